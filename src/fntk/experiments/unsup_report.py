"""Tables and the figure of ``fntk run unsup``: one wide Markdown table per metric (methods × (target,
m)) and accuracy / NLL against the labels per class, one panel per target."""

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


def wide_tables(
    rows: list[dict], targets: Sequence[str], ms: Sequence[int], methods: Sequence[str]
) -> dict[str, str]:
    """{metric: Markdown table}: a row per method, a column per (target, m), cells ``mean ± std``
    over seeds from the summary rows (``—`` where a method did not run)."""
    index = {(r["target"], r["m"], r["method"]): r for r in rows}
    cols = [(t, m) for t in targets for m in ms]
    out = {}
    for metric, (scale, fmt) in CELLS.items():
        head = "| method | " + " | ".join(f"{t} m={m}" for t, m in cols) + " |"
        lines = [head, "|---|" + "---|" * len(cols)]
        for method in methods:
            cells = []
            for t, m in cols:
                r = index.get((t, m, method))
                if r is None or r[metric] is None or not math.isfinite(r[metric]):
                    cells.append("—")
                else:
                    cells.append(f"{scale * r[metric]:{fmt}} ± {scale * r[metric + '_std']:{fmt}}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        out[metric] = "\n".join(lines)
    return out


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
