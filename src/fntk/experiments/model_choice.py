"""The NTK-GP methods shared by the regression experiments (sine, malaria, faces) and the comparison
of the model-choice criteria.

On every task one default regressor (``gp_model="auto"``, ``keep_candidates=True``) fits the
candidate set of :func:`fntk.gp.default_candidates` with hyperpriors and keeps every candidate, so
the choice of each criterion is scored on the same fits:

- ``ntk_gp``: the default, the candidate with the best leave-one-out predictive (``criterion="loo"``);
- ``ntk_gp_evidence``: the candidate with the best Laplace evidence (same fits);
- ``oracle``: the candidate with the lowest *test* NLL (what no criterion can beat; not a method);
- ``cand:<name>``: every candidate, with its scores;
- ``ntk_gp_marglik``: ``criterion="marglik", hyperprior=False``, the choice by the plain marginal
  likelihood of candidates fitted without hyperpriors (the over-fitting baseline of issue 16);
- ``ntk_gp_network``: ``mean="network"``, the plain NTK-GP that was the default before (f + b).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from torch import Tensor

from fntk.experiments.common import summarize
from fntk.gp import NTKRegressor
from fntk.gp.network import cached_diagonals
from fntk.linearize import Linearized
from fntk.ntk import cached_kernels

CRITERIA = {"ntk_gp": "loo", "ntk_gp_evidence": "evidence"}
METHODS = ("ntk_gp", "ntk_gp_evidence", "ntk_gp_marglik", "ntk_gp_network", "oracle")
CANDIDATE = "cand:"

Predict = Callable[[NTKRegressor, Any], "tuple[Tensor, Tensor]"]
Score = Callable[[Tensor, Tensor], dict]


def ntk_gp_records(lin: Linearized, x: Tensor, y: Tensor, xt: Any, predict: Predict, score: Score,
                   base: dict, variance_output: int | None = None, marglik: bool = True,
                   kw: dict | None = None) -> tuple[list[dict], NTKRegressor]:
    """Records (``base`` + method, metrics from ``score(mean, predictive variance)``, the chosen
    model and seconds) of the methods in the module docstring on one task; also the default
    regressor. ``predict(reg, xt)`` gives (mean, predictive variance); ``kw`` extra NTKRegressor
    options (e.g. ``output``); ``marglik=False`` skips ``ntk_gp_marglik``."""
    kw = dict(kw or {}, variance_output=variance_output)
    records: list[dict] = []

    def add(method: str, reg: NTKRegressor, seconds: float | None, **info: Any) -> dict:
        t0 = time.perf_counter()
        mean, var = predict(reg, xt)
        rec = {**base, "method": method, **score(mean, var), "model": reg.model_, **info}
        rec["seconds"] = None if seconds is None else seconds + time.perf_counter() - t0
        records.append(rec)
        return rec

    with cached_kernels(), cached_diagonals():  # one NTK of the task for every fit and prediction
        t0 = time.perf_counter()
        auto = NTKRegressor(lin, keep_candidates=True, **kw).fit(x, y)
        fit_seconds = time.perf_counter() - t0
        add("ntk_gp", auto, fit_seconds)
        cands = {name: add(CANDIDATE + name, reg, None, **{f"score_{k}": v for k, v in scores.items()})
                 for name, reg in auto.candidates_.items() for scores in [reg.model_scores_[name]]}
        best = max(auto.model_scores_, key=lambda m: _finite(auto.model_scores_[m]["evidence"]))
        records.append({**cands[best], "method": "ntk_gp_evidence", "seconds": None})
        oracle = min(cands, key=lambda m: _finite(cands[m]["nll"], math.inf))
        records.append({**cands[oracle], "method": "oracle", "seconds": None})
        if marglik:
            t0 = time.perf_counter()
            reg = NTKRegressor(lin, criterion="marglik", hyperprior=False, **kw).fit(x, y)
            add("ntk_gp_marglik", reg, time.perf_counter() - t0)
        t0 = time.perf_counter()
        add("ntk_gp_network", NTKRegressor(lin, mean="network", **kw).fit(x, y), time.perf_counter() - t0)
    return records, auto


def _finite(v: float, bad: float = -math.inf) -> float:
    return v if v is not None and math.isfinite(v) else bad


def choice_table(records: list[dict], by: tuple[str, ...], metrics: tuple[str, ...]
                 ) -> tuple[list[dict], str]:
    """Per group of ``by`` and candidate: its mean metrics over the tasks and how often each
    criterion (``ntk_gp``: LOO, ``ntk_gp_evidence``, ``ntk_gp_marglik``) chose it (a Markdown table)."""
    cand = [r for r in records if r["method"].startswith(CANDIDATE)]
    rows = summarize(cand, by + ("method",), metrics)
    chosen = {m: [r for r in records if r["method"] == m]
              for m in ("ntk_gp", "ntk_gp_evidence", "ntk_gp_marglik")}
    for row in rows:
        name = row["method"][len(CANDIDATE):]
        for m, recs in chosen.items():
            here = [r for r in recs if all(r[k] == row[k] for k in by)]
            row[f"chosen_{m}"] = sum(r["model"] == name for r in here) / len(here) if here else float("nan")
    head = "| " + " | ".join([*by, "candidate", *metrics, "chosen: loo", "evidence", "marglik"]) + " |"
    lines = [head, "|" + "---|" * (len(by) + len(metrics) + 4)]
    for r in rows:
        cells = [str(r[k]) for k in by] + [r["method"][len(CANDIDATE):]]
        cells += [f"{r[m]:.3g} ± {r[m + '_std']:.3g}" for m in metrics]
        cells += [f"{r['chosen_' + m]:.2f}" for m in chosen]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def main_records(records: list[dict]) -> list[dict]:
    """The records of the methods (candidates left out)."""
    return [r for r in records if not r["method"].startswith(CANDIDATE)]


__all__ = ["CRITERIA", "METHODS", "CANDIDATE", "ntk_gp_records", "choice_table", "main_records"]
