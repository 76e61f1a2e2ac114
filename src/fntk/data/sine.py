"""The paper's synthetic regression family: sine waves (and linear functions as a source variant).

Following the paper's code (after Bayesian MAML, Yoon et al. 2018):

- sine task:   y = A sin(w x + b) + 0.01·A·ε,  A ~ U[0.1, 5], b ~ U[0, 2π], w ~ U[0.5, 2]
- linear task: y = A x + b + 0.3·ε,           A ~ U[-3, 3],  b ~ U[-3, 3]

with x ~ U[-5, 5] and ε ~ N(0, 1). The "linear → sine" transfer setting trains the source network on
a linear task and adapts to sine targets. All randomness comes from a seeded ``torch.Generator``,
so a (seed, arguments) pair always gives the same tensors.

Shapes: inputs are (n, 1) and targets (n,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

SINE_NOISE_FACTOR = 0.01  # noise std = 0.01 * amplitude (the paper's code)
LINEAR_NOISE_STD = 0.3
X_RANGE = (-5.0, 5.0)


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64))


@dataclass
class RegressionTask:
    """One regression task of the family.

    Attributes:
        kind: ``"sine"`` or ``"linear"``.
        params: the task's parameters: sine ``{"amplitude", "phase", "frequency"}``, linear
            ``{"slope", "intercept"}``.
        noise_std: standard deviation of the observation noise of ``y_train``.
        x_train: (n, 1) inputs drawn from U[-5, 5], sorted.
        y_train: (n,) noisy observations f(x_train) + noise.
        x_test: (m, 1) dense evaluation grid (``torch.linspace`` over ``test_range``).
        y_test: (m,) noiseless truth f(x_test).
    """

    kind: str
    params: dict[str, float]
    noise_std: float
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    extra: dict = field(default_factory=dict)

    def f(self, x: Tensor) -> Tensor:
        """The noiseless task function at x of shape (n, 1) or (n,); returns (n,)."""
        return task_function(self.kind, self.params, x)


def task_function(kind: str, params: dict[str, float], x: Tensor) -> Tensor:
    """Evaluate a task's noiseless function; x (n, 1) or (n,) → (n,)."""
    x = x.reshape(-1)
    if kind == "sine":
        return params["amplitude"] * torch.sin(params["frequency"] * x + params["phase"])
    if kind == "linear":
        return params["slope"] * x + params["intercept"]
    raise ValueError(f"kind must be 'sine' or 'linear', got {kind!r}")


def sample_params(kind: str, generator: torch.Generator) -> tuple[dict[str, float], float]:
    """Draw a task's parameters and its noise std from the family's prior."""
    if kind == "sine":
        amp = _uniform(generator, 0.1, 5.0)
        phase = _uniform(generator, 0.0, 2 * math.pi)
        freq = _uniform(generator, 0.5, 2.0)
        return {"amplitude": amp, "phase": phase, "frequency": freq}, SINE_NOISE_FACTOR * amp
    if kind == "linear":
        slope = _uniform(generator, -3.0, 3.0)
        intercept = _uniform(generator, -3.0, 3.0)
        return {"slope": slope, "intercept": intercept}, LINEAR_NOISE_STD
    raise ValueError(f"kind must be 'sine' or 'linear', got {kind!r}")


def sample_task(
    n_train: int,
    seed: int | torch.Generator = 0,
    kind: str = "sine",
    n_test: int = 200,
    test_range: tuple[float, float] = X_RANGE,
    params: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float32,
) -> RegressionTask:
    """Draw one task and its data.

    Args:
        n_train: number of noisy training points, x ~ U[-5, 5] (sorted).
        seed: an int seed or a ``torch.Generator`` (advanced in place, for drawing many tasks).
        kind: ``"sine"`` or ``"linear"``.
        n_test: size of the dense test grid.
        test_range: the grid's interval (the paper's figures extrapolate to [-6.5, 6.5]).
        params: fix the task's parameters instead of drawing them (noise std follows the kind).
        dtype: floating dtype of the returned tensors.

    Returns:
        A :class:`RegressionTask` with x_train (n_train, 1), y_train (n_train,), x_test (n_test, 1),
        y_test (n_test,) noiseless.
    """
    if n_train < 0 or n_test < 1:
        raise ValueError(f"need n_train >= 0 and n_test >= 1, got {n_train}, {n_test}")
    g = _generator(seed)
    drawn, noise_std = sample_params(kind, g)
    if params is not None:
        drawn = dict(params)
        noise_std = SINE_NOISE_FACTOR * drawn["amplitude"] if kind == "sine" else LINEAR_NOISE_STD
    lo, hi = X_RANGE
    x = lo + (hi - lo) * torch.rand(n_train, generator=g, dtype=torch.float64)
    x = torch.sort(x).values
    eps = torch.randn(n_train, generator=g, dtype=torch.float64)
    y = task_function(kind, drawn, x) + noise_std * eps
    xt = torch.linspace(test_range[0], test_range[1], n_test, dtype=torch.float64)
    yt = task_function(kind, drawn, xt)
    return RegressionTask(
        kind=kind,
        params=drawn,
        noise_std=noise_std,
        x_train=x.unsqueeze(-1).to(dtype),
        y_train=y.to(dtype),
        x_test=xt.unsqueeze(-1).to(dtype),
        y_test=yt.to(dtype),
    )


def sample_tasks(
    num_tasks: int,
    n_train: int,
    seed: int | torch.Generator = 0,
    kind: str = "sine",
    **kwargs,
) -> list[RegressionTask]:
    """``num_tasks`` independent tasks from one generator (keyword arguments as :func:`sample_task`)."""
    g = _generator(seed)
    return [sample_task(n_train, g, kind=kind, **kwargs) for _ in range(num_tasks)]


def transfer_tasks(
    num_targets: int,
    n_source: int = 100,
    n_target: int = 10,
    seed: int = 0,
    source_kind: str = "sine",
    num_sources: int = 1,
    n_test: int = 200,
    test_range: tuple[float, float] = X_RANGE,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[RegressionTask], list[RegressionTask]]:
    """Source task(s) and sine target tasks for one seed of the transfer experiment.

    Args:
        num_targets: T, the number of sine target tasks.
        n_source: training points per source task.
        n_target: labelled points per target task (the paper's nx, default 10).
        seed: one seed fixes everything; the source tasks are drawn first, then the targets.
        source_kind: ``"sine"`` (the paper's main setting) or ``"linear"`` (linear → sine).
        num_sources: number of source tasks (ABLR trains jointly over all; the source network
            usually uses the first).

    Returns:
        ``(sources, targets)``: lists of :class:`RegressionTask`.
    """
    g = _generator(seed)
    common = {"n_test": n_test, "test_range": test_range, "dtype": dtype}
    sources = [sample_task(n_source, g, kind=source_kind, **common) for _ in range(num_sources)]
    targets = [sample_task(n_target, g, kind="sine", **common) for _ in range(num_targets)]
    return sources, targets


def stack_tasks(tasks: Sequence[RegressionTask]) -> tuple[Tensor, Tensor]:
    """Concatenate the training data of several tasks: (Σn, 1) inputs and (Σn,) targets."""
    return torch.cat([t.x_train for t in tasks]), torch.cat([t.y_train for t in tasks])
