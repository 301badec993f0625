"""Storage formats: how each buffer of an update is held in memory.

The rules compute in float32 or float64 (:mod:`fastopt.kernels.elements`);
a *format* says how a buffer role is loaded into the compute dtype and stored
back (docs/design.md, section 5). A call whose buffers are all float32, or
all float64, is the plain case. Any other mix is a *mixed-format call*: it
computes in float32, and each role has its own format:

==============  =====================================  =================================
role            formats                                stored as
==============  =====================================  =================================
param           float32; bfloat16; float16             bf16 without a master copy:
                                                       stochastic rounding; with one:
                                                       round to nearest even
master_param    float32 (optional for a bf16 param,    as computed
                required for a float16 one)
grad            float32; bfloat16; float16             (read only)
each state      float32; bfloat16                      bf16: stochastic rounding
==============  =====================================  =================================

Host bfloat16 arrays are NumPy arrays of ``ml_dtypes.bfloat16`` (recognised
by the dtype's name, so this module does not import ml_dtypes). With a master
copy the update reads ``master_param``, writes it, and writes ``param`` as
its nearest 16-bit value, in the same pass (apex's and DeepSpeed's master
weights, without a separate copy kernel).

**Conversions**, defined on the bits so that every backend gives the same
ones (this module is their executable specification, in NumPy):

* load: bfloat16 to float32 is exact (the bits shifted up by 16); float16 to
  float32 is exact, a NaN becomes ``0x7fc00000`` with the sign of the input;
* bfloat16 round to nearest even: ``(b + 0x7fff + (b >> 16 & 1)) >> 16`` of
  the float32 bits ``b``; a NaN becomes ``0x7fc0`` with its sign (what
  ``ml_dtypes`` gives);
* float16 round to nearest even (IEEE, subnormals included, overflow to
  infinity); a NaN becomes ``0x7e00`` with its sign;
* bfloat16 stochastic rounding: ``(b + (r & 0xffff)) >> 16``, ``r`` 32
  random bits (below): rounds away from zero with probability equal to the
  dropped fraction, so the expected stored value is the computed one (small
  updates survive in expectation where round-to-nearest loses them); an
  infinity stays infinite, a NaN becomes ``0x7fc0`` with its sign.

**Random bits** come from a counter-based hash, never from a generator's
state, so they depend only on (seed, step, tensor position, role, element
index), not on the thread count, the CPU path or the backend:

* ``mix32``: Chris Wellons' ``lowbias32`` (an invertible 32-bit mixer);
* the call's key, from ``rounding_seed`` (an int in [0, 2**64)) and the step
  (:func:`rounding_key`);
* per tensor ``t`` of the call (0 for a flat buffer) and role ``r`` (0: param,
  1 + k: state buffer k in the rule's order), the stream
  ``s = mix32(key ^ mix32(t * 16 + r))``;
* element ``i`` (C order within its tensor): ``r_i = mix32(s + i)`` (mod
  2**32; a tensor of more than 2**32 elements repeats its stream).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["FLOAT32", "BFLOAT16", "FLOAT16", "INT8", "BLOCK", "QUIET_NAN", "Int8State", "FORMAT_NAMES", "CallFormats", "format_of", "rounding_key",
           "mix32", "rounding_bits", "load", "bf16_nearest", "bf16_stochastic", "f16_nearest"]

#: Format codes (the C library's ``FASTOPT_FORMAT_*``); INT8: 8-bit blockwise state (below).
FLOAT32, BFLOAT16, FLOAT16, INT8 = 0, 1, 2, 3
FORMAT_NAMES = {FLOAT32: "float32", BFLOAT16: "bfloat16", FLOAT16: "float16", INT8: "int8"}
#: A role is at most this many per tensor (param and the state buffers) in a stream's index.
ROLES_PER_TENSOR = 16

_M32 = 0xFFFFFFFF


class CallFormats(NamedTuple):
    """The formats of one mixed-format call: one code per role (``state``: per state
    buffer of the rule, None for one the call does not use), and whether a float32
    master copy of the param is given."""
    param: int
    grad: int
    state: tuple
    master: bool


def format_of(dtype: Any) -> Optional[int]:
    """The format code of a NumPy dtype (float32, ml_dtypes.bfloat16, float16), else None."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return FLOAT32
    if dtype == np.float16:
        return FLOAT16
    if dtype.name == "bfloat16" and dtype.itemsize == 2:
        return BFLOAT16
    return None


# ---- random bits ---------------------------------------------------------------

def mix32(x: Any) -> Any:
    """lowbias32 of a Python int or a uint32 array: ``x ^= x >> 16; x *= 0x7feb352d;
    x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16``, mod 2**32."""
    if isinstance(x, np.ndarray):
        x = x.astype(np.uint32, copy=True)
        with np.errstate(over="ignore"):
            x ^= x >> np.uint32(16)
            x *= np.uint32(0x7FEB352D)
            x ^= x >> np.uint32(15)
            x *= np.uint32(0x846CA68B)
            x ^= x >> np.uint32(16)
        return x
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int) -> int:
    """The 32-bit key of one call's random bits:
    ``mix32(lo(seed) ^ mix32(hi(seed) ^ mix32(lo(step) ^ mix32(hi(step)))))``
    (lo, hi: the low and high 32 bits of a 64-bit value)."""
    return mix32((seed & _M32) ^ mix32((seed >> 32) ^ mix32((step & _M32) ^ mix32(step >> 32))))


def stream(key: int, tensor: int, role: int) -> int:
    """The stream of role ``role`` of tensor ``tensor`` of a call with key ``key``."""
    return mix32(key ^ mix32((tensor * ROLES_PER_TENSOR + role) & _M32))


def rounding_bits(key: int, tensor: int, role: int, size: int) -> np.ndarray:
    """The random bits of elements ``0..size-1`` of one buffer (uint32)."""
    s = np.uint32(stream(key, tensor, role))
    with np.errstate(over="ignore"):
        return mix32(np.arange(size, dtype=np.uint64).astype(np.uint32) + s)


# ---- conversions (the reference: whole arrays, exact bit rules) ------------------

def load(a: np.ndarray) -> np.ndarray:
    """The float32 values of a float32, bfloat16 or float16 array (a new array, except
    for float32: the array itself)."""
    fmt = format_of(a.dtype)
    if fmt == FLOAT32:
        return a
    bits = a.view(np.uint16)
    if fmt == BFLOAT16:
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    x = a.astype(np.float32)
    nan = np.isnan(x)
    if nan.any():
        sign = (bits.astype(np.uint32) & np.uint32(0x8000)) << np.uint32(16)
        x[nan] = (sign[nan] | np.uint32(0x7FC00000)).view(np.float32)
    return x


def _bits32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def _nan16(b: np.ndarray, out: np.ndarray, quiet: int) -> np.ndarray:
    """``out`` with every element whose float32 bits ``b`` are a NaN set to ``quiet``
    with the NaN's sign."""
    nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        out[nan] = ((b[nan] >> np.uint32(16)) & np.uint32(0x8000) | np.uint32(quiet)).astype(np.uint16)
    return out


def bf16_nearest(x: np.ndarray) -> np.ndarray:
    """float32 values to bfloat16 bits (uint16), rounding to nearest even."""
    b = _bits32(x)
    with np.errstate(over="ignore"):
        out = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return _nan16(b, out, 0x7FC0)


def bf16_stochastic(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """float32 values to bfloat16 bits (uint16), rounding stochastically with the
    random ``bits`` (uint32, one per element)."""
    b = _bits32(x)
    with np.errstate(over="ignore"):
        out = ((b + (bits & np.uint32(0xFFFF))) >> np.uint32(16)).astype(np.uint16)
    return _nan16(b, out, 0x7FC0)


def f16_nearest(x: np.ndarray) -> np.ndarray:
    """float32 values to float16 bits (uint16), rounding to nearest even (IEEE)."""
    b = _bits32(x)
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint16).copy()
    return _nan16(b, out, 0x7E00)


def store(dst: np.ndarray, x: np.ndarray, fmt: int, bits: Optional[np.ndarray] = None) -> None:
    """Write float32 values ``x`` into ``dst`` of format ``fmt``: float32 as is,
    bfloat16 stochastically when ``bits`` are given (else to nearest), float16 to
    nearest."""
    if fmt == FLOAT32:
        if dst is not x:
            dst[...] = x
        return
    flat = dst.reshape(-1).view(np.uint16)
    x = x.reshape(-1)
    if fmt == BFLOAT16:
        flat[...] = bf16_nearest(x) if bits is None else bf16_stochastic(x, bits)
    else:
        flat[...] = f16_nearest(x)


def stochastic_roles(formats: CallFormats) -> list[int]:
    """The roles a call rounds stochastically: the param (role 0) when it is bfloat16
    without a master copy, and each bfloat16 state buffer (role 1 + k)."""
    roles = [0] if formats.param == BFLOAT16 and not formats.master else []
    return roles + [1 + k for k, f in enumerate(formats.state) if f == BFLOAT16]


def describe(formats: CallFormats, state_names: Sequence[str]) -> str:
    """``param bfloat16 (master float32), grad bfloat16, exp_avg bfloat16, ...`` for messages."""
    parts = [f"param {FORMAT_NAMES[formats.param]}" + (" (master float32)" if formats.master else ""),
             f"grad {FORMAT_NAMES[formats.grad]}"]
    parts += [f"{n} {FORMAT_NAMES[f]}" for n, f in zip(state_names, formats.state) if f is not None]
    return ", ".join(parts)


# ---- the formats of a call --------------------------------------------------------

_ALLOWED = {"param": (FLOAT32, BFLOAT16, FLOAT16), "grad": (FLOAT32, BFLOAT16, FLOAT16),
            "master_param": (FLOAT32,)}
_STATE_ALLOWED = (FLOAT32, BFLOAT16, INT8)


def is_mixed(param: Any, grad: Any, state: Sequence[Any]) -> bool:
    """Whether a call's host buffers (arrays or lists of arrays) hold a 16-bit format:
    the first array of each role is looked at (the checks look at every one)."""
    for buf in (param, grad, *state):
        a = buf[0] if isinstance(buf, (list, tuple)) and buf else buf
        if type(a) is np.ndarray and a.dtype.itemsize == 2 and format_of(a.dtype) is not None \
                or type(a) is Int8State:
            return True
    return False


def call_formats(names: Sequence[str], buffers: Sequence[Any], listed: bool, state_names: Sequence[str],
                 used: Sequence[Any]) -> CallFormats:  # noqa: C901 (one check after another)
    """The formats of a mixed-format call whose buffers passed the shape, layout and
    overlap checks (``fastopt.buffers`` with ``any_dtype=True``): ``names[i]`` names
    ``buffers[i]`` (an array, or a list when ``listed``): param, grad, the state
    buffers given, then ``master_param`` when given; ``used[k]``: state buffer k of
    the rule as the call uses it (None: unused). Raises TypeError/ValueError naming
    the argument (and position) whose dtype no format of its role takes."""
    found = {}
    for name, buf in zip(names, buffers):
        arrays = buf if listed else (buf,)
        where = (lambda i: f"{name}[{i}]") if listed else (lambda i: name)
        fmt0 = None
        for i, a in enumerate(arrays):
            if type(a) is Int8State:
                fmt = INT8
            elif type(a) is not np.ndarray:
                raise TypeError(f"{where(i)} is a device array: updates with bfloat16 or float16 buffers run "
                                "on the host backends (numpy, numba, c) for now")
            else:
                fmt = format_of(a.dtype)
            allowed = _ALLOWED.get(name, _STATE_ALLOWED)
            if fmt not in allowed:
                kinds = " or ".join(FORMAT_NAMES[f] for f in allowed)
                got = "an 8-bit Int8State" if fmt == INT8 else f"dtype {a.dtype}"
                raise TypeError(f"{where(i)} has {got}; in an update with bfloat16, float16 or 8-bit buffers "
                                f"(computed in float32) {name} must be {kinds}")
            if fmt0 is None:
                fmt0 = fmt
            elif fmt != fmt0:
                got = "an 8-bit Int8State" if fmt == INT8 else f"dtype {a.dtype}"
                raise TypeError(f"{where(i)} has {got}, expected {FORMAT_NAMES[fmt0]} (the format of "
                                f"{where(0)}); every array of one role has one format")
        found[name] = FLOAT32 if fmt0 is None else fmt0
    master = "master_param" in found
    param = found["param"]
    if master and param == FLOAT32:
        raise ValueError("master_param is the float32 master copy of a bfloat16 or float16 param, "
                         "but param is float32 (pass no master_param)")
    if param == FLOAT16 and not master:
        raise ValueError("a float16 param needs a float32 master copy (master_param=...): float16's range and "
                         "precision are too small to accumulate updates in (a bfloat16 param may go without one, "
                         "with stochastic rounding)")
    state = tuple(None if u is None else found[n] for n, u in zip(state_names, used))
    return CallFormats(param, found["grad"], state, master)


def state_dtype(value: Any, param_dtype: Any, where: str = "state_dtype") -> np.dtype:
    """The dtype of an optimizer's state buffers from its ``state_dtype`` option: None
    (float32 for a 16-bit param, else the param's dtype), ``"float32"``,
    ``"bfloat16"`` (or NumPy/ml_dtypes dtypes of those), ``"int8"`` (8-bit blockwise:
    :class:`Int8State`, returned as ``np.dtype(np.int8)``). TypeError/ValueError names
    ``where`` and the value."""
    param_dtype = np.dtype(param_dtype)
    if value is None:
        return np.dtype(np.float32) if format_of(param_dtype) in (BFLOAT16, FLOAT16) else param_dtype
    if isinstance(value, str) and value == "int8":
        if param_dtype == np.float64:
            raise ValueError(f"{where} int8 needs a float32, bfloat16 or float16 param buffer (an update with "
                             "8-bit state computes in float32), got float64")
        return np.dtype(np.int8)
    try:
        dtype = bfloat16() if isinstance(value, str) and value == "bfloat16" else np.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or format_of(dtype) not in _STATE_ALLOWED and dtype != np.float64:
        raise ValueError(f"{where} must be None, 'float32', 'bfloat16' or 'int8', got {value!r}")
    if dtype == np.float64 and param_dtype != np.float64:
        raise ValueError(f"{where} float64 needs a float64 param buffer, got {param_dtype}")
    if format_of(dtype) == BFLOAT16 and param_dtype == np.float64:
        raise ValueError(f"{where} bfloat16 needs a float32, bfloat16 or float16 param buffer "
                         "(an update with bfloat16 buffers computes in float32), got float64")
    return dtype


def bfloat16() -> np.dtype:
    """NumPy's bfloat16 dtype (from ml_dtypes, imported here, at the first use)."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def convert_into(dst: np.ndarray, src: Any) -> None:
    """Copy ``src`` (any float array of ``dst``'s shape) into ``dst``, converting to its
    format by round to nearest even (loading a float32 state dict into bfloat16 state)."""
    src = np.asarray(src)
    fmt = format_of(dst.dtype)
    if fmt is None or fmt == FLOAT32 or format_of(src.dtype) == fmt:
        np.copyto(dst, src if format_of(src.dtype) in (None, FLOAT32) else load(src), casting="unsafe")
        return
    x = load(src) if format_of(src.dtype) is not None else src.astype(np.float32)
    store(dst, np.ascontiguousarray(x, dtype=np.float32), fmt)


# ---- 8-bit blockwise state (bitsandbytes' scheme) -----------------------------------

#: The block of 8-bit state: one float32 absmax per 256 elements.
BLOCK = 256


def _dynamic_map_values(signed: bool) -> list[float]:
    """bitsandbytes' ``create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)``
    (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep Learning"), in float64:
    per decade 10^-6 .. 10^0 the midpoints of an even split of [0.1, 1] (twice as many
    per decade for the unsigned map, which has no negative half), then 0 and 1."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1.0, items)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += list(10.0 ** (i - 6) * means)
        if signed:
            data += list(-(10.0 ** (i - 6)) * means)
    data += [0.0, 1.0]
    assert len(data) == 256
    return sorted(data)


_MAPS: dict = {}


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 float32 values an 8-bit code stands for (times its block's absmax),
    ascending: the signed map for buffers that may be negative (first moments), the
    unsigned one (finer, non-negative) for second moments and sums of squares."""
    got = _MAPS.get(signed)
    if got is None:
        values = np.array(_dynamic_map_values(signed), np.float64)
        mids = ((values[:-1] + values[1:]) / 2.0).astype(np.float32)
        got = _MAPS[signed] = (values.astype(np.float32), mids)
        got[0].setflags(write=False)
        got[1].setflags(write=False)
    return got[0]


def zero_code(signed: bool) -> int:
    """The code of 0.0 in the map (every code of a fresh or all-zero block)."""
    return int(np.searchsorted(dynamic_map(signed), 0.0))


def map_midpoints(signed: bool) -> np.ndarray:
    """The 255 decision boundaries of quantization: float32 of the float64 midpoints of
    neighbouring map values. A normalized value ``x`` gets the code ``#{mid < x}``
    (the nearest map value; a tie goes to the lower one)."""
    dynamic_map(signed)
    return _MAPS[signed][1]


def blocks(size: int) -> int:
    """The number of absmax values of an 8-bit buffer of ``size`` elements."""
    return -(-int(size) // BLOCK)


def quantize(x: np.ndarray, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8, absmax float32) of float32 values ``x`` (flat), per block of 256
    elements (the last one shorter): ``absmax = max |x|`` (the quiet NaN ``0x7fc00000``
    when the block holds a NaN), ``code = #{mid < x / absmax}`` in float32 (a block of zeros: absmax 0 and
    every code 0.0's; a NaN ratio: 0.0's code, so a block with a NaN or an infinity
    dequantizes to NaN or zeros, never to a wrong finite number... see dequantize)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    n = x.size
    pad = np.zeros(blocks(n) * BLOCK, np.float32)
    pad[:n] = x
    b = pad.reshape(-1, BLOCK)
    with np.errstate(invalid="ignore", divide="ignore"):
        absmax = np.max(np.abs(b), axis=1)  # (NaN propagates)
        norm = b / absmax[:, None]
    zero = zero_code(signed)
    codes = np.searchsorted(map_midpoints(signed), norm, side="left").astype(np.uint8)
    codes[~(absmax[:, None] > 0) | np.isnan(norm)] = zero  # (absmax 0 or NaN; a NaN ratio)
    nan_block = np.isnan(absmax)
    if nan_block.any():
        codes[nan_block] = zero
        absmax[nan_block] = QUIET_NAN  # (one NaN, whichever payloads the block held)
    return codes.reshape(-1)[:n], absmax.astype(np.float32)


#: The absmax of a block holding a NaN: the float32 quiet NaN 0x7fc00000.
QUIET_NAN = np.uint32(0x7FC00000).view(np.float32)

# ---- quantization without a search (the compiled backends) ----------------------------
# A code is #{mid < v} for v = x / absmax in [-1, 1]. The compiled backends find it
# with one table lookup and one compare instead of a binary search: the top 16 bits
# of v's float32 bits (sign, exponent, 7 mantissa bits) name a *bucket*, an interval
# of values holding at most one midpoint (checked below), and
#     code = first[bucket] + (padded_mids[first[bucket]] < v)
# where first[bucket] = #{mid < every value of the bucket} and padded_mids is the
# midpoints with +inf appended (index 255). Buckets of magnitudes below 2**-27 hold
# no midpoint (the smallest is 1.6e-7) and share the bucket of 2**-27.

#: The magnitude buckets kept: top-16-bit values (sign cleared) BUCKET_LO..BUCKET_HI,
#: exponents 100..127 (2**-27 up to 1.0, the largest |v|).
BUCKET_LO, BUCKET_HI = 100 << 7, (127 << 7) | 0x7F
BUCKETS = BUCKET_HI - BUCKET_LO + 1  # per sign


def bucket_of(v_bits: Any) -> Any:
    """The bucket index (0 .. 2 * BUCKETS - 1) of the float32 bits of ``v``
    (a uint32 array or int): ``clamp(b >> 16 & 0x7fff, BUCKET_LO, BUCKET_HI) - BUCKET_LO``,
    plus BUCKETS for a negative sign."""
    b = np.asarray(v_bits, dtype=np.uint32)
    top = np.clip((b >> np.uint32(16)) & np.uint32(0x7FFF), BUCKET_LO, BUCKET_HI) - np.uint32(BUCKET_LO)
    return (top + (b >> np.uint32(31)) * np.uint32(BUCKETS)).astype(np.uint32)


_FAST: dict = {}


def quantize_tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(first, padded_mids) of the map: ``first`` uint8, one entry per bucket
    (:func:`bucket_of`); ``padded_mids`` float32, the 255 midpoints and +inf."""
    got = _FAST.get(signed)
    if got is not None:
        return got
    mids = map_midpoints(signed)
    mb = mids.view(np.uint32)
    assert np.all(np.abs(mids) >= np.float32(2.0 ** -26)), "a midpoint in the clamped bucket"
    assert np.unique(mb >> np.uint32(16)).size == mids.size, "a bucket with two midpoints"
    top = np.arange(BUCKET_LO, BUCKET_HI + 1, dtype=np.uint32)
    # the smallest value of a positive bucket is its first float; of a negative one,
    # the negative of its last float (a clamped bucket: the same count, no midpoint near 0)
    low_pos = (top << np.uint32(16)).view(np.float32)
    low_neg = -((top << np.uint32(16)) | np.uint32(0xFFFF)).view(np.float32)
    first = np.concatenate([np.searchsorted(mids, low_pos, side="left"),
                            np.searchsorted(mids, low_neg, side="left")]).astype(np.uint8)
    padded = np.append(mids, np.float32(np.inf)).astype(np.float32)
    first.setflags(write=False)
    padded.setflags(write=False)
    got = _FAST[signed] = (first, padded)
    return got


def fused_table(signed: bool) -> np.ndarray:
    """The lookup of :func:`fast_codes` in one read per code: a uint32 per value of the
    top 16 bits ``t`` of a ratio's bits (65536), ``c | threshold << 8`` with ``c =
    first[bucket_of(t << 16)]`` and ``code = c + (x > threshold)`` for ``x`` the ratio's
    low 16 bits (of a negative ratio: ``x ^ 0xffff``, whose order is its value's).
    The threshold is that of the bucket's midpoint ``mids[c]`` when it lies in the
    bucket (its low 16 bits, flipped alike for a negative one), else 0xffff (never
    exceeded: ``mids[c]`` lies above the whole bucket)."""
    got = _FAST.get(("fused", signed))
    if got is not None:
        return got
    first, padded = quantize_tables(signed)
    tops = np.arange(1 << 16, dtype=np.uint32)
    c = first[bucket_of(tops << np.uint32(16))].astype(np.uint32)
    mb = padded[np.minimum(c, 254)].view(np.uint32)  # (c 255: no midpoint above; mids[254] is below)
    inside = (mb >> np.uint32(16) == tops) & (c < 255)
    low = mb & np.uint32(0xFFFF)
    low = np.where(tops >> np.uint32(15) == 1, low ^ np.uint32(0xFFFF), low)
    table = c | np.where(inside, low, np.uint32(0xFFFF)) << np.uint32(8)
    table.setflags(write=False)
    _FAST["fused", signed] = table
    return table


def fused_buckets(signed: bool) -> np.ndarray:
    """:func:`fused_table` over the buckets only (the C library's AVX-512 path reads it: 28
    KB, one gather per code): one uint32 per top 16 bits of a ratio's magnitude from
    ``BUCKET_LO - 1`` to ``BUCKET_HI``, those of non-negative ratios first, then of negative
    ones (``2 * (BUCKETS + 1)`` entries). Entry ``BUCKET_LO - 1`` stands for every smaller
    magnitude: no midpoint lies among them (asserted), so theirs is one entry, a code and the
    threshold 0xffff. Index: ``clamp(b >> 16 & 0x7fff, BUCKET_LO - 1, BUCKET_HI) - (BUCKET_LO
    - 1) + (b >> 31) * (BUCKETS + 1)``; the code as :func:`fused_codes` gives it."""
    got = _FAST.get(("buckets", signed))
    if got is not None:
        return got
    full = fused_table(signed)
    parts = []
    for sign in (0, 1):
        base = sign << 15
        below = full[base:base + BUCKET_LO]
        assert np.all(below == below[0]) and below[0] >> 8 == 0xFFFF, "a midpoint below the buckets"
        parts.append(full[base + BUCKET_LO - 1:base + BUCKET_HI + 1])
    table = np.concatenate(parts)
    table.setflags(write=False)
    _FAST["buckets", signed] = table
    return table


def fused_bucket_codes(v: np.ndarray, signed: bool) -> np.ndarray:
    """:func:`fast_codes` by :func:`fused_buckets` (tested equal)."""
    b = np.ascontiguousarray(v, np.float32).view(np.uint32)
    top = np.clip(b >> np.uint32(16) & np.uint32(0x7FFF), BUCKET_LO - 1, BUCKET_HI) - np.uint32(BUCKET_LO - 1)
    entry = fused_buckets(signed)[top + (b >> np.uint32(31)) * np.uint32(BUCKETS + 1)]
    x = (b & np.uint32(0xFFFF)) ^ np.where(b >> np.uint32(31) == 1, np.uint32(0xFFFF), np.uint32(0))
    return ((entry & np.uint32(0xFF)) + (x > entry >> np.uint32(8))).astype(np.uint8)


def fused_codes(v: np.ndarray, signed: bool) -> np.ndarray:
    """:func:`fast_codes` by :func:`fused_table` (tested equal)."""
    b = np.ascontiguousarray(v, np.float32).view(np.uint32)
    entry = fused_table(signed)[b >> np.uint32(16)]
    x = (b & np.uint32(0xFFFF)) ^ np.where(b >> np.uint32(31) == 1, np.uint32(0xFFFF), np.uint32(0))
    return ((entry & np.uint32(0xFF)) + (x > entry >> np.uint32(8))).astype(np.uint8)


def fast_codes(v: np.ndarray, signed: bool) -> np.ndarray:
    """The codes of normalized values ``v`` (float32, no NaN, |v| <= 1) by the table
    lookup the compiled backends run: equal to ``searchsorted(mids, v)`` (tested)."""
    first, padded = quantize_tables(signed)
    c = first[bucket_of(np.ascontiguousarray(v, np.float32).view(np.uint32))]
    return (c + (padded[c] < v)).astype(np.uint8)


def dequantize(codes: np.ndarray, absmax: np.ndarray, signed: bool) -> np.ndarray:
    """float32 values of 8-bit ``codes`` (flat) and their blocks' ``absmax``:
    ``map[code] * absmax`` in float32. A block whose absmax is NaN or infinite gives NaN
    (or 0 * inf: NaN) for every element: a non-finite state value spoils its block."""
    codes = codes.reshape(-1)
    scale = np.repeat(absmax.astype(np.float32), BLOCK)[:codes.size]
    with np.errstate(invalid="ignore", over="ignore"):
        return dynamic_map(signed)[codes] * scale


class Int8State:
    """An 8-bit blockwise state buffer: ``codes`` (uint8, the param's shape), ``absmax``
    (float32, one per block of 256 elements in C order) and the map (``signed``).

    Pass it where the update takes that state buffer (``fastopt.adamw_(p, g,
    Int8State.zeros(p.shape), Int8State.zeros(p.shape, signed=False), step=t)``); the
    update dequantizes each block, updates it and quantizes it again in the same pass.
    ``dequantize()`` gives the float32 values.
    """

    __slots__ = ("codes", "absmax", "signed")

    def __init__(self, codes: np.ndarray, absmax: np.ndarray, signed: bool = True) -> None:
        self.codes, self.absmax, self.signed = codes, absmax, bool(signed)

    @classmethod
    def zeros(cls, shape: Any, signed: bool = True) -> "Int8State":
        """State of zeros (a fresh moment buffer) of ``shape``."""
        size = int(np.prod(shape))
        return cls(np.full(shape, zero_code(signed), np.uint8), np.zeros(blocks(size), np.float32), signed)

    @classmethod
    def from_float(cls, values: Any, signed: bool = True) -> "Int8State":
        """The quantized ``values`` (a float array: loading a float32 state dict)."""
        values = np.asarray(values)
        x = load(values) if format_of(values.dtype) is not None else values.astype(np.float32)
        codes, absmax = quantize(x, signed)
        return cls(codes.reshape(values.shape), absmax, signed)

    @property
    def shape(self) -> tuple:
        return self.codes.shape

    @property
    def size(self) -> int:
        return self.codes.size

    def dequantize(self) -> np.ndarray:
        """The float32 values, in the codes' shape."""
        return dequantize(self.codes, self.absmax, self.signed).reshape(self.codes.shape)

    def __repr__(self) -> str:
        return f"Int8State(shape={self.codes.shape}, signed={self.signed})"


def codes_of(buf: Any) -> Any:
    """What the layout checks see of a state argument: an Int8State's codes (or a list of
    them), anything else as it is."""
    if type(buf) is Int8State:
        return buf.codes
    if isinstance(buf, (list, tuple)) and any(type(b) is Int8State for b in buf):
        return [b.codes if type(b) is Int8State else b for b in buf]
    return buf


def check_int8(name: str, state: Any, signed_buffer: bool) -> list[tuple[str, np.ndarray]]:
    """Check an 8-bit state argument (an Int8State or a list of them) beyond its codes'
    layout (checked with the other buffers): codes uint8, absmax a writable C-contiguous
    float32 array of one value per block, a signed map for a buffer that may be negative.
    Returns the (name, absmax) pairs, for the overlap check. TypeError/ValueError names
    the argument and position."""
    listed = isinstance(state, (list, tuple))
    out = []
    for i, st in enumerate(state if listed else (state,)):
        where = f"{name}[{i}]" if listed else name
        if type(st) is not Int8State:
            continue  # (call_formats names a role that mixes formats)
        if st.codes.dtype != np.uint8:
            raise TypeError(f"{where}.codes has dtype {st.codes.dtype}, expected uint8")
        a = st.absmax
        if type(a) is not np.ndarray or a.dtype != np.float32 or a.ndim != 1:
            what = f"a {a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"{where}.absmax must be a 1-D float32 array, got {what}")
        if a.size != blocks(st.codes.size):
            raise ValueError(f"{where}.absmax has {a.size} values, expected {blocks(st.codes.size)} (one per block "
                             f"of {BLOCK} of its {st.codes.size} elements)")
        if not a.flags.c_contiguous or not a.flags.writeable:
            raise ValueError(f"{where}.absmax must be C-contiguous and writable")
        if signed_buffer and not st.signed:
            raise ValueError(f"{where} uses the unsigned 8-bit map, but {name} may be negative: "
                             f"make it with Int8State.zeros(shape, signed=True)")
        if out and st.signed != state[0].signed:  # (the compiled backends take one map per state argument)
            kinds = {True: "signed", False: "unsigned"}
            raise ValueError(f"{where} uses the {kinds[st.signed]} 8-bit map, {name}[0] the {kinds[not st.signed]} "
                             f"one; every Int8State of one state argument uses one map")
        out.append((f"{where}.absmax", a))
    return out
