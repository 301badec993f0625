"""CUDA kernels of the reproducible reductions: sums of squares and max |x|.

The sum of squares must have the host's bits (csrc/src/norm.c,
:mod:`fastopt.kernels.numba_norms`, ``fastopt.backends.reference``): each
tensor in blocks of :data:`BLOCK` elements; in a block, element i goes to lane
i mod :data:`LANES`, each lane summed in index order in float64; the lanes
combined ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))``; the blocks' sums added in
order per tensor, and all of them in order for the total. That order is a
chain of 512 dependent additions per (block, lane), so the mapping is the
simple one: **one CUDA thread per (block, lane)** of one tensor, consecutive
threads on consecutive lanes (a warp reads 4 blocks x 8 consecutive elements
per step: whole 32-byte sectors). The 8 lanes of a block are in one thread
block; they leave their sums in shared memory and the block's lane-0 thread
combines them by the tree and stores the block's sum at ``out[first + b]``
(``first``: the tensor's first block in the call). The host wrapper
(:mod:`fastopt.backends.cuda`) launches once per tensor, copies the block sums
back and adds them in order (``np.add.accumulate``: a sequential sum). The
float32 kernel converts each element to float64 first, as the host does.

Multiply-adds: NVVM would contract ``acc + v*v`` into an FMA (one rounding
instead of two: other bits than the host's for float64 input), and numba-cuda
has no switch for it. The square is ``libdevice.dmul_rn`` (``mul.rn.f64``,
which the compiler never fuses), so the GPU rounds exactly as the host does.
Numba's simulator cannot run libdevice, so there the square is ``v * v`` (the
simulator computes in NumPy float64: the same rounding).

The max |x| kernel takes the same mapping (a maximum is exact in any order;
sharing it keeps one launch geometry and one test): each lane's max |x| as
float64, NaN sticky (``a > m or a != a``: once NaN, no value replaces it),
the block's lanes combined the same way. The host turns any NaN into the
canonical ``np.nan``, as the host backends do.

Launch: a grid of ``ceil(blocks * LANES / threads)`` thread blocks of
``threads`` threads, a multiple of :data:`LANES` and at most
:data:`MAX_THREADS` (the shared array's size). Indices are unsigned, as in
:mod:`fastopt.kernels.cuda_kernels` (no negative-index wraparound checks).

Speed (not yet measured on a GPU): the fixed order allows n / 512 threads per
tensor, so a tensor of 2^24 elements runs 32768 threads, an eighth of what an
H200 keeps resident; each thread's loads are independent (only its additions
chain), but expect below-peak bandwidth on mid-sized tensors. Tensors launch
one after another on one stream; the host's in-order sum of the block results
costs ~1 ns a block.
"""
from __future__ import annotations

import numpy as np
from numba import cuda, float64, types, uint64
from numba.core import config
from numba.cuda import libdevice

__all__ = ["BLOCK", "LANES", "MAX_THREADS", "sumsq_kernel", "maxabs_kernel", "SIGNATURES", "grid"]

#: The reduction's order (csrc/src/norm.c): blocks of BLOCK elements, LANES lanes each.
BLOCK, LANES = 4096, 8
#: Threads per thread block at most (the shared array of lane results has this many entries).
MAX_THREADS = 256

_U_BLOCK, _U_LANES = np.uint64(BLOCK), np.uint64(LANES)


def _square_exact(v):
    return libdevice.dmul_rn(v, v)  # mul.rn.f64: never contracted into an FMA


def _square_simulated(v):
    return v * v  # the simulator has no libdevice; NumPy float64 multiplies with one rounding


_square = cuda.jit(device=True, inline="always")(_square_simulated if config.ENABLE_CUDASIM else _square_exact)


def sumsq_kernel(x, out, first):
    """``out[first + b]`` = the sum of squares of block ``b`` of ``x`` (float64, the host's order)."""
    lanes = cuda.shared.array(MAX_THREADS, float64)
    tid = uint64(cuda.threadIdx.x)
    j = uint64(cuda.blockIdx.x) * uint64(cuda.blockDim.x) + tid  # (block, lane) of this tensor
    b = j // _U_LANES
    lane = j - b * _U_LANES
    n = uint64(x.size)
    lo = b * _U_BLOCK
    hi = min(lo + _U_BLOCK, n)
    acc = float64(0.0)
    for i in range(lo + lane, hi, _U_LANES):
        v = float64(x[i])
        acc += _square(v)
    lanes[tid] = acc
    cuda.syncthreads()
    if lane == 0 and lo < n:
        out[first + b] = (((lanes[tid] + lanes[tid + 1]) + (lanes[tid + 2] + lanes[tid + 3]))
                          + ((lanes[tid + 4] + lanes[tid + 5]) + (lanes[tid + 6] + lanes[tid + 7])))


def maxabs_kernel(x, out, first):
    """``out[first + b]`` = max |x| over block ``b`` of ``x`` (float64; NaN if the block holds one)."""
    lanes = cuda.shared.array(MAX_THREADS, float64)
    tid = uint64(cuda.threadIdx.x)
    j = uint64(cuda.blockIdx.x) * uint64(cuda.blockDim.x) + tid
    b = j // _U_LANES
    lane = j - b * _U_LANES
    n = uint64(x.size)
    lo = b * _U_BLOCK
    hi = min(lo + _U_BLOCK, n)
    m = float64(0.0)
    for i in range(lo + lane, hi, _U_LANES):
        a = abs(float64(x[i]))
        if a > m or a != a:  # NaN sticky: a > NaN is false
            m = a
    lanes[tid] = m
    cuda.syncthreads()
    if lane == 0 and lo < n:
        r = lanes[tid]
        for k in range(uint64(1), _U_LANES):
            v = lanes[tid + k]
            if v > r or v != v:
                r = v
        out[first + b] = r


#: dtype -> the kernels' Numba signature: (x, out (float64 block results), first block index)
SIGNATURES = {np.dtype(np.float32): (types.float32[::1], types.float64[::1], types.uint64),
              np.dtype(np.float64): (types.float64[::1], types.float64[::1], types.uint64)}


def grid(blocks: int, threads: int) -> int:
    """Thread blocks of ``threads`` threads that give each of ``blocks`` norm blocks its LANES threads."""
    if threads % LANES or not 0 < threads <= MAX_THREADS:
        raise ValueError(f"threads per block must be a multiple of {LANES} in [{LANES}, {MAX_THREADS}], got {threads}")
    return -(-blocks * LANES // threads)
