"""Checking the buffers of one update before anything is written.

An update takes a parameter buffer, a gradient and the rule's state buffers.
They must all live on the same side (host NumPy arrays, or device arrays that
export ``__cuda_array_interface__``), share one shape and one float dtype, be
C-contiguous, and never overlap: the kernels stream through them once and in
parallel, so an overlap would make the result depend on the schedule. Every
buffer except the gradient is written, so those must be writable; a
read-only gradient is fine.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["SUPPORTED_DTYPES", "check_buffers", "device_interface", "is_device_array"]

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DTYPE_NAMES = "float32 or float64"


def _simulator_array(obj: Any) -> bool:
    # Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) wraps a host NumPy array
    # in a FakeCUDAArray that exports no __cuda_array_interface__.
    return getattr(obj, "__cuda_ndarray__", False) and isinstance(getattr(obj, "_ary", None), np.ndarray)


def is_device_array(obj: Any) -> bool:
    if isinstance(obj, np.ndarray):
        return False
    try:
        return hasattr(obj, "__cuda_array_interface__") or _simulator_array(obj)
    except RuntimeError:
        # torch raises RuntimeError (not AttributeError) for a CUDA tensor that
        # requires grad: it is a device array.
        return True


def device_interface(obj: Any) -> dict:
    """The ``__cuda_array_interface__`` dict of a device array.

    A torch CUDA tensor with ``requires_grad=True`` refuses to export it; its
    ``detach()`` shares the same memory and does, and an optimizer updates the
    values in place under no_grad anyway. A CUDA-simulator array is described
    from the host array it wraps, so the simulator goes through the same checks
    and backend code as a GPU.
    """
    try:
        return obj.__cuda_array_interface__
    except AttributeError:
        if not _simulator_array(obj):
            raise
        a = obj._ary
        return {"shape": a.shape, "typestr": a.dtype.str, "version": 3, "stream": None,
                "strides": None if a.flags.c_contiguous else a.strides,
                "data": (a.__array_interface__["data"][0], not a.flags.writeable)}
    except RuntimeError:
        detach = getattr(obj, "detach", None)
        if detach is None:
            raise
        return detach().__cuda_array_interface__


def _device_extent(name: str, a: Any, writable: bool) -> tuple[int, int, tuple, np.dtype]:
    cai = device_interface(a)
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {dtype}")
    strides = cai.get("strides")
    if strides is not None:
        expected = []
        step = dtype.itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        if tuple(strides) != tuple(reversed(expected)) and int(np.prod(shape)) > 1:
            raise ValueError(f"{name} must be C-contiguous, got strides {tuple(strides)} for shape {shape}")
    ptr, readonly = cai["data"]
    if writable and readonly:
        raise ValueError(f"{name} is read-only; it is updated in place, so it must be writable")
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return ptr, ptr + nbytes, shape, dtype


def check_buffers(names: Sequence[str], arrays: Sequence[Any], grad_index: int = 1) -> bool:
    """Validate the buffers of one update; return True when they are device arrays.

    ``names[i]`` is the argument name of ``arrays[i]`` (used in messages).
    ``arrays[grad_index]`` is the only buffer that is read but never written.
    Raises TypeError/ValueError naming the argument; writes nothing.
    """
    first = arrays[0]
    on_device = is_device_array(first)
    extents = []
    if on_device:
        shape0 = dtype0 = None
        for i, (name, a) in enumerate(zip(names, arrays)):
            if not is_device_array(a):
                raise TypeError(
                    f"{name} is a {type(a).__name__} on the host but {names[0]} is a device array; "
                    "all buffers of one update must be on the same device")
            lo, hi, shape, dtype = _device_extent(name, a, i != grad_index)
            if i == 0:
                shape0, dtype0 = shape, dtype
            elif shape != shape0:
                raise ValueError(f"{name} has shape {shape}, expected {shape0} (the shape of {names[0]})")
            elif dtype != dtype0:
                raise TypeError(f"{name} has dtype {dtype}, expected {dtype0} (the dtype of {names[0]})")
            extents.append((lo, hi))
    else:
        # The host path runs on every update, so it avoids per-array helper
        # calls and ``__array_interface__`` (~0.8 us per array, the largest
        # cost of a small update); the checks and messages are the same.
        shape0 = dtype0 = None
        all_own_data = True
        for i, (name, a) in enumerate(zip(names, arrays)):
            if not isinstance(a, np.ndarray):
                if is_device_array(a):
                    raise TypeError(
                        f"{name} is a device array but {names[0]} is a NumPy array on the host; "
                        "all buffers of one update must be on the same device")
                raise TypeError(f"{name} must be a numpy.ndarray or a __cuda_array_interface__ array, "
                                f"got {type(a).__name__}")
            if i:
                if a.shape != shape0:
                    raise ValueError(f"{name} has shape {a.shape}, expected {shape0} (the shape of {names[0]})")
                if a.dtype != dtype0:
                    raise TypeError(f"{name} has dtype {a.dtype}, expected {dtype0} (the dtype of {names[0]})")
            else:
                shape0, dtype0 = a.shape, a.dtype
                if dtype0 not in SUPPORTED_DTYPES:
                    raise TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {dtype0}")
            flags = a.flags
            # One flag test in the common case: carray is C-contiguous + writeable + aligned.
            if not (flags.carray if i != grad_index else flags.c_contiguous):
                if not flags.c_contiguous:
                    raise ValueError(f"{name} must be C-contiguous, got strides {a.strides} for shape {a.shape}")
                if i != grad_index and not flags.writeable:
                    raise ValueError(f"{name} is read-only; it is updated in place, so it must be writable")
                # (merely misaligned: accepted, the kernels do unaligned loads)
            all_own_data = all_own_data and flags.owndata
        # Arrays that own their data are separate allocations: only the same
        # array passed twice can overlap. Otherwise (views, foreign memory),
        # NumPy's bounds test (may_share_memory's default, max_work=0; the
        # keyword itself costs 0.1 us) is, for C-contiguous arrays, exactly
        # the address-range test below (and false for an empty array).
        if all_own_data and len(set(map(id, arrays))) == len(arrays):
            return on_device  # distinct allocations: the common case, in one set
        for i in range(1, len(arrays)):
            for j in range(i):
                if (arrays[i] is arrays[j] and arrays[i].size if all_own_data
                        else np.may_share_memory(arrays[i], arrays[j])):
                    raise ValueError(f"{names[i]} overlaps {names[j]} in memory; every buffer of an update "
                                     "must be a separate array")
        return on_device
    # Overlap test on address ranges: exact for contiguous buffers. Empty
    # buffers cannot overlap anything.
    for i in range(len(extents)):
        lo_i, hi_i = extents[i]
        if lo_i == hi_i:
            continue
        for j in range(i):
            lo_j, hi_j = extents[j]
            if lo_i < hi_j and lo_j < hi_i:
                raise ValueError(f"{names[i]} overlaps {names[j]} in memory; every buffer of an update "
                                 "must be a separate array")
    return on_device
