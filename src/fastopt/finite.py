"""Is every gradient value finite? The check behind "skip the step on NaN/Inf".

By default fastopt propagates non-finite gradients exactly as PyTorch does
(a NaN gradient makes NaN parameters). Training loops that prefer to drop
such a step (as mixed-precision loss scaling does) call :func:`all_finite`
first, or let the stateful optimizers do it with ``skip_nonfinite=True``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import dispatch
from .buffers import is_device_array

__all__ = ["all_finite"]

# Checked in slices so the temporary boolean mask stays in cache and a NaN
# near the start returns early.
_SLICE = 1 << 15


def all_finite(array: Any, *, backend: str | None = None) -> bool:
    """True when no element of ``array`` is NaN or +-Inf.

    Host arrays are checked here (no full-size temporary); device arrays go to
    the backend that owns them. Raises TypeError for anything else.
    """
    if isinstance(array, np.ndarray):
        if array.dtype.kind != "f":
            raise TypeError(f"array must have a floating dtype, got {array.dtype}")
        flat = array.reshape(-1)
        return all(np.isfinite(flat[i:i + _SLICE]).all() for i in range(0, flat.size, _SLICE))
    if is_device_array(array):
        module = dispatch.select(backend, on_device=True)  # a device backend: all_finite is in its contract
        return bool(module.all_finite(array))
    raise TypeError(f"array must be a numpy.ndarray or a __cuda_array_interface__ array, got {type(array).__name__}")
