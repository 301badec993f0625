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
from numba import cuda, float32, types, uint8, uint16, uint64
from numba.core import config

from ..formats import BFLOAT16, BLOCK, FLOAT16, FLOAT32, INT8, CallFormats, dynamic_map, map_midpoints, zero_code
from ..rules import KERNEL_SCALARS
from .cuda_kernels import STATE, _element, _store

__all__ = ["make_kernel", "signature", "roles"]

_SIMULATOR = bool(config.ENABLE_CUDASIM)
_M32, _M16 = uint64(0xFFFFFFFF), uint64(0xFFFF)
_SIGN16, _QNAN_BF16, _QNAN_F16 = uint64(0x8000), uint64(0x7FC0), uint64(0x7E00)
_ABS32, _INF32, _QNAN32 = uint64(0x7FFFFFFF), uint64(0x7F800000), uint64(0x7FC00000)
_S16, _S13, _S15, _S10, _S23, _U1 = uint64(16), uint64(13), uint64(15), uint64(10), uint64(23), uint64(1)
_K1, _K2 = uint64(0x7FEB352D), uint64(0x846CA68B)
_TWO_M24 = float32(2.0 ** -24)  # a float16 subnormal's unit: exact in float32
# The 8-bit maps and their midpoints (module globals: Numba CUDA makes them constant arrays).
_MAP_SIGNED, _MAP_UNSIGNED = dynamic_map(True), dynamic_map(False)
MIDS_SIGNED, MIDS_UNSIGNED = map_midpoints(True), map_midpoints(False)
ZERO_SIGNED, ZERO_UNSIGNED = zero_code(True), zero_code(False)

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


_LOAD = {FLOAT32: "{a}[{i}]", BFLOAT16: "bf16_load({a}[{i}])", FLOAT16: "f16_load({a}[{i}])",
         INT8: "{map}[{a}_codes[{i}]] * {a}_absmax[blk]"}
_NEAREST = {BFLOAT16: "bf16_nearest", FLOAT16: "f16_nearest"}

# Elementwise formats: a grid-stride loop over elements.
_TEMPLATE = """\
def {name}(param, grad, {arrays}{master}s, tiny, streams):
    for i in range(uint64(cuda.grid(1)), uint64(param.size), uint64(cuda.gridsize(1))):
        p = {load_p}
        p_new, {outs} = element(p, {load_g}, {values}, s)
        p_new = store(p_new, tiny)
{store_p}{stores}"""

# With 8-bit state: one thread block of 256 threads per block of 256 elements (grid-stride
# over blocks), so a block's new absmax is a reduction in shared memory. Threads past the
# end compute on element 0 and store nothing, but take part in every reduction.
_BLOCK_TEMPLATE = """\
def {name}(param, grad, {arrays}{master}s, tiny, streams):
    lanes = cuda.shared.array(BLOCK, float32)
    t = uint64(cuda.threadIdx.x)
    n = uint64(param.size)
    for blk in range(uint64(cuda.blockIdx.x), (n + uint64(BLOCK - 1)) // uint64(BLOCK), uint64(cuda.gridDim.x)):
        i = blk * uint64(BLOCK) + t
        inside = i < n
        j = i if inside else uint64(0)
        p = {load_p}
        p_new, {outs} = element(p, {load_g}, {values}, s)
        p_new = store(p_new, tiny)
        if inside:
{store_p}{stores}{quantize}"""


def block_max(lanes, a, t):
    """The largest of the block's 256 values ``a`` (NaN if any is NaN): a tree in shared memory."""
    lanes[t] = a
    cuda.syncthreads()
    step = uint64(BLOCK // 2)
    while step > uint64(0):
        if t < step:
            x = lanes[t]
            y = lanes[t + step]
            lanes[t] = x if (x > y or x != x) else y
        cuda.syncthreads()
        step = step // uint64(2)
    m = lanes[0]
    cuda.syncthreads()  # (lanes are reused by the next reduction)
    return m


def quantize_signed(x, absmax):
    return _code(x, absmax, MIDS_SIGNED, ZERO_SIGNED)


def quantize_unsigned(x, absmax):
    return _code(x, absmax, MIDS_UNSIGNED, ZERO_UNSIGNED)


def _code(x, absmax, mids, zero):
    """``#{mid < x / absmax}`` by binary search over the 255 midpoints; 0.0's code for a
    block of zeros or a NaN ratio (fastopt.formats.quantize)."""
    if not absmax > float32(0):
        return uint8(zero)
    v = x / absmax
    if v != v:
        return uint8(zero)
    lo = uint64(0)
    hi = uint64(255)
    while lo < hi:  # the first midpoint not below v: #{mid < v}
        mid = (lo + hi) // uint64(2)
        if mids[mid] < v:
            lo = mid + uint64(1)
        else:
            hi = mid
    return uint8(lo)


def roles(formats: CallFormats) -> tuple[int, ...]:
    """The roles a variant rounds stochastically, in its ``streams`` argument's order."""
    roles = (0,) if formats.param == BFLOAT16 and not formats.master else ()
    return roles + tuple(1 + k for k, f in enumerate(formats.state) if f == BFLOAT16)


def _name(kernel: str, formats: CallFormats, flush: bool, signed: tuple = ()) -> str:
    code = "".join("x" if f is None else str(f) + ("" if f != INT8 else "s" if sg else "u")
                   for f, sg in zip(formats.state, signed or (None,) * len(formats.state)))
    return f"fastopt_{kernel}__mixed_p{formats.param}g{formats.grad}s{code}" + ("m" if formats.master else "") \
        + ("__flush" if flush else "")


@functools.lru_cache(maxsize=None)
def make_kernel(kernel: str, formats: CallFormats, flush: bool = False, signed: tuple = ()) -> Callable:
    """The kernel of ``kernel`` for a call in ``formats`` (its ``state``: a format per
    state buffer, None for an absent one; ``signed``: per state buffer, for an 8-bit one
    whether it uses the signed map). Arguments: ``(param, grad, *present state, [master,]
    scalars, tiny, streams)``, an 8-bit buffer as two (its codes, its absmax); 16-bit
    buffers are ``uint16`` arrays of their bits; ``streams``: a tuple of uint64, one per
    role of :func:`roles`."""
    names = STATE[kernel]
    if len(formats.state) != len(names):
        raise ValueError(f"{kernel} has state {names}, got formats {formats.state}")
    signed = signed or (None,) * len(names)
    blocked = INT8 in formats.state
    i = "j" if blocked else "i"  # the index loads use
    pad = " " * (12 if blocked else 8)  # stores (under ``if inside:`` in the block template)
    stream_of = {r: k for k, r in enumerate(roles(formats))}
    present = [(n, f, sg) for n, f, sg in zip(names, formats.state, signed)]

    def load(fmt, a, sg=None):
        return _LOAD[fmt].format(a=a, i=i, map="MAP_SIGNED" if sg else "MAP_UNSIGNED")
    if formats.master:
        load_p = f"master[{i}]"
        store_p = f"{pad}master[i] = p_new\n{pad}param[i] = {_NEAREST[formats.param]}(p_new)\n"
    elif formats.param == BFLOAT16:
        load_p = load(BFLOAT16, "param")
        store_p = f"{pad}param[i] = bf16_stochastic(p_new, mix32(streams[{stream_of[0]}] + i))\n"
    else:
        load_p, store_p = f"param[{i}]", f"{pad}param[i] = p_new\n"
    stores = quantize = ""
    for k, (n, f, sg) in enumerate(present):
        value = f"store({n}_new, tiny)"
        if f == FLOAT32:
            stores += f"{pad}{n}[i] = {value}\n"
        elif f == BFLOAT16:
            stores += f"{pad}{n}[i] = bf16_stochastic({value}, mix32(streams[{stream_of[1 + k]}] + i))\n"
        elif f == INT8:
            quantize += (f"        x = {value}\n"
                         f"        absmax = block_max(lanes, abs(x) if inside else float32(0), t)\n"
                         f"        if inside:\n"
                         f"            {n}_codes[i] = quantize_{'signed' if sg else 'unsigned'}(x, absmax)\n"
                         f"        if t == uint64(0):\n"
                         f"            {n}_absmax[blk] = absmax if absmax == absmax else as_float(_QNAN32)\n")
    name = _name(kernel, formats, flush, signed)
    args = "".join((f"{n}_codes, {n}_absmax, " if f == INT8 else f"{n}, ") for n, f, _ in present if f is not None)
    source = (_BLOCK_TEMPLATE if blocked else _TEMPLATE).format(
        name=name, arrays=args, master="master, " if formats.master else "", load_p=load_p,
        load_g=load(formats.grad, "grad"),
        outs=", ".join(f"{n}_new" if f is not None else "_" for n, f, _ in present),
        values=", ".join(load(f, n, sg) if f is not None else "p" for n, f, sg in present),
        store_p=store_p, stores=stores or ("" if not blocked or store_p else f"{pad}pass\n"), quantize=quantize)
    filename = f"<fastopt cuda kernel {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": __name__, "cuda": cuda, "uint64": uint64, "float32": float32, "BLOCK": BLOCK,
                 "element": _element(kernel), "store": _store(flush), "MAP_SIGNED": _MAP_SIGNED,
                 "MAP_UNSIGNED": _MAP_UNSIGNED, "_QNAN32": _QNAN32, **_DEVICE}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


# On a GPU every helper becomes a device function under its own module name: a device
# function can call only device functions, and these call each other through the module
# globals. In the simulator the arithmetic helpers stay plain Python (a simulated device
# function swaps its globals on every call: 30x slower), and only block_max, which
# synchronizes the block, is a simulated device function.
_DEVICE = {}
for _fn in (as_bits, as_float, mix32, bf16_load, f16_load, _nan_or, bf16_nearest, bf16_stochastic, f16_nearest,
            block_max, _code, quantize_signed, quantize_unsigned):
    _DEVICE[_fn.__name__] = globals()[_fn.__name__] = \
        _fn if _SIMULATOR and _fn is not block_max else _device(_fn)
del _fn


def signature(kernel: str, formats: CallFormats) -> tuple:
    """Numba argument types of ``make_kernel(kernel, formats, flush, signed)``: float32
    compute, ``uint16`` arrays for 16-bit buffers, (uint8 codes, float32 absmax) for 8-bit ones."""
    def array(fmt):
        return types.float32[::1] if fmt == FLOAT32 else types.uint16[::1]
    cls = KERNEL_SCALARS[kernel]
    fields = [types.float32 if hint is float else types.boolean for hint in get_type_hints(cls).values()]
    state = [t for f in formats.state if f is not None
             for t in ((types.uint8[::1], types.float32[::1]) if f == INT8 else (array(f),))]
    master = [types.float32[::1]] if formats.master else []
    return (array(formats.param), array(formats.grad), *state, *master, types.NamedTuple(fields, cls),
            types.float32, types.UniTuple(types.uint64, len(roles(formats))))
