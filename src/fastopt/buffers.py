"""Checking the buffers of one update before anything is written.

An update takes a parameter buffer, a gradient and the rule's state buffers.
They must all live on the same side (host NumPy arrays, not subclasses, or
device arrays that export ``__cuda_array_interface__``), share one shape and
one float dtype, be
C-contiguous, and never overlap: the kernels stream through them once and in
parallel, so an overlap would make the result depend on the schedule. Every
buffer except the gradient is written, so those must be writable; a
read-only gradient is fine.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["SUPPORTED_DTYPES", "check_buffers", "check_lists", "device_interface", "is_device_array"]

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


def check_buffers(names: Sequence[str], arrays: Sequence[Any], grad_index: int = 1, overlap: bool = True) -> bool:
    """Validate the buffers of one update; return True when they are device arrays.

    ``names[i]`` is the argument name of ``arrays[i]`` (used in messages).
    ``arrays[grad_index]`` is the only buffer that is read but never written.
    Raises TypeError/ValueError naming the argument; writes nothing.
    ``overlap=False`` skips the overlap test (:func:`check_lists` does it across
    the whole call).
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
            if type(a) is not np.ndarray:
                if isinstance(a, np.ndarray):
                    # np.matrix redefines *, masked arrays carry a mask no kernel
                    # reads: a subclass's own semantics cannot be honoured by
                    # every backend, so none takes one. np.asarray(x) is a plain
                    # view of the same memory (a memmap's file included).
                    raise TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__}, a subclass of "
                                    "numpy.ndarray whose semantics the kernels do not follow; pass "
                                    f"np.asarray({name}) (a plain view of the same memory)")
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
        if not overlap or all_own_data and len(set(map(id, arrays))) == len(arrays):
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
    for i in range(len(extents) if overlap else 0):
        lo_i, hi_i = extents[i]
        if lo_i == hi_i:
            continue
        for j in range(i):
            lo_j, hi_j = extents[j]
            if lo_i < hi_j and lo_j < hi_i:
                raise ValueError(f"{names[i]} overlaps {names[j]} in memory; every buffer of an update "
                                 "must be a separate array")
    return on_device


def _extent(a: Any) -> tuple[int, int]:
    """The address range [lo, hi) of a C-contiguous host or device array."""
    if isinstance(a, np.ndarray):
        lo = a.__array_interface__["data"][0]
        return lo, lo + a.nbytes
    lo, hi, _, _ = _device_extent("", a, False)
    return lo, hi


def check_lists(names: Sequence[str], lists: Sequence[Any], grad_index: int = 1) -> bool:
    """Validate the buffers of one update over lists of tensors; return True on the device.

    ``lists[r]`` is the list (or tuple) of arrays of role ``names[r]`` (param,
    grad, each state buffer). Every list has the length of the first; position
    i of every list has one shape; every array has one dtype and is on one
    side; no two arrays of the call overlap. Raises TypeError/ValueError
    naming the role and the position (``exp_avg[3]``); writes nothing.
    """
    count = None
    for name, arrays in zip(names, lists):
        if not isinstance(arrays, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of arrays like {names[0]}, got {type(arrays).__name__}")
        if count is None:
            count = len(arrays)
        elif len(arrays) != count:
            raise ValueError(f"{name} has {len(arrays)} arrays, expected {count} (the length of {names[0]})")
    if not count:
        return False
    # Position by position: the flat checks over one tensor's buffers give the
    # same messages; the names carry the position.
    on_device = None
    dtype0 = None
    for i in range(count):
        row = [arrays[i] for arrays in lists]
        row_names = [f"{name}[{i}]" for name in names]
        here = check_buffers(row_names, row, grad_index, overlap=False)
        if on_device is None:
            on_device, dtype0 = here, _dtype(row[0])
        elif here != on_device:
            raise TypeError(f"{row_names[0]} is {'a device' if here else 'a host'} array but {names[0]}[0] is not; "
                            "all buffers of one update must be on the same device")
        elif _dtype(row[0]) != dtype0:
            raise TypeError(f"{row_names[0]} has dtype {_dtype(row[0])}, expected {dtype0} (the dtype of {names[0]}[0]); "
                            "one call updates one dtype")
    # Overlap across every array of the call. Arrays that own their data are
    # distinct allocations unless the same object appears twice; otherwise
    # sort the address ranges once (n log n, not n^2 pairs).
    everything = [(a, f"{name}[{i}]") for name, arrays in zip(names, lists) for i, a in enumerate(arrays)]
    if not on_device and all(a.flags.owndata for a, _ in everything) \
            and len({id(a) for a, _ in everything}) == len(everything):
        return on_device
    spans = sorted((*_extent(a), where) for a, where in everything)
    spans = [s for s in spans if s[0] != s[1]]  # empty arrays overlap nothing
    for (lo, hi, where), (lo2, hi2, where2) in zip(spans, spans[1:]):
        if lo2 < hi:
            raise ValueError(f"{where2} overlaps {where} in memory; every buffer of an update must be a separate array")
    return on_device


def _dtype(a: Any) -> np.dtype:
    return a.dtype if isinstance(a, np.ndarray) else np.dtype(device_interface(a)["typestr"])
