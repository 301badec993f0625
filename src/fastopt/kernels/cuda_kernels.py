"""CUDA kernels for every element kernel, generated from one template.

The three layers of llm.c's ``adamw.cuh``:

1. the element function (:mod:`fastopt.kernels.elements`, shared with the Numba
   CPU backend), compiled as an always-inlined device function;
2. a kernel that only indexes: a grid-stride loop that loads one element of
   every buffer, calls the element function and stores what it returns;
3. the host wrapper (:mod:`fastopt.backends.cuda`) that precomputes nothing
   itself (``fastopt.rules`` did), picks the variant and launches.

One kernel source is generated per (element kernel, which state buffers are
present). An absent optional buffer (no ``max_exp_avg_sq`` without AMSGrad, no
``momentum_buffer`` for plain SGD) is not an argument and is never loaded: the
element function gets the parameter value as a dummy, ignores it because the
matching flag in the scalars is off, and its result is dropped. Each variant is
compiled per dtype with an explicit signature (:func:`signature`), so the
scalars arrive as a struct of buffer-dtype floats and a launch does no type
inference.

This module imports ``numba.cuda``: only the CUDA backend and its tests use it.
"""
from __future__ import annotations

import functools
import linecache
from typing import Callable, get_type_hints

import numpy as np
from numba import cuda, types, uint64

from ..rules import KERNEL_RULES, KERNEL_SCALARS
from . import elements, stores

__all__ = ["STATE", "make_kernel", "signature", "nonfinite_kernel", "NONFINITE_SIGNATURES"]

#: element kernel -> names of its state buffers, in the rule's (and the element function's) order
#: (the two-pass and matrix rules' too: their passes are ordinary kernels)
STATE: dict[str, tuple[str, ...]] = {r.kernel: r.state for r in KERNEL_RULES.values()}

# Indices are unsigned: with signed ones Numba wraps negative indices, which
# costs a compare and a select on every load and store.
_TEMPLATE = """\
def {name}(param, grad, {arrays}s, tiny):
    for i in range(uint64(cuda.grid(1)), uint64(param.size), uint64(cuda.gridsize(1))):
        p = param[i]
        p_new, {outs} = element(p, grad[i], {values}, s)
        param[i] = store(p_new, tiny)
{stores}"""


@functools.lru_cache(maxsize=None)
def _element(kernel: str):
    return cuda.jit(device=True, inline="always")(getattr(elements, kernel))


@functools.lru_cache(maxsize=None)
def _store(flush: bool):
    return cuda.jit(device=True, inline="always")(stores.flush_subnormal if flush else stores.keep)


def _variant_name(kernel: str, present: tuple[bool, ...], flush: bool = False) -> str:
    absent = [n for n, here in zip(STATE[kernel], present) if not here]
    return f"fastopt_{kernel}" + "".join(f"__no_{n}" for n in absent) + ("__flush" if flush else "")


@functools.lru_cache(maxsize=None)
def make_kernel(kernel: str, present: tuple[bool, ...], flush: bool = False) -> Callable:
    """The Python source of the kernel for ``kernel`` with the state buffers
    flagged in ``present`` (one bool per name in ``STATE[kernel]``), storing
    through :func:`fastopt.kernels.stores.flush_subnormal` when ``flush`` else
    :func:`~fastopt.kernels.stores.keep`.

    Its arguments are ``(param, grad, *present state buffers, scalars, tiny)``
    (``tiny``: the dtype's smallest normal value, for the store function).
    Returns the plain function; compile it with ``cuda.jit(signature(...))``
    or ``cuda.compile_ptx``.
    """
    names = STATE[kernel]
    if len(present) != len(names):
        raise ValueError(f"{kernel} has state {names}, got presence flags {present}")
    name = _variant_name(kernel, present, flush)
    source = _TEMPLATE.format(
        name=name,
        arrays="".join(f"{n}, " for n, here in zip(names, present) if here),
        outs=", ".join(f"{n}_new" if here else "_" for n, here in zip(names, present)),
        values=", ".join(f"{n}[i]" if here else "p" for n, here in zip(names, present)),
        stores="".join(f"        {n}[i] = store({n}_new, tiny)\n" for n, here in zip(names, present) if here),
    )
    filename = f"<fastopt cuda kernel {name}>"
    # Registered so tracebacks (and the simulator) can show the generated source.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "cuda": cuda, "uint64": uint64, "element": _element(kernel),
                 "store": _store(flush)}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def signature(kernel: str, dtype, present: tuple[bool, ...]) -> tuple:
    """Numba argument types of ``make_kernel(kernel, present, flush)`` for buffers of ``dtype``.

    Every float field of the scalars tuple has the buffer dtype (no float64
    promotion in a float32 kernel); flags are booleans.
    """
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"CUDA kernels take float32 or float64 buffers, got {np.dtype(dtype)}")
    f = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    cls = KERNEL_SCALARS[kernel]
    fields = [f if hint is float else types.boolean for hint in get_type_hints(cls).values()]
    array = f[::1]
    return (array, array, *[array] * sum(present), types.NamedTuple(fields, cls), f)


def nonfinite_kernel(x, found):
    """Set ``found[0] = 1`` if any element of ``x`` is NaN or +-Inf.

    ``v - v`` is 0 for finite ``v`` and NaN otherwise (no float literal, so no
    float64 promotion). Many threads may store 1 at once: same value, no atomic.
    """
    for i in range(uint64(cuda.grid(1)), uint64(x.size), uint64(cuda.gridsize(1))):
        v = x[i]
        d = v - v
        if d != d:
            found[0] = 1


NONFINITE_SIGNATURES = {np.dtype(np.float32): (types.float32[::1], types.int32[::1]),
                        np.dtype(np.float64): (types.float64[::1], types.int32[::1])}
