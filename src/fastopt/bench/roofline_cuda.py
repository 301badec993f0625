"""The roofline's trivial kernels on a GPU (Numba CUDA): ``x = scale*g; p += x; s += x``.

A module of its own so that importing :mod:`.roofline` never imports
``numba.cuda``; ``cuda`` must be a module global here for
``NUMBA_ENABLE_CUDASIM=1`` (the simulator swaps module globals, not closures).
Grid-stride loops: any grid covers any size.
"""
from numba import cuda

__all__ = ["KERNELS", "launch_config"]


@cuda.jit
def _k0(scale, p, g):
    i, stride = cuda.grid(1), cuda.gridsize(1)
    while i < p.size:
        p[i] += scale * g[i]
        i += stride


@cuda.jit
def _k1(scale, p, g, a):
    i, stride = cuda.grid(1), cuda.gridsize(1)
    while i < p.size:
        x = scale * g[i]
        p[i] += x
        a[i] += x
        i += stride


@cuda.jit
def _k2(scale, p, g, a, b):
    i, stride = cuda.grid(1), cuda.gridsize(1)
    while i < p.size:
        x = scale * g[i]
        p[i] += x
        a[i] += x
        b[i] += x
        i += stride


@cuda.jit
def _k3(scale, p, g, a, b, c):
    i, stride = cuda.grid(1), cuda.gridsize(1)
    while i < p.size:
        x = scale * g[i]
        p[i] += x
        a[i] += x
        b[i] += x
        c[i] += x
        i += stride


#: Kernel by number of state buffers (0..3).
KERNELS = (_k0, _k1, _k2, _k3)


def launch_config(n: int) -> tuple[int, int]:
    """(blocks, threads per block) for ``n`` elements: 256 threads, one element per
    thread up to 65536 blocks, grid-stride beyond (small arrays get one small block,
    which keeps the simulator fast)."""
    threads = 256 if n >= 256 else max(32, -(-n // 32) * 32)
    return max(1, min(-(-n // threads), 1 << 16)), threads
