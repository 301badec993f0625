"""The Numba loops of mixed-format updates (:mod:`fastopt.formats`).

A mixed-format call computes in float32 whatever each buffer role is stored
as. Numba has no bfloat16 or float16 scalar type on the CPU, so a 16-bit
buffer is viewed as ``uint16`` and converted with integer code (the bit rules
of :mod:`fastopt.formats`, which the NumPy reference runs on whole arrays).

Each call runs from a pointer table (rows of addresses: :data:`PARAM`,
:data:`GRAD`, :data:`MASTER`, then two per state buffer from
:data:`FIRST_STATE`, then the element counts), split into one contiguous range
of elements per thread as in ``numba_loops``' list loops, with the ends cut at
multiples of the 8-bit block (:data:`fastopt.formats.BLOCK`) within each
tensor. A thread walks its range in tiles of :data:`TILE` elements. Per tile:

1. each 16-bit or 8-bit input role is loaded into a float32 scratch array of
   the thread (a float32 role is used in place; with a master copy the master
   is the param the update reads and writes);
2. the serial float32 flat loop of the kernel (``numba_loops``' segment, the
   one the plain list loops run, flushing included) updates the float32 views;
3. each 16-bit written role is stored back from its view: the param to the
   nearest 16-bit value of the master, else (bfloat16 without a master) and
   every bfloat16 state buffer with stochastic rounding; each 8-bit state
   buffer is quantized again, block by block (the tile's blocks are whole).

The scratch arrays are small enough to stay in the core's cache, so the only
memory traffic is the buffers' own; the update itself is the very loop of
float32 calls, which is what makes the result bitwise the reference's. The
formats are runtime values, tested once per tile: one compiled loop per
kernel, store function and pattern of unused state buffers serves every
combination of formats.

Cost (measured on a 2-core AMD EPYC (Zen 1, AVX2) VM, AdamW, in cache, one
thread): loading a bfloat16 role ~0.1 ns per element, rounding one
stochastically ~0.8 ns (about 17 vector operations per 8 elements, the hash's
two 32-bit multiplies and three shifts included), next to ~1.6 ns for the
float32 update itself. So there a bfloat16-state update is compute bound and
about half as fast as a float32 one, although it moves 20 bytes per element
instead of 28.

The random bits of element ``i`` of role ``r`` of tensor ``t`` are
``mix32(stream(key, t, r) + i)`` (:mod:`fastopt.formats`), a function of the
element's index in its tensor only: any thread count and tiling give the
same bits. As in ``numba_loops``: no float literals in the loops (they would
promote float32 to float64), ``error_model="numpy"``, ``cache=True``, and the
closures hold only what pickles the same in every process (the segment is a
module attribute of ``numba_loops``; the integers below).
"""
from __future__ import annotations

import hashlib

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from . import numba_loops
from .numba_loops import SOURCE_KEY, _STORES, _pointer, _suffix, _view
from .. import formats
from ..formats import BFLOAT16, BLOCK, FLOAT32, INT8, ROLES_PER_TENSOR
from ..rules import KERNEL_SCALARS

__all__ = ["MIXED_LOOPS", "TILE", "PARAM", "GRAD", "MASTER", "FIRST_STATE"]

_JIT = dict(error_model="numpy", cache=True)

#: Elements per tile. The per-tile work (views, format tests, the calls of the
#: conversion loops and of the segment) measured 0.15-0.4 ns per element at 1024
#: (2-core AMD EPYC VM, fp32 AdamW: a tenth to a quarter of the update), none
#: measurable at 4096; a thread's scratch (param, grad, three states: 80 KiB)
#: still stays in its L2 cache.
TILE = 4096

#: Rows of the pointer table (then two rows per state buffer, then the element counts).
PARAM, GRAD, MASTER, FIRST_STATE = 0, 1, 2, 3


def _mixed_source_key() -> int:
    """numba_loops.SOURCE_KEY, plus numba_loops.py and formats.py themselves.

    A loop below has the segment of numba_loops compiled into it, and the format
    codes of formats.py; Numba's cache looks only at this file (and the closure),
    so without this key an edit there would keep running the old cached code."""
    digest = hashlib.sha256(SOURCE_KEY.to_bytes(8, "little"))
    for module in (numba_loops, formats):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return int.from_bytes(digest.digest()[:7], "little")


MIXED_SOURCE_KEY = _mixed_source_key()


# ---- bit casts and 16-bit views ---------------------------------------------------

@intrinsic
def _as_float32(typingctx, bits):
    """The float32 whose bits are the uint32 ``bits``."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(bits), codegen


@intrinsic
def _as_uint32(typingctx, x):
    """The bits of the float32 ``x`` as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(x), codegen


@numba.njit(inline="always", **_JIT)
def _view16(table, row, t, lo, n):
    """Elements ``[lo, lo + n)`` of tensor ``t`` of 16-bit role ``row`` as a uint16 array."""
    return numba.carray(_pointer(table[row, t] + lo * 2, np.uint16(0)), n)


@numba.njit(inline="always", **_JIT)
def _view8(table, row, t, lo, n):
    """Elements ``[lo, lo + n)`` of tensor ``t`` of 8-bit role ``row`` (its codes) as a uint8 array."""
    return numba.carray(_pointer(table[row, t] + lo, np.uint8(0)), n)


@numba.njit(inline="always", **_JIT)
def _absmax_view(table, row, t, lo, n, tiny):
    """The absmax values of the 8-bit blocks of elements ``[lo, lo + n)`` (``lo`` a
    multiple of BLOCK) of tensor ``t``, whose absmax addresses are in row ``row``."""
    return numba.carray(_pointer(table[row, t] + (lo // BLOCK) * 4, tiny), (n + BLOCK - 1) // BLOCK)


# ---- the conversions (fastopt.formats' bit rules, on uint32 values) ----------------
# Numba widens uint32 arithmetic to 64 bits; every result is cast back to uint32,
# so LLVM keeps 32-bit lanes.

@numba.njit(**_JIT)
def _mix32(x):
    """lowbias32 (formats.mix32) of a uint32."""
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    return np.uint32(x ^ (x >> np.uint32(16)))


@numba.njit(**_JIT)
def _stream(key, t, role):
    """formats.stream: ``mix32(key ^ mix32(t * 16 + role))``."""
    return _mix32(np.uint32(np.uint32(key) ^ _mix32(np.uint32(t * ROLES_PER_TENSOR + role))))


@numba.njit(**_JIT)
def _magnitude(b):
    """The float32 bits ``b`` without the sign: above ``0x7f800000`` for a NaN."""
    return np.uint32(b & np.uint32(0x7FFFFFFF))


@numba.njit(**_JIT)
def _bf16_nearest(b):
    """float32 bits to bfloat16 bits, round to nearest even (a NaN: see _quiet_nans)."""
    odd = np.uint32(b >> np.uint32(16)) & np.uint32(1)
    return np.uint16(np.uint32(np.uint32(b + np.uint32(0x7FFF) + odd) >> np.uint32(16)))


@numba.njit(**_JIT)
def _bf16_stochastic(b, r):
    """float32 bits to bfloat16 bits, rounded up with the probability of the dropped
    fraction (``r``: 32 random bits; a NaN: see _quiet_nans)."""
    return np.uint16(np.uint32(np.uint32(b + (r & np.uint32(0xFFFF))) >> np.uint32(16)))


@numba.njit(**_JIT)
def _quiet_nans(bits, dst):
    """Store the bfloat16 quiet NaN ``0x7fc0`` with its sign for each NaN of ``bits``.

    The rounding loops round a NaN like any value (to a NaN or an infinity) and
    only find out whether their tile held one (the largest magnitude, a vector
    reduction); this pass then runs, for such tiles only. A select per element
    in the rounding loop measured 10-25% slower (5 vector operations per 8
    elements instead of 2)."""
    for i in range(bits.size):
        if _magnitude(bits[i]) > np.uint32(0x7F800000):
            dst[i] = np.uint16(np.uint32(bits[i] >> np.uint32(16)) & np.uint32(0x8000) | np.uint32(0x7FC0))


@numba.njit(**_JIT)
def _f16_nearest(b):
    """float32 bits to float16 bits, round to nearest even, subnormals included
    (Fabian Giesen's float_to_half_fast3_rtne)."""
    sign = b & np.uint32(0x80000000)
    a = np.uint32(b ^ sign)
    if a >= np.uint32((127 + 16) << 23):  # 2**16 and up: infinity, or NaN
        out = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif a < np.uint32(113 << 23):  # below 2**-14: a float16 subnormal or zero
        # Adding 0.5 (exponent 126) aligns the float16 subnormal's 10 bits at the
        # bottom of the mantissa, rounded to nearest even by the float addition.
        magic = np.uint32(126 << 23)
        out = np.uint32(_as_uint32(_as_float32(a) + _as_float32(magic)) - magic)
    else:  # rebias the exponent, round the 13 dropped bits to nearest even
        odd = np.uint32(a >> np.uint32(13)) & np.uint32(1)
        out = np.uint32(np.uint32(a + np.uint32(((15 - 127) << 23) + 0xFFF) + odd) >> np.uint32(13))
    return np.uint16(out | np.uint32(sign >> np.uint32(16)))


@numba.njit(**_JIT)
def _f16_load(h):
    """float16 bits (a uint16) to float32 bits, exactly; a NaN is the quiet NaN of its sign."""
    h = np.uint32(h)
    sign = np.uint32(np.uint32(h & np.uint32(0x8000)) << np.uint32(16))
    a = h & np.uint32(0x7FFF)
    if a >= np.uint32(0x7C00):
        out = np.uint32(0x7F800000) if a == np.uint32(0x7C00) else np.uint32(0x7FC00000)
    elif a >= np.uint32(0x0400):  # normal: rebias the exponent
        out = np.uint32(np.uint32(a << np.uint32(13)) + np.uint32((127 - 15) << 23))
    elif a != np.uint32(0):  # subnormal, a * 2**-24: the exact int-to-float conversion, less 24 in the exponent
        # (integer code, so a denormals-are-zero CPU mode cannot flush the result)
        out = np.uint32(_as_uint32(np.float32(a)) - np.uint32(24 << 23))
    else:
        out = np.uint32(0)
    return _as_float32(np.uint32(out | sign))


# ---- the conversion loops over one tile ----------------------------------------------

@numba.njit(**_JIT)
def load_bf16(src, dst):
    """bfloat16 bits ``src`` (uint16) into float32 ``dst``: exact, the bits shifted up by 16."""
    bits = dst.view(np.uint32)
    for i in range(src.size):
        bits[i] = np.uint32(src[i]) << np.uint32(16)


@numba.njit(**_JIT)
def load_f16(src, dst):
    """float16 bits ``src`` (uint16) into float32 ``dst``: exact."""
    for i in range(src.size):
        dst[i] = _f16_load(src[i])


@numba.njit(**_JIT)
def store_bf16_nearest(src, dst):
    """float32 ``src`` into bfloat16 bits ``dst`` (uint16), to nearest even."""
    bits = src.view(np.uint32)
    largest = np.uint32(0)
    for i in range(bits.size):
        dst[i] = _bf16_nearest(bits[i])
        largest = max(largest, _magnitude(bits[i]))
    if largest > np.uint32(0x7F800000):
        _quiet_nans(bits, dst)


@numba.njit(**_JIT)
def store_f16_nearest(src, dst):
    """float32 ``src`` into float16 bits ``dst`` (uint16), to nearest even."""
    bits = src.view(np.uint32)
    for i in range(bits.size):
        dst[i] = _f16_nearest(bits[i])


@numba.njit(**_JIT)
def store_bf16_stochastic(src, dst, stream, first):
    """float32 ``src`` into bfloat16 bits ``dst`` (uint16), rounded stochastically;
    ``src[0]`` is element ``first`` of its tensor, whose role has the stream ``stream``."""
    bits = src.view(np.uint32)
    counter = np.uint32(stream + np.uint32(first & 0xFFFFFFFF))  # mod 2**32, as formats.rounding_bits
    largest = np.uint32(0)
    for i in range(bits.size):
        dst[i] = _bf16_stochastic(bits[i], _mix32(counter))
        largest = max(largest, _magnitude(bits[i]))
        counter = np.uint32(counter + np.uint32(1))
    if largest > np.uint32(0x7F800000):
        _quiet_nans(bits, dst)


# ---- 8-bit blockwise state (fastopt.formats.quantize and dequantize) ---------------
# Tiles start on a block (the ranges are cut at multiples of BLOCK within each tensor),
# so a tile's blocks are whole blocks of its tensor, the last one maybe shorter.

_MAP_SIGNED, _MAP_UNSIGNED = formats.dynamic_map(True), formats.dynamic_map(False)
# The lookup of a code in one read (fastopt.formats.fused_table: indexed by the whole top
# 16 bits of a ratio, so no clamp; 256 KiB each, of which the ratios of [-1, 1] touch 28).
_FUSED_SIGNED, _FUSED_UNSIGNED = formats.fused_table(True), formats.fused_table(False)
_ZERO_SIGNED, _ZERO_UNSIGNED = formats.zero_code(True), formats.zero_code(False)


# Indices here are unsigned or count from 0 over a block's own views: Numba wraps a
# signed index that may be negative (``a[i]`` with ``i < 0``), and that test kept
# LLVM from vectorizing (it gathered the wrapped indices instead).

@numba.njit(**_JIT)
def _dequantize_block(codes, scale, values, dst):
    for i in range(codes.size):
        dst[i] = values[codes[i]] * scale


@numba.njit(**_JIT)
def load_int8(codes, absmax, values, dst):
    """8-bit ``codes`` and their blocks' ``absmax`` into float32 ``dst``:
    ``values[code] * absmax`` (``values``: the map)."""
    n = codes.size
    for b in range(absmax.size):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        _dequantize_block(codes[lo:hi], absmax[b], values, dst[lo:hi])


@numba.njit(**_JIT)
def _quantize_block(x, codes, fused, zero, ratio):
    """One block: its absmax (returned), and its codes (``fused``: the map's
    fastopt.formats.fused_table; ``ratio``: a float32 scratch of the block's size)."""
    bits = x.view(np.uint32)
    # the largest magnitude as bits: an integer max, which orders non-negative floats
    # as their values and puts any NaN (above 0x7f800000) on top
    largest = np.uint32(0)
    for i in range(bits.size):
        largest = max(largest, _magnitude(bits[i]))
    nan = largest > np.uint32(0x7F800000)
    if nan or largest == np.uint32(0):
        for i in range(codes.size):
            codes[i] = zero
        return _as_float32(np.uint32(0x7FC00000) if nan else largest)
    scale = _as_float32(largest)
    # the divisions first, in a loop of their own that LLVM vectorizes; the table
    # lookups stay scalar (LLVM does not gather on this CPU), but cheap: one read
    # and one integer compare per code
    for i in range(x.size):
        ratio[i] = x[i] / scale
    r = ratio.view(np.uint32)
    for i in range(x.size):
        b = r[i]
        entry = fused[b >> np.uint32(16)]
        flip = np.uint32(np.uint32(0) - np.uint32(b >> np.uint32(31))) & np.uint32(0xFFFF)
        above = np.uint32(np.uint32(b & np.uint32(0xFFFF)) ^ flip) > np.uint32(entry >> np.uint32(8))
        codes[i] = np.uint8(np.uint32(entry & np.uint32(0xFF)) + np.uint32(above))
    if largest == np.uint32(0x7F800000):  # an infinite scale: an infinity's ratio is NaN
        for i in range(x.size):
            if ratio[i] != ratio[i]:
                codes[i] = zero
    return scale


@numba.njit(**_JIT)
def store_int8(src, codes, absmax, fused, zero):
    """float32 ``src`` into 8-bit ``codes`` and ``absmax``, block by block: the block's
    largest magnitude (the quiet NaN if it holds a NaN), then each code by the lookup
    of fastopt.formats.fused_codes (``fused``: the map's table; ``zero``: 0.0's code,
    for a block of zeros, of a NaN, or a NaN ratio)."""
    n = src.size
    ratio = np.empty(BLOCK, np.float32)
    for b in range(absmax.size):
        lo, hi = b * BLOCK, min(n, (b + 1) * BLOCK)
        absmax[b] = _quantize_block(src[lo:hi], codes[lo:hi], fused, np.uint8(zero), ratio[:hi - lo])


# ---- one role of one tile: the float32 view in, the stored format out ----------------
# A thread's scratch is one float32 array of TILE elements per role: param (0),
# grad (1), each state buffer (2 + k). Its views are made from its address, as
# the buffers' are. The helpers of this section are inlined at Numba's IR level:
# called, each would take the table and the scratch array and change their
# reference counts (atomic operations), 5% of an all-float32 update at TILE (and
# views sliced from the scratch array would each change it again). The conversion
# loops are called: they take only views, which have no reference count.

@numba.njit(inline="always", **_JIT)
def _scratch_view(scratch, j, n, tiny):
    """The first ``n`` elements of the scratch array of role ``j``."""
    return numba.carray(_pointer(scratch.ctypes.data + j * TILE * 4, tiny), n)


@numba.njit(inline="always", **_JIT)
def _load(table, row, fmt, t, lo, n, scratch, j, tiny):
    """The float32 values of elements ``[lo, lo + n)`` of tensor ``t`` of role ``row``
    (format ``fmt``): the buffer itself when float32, else loaded into the scratch
    array of role ``j``."""
    if fmt == FLOAT32:
        return _view(table, row, t, lo, n, tiny)
    x = _scratch_view(scratch, j, n, tiny)
    if fmt == BFLOAT16:
        load_bf16(_view16(table, row, t, lo, n), x)
    else:
        load_f16(_view16(table, row, t, lo, n), x)
    return x


@numba.njit(inline="always", **_JIT)
def _load_state(table, row, fmt, signed, t, lo, n, scratch, j, tiny):
    """``_load`` of a state buffer, which may also be 8-bit (its absmax addresses in
    row ``row + 1``, its map the signed one when ``signed``)."""
    if fmt != INT8:
        return _load(table, row, fmt, t, lo, n, scratch, j, tiny)
    x = _scratch_view(scratch, j, n, tiny)
    load_int8(_view8(table, row, t, lo, n), _absmax_view(table, row + 1, t, lo, n, tiny),
              _MAP_SIGNED if signed else _MAP_UNSIGNED, x)
    return x


def _load_states(table, rows, fmts, signs, t, lo, n, scratch, j, tiny):
    """``(_load_state(table, rows[k], fmts[k], signs[k], ..., scratch, j + k, tiny), ...)``
    for each state buffer k; None for an unused one."""


@overload(_load_states, inline="always")
def _load_states_impl(table, rows, fmts, signs, t, lo, n, scratch, j, tiny):
    if len(rows) == 0:
        return lambda table, rows, fmts, signs, t, lo, n, scratch, j, tiny: ()
    if isinstance(rows[0], types.NoneType):
        return lambda table, rows, fmts, signs, t, lo, n, scratch, j, tiny: \
            (None,) + _load_states(table, rows[1:], fmts[1:], signs[1:], t, lo, n, scratch, j + 1, tiny)
    return lambda table, rows, fmts, signs, t, lo, n, scratch, j, tiny: \
        ((_load_state(table, rows[0], fmts[0], signs[0], t, lo, n, scratch, j, tiny),)
         + _load_states(table, rows[1:], fmts[1:], signs[1:], t, lo, n, scratch, j + 1, tiny))


def _store_states(table, rows, fmts, signs, t, lo, values, key, role, tiny):
    """Store each 16-bit or 8-bit state buffer k's tile from its float32 view
    ``values[k]``: bfloat16 rounded stochastically with the bits of role ``role + k``,
    8-bit quantized block by block (a float32 one was updated in place; an unused
    one is None)."""


@overload(_store_states, inline="always")
def _store_states_impl(table, rows, fmts, signs, t, lo, values, key, role, tiny):
    if len(rows) == 0:
        return lambda table, rows, fmts, signs, t, lo, values, key, role, tiny: None
    if isinstance(rows[0], types.NoneType):
        return lambda table, rows, fmts, signs, t, lo, values, key, role, tiny: \
            _store_states(table, rows[1:], fmts[1:], signs[1:], t, lo, values[1:], key, role + 1, tiny)

    def store_states(table, rows, fmts, signs, t, lo, values, key, role, tiny):
        x = values[0]
        if fmts[0] == BFLOAT16:
            store_bf16_stochastic(x, _view16(table, rows[0], t, lo, x.size), _stream(key, t, role), lo)
        elif fmts[0] == INT8:
            codes, absmax = _view8(table, rows[0], t, lo, x.size), _absmax_view(table, rows[0] + 1, t, lo, x.size, tiny)
            if signs[0]:
                store_int8(x, codes, absmax, _FUSED_SIGNED, _ZERO_SIGNED)
            else:
                store_int8(x, codes, absmax, _FUSED_UNSIGNED, _ZERO_UNSIGNED)
        _store_states(table, rows[1:], fmts[1:], signs[1:], t, lo, values[1:], key, role + 1, tiny)
    return store_states


@numba.njit(inline="always", **_JIT)
def _load_param(table, fmt, master, t, lo, n, scratch, tiny):
    """The float32 param values of the tile: the master copy when there is one, else
    the param (loaded from bfloat16 into ``scratch``, or the float32 buffer itself)."""
    return _load(table, MASTER if master else PARAM, FLOAT32 if master else fmt, t, lo, n, scratch, 0, tiny)


@numba.njit(inline="always", **_JIT)
def _store_param(table, fmt, master, t, lo, p, key):
    """Store the updated float32 param values ``p`` of the tile into a 16-bit param:
    the nearest value of the master, else (bfloat16: a float16 param always has a
    master, fastopt.formats.call_formats) rounded stochastically."""
    if fmt == FLOAT32:
        return
    dst = _view16(table, PARAM, t, lo, p.size)
    if not master:
        store_bf16_stochastic(p, dst, _stream(key, t, 0), lo)
    elif fmt == BFLOAT16:
        store_bf16_nearest(p, dst)
    else:
        store_f16_nearest(p, dst)


# ---- the loops -------------------------------------------------------------------

def _mixed_loop(segment, rng, source_key):
    # ``rows``: the table row of each state buffer (None: unused); ``roles``: the
    # (param, grad) formats and whether there is a master copy; ``fmts``: each
    # state buffer's format; ``key``: the call's rounding key; ``blocks``: the
    # number of ranges, one per thread.
    def loop(table, rows, roles, fmts, signs, floats, flags, tiny, key, blocks):
        source_key  # noqa: B018  (only to be in the closure, hence in the cache key)
        param_fmt, grad_fmt, master = roles
        count = table.shape[1]
        sizes = table[table.shape[0] - 1]
        total = 0
        for t in range(count):
            total += sizes[t]
        per = (total + blocks - 1) // blocks
        for b in rng(blocks):
            lo = b * per
            hi = min(total, lo + per)
            scratch = np.empty((2 + len(rows)) * TILE, np.float32)
            offset = 0
            for t in range(count):
                n = sizes[t]
                if offset < hi and offset + n > lo:
                    # the range's ends within the tensor, rounded up to a multiple of BLOCK:
                    # consecutive ranges still partition it, and an 8-bit block is never split
                    start = (max(lo - offset, 0) + BLOCK - 1) // BLOCK * BLOCK
                    end = min((hi - offset + BLOCK - 1) // BLOCK * BLOCK, n)
                    for first in range(start, end, TILE):
                        m = min(TILE, end - first)
                        p = _load_param(table, param_fmt, master, t, first, m, scratch, tiny)
                        g = _load(table, GRAD, grad_fmt, t, first, m, scratch, 1, tiny)
                        state = _load_states(table, rows, fmts, signs, t, first, m, scratch, 2, tiny)
                        segment(p, g, *state, floats, flags, tiny)
                        _store_param(table, param_fmt, master, t, first, p, key)
                        _store_states(table, rows, fmts, signs, t, first, state, key, 1, tiny)
                offset += n
    return loop


def _build(kernel: str, parallel: bool, store):
    segment = getattr(numba_loops, f"_segment_{kernel}{_suffix(store)}")
    py_loop = _mixed_loop(segment, numba.prange if parallel else range, MIXED_SOURCE_KEY)
    py_loop.__qualname__ = py_loop.__name__ = f"{kernel}_mixed_{'parallel' if parallel else 'serial'}{_suffix(store)}"
    return numba.njit(parallel=parallel, **_JIT)(py_loop)


#: (kernel name, store function) -> (serial, parallel) mixed-format loops, each
#: ``loop(table, rows, roles, fmts, signs, floats, flags, tiny, key, blocks)``: ``table``
#: the pointer table (rows PARAM, GRAD, MASTER (any value without a master copy),
#: two rows per state buffer (its values, or an 8-bit one's codes; an 8-bit one's
#: absmax), the element counts), ``rows`` the first row of each state buffer (None:
#: unused), ``roles = (param format, grad format, has master)``, ``fmts`` each state
#: buffer's format (any value when unused), ``signs`` for each whether an 8-bit one
#: uses the signed map, ``floats, flags`` as in numba_loops, ``tiny`` a float32,
#: ``key`` the call's rounding key.
MIXED_LOOPS = {(k, store): (_build(k, False, store), _build(k, True, store))
               for k in KERNEL_SCALARS for store in _STORES}
