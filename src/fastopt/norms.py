"""Norms of many gradients: one read pass, the same bits on every backend.

    norm = fastopt.total_norm([g1, g2, ...])                 # sqrt of the sum of all squares
    norm = fastopt.total_norm([g1, g2, ...], math.inf)      # the largest |g|

It is what ``torch.nn.utils.clip_grad_norm_`` computes before it scales the
gradients: with fastopt the scaling is not a pass of its own but the next
update's ``grad_multiplier`` (``min(1, max_norm / (norm + 1e-6))``, times a
loss scale's inverse), so clipping costs one read of the gradients.

The sum is reproducible: its order depends only on the tensors' sizes (blocks
of 4096 elements, 8 lanes each, blocks added in order: csrc/src/norm.c), so it
is bitwise the same for any thread count and on every backend (the CUDA one
included), and equal to the NumPy reference's. It is accumulated in double, so
it is at least as accurate as torch's float32 norm. The inf norm,
:func:`max_abs`, is exact (max |x| of float32 or float64 values is one of them,
as a double) in any order. A NaN anywhere gives NaN (for max_abs always the
quiet NaN ``float('nan')``, bits 0x7ff8000000000000), an Inf (and no NaN) Inf:
the same pass tells a loss scaler that a gradient overflowed. (A sum of
squares of finite float64 values above ~1e154 can also overflow to Inf;
max_abs is finite exactly when every value is.)

Arrays: one array, or a list or tuple of arrays of one float dtype, all on the
host (NumPy) or all on a GPU (``__cuda_array_interface__``, or the CUDA
simulator's arrays): device arrays go to the ``cuda`` backend, which computes
the block results on the GPU and combines them on the host (it synchronises).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import dispatch
from .buffers import SUPPORTED_DTYPES, _device_extent, is_device_array

__all__ = ["total_norm", "sum_of_squares", "sums_of_squares", "max_abs", "max_abs_each"]

Arrays = Union[Any, Sequence[Any]]


def _checked(arrays: Arrays) -> tuple[list, bool]:
    """(the arrays as a list, whether they are device arrays), or TypeError/ValueError naming the array."""
    items = list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]
    on_device = bool(items) and is_device_array(items[0])
    dtype0 = None
    for i, a in enumerate(items):
        name = f"arrays[{i}]" if isinstance(arrays, (list, tuple)) else "arrays"
        if on_device:
            if not is_device_array(a):
                what = "a numpy.ndarray on the host" if isinstance(a, np.ndarray) else f"a {type(a).__name__}"
                raise TypeError(f"{name} is {what} but arrays[0] is a device array; "
                                "all arrays of one norm must be on the same device")
            dtype = _device_extent(name, a, False)[3]  # dtype and C-contiguity checked there
        else:
            if type(a) is not np.ndarray:
                if is_device_array(a):
                    raise TypeError(f"{name} is a device array but arrays[0] is a numpy.ndarray on the host; "
                                    "all arrays of one norm must be on the same device")
                raise TypeError(f"{name} must be a numpy.ndarray or a __cuda_array_interface__ array, "
                                f"got {type(a).__name__}")
            dtype = a.dtype
            if dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name} must have dtype float32 or float64, got {dtype}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous (strides {a.strides} for shape {a.shape})")
        if dtype0 is None:
            dtype0 = dtype
        elif dtype != dtype0:
            raise TypeError(f"{name} has dtype {dtype}, expected {dtype0} (the dtype of arrays[0])")
    return items, on_device


def sum_of_squares(arrays: Arrays, *, backend: Optional[str] = None) -> float:
    """The sum of the squares of every element of ``arrays`` (one array, or a list
    or tuple of arrays of one float dtype, on the host or on a GPU), in double, in
    the reproducible order."""
    items, on_device = _checked(arrays)
    return dispatch.select(backend, on_device).sumsq_list(items)


def sums_of_squares(arrays: Arrays, *, backend: Optional[str] = None) -> tuple[float, np.ndarray]:
    """(the total, as :func:`sum_of_squares`; each array's own sum of squares, a
    float64 array): the per-tensor norms LAMB's and LARS's trust ratios need, from
    the same single pass, each in its own reproducible order."""
    items, on_device = _checked(arrays)
    each = np.zeros(len(items))
    total = dispatch.select(backend, on_device).sumsq_list(items, each)
    return total, each


def max_abs(arrays: Arrays, *, backend: Optional[str] = None) -> float:
    """The largest magnitude ``max |x|`` over every element of ``arrays`` (as
    :func:`sum_of_squares` takes them), as a float (exact): the inf norm; 0.0 when
    there are no elements; ``float('nan')`` when any element is NaN."""
    items, on_device = _checked(arrays)
    return dispatch.select(backend, on_device).maxabs_list(items)


def max_abs_each(arrays: Arrays, *, backend: Optional[str] = None) -> tuple[float, np.ndarray]:
    """(the total, as :func:`max_abs`; each array's own max |x|, a float64 array,
    0.0 for an empty array and NaN for one holding a NaN), from one pass."""
    items, on_device = _checked(arrays)
    each = np.zeros(len(items))
    total = dispatch.select(backend, on_device).maxabs_list(items, each)
    return total, each


def total_norm(arrays: Arrays, norm_type: float = 2.0, *, backend: Optional[str] = None) -> float:
    """The norm of all elements of ``arrays`` together, torch's ``clip_grad_norm_``
    total norm: ``norm_type=2.0`` (default) the L2 norm, ``sqrt(sum_of_squares(arrays))``;
    ``norm_type=math.inf`` the max norm, :func:`max_abs`. Other norm types raise ValueError."""
    if isinstance(norm_type, (int, float, np.integer, np.floating)) and not isinstance(norm_type, (bool, np.bool_)):
        if norm_type == 2.0:
            return math.sqrt(sum_of_squares(arrays, backend=backend))
        if norm_type == math.inf:
            return max_abs(arrays, backend=backend)
    raise ValueError(f"norm_type must be 2.0 (the L2 norm) or math.inf (the max norm), got {norm_type!r}")
