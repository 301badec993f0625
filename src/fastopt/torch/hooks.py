"""torch.optim's step hooks and profiler range around ``step()``, without their fixed cost.

``torch.optim.Optimizer.__init__`` wraps every subclass's ``step`` in
``Optimizer.profile_hook_step``: the global and per-optimizer step pre- and
post-hooks (``register_step_pre_hook``, ``register_optimizer_step_post_hook``,
...), a ``record_function("Optimizer.step#<Class>.step")`` range for the
profiler, and ``_optimizer_step_code()`` for the profiler's Python tracer.
The range alone costs ~5 us per step, opened even when no profiler runs:
more than a whole fused step of a small model (measured here, 2^10 float32
AdamW: 6 us for torch's wrapper around an empty ``step``; the fastopt step
itself is ~2 us).

:func:`hooked_step` is the same wrapper, in the same order, opening the
range only while a profiler is recording (``torch.autograd._profiler_enabled``,
true under ``torch.profiler.profile`` and the legacy profiler alike). It
marks the step ``hooked``, so torch's ``_patch_step_function`` leaves it as
it is. Where this torch lacks the pieces it relies on (private names of
``torch.optim.optimizer``), it is torch's own wrapper.
"""
from __future__ import annotations

import functools
from itertools import chain
from typing import Any, Callable

import torch
import torch.optim.optimizer as _optimizer

__all__ = ["hooked_step"]

_PRE = getattr(_optimizer, "_global_optimizer_pre_hooks", None)
_POST = getattr(_optimizer, "_global_optimizer_post_hooks", None)
_PROFILING = getattr(torch.autograd, "_profiler_enabled", None)


def hooked_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` wrapped as ``torch.optim.Optimizer.profile_hook_step`` wraps it (see the module docstring)."""
    if _PRE is None or _POST is None or _PROFILING is None:  # (another torch: its own wrapper)
        wrapped = torch.optim.Optimizer.profile_hook_step(step)
        wrapped.hooked = True
        return wrapped

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = args[0]
        if _PROFILING():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _hooks_around(step, self, args, kwargs)
        # (what _hooks_around does, inline: a call fewer on every step)
        pre, post = self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks
        if _PRE or pre or post or _POST:
            return _hooks_around(step, self, args, kwargs)
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True
    return wrapper


def _hooks_around(step: Callable[..., Any], self: Any, args: tuple, kwargs: dict) -> Any:
    for hook in chain(_PRE.values(), self._optimizer_step_pre_hooks.values()):
        result = hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), "
                                   f"but got {result}.")
    out = step(*args, **kwargs)
    self._optimizer_step_code()
    for hook in chain(self._optimizer_step_post_hooks.values(), _POST.values()):
        hook(self, args, kwargs)
    return out
