"""What every experiment shares: run configuration, result tables, results.json, source caches."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from fntk import baselines, distributed, persist
from fntk.data.nets import heteroscedastic_nll


@dataclass
class RunConfig:
    """Options common to all experiments (the CLI's ``run`` flags)."""

    out: Path
    data: Path | None = None
    seed: int = 0
    quick: bool = False
    cache: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.cache is None:
            env = os.environ.get("FNTK_CACHE")
            self.cache = Path(env) if env else self.out / "cache"
        self.cache = Path(self.cache)

    def check(self) -> None:
        """Refuse, before anything is trained, an ``out`` or ``cache`` that is not a creatable,
        writable folder, and a ``data`` that is a file (ValueError naming the option); creates ``out``
        and ``cache``."""
        for flag, folder in (("--out", self.out), ("cache folder ($FNTK_CACHE or --out/cache)", self.cache)):
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"{flag} {str(folder)!r} exists and is not a folder; choose another path")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"{flag} {str(folder)!r} cannot be created: {err.strerror or err}") from err
            if not os.access(folder, os.W_OK):
                raise ValueError(f"{flag} {str(folder)!r} is not writable")
        # a missing --data is reported by the data loaders, naming the file they expected
        if self.data is not None and Path(self.data).exists() and not Path(self.data).is_dir():
            raise ValueError(
                f"--data {str(self.data)!r} is not a folder (expected one laid out like shared/data)"
            )


def experiment_grid(cfg: RunConfig, quick: dict[str, Any], full: dict[str, Any]) -> tuple[dict, list[int]]:
    """(grid, seeds) of an experiment run: ``quick`` or ``full`` as ``cfg.quick`` says, with the entries
    ``cfg.extra`` names overridden, and the ``grid["seeds"]`` seeds cfg.seed, cfg.seed + 1, ..."""
    grid = dict(quick if cfg.quick else full)
    grid.update({k: v for k, v in cfg.extra.items() if k in grid})
    return grid, [cfg.seed + i for i in range(grid["seeds"])]


def progress(it: Iterable, desc: str, total: int | None = None) -> Iterable:
    """A tqdm progress bar on the main rank only (stderr), silent elsewhere."""
    return tqdm(it, desc=desc, total=total, leave=False, disable=not distributed.is_main())


T = TypeVar("T")


def cached(path: Path, read: Callable[[Any], T], build: Callable[[], T], dump: Callable[[T], Any]) -> T:
    """``read(torch.load(path))`` if the cache entry ``path`` exists and reads, else ``build()``,
    stored as ``torch.save(dump(value))``.

    An entry that cannot be read (truncated or corrupt, e.g. a run killed while an older fntk wrote
    it) or that ``read`` rejects (it raises: other names or shapes) is reported on stderr by name,
    removed and rebuilt. Entries are written atomically (:func:`fntk.persist.atomic_write`), on the
    main rank only."""
    path = Path(path)
    if path.exists():
        try:
            return read(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as err:  # any unreadable entry: truncated zip, bad pickle, wrong contents
            why = " ".join(str(err).split())[:160] or type(err).__name__
            if distributed.is_main():
                msg = f"fntk: cache entry {path} is corrupt ({why}); removed, rebuilding it"
                tqdm.write(msg, file=sys.stderr)
                path.unlink(missing_ok=True)
    value = build()
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = dump(value)
        persist.atomic_write(path, lambda fh: torch.save(data, fh), "cache")
    return value


def load_matching(model: torch.nn.Module, state: Any) -> torch.nn.Module:
    """``model.load_state_dict(state)`` after checking that ``state`` is a state dict with exactly
    ``model``'s names and shapes (ValueError otherwise, leaving ``model`` untouched)."""
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in state.items()}
    if got != expected:
        raise ValueError("its parameter names or shapes differ from the network's")
    model.load_state_dict(state)
    return model


def cached_state(cache: Path, key: str, train: Callable[[], torch.nn.Module], model: torch.nn.Module):
    """``model`` with the weights of ``cache/key.pt`` if that entry is valid, else ``train()`` (its
    weights then cached; see :func:`cached`: corrupt entries are reported, removed and rebuilt)."""
    return cached(Path(cache) / f"{key}.pt", lambda state: load_matching(model, state), train,
                  lambda trained: trained.state_dict())


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s


def summarize(records: list[dict[str, Any]], by: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Group per-seed/task records by the ``by`` keys and give mean and std of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for rec in records:
        groups.setdefault(tuple(rec[k] for k in by), []).append(rec)
    rows = []
    for key, recs in groups.items():
        row = dict(zip(by, key))
        for m in metrics:
            vals = [r[m] for r in recs if r.get(m) is not None and math.isfinite(r[m])]
            row[m], row[m + "_std"] = mean_std(vals) if vals else (float("nan"), float("nan"))
        row["count"] = len(recs)
        rows.append(row)
    return rows


def format_table(rows: list[dict], by: tuple[str, ...], metrics: tuple[str, ...], digits: int = 3) -> str:
    """A Markdown table: one row per group, ``mean ± std`` per metric."""
    head = "| " + " | ".join([*by, *metrics]) + " |"
    sep = "|" + "---|" * (len(by) + len(metrics))
    lines = [head, sep]
    for r in rows:
        cells = [str(r[k]) for k in by]
        cells += [f"{r[m]:.{digits}g} ± {r[m + '_std']:.{digits}g}" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(
    records: list[dict[str, Any]], by: tuple[str, ...], metrics: tuple[str, ...]
) -> tuple[list[dict], str]:
    """(:func:`summarize` rows, their :func:`format_table` Markdown table)."""
    rows = summarize(records, by, metrics)
    return rows, format_table(rows, by, metrics)


def errorbars_by_method(ax, rows: list[dict], methods: Iterable[str], x: str, metric: str) -> None:
    """One error-bar line per method on a matplotlib axis: ``metric`` ± ``metric_std`` of the
    summary rows against their ``x`` key, in increasing x."""
    for method in methods:
        r = sorted((row for row in rows if row["method"] == method), key=lambda row: row[x])
        ys, errs = [row[metric] for row in r], [row[metric + "_std"] for row in r]
        ax.errorbar([row[x] for row in r], ys, yerr=errs, marker="o", capsize=3, label=method)


def write_results(out: Path, results: dict[str, Any]) -> Path:
    """results.json in ``out`` (main rank only); non-finite floats become null."""

    def clean(o):
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, torch.Tensor):
            return clean(o.tolist())
        if isinstance(o, Path):
            return str(o)
        return o

    path = Path(out) / "results.json"
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(clean(results), indent=2).encode()
        persist.atomic_write(path, lambda fh: fh.write(text), "results")
    return path


def say(*args: Any) -> None:
    """print on the main rank only."""
    if distributed.is_main():
        print(*args, flush=True)


def finish(cfg: RunConfig, results: dict[str, Any], start: float, wrote: str) -> dict[str, Any]:
    """Close a run: add ``wall_seconds`` (since ``start``, a ``time.perf_counter()``) to ``results``,
    write results.json to ``cfg.out`` and say so (``wrote`` names what else was written)."""
    results["wall_seconds"] = time.perf_counter() - start
    write_results(cfg.out, results)
    say(f"wrote {cfg.out / 'results.json'} and {wrote}")
    return results


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (restored afterwards); ``None`` leaves it.

    Small networks (the sine and linearity nets) run many tiny kernels for which intra-op threads
    only add synchronisation; on a shared, busy machine one thread is many times faster.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def residual_variance(pred: torch.Tensor, y: torch.Tensor, floor: float = 1e-4) -> float:
    """Mean squared residual of a point predictor on the data it was fitted to, floored.

    The predictive variance given to methods without their own uncertainty (source network,
    fine-tuning): a homoscedastic Gaussian whose variance is the training residual.
    """
    r = (pred.detach().reshape(-1).double() - y.detach().reshape(-1).double()).square().mean()
    return max(float(r), floor)


def save_figure(fig, out: Path, name: str) -> Path:
    """Save a matplotlib figure as ``out/name`` (PNG, 120 dpi) on the main rank and close it."""
    import matplotlib.pyplot as plt

    path = Path(out) / name
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        persist.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"),
                             "figure")
    plt.close(fig)
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class TrainingBar(list):
    """A list for ``fntk.baselines.finetune(history=...)`` that ticks a progress bar per epoch.

    ``finetune`` appends each epoch's mean loss to ``history``; this list shows it live (main rank).
    """

    def __init__(self, desc: str, total: int):
        super().__init__()
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=not distributed.is_main())

    def append(self, value: float) -> None:
        super().append(value)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{value:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def default_threads(cfg: RunConfig) -> int:
    """Torch threads for an experiment: ``cfg.extra["threads"]``, else ``$FNTK_THREADS``, else 1.

    One thread by default: measured on the shared 2-core development machine, the experiments' many
    small and medium kernels ran 3-15x faster single-threaded than with both cores contended.
    """
    return int(cfg.extra.get("threads", os.environ.get("FNTK_THREADS", 1)))


def train_heteroscedastic_source(
    cfg: RunConfig, net: torch.nn.Module, data: dict, key: str, epochs: int, lr: float, batch_size: int,
    seed: int, label: str,
) -> torch.nn.Module:
    """``net`` (a mean + raw-variance head) trained on ``data["x_source"], data["y_source"]`` by the
    heteroscedastic Gaussian NLL with Adam, with a progress bar; cached under ``key``; eval mode."""
    def train() -> torch.nn.Module:
        bar = TrainingBar(f"{label} source net seed {seed}", epochs)
        trained = baselines.finetune(
            net, data["x_source"], data["y_source"], "all", heteroscedastic_nll, epochs, lr,
            seed=seed, batch_size=batch_size, history=bar,
        )
        bar.close()
        return trained

    return cached_state(cfg.cache, key, train, net).eval()
