"""The total norm of many gradients: one read pass, the same bits on every backend.

    norm = fastopt.total_norm([g1, g2, ...])       # sqrt of the sum of all squares

It is what ``torch.nn.utils.clip_grad_norm_`` computes before it scales the
gradients: with fastopt the scaling is not a pass of its own but the next
update's ``grad_multiplier`` (``min(1, max_norm / (norm + 1e-6))``, times a
loss scale's inverse), so clipping costs one read of the gradients.

The sum is reproducible: its order depends only on the tensors' sizes (blocks
of 4096 elements, 8 lanes each, blocks added in order: csrc/src/norm.c), so it
is bitwise the same for any thread count and on every host backend, and equal
to the NumPy reference's. It is accumulated in double, so it is at least as
accurate as torch's float32 norm. A NaN anywhere gives NaN, an Inf (and no
NaN) Inf: the same pass tells a loss scaler that a gradient overflowed.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import dispatch
from .buffers import SUPPORTED_DTYPES, is_device_array

__all__ = ["total_norm", "sum_of_squares", "sums_of_squares"]

Arrays = Union[Any, Sequence[Any]]


def _checked(arrays: Arrays) -> list:
    items = list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]
    for i, a in enumerate(items):
        name = f"arrays[{i}]" if isinstance(arrays, (list, tuple)) else "arrays"
        if type(a) is not np.ndarray:
            what = "a device array: total_norm runs on host arrays for now" if is_device_array(a) else type(a).__name__
            raise TypeError(f"{name} must be a numpy.ndarray, got {what}")
        if a.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64, got {a.dtype}")
        if a.dtype != items[0].dtype:
            raise TypeError(f"{name} has dtype {a.dtype}, expected {items[0].dtype} (the dtype of arrays[0])")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous (strides {a.strides} for shape {a.shape})")
    return items


def sum_of_squares(arrays: Arrays, *, backend: Optional[str] = None) -> float:
    """The sum of the squares of every element of ``arrays`` (one array, or a list
    or tuple of arrays of one float dtype), in double, in the reproducible order."""
    items = _checked(arrays)
    return dispatch.select(backend, False).sumsq_list(items)


def sums_of_squares(arrays: Arrays, *, backend: Optional[str] = None) -> tuple[float, np.ndarray]:
    """(the total, as :func:`sum_of_squares`; each array's own sum of squares, a
    float64 array): the per-tensor norms LAMB's and LARS's trust ratios need, from
    the same single pass, each in its own reproducible order."""
    items = _checked(arrays)
    each = np.zeros(len(items))
    total = dispatch.select(backend, False).sumsq_list(items, each)
    return total, each


def total_norm(arrays: Arrays, *, backend: Optional[str] = None) -> float:
    """The L2 norm of all elements of ``arrays`` together: ``sqrt(sum_of_squares(arrays))``."""
    return math.sqrt(sum_of_squares(arrays, backend=backend))
