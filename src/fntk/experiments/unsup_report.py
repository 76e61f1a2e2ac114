"""Tables and the figure of ``fntk run unsup``: one wide Markdown table per metric (methods × (target,
m)), the paired differences to the linear probe on the same seeds, the chosen λ, and accuracy /
NLL against the labels per class, one panel per target. Pure functions of the summary rows and
records of results.json."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from fntk.experiments.common import pyplot, save_figure

#: metric → (scale, format) of the table cells (accuracy in %)
CELLS = {"accuracy": (100.0, ".1f"), "nll": (1.0, ".3f"), "ece": (1.0, ".3f"), "brier": (1.0, ".3f"),
         "seconds": (1.0, ".3g")}
TITLES = {"mnist": "MNIST (held-out)", "usps": "USPS", "sklearn": "sklearn digits"}
STYLES = {
    "probe": ("tab:gray", "--"),
    "fntk_map": ("tab:red", ":"),
    "fntk_laplace": ("tab:red", "-"),
    "fntk_cv": ("tab:orange", "-"),
    "finetune": ("tab:brown", "--"),
    "scratch": ("k", ":"),
}


def _grid(cols: list[tuple[str, int]], body: dict[str, list[str]]) -> str:
    head = "| method | " + " | ".join(f"{t} m={m}" for t, m in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    lines += [f"| {method} | " + " | ".join(cells) + " |" for method, cells in body.items()]
    return "\n".join(lines)


def wide_tables(
    rows: list[dict], targets: Sequence[str], ms: Sequence[int], methods: Sequence[str]
) -> dict[str, str]:
    """{metric: Markdown table}: a row per method, a column per (target, m), cells ``mean ± std``
    over seeds from the summary rows (``—`` where a method did not run; a single seed is marked
    ``(1 seed)`` instead of a zero std)."""
    index = {(r["target"], r["m"], r["method"]): r for r in rows}
    cols = [(t, m) for t in targets for m in ms]
    out = {}
    for metric, (scale, fmt) in CELLS.items():
        body = {}
        for method in methods:
            cells = []
            for t, m in cols:
                r = index.get((t, m, method))
                if r is None or r[metric] is None or not math.isfinite(r[metric]):
                    cells.append("—")
                elif r["count"] == 1:
                    cells.append(f"{scale * r[metric]:{fmt}} (1 seed)")
                else:
                    cells.append(f"{scale * r[metric]:{fmt}} ± {scale * r[metric + '_std']:{fmt}}")
            body[method] = cells
        out[metric] = _grid(cols, body)
    return out


def paired_tables(
    records: list[dict], targets: Sequence[str], ms: Sequence[int], methods: Sequence[str],
    reference: str = "probe",
) -> dict[str, str]:
    """{"accuracy_vs_probe", "nll_vs_probe": Markdown table}: per method and (target, m), the mean
    ± std over seeds of (method − reference) on the same seed (accuracy in points), with the number
    of seeds where it differs from one; the seeds a method did not run on are left out."""
    by = {(r["target"], r["m"], r["seed"], r["method"]): r for r in records}
    cols = [(t, m) for t in targets for m in ms]
    out = {}
    for metric in ("accuracy", "nll"):
        scale, fmt = CELLS[metric]
        body = {}
        for method in (mt for mt in methods if mt != reference):
            cells = []
            for t, m in cols:
                d = [scale * (r[metric] - by[(t, m, s, reference)][metric])
                     for (tt, mm, s, mt), r in by.items()
                     if (tt, mm, mt) == (t, m, method) and (t, m, s, reference) in by]
                if not d:
                    cells.append("—")
                    continue
                mean = sum(d) / len(d)
                std = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1)) if len(d) > 1 else 0.0
                spread = f" ± {std:{fmt}}" if len(d) > 1 else " (1 seed)"
                shown = round(mean, int(fmt[1:-1])) + 0.0  # no "-0.000"
                cells.append(f"{shown:+{fmt}}{spread}")
            body[method] = cells
        out[f"{metric}_vs_{reference}"] = _grid(cols, body)
    return out


def lambda_table(records: list[dict], targets: Sequence[str], ms: Sequence[int],
                 methods: Sequence[str] = ("fntk_laplace", "fntk_cv")) -> str:
    """The λ each fntk fit chose, per (target, m): the seeds' values in seed order."""
    cols = [(t, m) for t in targets for m in ms]
    body = {}
    for method in methods:
        cells = []
        for t, m in cols:
            lams = [r["lambda"] for r in sorted(records, key=lambda r: r["seed"])
                    if (r["target"], r["m"], r["method"]) == (t, m, method)]
            cells.append(" / ".join(f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-") for v in lams) or "—")
        body[method] = cells
    return _grid(cols, body)


def transfer_figure(
    rows: list[dict], targets: Sequence[str], ms: Sequence[int], methods: Sequence[str], out: Path,
    name: str = "unsup_transfer.png",
) -> Path:
    """Accuracy (top row) and NLL (bottom row, log scale) against labels per class, per target."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(targets), figsize=(4.2 * len(targets), 7), squeeze=False)
    for j, target in enumerate(targets):
        for i, metric in enumerate(("accuracy", "nll")):
            ax = axes[i][j]
            for method in methods:
                r = sorted((row for row in rows if row["method"] == method and row["target"] == target),
                           key=lambda row: row["m"])
                if not r:
                    continue
                color, ls = STYLES.get(method, (None, "-"))
                ax.errorbar([row["m"] for row in r], [row[metric] for row in r],
                            yerr=[row[metric + "_std"] for row in r], color=color, ls=ls, marker="o", ms=3,
                            capsize=2, label=method)
            ax.set_xscale("log")
            ax.set_xticks(list(ms))
            ax.set_xticklabels([str(m) for m in ms])
            ax.set_xlabel("labels per class m")
            ax.set_ylabel("test " + ("accuracy" if metric == "accuracy" else "NLL"))
            ax.set_title(TITLES.get(target, target))
            if metric == "nll":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Contrastive MNIST encoder → labelled digits")
    fig.tight_layout()
    return save_figure(fig, out, name)
