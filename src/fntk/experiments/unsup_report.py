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


def _paired(records: list[dict], target: str, method: str, metric: str, reference: str = "probe"):
    """[(m, mean, std, seeds)] of (method − reference) on the same seeds, in increasing m."""
    ref = {(r["m"], r["seed"]): r[metric] for r in records
           if r["target"] == target and r["method"] == reference}
    diffs: dict[int, list[float]] = {}
    for r in records:
        if r["target"] == target and r["method"] == method and (r["m"], r["seed"]) in ref:
            diffs.setdefault(r["m"], []).append(r[metric] - ref[(r["m"], r["seed"])])
    out = []
    for m in sorted(diffs):
        d = diffs[m]
        mean = sum(d) / len(d)
        std = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1)) if len(d) > 1 else 0.0
        out.append((m, mean, std, len(d)))
    return out


def transfer_figure(
    rows: list[dict], records: list[dict], targets: Sequence[str], ms: Sequence[int], methods: Sequence[str],
    out: Path, name: str = "unsup_transfer.png",
) -> Path:
    """Per target (columns): test accuracy against labels per class (top), and the paired
    differences to the linear probe on the same seeds, accuracy (middle) and NLL (bottom), for the
    methods that start from the probe. Points from a single seed are drawn hollow."""
    plt = pyplot()
    fig, axes = plt.subplots(3, len(targets), figsize=(4.2 * len(targets), 9.5), squeeze=False)
    near = [mt for mt in methods if mt not in ("probe", "scratch")]
    for j, target in enumerate(targets):
        ax = axes[0][j]
        for method in methods:
            r = sorted((row for row in rows if row["method"] == method and row["target"] == target),
                       key=lambda row: row["m"])
            if not r:
                continue
            color, ls = STYLES.get(method, (None, "-"))
            ax.errorbar([row["m"] for row in r], [row["accuracy"] for row in r],
                        yerr=[row["accuracy_std"] for row in r], color=color, ls=ls, marker="o", ms=3,
                        capsize=2, label=method)
            single = [row for row in r if row["count"] == 1]
            ax.plot([row["m"] for row in single], [row["accuracy"] for row in single], "o", ms=6,
                    mfc="white", color=color)
        ax.set_ylabel("test accuracy")
        ax.set_title(TITLES.get(target, target))
        for i, (metric, label) in enumerate((("accuracy", "accuracy − probe"), ("nll", "NLL − probe")), 1):
            ax = axes[i][j]
            ax.axhline(0.0, color="tab:gray", ls="--", lw=1)
            for method in near:
                d = _paired(records, target, method, metric)
                if not d:
                    continue
                color, ls = STYLES.get(method, (None, "-"))
                ax.errorbar([v[0] for v in d], [v[1] for v in d], yerr=[v[2] for v in d], color=color, ls=ls,
                            marker="o", ms=3, capsize=2, label=method)
                single = [v for v in d if v[3] == 1]
                ax.plot([v[0] for v in single], [v[1] for v in single], "o", ms=6, mfc="white", color=color)
            ax.set_ylabel(f"test {label} (same seeds)")
        for ax in (axes[0][j], axes[1][j], axes[2][j]):
            ax.set_xscale("log")
            ax.set_xticks(list(ms))
            ax.set_xticklabels([str(m) for m in ms])
        axes[2][j].set_xlabel("labels per class m")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle("Contrastive MNIST encoder → labelled digits (hollow: one seed)")
    fig.tight_layout()
    return save_figure(fig, out, name)
