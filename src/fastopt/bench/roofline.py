"""The roofline kernels: the same memory traffic as an update, trivial math.

An optimizer update is memory bound, so its speed limit on a machine is the
time a loop takes to read ``param``, ``grad`` and ``k`` state buffers and write
back ``param`` and the ``k`` state buffers, doing almost nothing in between:

    x = scale*g; p += x; s1 += x; ...; sk += x          (k = 0 .. 3 state buffers)

That loop, timed in the same run as the backends, is the 100% mark of the
``% roofline`` column. The benchmark runs it with ``scale = 0``: every load and
store still happens (``p + 0*g`` cannot be folded without fast-math, since
``0*inf`` is NaN), but the buffers keep their values, so the implementations
timed after it on the same buffers see sane state (``v += g`` a million times
would leave negative second moments and NaNs). Tests run it with ``scale = 1``.

Written in Numba (not C) so it does not depend on the C backend. ``scale`` is
passed in the buffer dtype and there are no literals, so float32 stays float32
and the loop vectorises. Two variants per arity: ``prange`` over the same
thread count as the backends, and a serial loop (a parallel region costs a few
microseconds to start, which dominates small buffers); the runner takes the
faster, and names it.

Checks that the roofline is itself at bandwidth: :func:`host_copy`
(``np.copyto``, single-threaded) is timed next to it. On a GPU the roofline is
a device-to-device copy (:func:`device_copy`, ``cudaMemcpy``); the trivial
kernel (:func:`device_kernel`) is its check row.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numba
import numpy as np
from numba import prange

__all__ = ["host_kernels", "host_copy", "device_kernel", "device_copy", "set_threads", "MAX_STATE"]

_JIT = dict(cache=True, error_model="numpy", nogil=True, boundscheck=False)

#: The most state buffers any rule has (AMSGrad: exp_avg, exp_avg_sq, max_exp_avg_sq).
MAX_STATE = 3


# Serial and parallel variants are separate functions: one cached function
# compiled with two flag sets would share one cache index.

@numba.njit(parallel=True, **_JIT)
def _par0(scale, p, g):
    for i in prange(p.size):
        p[i] += scale * g[i]


@numba.njit(parallel=True, **_JIT)
def _par1(scale, p, g, a):
    for i in prange(p.size):
        x = scale * g[i]
        p[i] += x
        a[i] += x


@numba.njit(parallel=True, **_JIT)
def _par2(scale, p, g, a, b):
    for i in prange(p.size):
        x = scale * g[i]
        p[i] += x
        a[i] += x
        b[i] += x


@numba.njit(parallel=True, **_JIT)
def _par3(scale, p, g, a, b, c):
    for i in prange(p.size):
        x = scale * g[i]
        p[i] += x
        a[i] += x
        b[i] += x
        c[i] += x


@numba.njit(**_JIT)
def _ser0(scale, p, g):
    for i in range(p.size):
        p[i] += scale * g[i]


@numba.njit(**_JIT)
def _ser1(scale, p, g, a):
    for i in range(p.size):
        x = scale * g[i]
        p[i] += x
        a[i] += x


@numba.njit(**_JIT)
def _ser2(scale, p, g, a, b):
    for i in range(p.size):
        x = scale * g[i]
        p[i] += x
        a[i] += x
        b[i] += x


@numba.njit(**_JIT)
def _ser3(scale, p, g, a, b, c):
    for i in range(p.size):
        x = scale * g[i]
        p[i] += x
        a[i] += x
        b[i] += x
        c[i] += x


PARALLEL = (_par0, _par1, _par2, _par3)
SERIAL = (_ser0, _ser1, _ser2, _ser3)


def set_threads(n: int) -> int:
    """Use ``n`` threads in the parallel roofline (capped by Numba's pool); return the count used."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def _arity(arrays: Sequence[Any]) -> int:
    k = len(arrays) - 2
    if not 0 <= k <= MAX_STATE:
        raise ValueError(f"the roofline takes param, grad and 0..{MAX_STATE} state buffers, got {len(arrays)} arrays")
    return k


def host_kernels(arrays: Sequence[np.ndarray], scale: float = 0.0) -> dict[str, Callable[[], None]]:
    """``{variant: callable}``: the roofline loop over ``arrays`` = [param, grad, *state], in place.

    Two variants, in this order: ``"<n> threads"`` (prange, Numba's current thread
    count) and ``"serial"``.
    """
    k = _arity(arrays)
    par, ser = PARALLEL[k], SERIAL[k]
    args = (arrays[0].dtype.type(scale), *arrays)
    threads = numba.get_num_threads()
    return {f"{threads} thread{'s' * (threads != 1)}": lambda: par(*args), "serial": lambda: ser(*args)}


def host_copy(arrays: Sequence[np.ndarray]) -> Callable[[], None]:
    """``np.copyto(param, grad)``: a single-threaded memcpy (2 x itemsize bytes per element)."""
    dst, src = arrays[0], arrays[1]
    return lambda: np.copyto(dst, src)


# --------------------------------------------------------------------------
# CUDA: the kernels live in .roofline_cuda, imported on first use, so the host
# path never imports numba.cuda.
# --------------------------------------------------------------------------

def device_kernel(arrays: Sequence[Any], scale: float = 0.0) -> Callable[[], None]:
    """The trivial kernel on Numba device arrays, grid-stride (see :mod:`.roofline_cuda`)."""
    from . import roofline_cuda

    kernel = roofline_cuda.KERNELS[_arity(arrays)]
    blocks, threads = roofline_cuda.launch_config(arrays[0].size)
    launch = kernel[blocks, threads]
    args = (np.dtype(arrays[0].dtype).type(scale), *arrays)
    return lambda: launch(*args)


def device_copy(arrays: Sequence[Any]) -> Callable[[], None]:
    """Device-to-device copy ``grad -> param`` (``cuMemcpyDtoD``): the GPU bandwidth roofline."""
    dst, src = arrays[0], arrays[1]
    return lambda: dst.copy_to_device(src)
