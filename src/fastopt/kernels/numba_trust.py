"""The Numba loops of the two-pass rules (LAMB, LARS): pass 1 and a per-tensor pass 2.

Pass 1 (:data:`SUMS`) reads each tensor once and reduces ``sum(p*p)`` and
``sum(u*u)`` in double, ``u`` being the update the rule's element function
gives with ``measure`` on (``fastopt.rule.Trust``). The order is the C
library's (csrc/src/trust.c, the same as csrc/src/norm.c's): each tensor cut
into blocks of :data:`BLOCK` elements; per block, ``u`` is computed into a
scratch array by the element loop (the plain loop every kernel has, so it
vectorizes as they do), then both arrays are summed in :data:`LANES`
interleaved lanes (element i to lane i mod 8, each lane in index order) and a
fixed tree; the block sums of a tensor are added in order. Threads only choose
who computes which block, so the sums are bitwise the same for any thread
count, and equal to C's and the NumPy reference's.

Pass 2 (:data:`EACH_LIST_LOOPS`) is the list loop of :mod:`fastopt.kernels.numba_loops`
with one float field of the scalars (the rule's ``trust.field``) taken per
tensor from an array: the threads share the total element count, as in every
list call, whatever the tensors' ratios.

Like the list loops, both run from the call's pointer table (a row of data
addresses per role, then the element counts) and view the tensors through
``numba_loops._view``.
"""
from __future__ import annotations

import inspect

import numba
import numpy as np

from . import elements, stores
from .. import rules
from .numba_loops import SOURCE_KEY, _STORES, _callable_in_jit, _suffix, _view, _views, cast_floats

__all__ = ["BLOCK", "LANES", "block_starts", "SUMS", "EACH_LIST_LOOPS", "FIELD_INDEX"]

BLOCK, LANES = 4096, 8
_JIT = dict(error_model="numpy", cache=True)

#: The two-pass kernels, and the index in their scalars of the field pass 2 takes per tensor.
FIELD_INDEX = {r.kernel: r.scalars._fields.index(r.trust.field) for r in rules.TWO_PASS_RULES.values()}


def block_starts(sizes: np.ndarray) -> np.ndarray:
    """first[t]: the index of tensor t's first block (first[count]: the number of blocks)."""
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum((sizes + BLOCK - 1) // BLOCK, out=first[1:])
    return first


@numba.njit(**_JIT)
def _sumsq_blocks(x, y):
    """The sums of squares of two blocks (x, y) in double: 8 lanes each (element i to
    lane i mod 8, each lane in index order), then the tree; one loop for both (two
    independent chains per lane), the tail without a temporary array. LLVM leaves it
    scalar (measured ~0.55 ns per element pair, 1 thread, where C's vector lanes take
    ~0.13): pass 1 on Numba runs at about half the C library's speed."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = 0.0
    n = x.size
    full = n // LANES
    for j in range(full):
        i = j * LANES
        u0, u1, u2, u3 = np.float64(x[i]), np.float64(x[i + 1]), np.float64(x[i + 2]), np.float64(x[i + 3])
        u4, u5, u6, u7 = np.float64(x[i + 4]), np.float64(x[i + 5]), np.float64(x[i + 6]), np.float64(x[i + 7])
        v0, v1, v2, v3 = np.float64(y[i]), np.float64(y[i + 1]), np.float64(y[i + 2]), np.float64(y[i + 3])
        v4, v5, v6, v7 = np.float64(y[i + 4]), np.float64(y[i + 5]), np.float64(y[i + 6]), np.float64(y[i + 7])
        a0 += u0 * u0
        a1 += u1 * u1
        a2 += u2 * u2
        a3 += u3 * u3
        a4 += u4 * u4
        a5 += u5 * u5
        a6 += u6 * u6
        a7 += u7 * u7
        b0 += v0 * v0
        b1 += v1 * v1
        b2 += v2 * v2
        b3 += v3 * v3
        b4 += v4 * v4
        b5 += v5 * v5
        b6 += v6 * v6
        b7 += v7 * v7
    i = full * LANES
    r = n - i  # the tail: lanes 0 .. r-1 get one more element each
    if r > 0:
        u, v = np.float64(x[i]), np.float64(y[i])
        a0 += u * u
        b0 += v * v
    if r > 1:
        u, v = np.float64(x[i + 1]), np.float64(y[i + 1])
        a1 += u * u
        b1 += v * v
    if r > 2:
        u, v = np.float64(x[i + 2]), np.float64(y[i + 2])
        a2 += u * u
        b2 += v * v
    if r > 3:
        u, v = np.float64(x[i + 3]), np.float64(y[i + 3])
        a3 += u * u
        b3 += v * v
    if r > 4:
        u, v = np.float64(x[i + 4]), np.float64(y[i + 4])
        a4 += u * u
        b4 += v * v
    if r > 5:
        u, v = np.float64(x[i + 5]), np.float64(y[i + 5])
        a5 += u * u
        b5 += v * v
    if r > 6:
        u, v = np.float64(x[i + 6]), np.float64(y[i + 6])
        a6 += u * u
        b6 += v * v
    return (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)),
            ((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7)))


# ---- pass 1 ------------------------------------------------------------------
# The element loop that writes u (the element's first result with s.measure on)
# to `out` and stores nothing else; one shape per number of state buffers.

def _measure1(element, cls, source_key):
    def measure(p, g, a, floats, flags, out):
        source_key  # noqa: B018  (only to be in the closure, hence in the cache key)
        for i in range(p.size):
            s = cls(*(cast_floats(floats, p) + flags))
            z = p[i]
            out[i] = element(p[i], g[i], a[i] if a is not None else z, s)[0]
    return measure


def _measure2(element, cls, source_key):
    def measure(p, g, a, b, floats, flags, out):
        source_key  # noqa: B018
        for i in range(p.size):
            s = cls(*(cast_floats(floats, p) + flags))
            z = p[i]
            out[i] = element(p[i], g[i], a[i] if a is not None else z, b[i] if b is not None else z, s)[0]
    return measure


def _measure3(element, cls, source_key):
    def measure(p, g, a, b, c, floats, flags, out):
        source_key  # noqa: B018
        for i in range(p.size):
            s = cls(*(cast_floats(floats, p) + flags))
            z = p[i]
            out[i] = element(p[i], g[i], a[i] if a is not None else z, b[i] if b is not None else z,
                             c[i] if c is not None else z, s)[0]
    return measure


_MEASURES = {1: _measure1, 2: _measure2, 3: _measure3}


def _measure(kernel: str):
    """The measure loop of ``kernel``, published as a module attribute (so the loops that
    call it pickle it by reference: one on-disk cache key in every process, as
    numba_loops._segment explains) and callable from jitted code."""
    element = getattr(elements, kernel)  # (made callable in jitted code by numba_loops)
    n_state = len(inspect.signature(element).parameters) - 3
    fn = _MEASURES[n_state](element, rules.KERNEL_SCALARS[kernel], SOURCE_KEY)
    fn.__name__ = fn.__qualname__ = f"_measure_{kernel}"
    globals()[fn.__name__] = fn
    return _callable_in_jit(fn, inline="never")


def _sums_loop(measure, rng, source_key):
    def sums(table, rows, floats, flags, tiny, first, param_sumsq, update_sumsq):
        source_key  # noqa: B018
        sizes = table[table.shape[0] - 1]
        count = sizes.size
        blocks = first[count]
        ps = np.empty(blocks)
        us = np.empty(blocks)
        for b in rng(blocks):
            t = np.searchsorted(first, b, side="right") - 1
            lo = (b - first[t]) * BLOCK
            n = min(BLOCK, sizes[t] - lo)
            p = _view(table, 0, t, lo, n, tiny)
            out = np.empty_like(p)
            measure(p, _view(table, 1, t, lo, n, tiny), *_views(table, rows, t, lo, n, tiny), floats, flags, out)
            ps[b], us[b] = _sumsq_blocks(p, out)
        for t in range(count):  # each tensor's blocks, in order
            a = 0.0
            c = 0.0
            for b in range(first[t], first[t + 1]):
                a += ps[b]
                c += us[b]
            param_sumsq[t] = a
            update_sumsq[t] = c
    return sums


def _build_sums(kernel: str, parallel: bool):
    py = _sums_loop(_measure(kernel), numba.prange if parallel else range, SOURCE_KEY)
    py.__qualname__ = py.__name__ = f"{kernel}_trust_sums_{'parallel' if parallel else 'serial'}"
    return numba.njit(parallel=parallel, **_JIT)(py)


#: two-pass kernel -> (serial, parallel) pass-1 loops, each
#: ``f(table, rows, floats, flags, tiny, first, param_sumsq, update_sumsq)``: ``rows`` the
#: table row of each state buffer (None: not read), ``first`` from :func:`block_starts`,
#: the sums written into the two float64 arrays (one value per tensor).
SUMS = {k: (_build_sums(k, False), _build_sums(k, True)) for k in FIELD_INDEX}


# ---- pass 2: per-tensor scalars ------------------------------------------------

def _each_list_loop(segment, rng, source_key, at):
    # numba_loops._list_loop, with float field `at` taken from values[t] for tensor t.
    # `at` and `after` are constants of the closure, so the slices are static
    # (a slice bound computed in the loop would not type).
    after = at + 1

    def loop(table, rows, floats, flags, tiny, blocks, values):
        source_key  # noqa: B018
        count = table.shape[1]
        sizes = table[table.shape[0] - 1]
        total = 0
        for t in range(count):
            total += sizes[t]
        per = (total + blocks - 1) // blocks
        for b in rng(blocks):
            lo = b * per
            hi = min(total, lo + per)
            offset = 0
            for t in range(count):
                n = sizes[t]
                if offset < hi and offset + n > lo:
                    first = max(lo - offset, 0)
                    m = min(hi - offset, n) - first
                    mine = floats[:at] + (values[t],) + floats[after:]
                    segment(_view(table, 0, t, first, m, tiny), _view(table, 1, t, first, m, tiny),
                            *_views(table, rows, t, first, m, tiny), mine, flags, tiny)
                offset += n
    return loop


def _build_each(kernel: str, parallel: bool, store):
    from . import numba_loops
    segment = getattr(numba_loops, f"_segment_{kernel}{_suffix(store)}")
    py = _each_list_loop(segment, numba.prange if parallel else range, SOURCE_KEY, FIELD_INDEX[kernel])
    py.__qualname__ = py.__name__ = f"{kernel}_each_list_{'parallel' if parallel else 'serial'}{_suffix(store)}"
    return numba.njit(parallel=parallel, **_JIT)(py)


#: (two-pass kernel, store function) -> (serial, parallel) pass-2 list loops, each
#: ``loop(table, rows, floats, flags, tiny, blocks, values)``: as numba_loops.LIST_LOOPS,
#: with ``values[t]`` (float64) as tensor t's value of the field ``FIELD_INDEX[kernel]``.
EACH_LIST_LOOPS = {(k, store): (_build_each(k, False, store), _build_each(k, True, store))
                   for k in FIELD_INDEX for store in _STORES}

assert _STORES == (stores.keep, stores.flush_subnormal)
