"""The sum of squares of many tensors in Numba, in the C library's order.

Each tensor is cut into blocks of :data:`BLOCK` elements; a block is summed in
double in :data:`LANES` interleaved lanes (element i to lane i mod 8, each lane
in index order) combined by a fixed tree, and the blocks' sums are added in
order, tensor by tensor (csrc/src/norm.c says why: the order depends only on
the sizes, so the result is bitwise the same for any thread count, and the
same as C's and the NumPy reference's). The tensors come as a pointer table
(row 0 the addresses, row 1 the element counts), read through the list loops'
views.

The largest magnitude (:data:`MAXABS`, the inf norm) takes the same blocks and
the same pointer table: a block's max |x| (exact in any order), the blocks'
maxima combined in order, a NaN anywhere giving the canonical ``np.nan``
(bits 0x7ff8000000000000, as C's and the reference's).
"""
from __future__ import annotations

import numba
import numpy as np

from .numba_loops import _view

__all__ = ["BLOCK", "LANES", "block_starts", "SUMSQ", "MAXABS"]

BLOCK, LANES = 4096, 8
_JIT = dict(error_model="numpy", cache=True)


@numba.njit(**_JIT)
def _block_sum(x):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    n = x.size
    i = 0
    while i + LANES <= n:
        v0, v1, v2, v3 = np.float64(x[i]), np.float64(x[i + 1]), np.float64(x[i + 2]), np.float64(x[i + 3])
        v4, v5, v6, v7 = np.float64(x[i + 4]), np.float64(x[i + 5]), np.float64(x[i + 6]), np.float64(x[i + 7])
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        a4 += v4 * v4
        a5 += v5 * v5
        a6 += v6 * v6
        a7 += v7 * v7
        i += LANES
    acc = np.array([a0, a1, a2, a3, a4, a5, a6, a7])
    for lane in range(n - i):
        v = np.float64(x[i + lane])
        acc[lane] += v * v
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


def block_starts(sizes: np.ndarray) -> np.ndarray:
    """first[t]: the index of tensor t's first block (first[count]: the number of blocks)."""
    first = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum((sizes + BLOCK - 1) // BLOCK, out=first[1:])
    return first


def _make(rng):
    def sumsq(table, first, tiny, each):
        sizes = table[1]
        blocks = first[first.size - 1]
        sums = np.empty(blocks)
        for b in rng(blocks):
            t = np.searchsorted(first, b, side="right") - 1
            lo = (b - first[t]) * BLOCK
            n = min(BLOCK, sizes[t] - lo)
            sums[b] = _block_sum(_view(table, 0, t, lo, n, tiny))
        total = 0.0
        for b in range(blocks):
            total += sums[b]
        for t in range(each.size):  # (each is empty when the per-tensor sums are not wanted)
            mine = 0.0
            for b in range(first[t], first[t + 1]):
                mine += sums[b]
            each[t] = mine
        return total
    return sumsq


# Module attributes (not closures in a dict) so that their on-disk cache keys are stable.
_sumsq_serial = numba.njit(**_JIT)(_make(range))
_sumsq_parallel = numba.njit(parallel=True, **_JIT)(_make(numba.prange))
#: (serial, parallel): ``f(table, first, tiny, each) -> float``, ``tiny`` a scalar of the dtype, ``each``
#: a float64 array for the per-tensor sums (empty: not wanted).
SUMSQ = (_sumsq_serial, _sumsq_parallel)


@numba.njit(**_JIT)
def _block_max(x):
    """max |x| of one block as a float64, ``np.nan`` if it holds a NaN. Eight
    independent lanes (so LLVM can keep them in one vector); a lane's NaN is found
    by summing its |x|: terms >= 0 make NaN only from a NaN (overflow gives +Inf)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = 0.0
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n = x.size
    i = 0
    while i + LANES <= n:
        a0, a1 = abs(np.float64(x[i])), abs(np.float64(x[i + 1]))
        a2, a3 = abs(np.float64(x[i + 2])), abs(np.float64(x[i + 3]))
        a4, a5 = abs(np.float64(x[i + 4])), abs(np.float64(x[i + 5]))
        a6, a7 = abs(np.float64(x[i + 6])), abs(np.float64(x[i + 7]))
        m0 = a0 if a0 > m0 else m0
        m1 = a1 if a1 > m1 else m1
        m2 = a2 if a2 > m2 else m2
        m3 = a3 if a3 > m3 else m3
        m4 = a4 if a4 > m4 else m4
        m5 = a5 if a5 > m5 else m5
        m6 = a6 if a6 > m6 else m6
        m7 = a7 if a7 > m7 else m7
        s0 += a0
        s1 += a1
        s2 += a2
        s3 += a3
        s4 += a4
        s5 += a5
        s6 += a6
        s7 += a7
        i += LANES
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    s = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while i < n:
        a = abs(np.float64(x[i]))
        m = a if a > m else m
        s += a
        i += 1
    return np.nan if s != s else m


@numba.njit(**_JIT)
def _max_nan(m, b):
    """The larger of ``m`` and ``b``, NaN sticky (the block results' NaNs are all ``np.nan``)."""
    return b if (b > m or b != b) else m


def _make_max(rng):
    def maxabs(table, first, tiny, each):
        sizes = table[1]
        blocks = first[first.size - 1]
        maxima = np.empty(blocks)
        for b in rng(blocks):
            t = np.searchsorted(first, b, side="right") - 1
            lo = (b - first[t]) * BLOCK
            n = min(BLOCK, sizes[t] - lo)
            maxima[b] = _block_max(_view(table, 0, t, lo, n, tiny))
        total = 0.0
        for b in range(blocks):
            total = _max_nan(total, maxima[b])
        for t in range(each.size):  # (each is empty when the per-tensor maxima are not wanted)
            mine = 0.0
            for b in range(first[t], first[t + 1]):
                mine = _max_nan(mine, maxima[b])
            each[t] = mine
        return total
    return maxabs


_maxabs_serial = numba.njit(**_JIT)(_make_max(range))
_maxabs_parallel = numba.njit(parallel=True, **_JIT)(_make_max(numba.prange))
#: (serial, parallel): ``f(table, first, tiny, each) -> float``, the max |x| in float64 (NaN: ``np.nan``),
#: arguments as :data:`SUMSQ`'s (``each``: the per-tensor maxima, empty when not wanted).
MAXABS = (_maxabs_serial, _maxabs_parallel)
