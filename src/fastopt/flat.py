"""Packing many arrays into one flat buffer, so that one kernel call updates them all.

A model has many parameter arrays (weights, biases, norms) of many shapes. An
update kernel that runs once per array pays its call overhead per array and
cannot stream; packed end to end in one contiguous buffer they are updated by
one call. :class:`FlatParams` copies the arrays into such a buffer, hands back
views of the original shapes, and keeps a matching flat gradient buffer.

Each segment starts on a 64-byte boundary (a cache line, and a whole AVX-512
vector), so a segment's first element is aligned whichever segment a loop or
thread starts on; the gaps are a few zero elements that stay zero under every
rule (zero parameter, zero gradient, zero state). Host buffers are NumPy
arrays; device buffers are Numba CUDA device arrays, made when the inputs
export ``__cuda_array_interface__`` (that path is kept thin: allocate, view,
copy).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import formats
from .buffers import SUPPORTED_DTYPES, check_buffers, is_device_array

__all__ = ["ALIGN", "FlatParams", "layout", "new_buffer", "to_host", "copy_into", "dtype_of", "shape_of"]

#: Byte alignment of every segment start.
ALIGN = 64

Array = Any  # numpy.ndarray, or a device array with __cuda_array_interface__


def layout(sizes: Sequence[int], itemsize: int, align: int = ALIGN) -> tuple[tuple[int, ...], int]:
    """Element offsets of segments of ``sizes`` elements, each start ``align``-byte aligned.

    Returns ``(offsets, total)``: segment ``i`` is ``[offsets[i], offsets[i] + sizes[i])``
    and the whole buffer has ``total`` elements (the last segment is padded too).
    """
    if align <= 0 or align % itemsize:
        raise ValueError(f"align must be a positive multiple of the item size {itemsize}, got {align}")
    step = align // itemsize
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-int(n) // step) * step  # round up to a whole number of aligned blocks
    return tuple(offsets), end


def _cuda():
    from numba import cuda  # only for device arrays: never imported on the host path

    return cuda


def new_buffer(like: Array, n: int, value: float = 0.0, dtype: Any = None, align: int = ALIGN) -> Array:
    """A fresh 1-D buffer of ``n`` elements filled with ``value``, on the same side as ``like``.

    Host buffers start on an ``align``-byte boundary; device allocations already
    start on (at least) 256-byte boundaries.
    """
    dtype = np.dtype(dtype if dtype is not None else dtype_of(like))
    if is_device_array(like):
        out = _cuda().device_array(n, dtype)
        out.copy_to_device(np.full(n, value, dtype))  # thin: one host-to-device copy at allocation
        return out
    raw = np.empty(n + align // dtype.itemsize, dtype)
    skip = (-raw.ctypes.data % align) // dtype.itemsize
    out = raw[skip:skip + n]
    out.fill(value)
    return out


def to_host(a: Array) -> np.ndarray:
    """A host NumPy copy of ``a`` (for state dicts)."""
    if is_device_array(a):
        return _cuda().as_cuda_array(a).copy_to_host()
    return np.array(a, copy=True)


def copy_into(dst: Array, src: Array) -> None:
    """Copy ``src`` (host or device, same shape) into ``dst`` in place."""
    if is_device_array(dst):
        cuda = _cuda()
        cuda.as_cuda_array(dst).copy_to_device(cuda.as_cuda_array(src) if is_device_array(src) else src)
    else:
        np.copyto(dst, to_host(src) if is_device_array(src) else src)


def dtype_of(a: Array) -> np.dtype:
    return np.dtype(a.__cuda_array_interface__["typestr"]) if is_device_array(a) else np.asarray(a).dtype


def shape_of(a: Array) -> tuple[int, ...]:
    return tuple(a.__cuda_array_interface__["shape"]) if is_device_array(a) else np.shape(a)


class FlatParams:
    """Arrays of any shapes packed into one contiguous, aligned buffer.

    ``FlatParams([w1, b1, w2, b2])`` copies the arrays into ``data`` (1-D) and
    gives ``params[i]``, a view of ``data`` with the shape of the ``i``-th
    input; ``grad`` is a zeroed buffer of the same layout with views
    ``grads[i]``. Write gradients into ``grads[i]`` and step an optimizer on
    ``data`` and ``grad``: every array is updated by one call per group.

    Args:
        arrays: NumPy arrays, or device arrays (``__cuda_array_interface__``),
            all of one dtype (or cast to ``dtype``): float32, float64, or on
            the host bfloat16 (``ml_dtypes.bfloat16``) or float16.
        dtype: the buffer dtype; default: the arrays' common dtype.
        align: byte alignment of each segment start (default 64).
    """

    def __init__(self, arrays: Sequence[Array], *, dtype: Any = None, align: int = ALIGN) -> None:
        arrays = list(arrays)
        if not arrays:
            raise ValueError("FlatParams needs at least one array")
        device = is_device_array(arrays[0])
        if any(is_device_array(a) != device for a in arrays):
            raise TypeError("FlatParams arrays must all be on the host or all on the device")
        dtypes = {dtype_of(a) for a in arrays}
        if dtype is None:
            if len(dtypes) != 1:
                raise TypeError(f"FlatParams arrays have dtypes {sorted(map(str, dtypes))}; pass dtype= to cast")
            dtype = dtypes.pop()
        self.dtype = np.dtype(dtype)
        if self.dtype not in SUPPORTED_DTYPES and not (formats.format_of(self.dtype) in (formats.BFLOAT16, formats.FLOAT16)
                                                       and not device):
            raise TypeError(f"FlatParams dtype must be float32, float64, bfloat16 or float16 (host), got {self.dtype}")
        self.shapes = tuple(shape_of(a) for a in arrays)
        self.sizes = tuple(int(np.prod(s)) for s in self.shapes)
        self.offsets, size = layout(self.sizes, self.dtype.itemsize, align)
        self.data = new_buffer(arrays[0], size, 0.0, self.dtype, align)
        self._grad = new_buffer(arrays[0], size, 0.0, self.dtype, align)
        self.params = self._views(self.data)
        self.grads = self._views(self._grad)
        for view, a in zip(self.params, arrays):
            copy_into(view, a if device else np.asarray(a, self.dtype))

    @property
    def grad(self) -> Array:
        """The flat gradient buffer (``grads[i]`` are views of it)."""
        return self._grad

    @grad.setter
    def grad(self, buffer: Array) -> None:
        """Use ``buffer`` (shape and dtype of ``data``) as the gradient from now on;
        ``grads`` become views of it and the optimizers read it at their next step."""
        check_buffers(["data", "grad"], [self.data, buffer], any_dtype=self.dtype not in SUPPORTED_DTYPES)
        self._grad = buffer
        self.grads = self._views(buffer)

    def _views(self, buf: Array) -> list:
        return [buf[o:o + n].reshape(s) for o, n, s in zip(self.offsets, self.sizes, self.shapes)]

    def __len__(self) -> int:
        return len(self.shapes)

    def span(self, start: int, stop: int | None = None) -> slice:
        """The slice of ``data`` holding arrays ``start .. stop-1`` (one array if ``stop`` is None).

        Consecutive arrays are contiguous, so a span is a parameter group:
        ``fastopt.AdamW(flat, groups=[{"params": flat.span(0, 4)},
        {"params": flat.span(4, 6), "weight_decay": 0.0}])``.
        """
        stop = start + 1 if stop is None else stop
        if not 0 <= start < stop <= len(self):
            raise IndexError(f"span({start}, {stop}) is out of range for {len(self)} arrays")
        return slice(self.offsets[start], self.offsets[stop - 1] + self.sizes[stop - 1])
