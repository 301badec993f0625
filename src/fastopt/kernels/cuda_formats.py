"""CUDA kernels of the mixed-format updates (:mod:`fastopt.formats`), from one template.

The same three layers as :mod:`fastopt.kernels.cuda_kernels`, with the loads
and stores of each role chosen by its format at code-generation time, so a
variant has no per-element format test: one variant per (element kernel,
present state buffers, flush, formats). Per element of one tensor:

* load: a float32 role is read as is; a bfloat16 one (a ``uint16`` array of its
  bits) is shifted into a float32's high half; a float16 one (its bits too) is
  decoded exactly (a NaN to the quiet NaN of its sign); with a master copy the
  param value is the master's;
* the float32 element function and the store function (flushing or not), as in
  every CUDA kernel;
* store: float32 as is; the param's nearest bfloat16/float16 value when there is
  a master copy (which gets the float32 value); bfloat16 stochastically with the
  bits ``mix32(stream + i)`` of the role's stream (computed on the host,
  :func:`fastopt.formats.stream`, one ``uint64`` argument per role).

The conversions are integer code on the float32 bits, exactly the rules of
:mod:`fastopt.formats`. Bits and floats are exchanged by ``as_bits``/``as_float``:
libdevice's ``__float_as_int``/``__int_as_float`` on a GPU; NumPy views in
Numba's simulator (which has no libdevice), so the simulator checks everything
else (indexing, variants, formats, the hash) against the reference bit for bit,
and PTX compilation checks the GPU versions. Integer arithmetic is uint64 with
uint64 constants (Numba types uint64 with int64 as float64), masked to 32 bits
where the rules are 32-bit.
"""
from __future__ import annotations

import functools
import linecache
from typing import Callable, get_type_hints

import numpy as np
from numba import cuda, float32, types, uint16, uint64
from numba.core import config

from ..formats import BFLOAT16, FLOAT16, FLOAT32, CallFormats
from ..rules import KERNEL_SCALARS
from .cuda_kernels import STATE, _element, _store

__all__ = ["make_kernel", "signature", "roles"]

_SIMULATOR = bool(config.ENABLE_CUDASIM)
_M32, _M16 = uint64(0xFFFFFFFF), uint64(0xFFFF)
_SIGN16, _QNAN_BF16, _QNAN_F16 = uint64(0x8000), uint64(0x7FC0), uint64(0x7E00)
_ABS32, _INF32 = uint64(0x7FFFFFFF), uint64(0x7F800000)
_S16, _S13, _S15, _S10, _S23, _U1 = uint64(16), uint64(13), uint64(15), uint64(10), uint64(23), uint64(1)
_K1, _K2 = uint64(0x7FEB352D), uint64(0x846CA68B)
_TWO_M24 = float32(2.0 ** -24)  # a float16 subnormal's unit: exact in float32

if _SIMULATOR:
    def as_bits(x):
        return uint64(np.array(x, np.float32).view(np.uint32)[()])

    def as_float(b):
        return np.array(b & _M32, np.uint64).astype(np.uint32).view(np.float32)[()]
else:
    from numba.cuda import libdevice

    def as_bits(x):
        return uint64(libdevice.float_as_int(x)) & _M32

    def as_float(b):
        return libdevice.int_as_float(types.int32(b & _M32))


def mix32(x):
    """lowbias32 of the low 32 bits of ``x`` (:func:`fastopt.formats.mix32`)."""
    x = x & _M32
    x ^= x >> _S16
    x = (x * _K1) & _M32
    x ^= x >> _S15
    x = (x * _K2) & _M32
    return x ^ (x >> _S16)


def bf16_load(h):
    return as_float(uint64(h) << _S16)


def f16_load(h):
    h = uint64(h)
    sign = (h & _SIGN16) << _S16
    e = (h >> _S10) & uint64(0x1F)
    m = h & uint64(0x3FF)
    if e == uint64(0x1F):  # infinity, or a NaN: the quiet NaN of its sign
        return as_float(sign | _INF32 | (uint64(0x400000) if m != uint64(0) else uint64(0)))
    if e == uint64(0):  # zero or subnormal: m * 2^-24, exact
        v = float32(m) * _TWO_M24
        return -v if sign != uint64(0) else v
    return as_float(sign | ((e + uint64(112)) << _S23) | (m << _S13))


def _nan_or(b, quiet, value):
    """``value``, or the 16-bit quiet NaN ``quiet`` with the sign of float32 bits ``b`` when they are a NaN."""
    if (b & _ABS32) > _INF32:
        return uint16(((b >> _S16) & _SIGN16) | quiet)
    return uint16(value & _M16)


def bf16_nearest(x):
    b = as_bits(x)
    return _nan_or(b, _QNAN_BF16, (b + uint64(0x7FFF) + ((b >> _S16) & _U1)) >> _S16)


def bf16_stochastic(x, r):
    b = as_bits(x)
    return _nan_or(b, _QNAN_BF16, (b + (r & _M16)) >> _S16)


def f16_nearest(x):
    """IEEE round to nearest even, on the bits: normal, subnormal, overflow to infinity."""
    b = as_bits(x)
    sign = (b >> _S16) & _SIGN16
    a = b & _ABS32
    if a > _INF32:
        return uint16(sign | _QNAN_F16)
    if a >= uint64(0x477FF000):  # 65520 and up round to infinity
        return uint16(sign | uint64(0x7C00))
    if a >= uint64(0x38800000):  # 2^-14 and up: a normal float16
        h = (a >> _S13) - uint64(112 << 10)
        rest = a & uint64(0x1FFF)
        up = rest > uint64(0x1000) or (rest == uint64(0x1000) and (h & _U1) != uint64(0))
        return uint16(sign | (h + (_U1 if up else uint64(0))))
    if a < uint64(0x33000000):  # below 2^-25: to zero (2^-25 itself ties to even: zero)
        return uint16(sign)
    m = (a & uint64(0x7FFFFF)) | uint64(0x800000)
    shift = uint64(126) - (a >> _S23)  # 14..24: the value is m * 2^-(shift + 24) * 2^24 units
    h = m >> shift
    rest = m & ((_U1 << shift) - _U1)
    half = _U1 << (shift - _U1)
    up = rest > half or (rest == half and (h & _U1) != uint64(0))
    return uint16(sign | (h + (_U1 if up else uint64(0))))


def _device(fn):
    return cuda.jit(device=True, inline="always")(fn)


# Every helper becomes a device function under its own module name: a device function
# can call only device functions, and these call each other through the module globals.
_DEVICE = {}
for _fn in (as_bits, as_float, mix32, bf16_load, f16_load, _nan_or, bf16_nearest, bf16_stochastic, f16_nearest):
    _DEVICE[_fn.__name__] = globals()[_fn.__name__] = _device(_fn)
del _fn

_LOAD = {FLOAT32: "{a}[i]", BFLOAT16: "bf16_load({a}[i])", FLOAT16: "f16_load({a}[i])"}
_NEAREST = {BFLOAT16: "bf16_nearest", FLOAT16: "f16_nearest"}

_TEMPLATE = """\
def {name}(param, grad, {arrays}{master}s, tiny, streams):
    for i in range(uint64(cuda.grid(1)), uint64(param.size), uint64(cuda.gridsize(1))):
        p = {load_p}
        p_new, {outs} = element(p, {load_g}, {values}, s)
        p_new = store(p_new, tiny)
{store_p}{stores}"""


def roles(formats: CallFormats) -> tuple[int, ...]:
    """The roles a variant rounds stochastically, in its ``streams`` argument's order."""
    roles = (0,) if formats.param == BFLOAT16 and not formats.master else ()
    return roles + tuple(1 + k for k, f in enumerate(formats.state) if f == BFLOAT16)


def _name(kernel: str, formats: CallFormats, flush: bool) -> str:
    code = "".join("x" if f is None else str(f) for f in formats.state)
    return f"fastopt_{kernel}__mixed_p{formats.param}g{formats.grad}s{code}" + ("m" if formats.master else "") \
        + ("__flush" if flush else "")


@functools.lru_cache(maxsize=None)
def make_kernel(kernel: str, formats: CallFormats, flush: bool = False) -> Callable:
    """The kernel of ``kernel`` for a call in ``formats`` (its ``state``: a format per
    state buffer, None for an absent one). Arguments: ``(param, grad, *present state,
    [master,] scalars, tiny, streams)``; 16-bit buffers are ``uint16`` arrays of their
    bits; ``streams``: a tuple of uint64, one per role of :func:`roles`."""
    names = STATE[kernel]
    if len(formats.state) != len(names):
        raise ValueError(f"{kernel} has state {names}, got formats {formats.state}")
    stream_of = {r: k for k, r in enumerate(roles(formats))}
    present = [(n, f) for n, f in zip(names, formats.state)]
    if formats.master:
        load_p = "master[i]"
        store_p = f"        master[i] = p_new\n        param[i] = {_NEAREST[formats.param]}(p_new)\n"
    elif formats.param == BFLOAT16:
        load_p = _LOAD[BFLOAT16].format(a="param")
        store_p = f"        param[i] = bf16_stochastic(p_new, mix32(streams[{stream_of[0]}] + i))\n"
    else:
        load_p, store_p = "param[i]", "        param[i] = p_new\n"
    stores = ""
    for k, (n, f) in enumerate(present):
        if f is None:
            continue
        value = f"store({n}_new, tiny)"
        stores += (f"        {n}[i] = {value}\n" if f == FLOAT32 else
                   f"        {n}[i] = bf16_stochastic({value}, mix32(streams[{stream_of[1 + k]}] + i))\n")
    name = _name(kernel, formats, flush)
    source = _TEMPLATE.format(
        name=name, arrays="".join(f"{n}, " for n, f in present if f is not None),
        master="master, " if formats.master else "", load_p=load_p, load_g=_LOAD[formats.grad].format(a="grad"),
        outs=", ".join(f"{n}_new" if f is not None else "_" for n, f in present),
        values=", ".join(_LOAD[f].format(a=n) if f is not None else "p" for n, f in present),
        store_p=store_p, stores=stores)
    filename = f"<fastopt cuda kernel {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "cuda": cuda, "uint64": uint64, "element": _element(kernel),
                 "store": _store(flush), **_DEVICE}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


def signature(kernel: str, formats: CallFormats) -> tuple:
    """Numba argument types of ``make_kernel(kernel, formats, flush)``: float32 compute,
    ``uint16`` arrays for 16-bit buffers."""
    def array(fmt):
        return types.float32[::1] if fmt == FLOAT32 else types.uint16[::1]
    cls = KERNEL_SCALARS[kernel]
    fields = [types.float32 if hint is float else types.boolean for hint in get_type_hints(cls).values()]
    state = [array(f) for f in formats.state if f is not None]
    master = [types.float32[::1]] if formats.master else []
    return (array(formats.param), array(formats.grad), *state, *master, types.NamedTuple(fields, cls),
            types.float32, types.UniTuple(types.uint64, len(roles(formats))))
