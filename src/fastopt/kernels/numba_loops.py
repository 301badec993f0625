"""The Numba CPU loops around the shared element functions.

For each element kernel (:mod:`fastopt.kernels.elements`) this module builds
two compiled loops over whole buffers, one serial and one ``prange``-parallel,
that only index, call the element function and store. Both take

    loop(param, grad, *state, floats, flags, tiny)

where ``state`` are the rule's state buffers (``None`` for an unused optional
one), ``floats``/``flags`` the float and bool fields of the rule's scalars
tuple as two plain tuples, and ``tiny`` the dtype's smallest normal value for
the store function (:mod:`fastopt.kernels.stores`: one pair of loops per store). The parallel loop uses the calling thread's Numba
thread count (``numba.set_num_threads``; not set in here because a jitted
``set_num_threads`` cannot be cached).

Why it looks like this (each point was measured on the 2-core AVX-512 dev
machine, fp32, 2 threads; numbers in the issue #4 report):

* **No float64 promotion.** Scalars arrive as Python floats (float64); a
  float32 array times a float64 scalar is a float64 operation in Numba, so
  the whole loop would run at half vector width (``vsqrtpd``) with
  conversions per operand (AdamW at 2^20: 0.27 ns/elem instead of 0.11; the
  roofline kernel 0.10).
  :func:`cast_floats` casts them once, in compiled code, to the buffer dtype;
  the element functions contain no float literals for the same reason.
* **Flags stay runtime values.** ``amsgrad``, ``nesterov``, ``centered``...
  and the ``weight_decay != 0`` tests are loop invariant; LLVM unswitches or
  if-converts them and the hot loop still vectorises (``vsqrtps``/``vdivps``
  on zmm; checked by ``tests/test_numba_backend.py``), and the kernel is at
  the roofline, so one compiled loop per kernel, dtype and pattern of None
  buffers serves every option (a variant per flag combination measured no
  faster).
* **``prange`` over the element index, not explicit chunks.** A loop
  ``range(lo, hi)`` inside a helper called per chunk does not vectorise:
  ``lo`` may be negative as far as Numba knows, so each ``a[i]`` keeps its
  negative-index wraparound and LLVM gives up (1.2-3.8 ns/elem, scalar
  ``sqrtss``). The parfor index is known non-negative, and Numba's static
  schedule splits it into one contiguous block per thread.
* **The scalars tuple is built inside the loop body.** A NamedTuple value
  that is live across the parfor boundary breaks Numba's gufunc generation
  (it re-creates the type by name); built in the body it is loop invariant
  and LLVM hoists it.
* ``None`` state buffers are pruned at compile time (``is None`` on an
  argument typed ``none``): no load, no store, no dummy traffic.
* ``error_model="numpy"``: the default Python model inserts a zero-division
  check before each ``/``, which blocks vectorisation (scalar ``vsqrtss``, no
  ``vdivps``); NumPy semantics (inf/NaN) are also what the reference does.
* No ``fastmath``: ``nnan``/``ninf`` would drop NaN/Inf propagation;
  ``contract`` (FMA) and ``arcp`` (x/y as x*(1/y)) each break bitwise
  equality with the reference (max rel. diff 4e-7 and 1e-7) and measured no
  faster, since the loop is memory bound.
* ``cache=True``: a cached process pays ~0.25 s on its first update (Numba's
  import and target setup) instead of ~1 s of compilation per kernel.
  :data:`SOURCE_KEY` keeps that cache honest when elements.py changes.

Per element the result does not depend on the block boundaries (no
reductions, no FMA), so any thread count gives bitwise identical buffers.

**List loops** (:data:`LIST_LOOPS`) update many tensors in one call, from the
call's pointer table (:func:`fastopt.buffers.check_lists`: a row of data
addresses per role, then a row of element counts). The concatenation of the
tensors is cut into one contiguous range of elements per thread, as the C
library does; each thread walks the tensors its range covers and runs the
serial flat loop, inlined, over each piece, viewed as an array from its
address (:func:`_view`). A reflected or typed list of arrays would cost
microseconds per tensor to unbox; the table costs nothing per tensor.
"""
from __future__ import annotations

import hashlib
import inspect
import typing

import numba
from llvmlite import binding as llvm_binding, ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import elements, stores
from .. import rules
from ..rules import KERNEL_SCALARS

__all__ = ["LOOPS", "LIST_LOOPS", "N_FLOATS", "SOURCE_KEY", "cast_floats"]

_JIT = dict(error_model="numpy", cache=True)


@intrinsic
def cast_floats(typingctx, values, like):
    """``values`` (a tuple of float64) cast to the dtype of the array ``like``."""
    if not isinstance(values, types.UniTuple) or not isinstance(like, types.Array):
        return None
    ret = types.UniTuple(like.dtype, values.count)

    def codegen(context, builder, sig, args):
        vals = cgutils.unpack_tuple(builder, args[0])
        cast = [context.cast(builder, v, values.dtype, like.dtype) for v in vals]
        return context.make_tuple(builder, ret, cast)

    return ret(values, like), codegen


def _n_floats(cls) -> int:
    """Number of leading float fields of a scalars NamedTuple (the bool flags follow)."""
    kinds = [hint is float for hint in typing.get_type_hints(cls).values()]
    n = kinds.index(False) if False in kinds else len(kinds)
    assert not any(kinds[n:]), f"{cls.__name__}: bool fields must come after the float fields"
    return n


#: kernel name -> number of float fields; a loop takes ``scalars[:n], scalars[n:]``
#: (slicing a NamedTuple gives plain tuples, which Numba types fast).
N_FLOATS = {k: _n_floats(cls) for k, cls in KERNEL_SCALARS.items()}


def _source_key() -> int:
    """A hash of the element functions' and scalars' source files.

    Numba's on-disk cache is keyed on the loop's own file (timestamp), its
    bytecode and its closure contents, but not on the files of the functions
    it calls: without this key, editing an element function in elements.py
    (or a scalars tuple in rules.py) would silently keep running the old
    compiled loop from the cache. Each loop holds the key in its closure.
    """
    digest = hashlib.sha256()
    # This file too: the loops of numba_formats and numba_trust compile its
    # segments and its CPU store functions (_flush_subnormal) into their own code.
    for path in (elements.__file__, stores.__file__, rules.__file__, __file__):
        with open(path, "rb") as f:
            digest.update(f.read())
    return int.from_bytes(digest.digest()[:7], "little")


SOURCE_KEY = _source_key()

# The three loop shapes (1, 2 or 3 state buffers). ``rng`` is ``prange`` or
# ``range``. ``z = p[i]`` stands in for a state value that is not used.

def _loop1(element, store, cls, rng, source_key):
    def loop(p, g, a, floats, flags, tiny):
        source_key  # noqa: B018  (only to be in the closure, hence in the cache key)
        for i in rng(p.size):
            s = cls(*(cast_floats(floats, p) + flags))
            z = p[i]
            p_i, a_i = element(p[i], g[i], a[i] if a is not None else z, s)
            p[i] = store(p_i, tiny)
            if a is not None:
                a[i] = store(a_i, tiny)
    return loop


def _loop2(element, store, cls, rng, source_key):
    def loop(p, g, a, b, floats, flags, tiny):
        source_key  # noqa: B018
        for i in rng(p.size):
            s = cls(*(cast_floats(floats, p) + flags))
            z = p[i]
            p_i, a_i, b_i = element(p[i], g[i], a[i] if a is not None else z,
                                    b[i] if b is not None else z, s)
            p[i] = store(p_i, tiny)
            if a is not None:
                a[i] = store(a_i, tiny)
            if b is not None:
                b[i] = store(b_i, tiny)
    return loop


def _loop3(element, store, cls, rng, source_key):
    def loop(p, g, a, b, c, floats, flags, tiny):
        source_key  # noqa: B018
        for i in rng(p.size):
            s = cls(*(cast_floats(floats, p) + flags))
            z = p[i]
            p_i, a_i, b_i, c_i = element(p[i], g[i], a[i] if a is not None else z,
                                         b[i] if b is not None else z,
                                         c[i] if c is not None else z, s)
            p[i] = store(p_i, tiny)
            if a is not None:
                a[i] = store(a_i, tiny)
            if b is not None:
                b[i] = store(b_i, tiny)
            if c is not None:
                c[i] = store(c_i, tiny)
    return loop


_SHAPES = {1: _loop1, 2: _loop2, 3: _loop3}


def _callable_in_jit(fn, inline: str = "always", impl=None):
    """Make the plain function ``fn`` callable from CPU-jitted code, inlined
    (``inline="never"``: compiled as a function of its own, which LLVM still
    inlines); ``impl``: compile this function, bitwise equivalent, in its place.

    ``fn`` itself is returned unchanged (the CUDA backend compiles the same
    function for its target). Unlike a ``numba.njit(inline="always")``
    dispatcher, a plain module-level function pickles deterministically, so
    the loops that close over it keep one on-disk cache key across processes
    (a dispatcher pickles with a fresh uuid: every process would miss the
    cache and recompile, ~0.5 s per kernel).
    """
    compiled = fn if impl is None else impl
    overload(fn, target="cpu", inline=inline, strict=False)(lambda *args: compiled)
    return fn


#: The element functions, each made callable in jitted code once.
_ELEMENTS = {k: _callable_in_jit(getattr(elements, k)) for k in KERNEL_SCALARS}

# llvm.is.fpclass test bits (llvm::FPClassTest): -subnormal, -0, +0, +subnormal.
_FC_ZERO_OR_SUBNORMAL = 0x10 | 0x20 | 0x40 | 0x80


@intrinsic
def _zero_or_subnormal(typingctx, x):
    """Whether the float ``x`` is a zero or subnormal (its exponent field is 0):
    ``abs(x) < tiny`` for its dtype's smallest normal ``tiny``, False for NaN."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        value = args[0]
        fnty = ir.FunctionType(ir.IntType(1), [value.type, ir.IntType(32)])
        test = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.is.fpclass.f{x.bitwidth}")
        return builder.call(test, [value, ir.Constant(ir.IntType(32), _FC_ZERO_OR_SUBNORMAL)])

    return types.boolean(x), codegen


def _flush_subnormal(x, tiny):
    """:func:`stores.flush_subnormal` as the CPU loops compile it, bit for bit
    (``tiny`` is the dtype's smallest normal, so ``abs(x) < tiny`` is the class test).

    Why: the class test is one instruction per vector on x86 (AVX-512:
    ``vptestnmd`` of the exponent bits; then the masked multiply), where
    ``abs(x) < tiny`` is two (``vandps``, ``vcmpltps``), and LLVM prices it low
    enough that the loop is still unswitched on the rules' loop-invariant flags
    and ``weight_decay != 0``, as the ``keep`` loop is. With the comparison,
    AdamW's three stores took the loop past LLVM's unswitching threshold (cost
    53 against 50), the flag tests stayed in the vector loop, and the flushing
    loop took 1.2-1.4x the ``keep`` loop's time (2^20 fp32, 2 threads); now
    1.05-1.1x, its vector loop that of ``keep`` plus two instructions per store.
    """
    flushed = x * (tiny - tiny)
    if _zero_or_subnormal(x):
        return flushed
    return x


# llvm.is.fpclass is in LLVM 15 and later (llvmlite 0.44, Numba 0.61); before,
# the loops compile stores.flush_subnormal itself.
_STORES = (_callable_in_jit(stores.keep),
           _callable_in_jit(stores.flush_subnormal,
                            impl=_flush_subnormal if llvm_binding.llvm_version_info >= (15,) else None))


def _suffix(store) -> str:
    return "" if store is stores.keep else "_" + store.__name__


def _flat_loop(kernel: str, store, rng):
    """The plain Python loop of ``kernel`` with ``store`` over ``rng`` (range or prange)."""
    element = _ELEMENTS[kernel]
    n_state = len(inspect.signature(element).parameters) - 3  # (p, g, *state, s)
    return _SHAPES[n_state](element, store, KERNEL_SCALARS[kernel], rng, SOURCE_KEY)


def _build(kernel: str, parallel: bool, store):
    py_loop = _flat_loop(kernel, store, numba.prange if parallel else range)
    py_loop.__qualname__ = py_loop.__name__ = f"{kernel}_{'parallel' if parallel else 'serial'}{_suffix(store)}"
    return numba.njit(parallel=parallel, **_JIT)(py_loop)


#: (kernel name, store function) -> (serial loop, parallel loop); compiled lazily
#: per dtype and per pattern of None state buffers, then loaded from Numba's
#: on-disk cache. Every loop takes ``(p, g, *state, floats, flags, tiny)``.
LOOPS = {(k, store): (_build(k, False, store), _build(k, True, store)) for k in KERNEL_SCALARS for store in _STORES}


# ---- list loops: many tensors per call, from a pointer table ----

@intrinsic
def _pointer(typingctx, address, like):
    """The int64 ``address`` as a pointer to values of the scalar type of ``like``
    (a float, or an integer: the 16-bit and 8-bit buffers of numba_formats)."""
    if not isinstance(address, types.Integer) or not isinstance(like, (types.Float, types.Integer)):
        return None
    ptr = types.CPointer(like)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


def _view(table, row, t, lo, n, tiny):
    """Elements ``[lo, lo + n)`` of tensor ``t`` of role ``row`` of ``table`` as a
    1-D array of ``tiny``'s dtype, or None when ``row`` is None (an unused
    buffer: pruned at compile time, as in the flat loops)."""


@overload(_view, inline="always")
def _view_impl(table, row, t, lo, n, tiny):
    if isinstance(row, types.NoneType):
        return lambda table, row, t, lo, n, tiny: None
    itemsize = tiny.bitwidth // 8

    def view(table, row, t, lo, n, tiny):
        return numba.carray(_pointer(table[row, t] + lo * itemsize, tiny), n)
    return view


def _views(table, rows, t, lo, n, tiny):
    """``(_view(table, rows[0], ...), _view(table, rows[1], ...), ...)`` for a tuple ``rows``."""


@overload(_views, inline="always")
def _views_impl(table, rows, t, lo, n, tiny):
    if len(rows) == 0:
        return lambda table, rows, t, lo, n, tiny: ()

    def views(table, rows, t, lo, n, tiny):
        return (_view(table, rows[0], t, lo, n, tiny),) + _views(table, rows[1:], t, lo, n, tiny)
    return views


def _list_loop(segment, rng, source_key):
    # ``rows``: the table row of each state buffer (None: unused); ``blocks``:
    # the number of ranges, one per thread.
    def loop(table, rows, floats, flags, tiny, blocks):
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
                    segment(_view(table, 0, t, first, m, tiny), _view(table, 1, t, first, m, tiny),
                            *_views(table, rows, t, first, m, tiny), floats, flags, tiny)
                offset += n
    return loop


def _segment(kernel: str, store):
    """The serial flat loop of ``kernel`` and ``store`` as a plain function that
    list loops call, published as a module attribute of its own name.

    A list loop holds it in its closure, and Numba keys its on-disk cache on
    the pickled closure: a nested function pickles by value, taking along the
    globals it calls (``cast_floats``, an intrinsic that pickles with a fresh
    uuid), so every process would miss the cache and recompile (~6 s). A
    function found at ``module.qualname`` pickles by reference: the same bytes
    in every process. (Its code is this file's, which the cache key covers.)
    """
    segment = _flat_loop(kernel, store, range)
    segment.__name__ = segment.__qualname__ = f"_segment_{kernel}{_suffix(store)}"
    globals()[segment.__name__] = segment
    # Not inlined at Numba's IR level: an inlined overload is typed without
    # pruning its ``x is not None`` branches on None arguments, which the flat
    # loops rely on.
    return _callable_in_jit(segment, inline="never")


def _build_list(kernel: str, parallel: bool, segment, store):
    py_loop = _list_loop(segment, numba.prange if parallel else range, SOURCE_KEY)
    py_loop.__qualname__ = py_loop.__name__ = f"{kernel}_list_{'parallel' if parallel else 'serial'}{_suffix(store)}"
    return numba.njit(parallel=parallel, **_JIT)(py_loop)


def _list_loops(kernel: str, store):
    segment = _segment(kernel, store)
    return _build_list(kernel, False, segment, store), _build_list(kernel, True, segment, store)


#: (kernel name, store function) -> (serial, parallel) list loops, each
#: ``loop(table, rows, floats, flags, tiny, blocks)`` (module docstring).
LIST_LOOPS = {(k, store): _list_loops(k, store) for k in KERNEL_SCALARS for store in _STORES}
