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

from typing import Any, Optional, Sequence

import numpy as np

from . import native

__all__ = ["SUPPORTED_DTYPES", "check_buffers", "check_lists", "check_disjoint", "host_tables", "disjoint_table", "device_interface", "is_device_array"]

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


# ---- the messages: one per kind of problem, for host and device arrays alike ----

def _bad_dtype(name: str, dtype: np.dtype) -> TypeError:
    return TypeError(f"{name} must have dtype {_DTYPE_NAMES}, got {dtype}")


def _unlike(name: str, shape: tuple, dtype: np.dtype, shape0: tuple, dtype0: np.dtype, first: str) -> Exception:
    if shape != shape0:
        return ValueError(f"{name} has shape {shape}, expected {shape0} (the shape of {first})")
    return TypeError(f"{name} has dtype {dtype}, expected {dtype0} (the dtype of {first})")


def _not_contiguous(name: str, strides: tuple, shape: tuple) -> ValueError:
    return ValueError(f"{name} must be C-contiguous, got strides {strides} for shape {shape}")


def _read_only(name: str) -> ValueError:
    return ValueError(f"{name} is read-only; it is updated in place, so it must be writable")


def _other_side(name: str, a: Any, first: str, first_on_device: bool) -> TypeError:
    if first_on_device:
        return TypeError(f"{name} is a {type(a).__name__} on the host but {first} is a device array; "
                         "all buffers of one update must be on the same device")
    if is_device_array(a):
        return TypeError(f"{name} is a device array but {first} is a NumPy array on the host; "
                         "all buffers of one update must be on the same device")
    if isinstance(a, np.ndarray):
        # np.matrix redefines *, masked arrays carry a mask no kernel reads: a
        # subclass's own semantics cannot be honoured by every backend, so none
        # takes one. np.asarray(x) is a plain view of the same memory (a
        # memmap's file included).
        return TypeError(f"{name} is a {type(a).__module__}.{type(a).__name__}, a subclass of numpy.ndarray "
                         f"whose semantics the kernels do not follow; pass np.asarray({name}) (a plain view of "
                         "the same memory)")
    return TypeError(f"{name} must be a numpy.ndarray or a __cuda_array_interface__ array, got {type(a).__name__}")


def _overlaps(name: str, other: str) -> ValueError:
    return ValueError(f"{name} overlaps {other} in memory; every buffer of an update must be a separate array")


def _device_extent(name: str, a: Any, writable: bool, any_dtype: bool = False) -> tuple[int, int, tuple, np.dtype]:
    """(first address, end address, shape, dtype) of a checked device array."""
    cai = device_interface(a)
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    if dtype not in SUPPORTED_DTYPES and not any_dtype:
        raise _bad_dtype(name, dtype)
    strides = cai.get("strides")
    if strides is not None:
        expected = []
        step = dtype.itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        if tuple(strides) != tuple(reversed(expected)) and int(np.prod(shape)) > 1:
            raise _not_contiguous(name, tuple(strides), shape)
    ptr, readonly = cai["data"]
    if writable and readonly:
        raise _read_only(name)
    return ptr, ptr + int(np.prod(shape)) * dtype.itemsize, shape, dtype


def check_buffers(names: Sequence[str], arrays: Sequence[Any], grad_index: int = 1, overlap: bool = True,
                  any_dtype: bool = False) -> bool:
    """Validate the buffers of one update; return True when they are device arrays.

    ``names[i]`` is the argument name of ``arrays[i]`` (used in messages).
    ``arrays[grad_index]`` is the only buffer that is read but never written.
    Raises TypeError/ValueError naming the argument; writes nothing.
    ``overlap=False`` skips the overlap test (:func:`check_lists` does it across
    the whole call). ``any_dtype=True`` skips the dtype tests: a mixed-format
    call (:mod:`fastopt.formats`) has checked each role's dtype already.
    """
    if is_device_array(arrays[0]):
        _check_device(names, arrays, grad_index, overlap, any_dtype)
        return True
    _check_host(names, arrays, grad_index, overlap, any_dtype)
    return False


def _check_host(names: Sequence[str], arrays: Sequence[Any], grad_index: int, overlap: bool,
                any_dtype: bool = False) -> None:
    # This runs on every update, so it avoids per-array helper calls and
    # ``__array_interface__`` (~0.8 us per array, the largest cost of a small
    # update): helpers only build the message once something is wrong.
    shape0 = dtype0 = None
    all_own_data = True
    for i, (name, a) in enumerate(zip(names, arrays)):
        if type(a) is not np.ndarray:
            raise _other_side(name, a, names[0], False)
        if i:
            if a.shape != shape0 or a.dtype != dtype0 and not any_dtype:
                raise _unlike(name, a.shape, a.dtype, shape0, dtype0, names[0])
        else:
            shape0, dtype0 = a.shape, a.dtype
            if dtype0 not in SUPPORTED_DTYPES and not any_dtype:
                raise _bad_dtype(name, dtype0)
        flags = a.flags
        # One flag test in the common case: carray is C-contiguous + writeable + aligned.
        if not (flags.carray if i != grad_index else flags.c_contiguous):
            if not flags.c_contiguous:
                raise _not_contiguous(name, a.strides, a.shape)
            if i != grad_index and not flags.writeable:
                raise _read_only(name)
            # (merely misaligned: accepted, the kernels do unaligned loads)
        all_own_data = all_own_data and flags.owndata
    # Arrays that own their data are separate allocations: only the same array
    # passed twice can overlap. Otherwise (views, foreign memory), NumPy's
    # bounds test (may_share_memory's default, max_work=0; the keyword itself
    # costs 0.1 us) is, for C-contiguous arrays, exactly the address-range
    # test (and false for an empty array).
    if not overlap or all_own_data and len(set(map(id, arrays))) == len(arrays):
        return  # distinct allocations: the common case, in one set
    for i in range(1, len(arrays)):
        for j in range(i):
            if (arrays[i] is arrays[j] and arrays[i].size if all_own_data
                    else np.may_share_memory(arrays[i], arrays[j])):
                raise _overlaps(names[i], names[j])


def _check_device(names: Sequence[str], arrays: Sequence[Any], grad_index: int, overlap: bool,
                  any_dtype: bool = False) -> None:
    shape0 = dtype0 = None
    extents = []
    for i, (name, a) in enumerate(zip(names, arrays)):
        if not is_device_array(a):
            raise _other_side(name, a, names[0], True)
        lo, hi, shape, dtype = _device_extent(name, a, i != grad_index, any_dtype)
        if i == 0:
            shape0, dtype0 = shape, dtype
        elif shape != shape0 or dtype != dtype0 and not any_dtype:
            raise _unlike(name, shape, dtype, shape0, dtype0, names[0])
        extents.append((lo, hi))
    # Address ranges: exact for contiguous buffers; empty ones overlap nothing.
    for i in range(len(extents) if overlap else 0):
        lo_i, hi_i = extents[i]
        for j in range(i):
            lo_j, hi_j = extents[j]
            if lo_i < hi_i and lo_j < hi_j and lo_i < hi_j and lo_j < hi_i:
                raise _overlaps(names[i], names[j])


def _extent(a: Any) -> tuple[int, int]:
    """The address range [lo, hi) of a C-contiguous host or device array."""
    if isinstance(a, np.ndarray):
        lo = a.__array_interface__["data"][0]
        return lo, lo + a.nbytes
    lo, hi, _, _ = _device_extent("", a, False)
    return lo, hi


def check_lists(names: Sequence[str], lists: Sequence[Any], grad_index: int = 1,
                any_dtype: bool = False) -> tuple[bool, Optional[np.ndarray]]:
    """Validate the buffers of one update over lists of tensors.

    ``lists[r]`` is the list (or tuple) of arrays of role ``names[r]`` (param,
    grad, each state buffer). Every list has the length of the first; position
    i of every list has one shape; every array has one dtype and is on one
    side; no two arrays of the call overlap. Raises TypeError/ValueError
    naming the role and the position (``exp_avg[3]``); writes nothing.

    Returns ``(on_device, table)``. ``table`` is None, or, for host arrays
    when the compiled checks (:func:`host_tables`) passed, their pointer
    table: int64 of shape ``(len(lists) + 1, N)``, ``table[r, i]`` the data
    address of ``lists[r][i]`` and ``table[-1, i]`` its element count, which
    a backend's ``run_list`` may use instead of the arrays.

    ``any_dtype=True`` (a mixed-format call, whose roles' dtypes
    :mod:`fastopt.formats` has checked) skips every dtype test and returns no
    table.
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
        return False, None
    table = None if any_dtype else host_tables(lists, grad_index)
    if table is not None:
        return False, table
    if not any_dtype and _host_lists_ok(lists, grad_index):
        return False, None  # plain, distinct host arrays (without the compiled checks, or misaligned ones)
    # Position by position: the flat checks over one tensor's buffers give the
    # same messages; the names carry the position.
    on_device = None
    dtype0 = None
    for i in range(count):
        row = [arrays[i] for arrays in lists]
        row_names = [f"{name}[{i}]" for name in names]
        here = check_buffers(row_names, row, grad_index, overlap=False, any_dtype=any_dtype)
        if on_device is None:
            on_device, dtype0 = here, _dtype(row[0])
        elif here != on_device:
            raise TypeError(f"{row_names[0]} is {'a device' if here else 'a host'} array but {names[0]}[0] is not; "
                            "all buffers of one update must be on the same device")
        elif _dtype(row[0]) != dtype0 and not any_dtype:
            raise TypeError(f"{row_names[0]} has dtype {_dtype(row[0])}, expected {dtype0} (the dtype of {names[0]}[0]); "
                            "one call updates one dtype")
    # Overlap across every array of the call. Arrays that own their data are
    # distinct allocations unless the same object appears twice; otherwise
    # sort the address ranges once (n log n, not n^2 pairs).
    everything = [(a, f"{name}[{i}]") for name, arrays in zip(names, lists) for i, a in enumerate(arrays)]
    if not on_device and all(a.flags.owndata for a, _ in everything) \
            and len({id(a) for a, _ in everything}) == len(everything):
        return on_device, None
    check_disjoint(everything)
    return on_device, None


def check_disjoint(named: Sequence[tuple[Any, str]]) -> None:
    """Raise ValueError naming two of the (C-contiguous) arrays ``named`` (``(array,
    name)`` pairs) that share memory: their address ranges sorted once (n log n)."""
    spans = sorted((*_extent(a), where) for a, where in named)
    spans = [s for s in spans if s[0] != s[1]]  # empty arrays overlap nothing
    for (lo, hi, where), (lo2, hi2, where2) in zip(spans, spans[1:]):
        if lo2 < hi:
            raise _overlaps(where2, where)


_tables: Any = None  # fastopt._tables once loaded; False when it is not there


def host_tables(lists: Sequence[Sequence[Any]], grad_index: int = 1) -> Optional[np.ndarray]:
    """The pointer table of a valid host list call (see :func:`check_lists`), from
    the compiled extension ``fastopt._tables`` (a few ns per array instead of
    ~1.5 us in Python; csrc/python/tables.c says exactly what it accepts).

    None when the extension is not built, or when the arrays are not the fast
    case: not plain aligned host arrays, or something is wrong with them (the
    Python checks then name it).
    """
    tables = _tables if _tables is not None else _extension()
    if not tables:
        return None
    return tables.host_tables(lists if type(lists) is tuple else tuple(lists), grad_index)


def _extension() -> Any:
    """fastopt._tables, loaded at the first use; False when it is not built."""
    global _tables
    if _tables is None:
        try:
            _tables = native.load_extension("_tables")
        except ImportError:
            _tables = False
    return _tables


def disjoint_table(table: np.ndarray, itemsize: int) -> bool:
    """Whether a caller-built pointer table (int64 ``(roles + 1, N)``: addresses by
    role, 0 for an unused buffer; then element counts) has every address aligned to ``itemsize`` and no two
    non-empty ranges overlapping; False also when the compiled extension is missing
    (the caller then takes the checked path)."""
    tables = _tables if _tables is not None else _extension()
    return bool(tables) and tables.disjoint_table(table, itemsize)


def _host_lists_ok(lists: Sequence[Sequence[Any]], grad_index: int) -> bool:
    """True when every array is a plain host ndarray that owns its data, of the
    first param's dtype (float32/float64), of its position's shape, C-contiguous,
    writable where written, and no array appears twice: then the call is valid.

    Checked a role at a time with comprehensions (about 0.3 us per array, a
    tenth of the per-position checks), because a list call may hold thousands
    of tensors. False means "not this fast case", not "invalid": the
    per-position checks then find the problem and name it.
    """
    params = lists[0]
    ndarray = np.ndarray
    if not all(type(a) is ndarray for a in params):
        return False
    dtype = params[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        return False
    shapes = [a.shape for a in params]
    for r, arrays in enumerate(lists):
        if not all(type(a) is ndarray for a in arrays):
            return False
        if [a.shape for a in arrays] != shapes or not all(a.dtype == dtype for a in arrays):
            return False
        flags = [a.flags for a in arrays]
        if not all(f.owndata for f in flags):
            return False
        if not all(f.c_contiguous for f in flags) if r == grad_index else not all(f.carray for f in flags):
            return False
    total = sum(map(len, lists))
    return len({id(a) for arrays in lists for a in arrays}) == total


def _dtype(a: Any) -> np.dtype:
    return a.dtype if isinstance(a, np.ndarray) else np.dtype(device_interface(a)["typestr"])
