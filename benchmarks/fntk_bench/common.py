"""Shared helpers for the benchmark scripts: timing, networks, RESULTS.md section writing."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parents[1] / "RESULTS.md"


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs (seconds), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def mlp(widths: list[int], act: type[nn.Module] = nn.Tanh, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """An MLP with the given layer widths, e.g. [2, 500, 500, 1]."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def write_section(title: str, body: str) -> None:
    """Replace (or append) the '## title' section of benchmarks/RESULTS.md."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    RESULTS.write_text(text)


def machine_note() -> str:
    import os
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} "
        "at the end (other jobs shared the cores: ratios are within one run)."
    )


def digits_args(doc: str):
    """The command line of the digit-transfer explorations (--data, --target, --ms, --seeds),
    parsed; also pins torch to one thread (the results are timed and compared across runs)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="folder laid out like shared/data")
    ap.add_argument("--target", default="sklearn", choices=("sklearn", "usps"))
    ap.add_argument("--ms", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--seeds", type=int, default=5)
    torch.set_num_threads(1)
    return ap.parse_args()
