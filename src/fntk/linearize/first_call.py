"""What a :class:`~fntk.Linearized` learns on its first call with data: the output size k and the
activation size per point (one forward on x[0]), then the capability probes (:mod:`.probes`) on a
small probe batch. Runs once, holding the object's lock; refuses inputs and models that cannot
work with a message naming the argument."""

from __future__ import annotations

import torch
from torch import Tensor

from fntk import inputs
from fntk.inputs import Inputs
from fntk.linearize import checks, probes, scope


def _forward_fails(x: Inputs, name: str, err: Exception, what: str) -> ValueError:
    hint = ""
    if isinstance(x, Tensor) and x.dim() == 1:
        hint = (f"; {name} is 1-d, so each of its {x.shape[0]} entries is one point with no feature "
                f"axis: for one feature per point pass {name}[:, None] (shape ({x.shape[0]}, 1))")
    return ValueError(
        f"{name} ({inputs.describe(x)}) does not fit the model: the forward pass on {what} "
        f"failed with {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}{hint}"
    )


def _shapes(lin, x: Inputs, name: str) -> None:
    """One forward on a single point: k, the activation size; rejects bad shapes and outputs early."""
    counts: list[int] = []

    def hook(_m, _i, out):
        if isinstance(out, Tensor):
            counts.append(out.numel())

    handles = [m.register_forward_hook(hook) for m in lin.module.modules()]
    try:
        with torch.no_grad():
            out = lin.function(x[:1])(lin.theta_dict())
    except (RuntimeError, IndexError) as err:
        raise _forward_fails(x, name, err, "its first point") from err
    finally:
        for h in handles:  # hooks live on our private copy, and are removed again
            h.remove()
    checks.check_outputs(out, f"on the first point of {name}")
    lin._k = int(out.shape[1])
    lin._feature_shape = inputs.feature_shape(x)
    lin._act_per_example = max(int(sum(counts)), lin._k, 1)


def setup(lin, x: Inputs, name: str) -> None:
    """Shapes from one point (unless known, e.g. after loading), then the probes on ≤ 3 points; a
    refusal leaves ``lin`` as it was (a later call with good data probes afresh)."""
    known = (lin._k, lin._feature_shape, lin._act_per_example)
    try:
        _setup(lin, x, name)
    except BaseException:
        lin._k, lin._feature_shape, lin._act_per_example = known
        raise


def _setup(lin, x: Inputs, name: str) -> None:
    if lin._k is None or lin._feature_shape is None or lin._act_per_example is None:
        _shapes(lin, x, name)
    xb = checks.probe_batch(x, probes.PROBE_POINTS)
    try:
        with torch.no_grad():
            out = lin.function(xb)(lin.theta_dict())
    except (RuntimeError, IndexError) as err:
        raise _forward_fails(x, name, err, f"a batch of {xb.shape[0]} of its points") from err
    if xb.shape[0] > min(x.shape[0], probes.PROBE_POINTS) and not bool(torch.isfinite(out[-1]).all()):
        xb, out = xb[:1], out[:1]  # the perturbed copy left the model's domain: probe the real point
    checks.check_outputs(out, f"on the first points of {name}")
    calls = scope.checkpoint_calls()
    caps = probes.probe(lin._target(), xb)
    caps.checkpoint = scope.checkpoint_calls() > calls
    lin._probe_x, lin._caps = xb, caps


__all__ = ["setup"]
