"""The torch settings every fntk call on a model runs under, set for the call and restored after.

Inside :func:`evaluation_scope`:

- **the fused attention fast paths are off** (``torch.backends.mha.set_fastpath_enabled(False)``):
  ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode otherwise call
  ``_native_multi_head_attention`` / ``_transformer_encoder_layer_fwd`` (no forward-mode AD, and a
  padding mask turns the activations into nested tensors, which vmap cannot batch);
- **scaled-dot-product attention uses the math kernel** (``sdpa_kernel(SDPBackend.MATH)``): the
  CPU flash kernel has no forward-mode AD and no double backward;
- **torch.utils.checkpoint runs its function directly**: checkpointing trades memory for
  recomputation and never changes a value, but its saved-tensor hooks (non-reentrant) and its
  autograd.Function without ``setup_context`` (reentrant) fail under ``torch.func``. Both
  variants are replaced by a plain call of the checkpointed function (``checkpoint_calls`` counts
  how often that happened, so probes can report it).

These are process-wide torch settings, so the scope is reference-counted: the first fntk call to
enter saves the settings, the last to leave restores them, also when a call raises. While any
fntk call runs, other threads of the process see the same settings (their results are unchanged:
the math kernels compute the same attention, a direct call the same checkpointed function).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.utils.checkpoint as _ckpt
from torch.nn.attention import SDPBackend, sdpa_kernel

_lock = threading.Lock()
_depth = 0
_saved: tuple | None = None
_calls = [0]


class _DirectCheckpointFunction:
    """Stand-in for ``torch.utils.checkpoint.CheckpointFunction``: ``apply`` calls the function."""

    @staticmethod
    def apply(function, _preserve_rng_state, *args):
        _calls[0] += 1
        return function(*args)


def _direct_generator(fn, preserve_rng_state=True, context_fn=None, determinism_check=None,
                      debug=False, early_stop=True, *args, **kwargs):
    """Stand-in for the non-reentrant checkpoint's generator (checkpoint() runs it to its one yield,
    calls fn, then expects it to finish): no saved-tensor hooks."""
    _calls[0] += 1
    yield


def checkpoint_calls() -> int:
    """How many checkpointed calls ran directly inside fntk's scopes so far (a process counter)."""
    return _calls[0]


def _enter() -> tuple:
    stack = contextlib.ExitStack()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    stack.callback(torch.backends.mha.set_fastpath_enabled, fast)
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    for name, repl in (("CheckpointFunction", _DirectCheckpointFunction),
                       ("_checkpoint_without_reentrant_generator", _direct_generator)):
        if hasattr(_ckpt, name):  # absent in another torch version: probes then refuse clearly
            stack.callback(setattr, _ckpt, name, getattr(_ckpt, name))
            setattr(_ckpt, name, repl)
    return (stack,)


@contextlib.contextmanager
def evaluation_scope() -> Iterator[None]:
    """Run the block with fntk's torch settings (see the module doc); re-entrant, thread-safe."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = _enter()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                stack, _saved = _saved[0], None
                stack.close()


__all__ = ["evaluation_scope", "checkpoint_calls"]
