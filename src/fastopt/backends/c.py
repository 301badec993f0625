"""The C backend: the kernels of ``csrc/`` (OpenMP threads, SIMD with runtime
CPU dispatch) called through the cffi extension ``fastopt._c``.

Why a compiled (API-mode) cffi extension rather than ``ffi.dlopen`` (ABI mode):
an ABI-mode call goes through libffi and costs ~3 us, plus ~0.9 us per
``ffi.from_buffer``, about 20x the kernel itself at 2^10 elements (docs/design.md, section 1).
The extension's wrappers are generated C that convert arguments and call the
library directly: a 4-buffer update costs ~0.6 us of binding on top of the
kernel (``csrc/bench/whole_call.py``). The extension is built by CMake from the
header's declarations (``csrc/python/build_cffi.py``) and links the shared
library ``libfastopt`` that sits next to it.

Where the extension is looked for: :mod:`fastopt.native` (the installed
package, ``$FASTOPT_C_BUILD_DIR``, the checkout's ``build/dev``). If none loads, :func:`unavailable_reason` says why and ``fastopt.backends()``
reports it; the rest of the package works.

``run_list`` updates a list of tensors in one native call (the
``fastopt_<rule>_list_*`` entry points: one pointer table per role, the
threads spread over all the elements), from the tables that
:func:`fastopt.buffers.check_lists` built when it could. ``run_mixed`` does
the same for the mixed-format calls of :mod:`fastopt.formats` (bfloat16 and
float16 buffers, a float32 master copy, 8-bit blockwise state:
``fastopt_<rule>_mixed_list``).

The per-step scalars go to C as the rule's struct, filled positionally from the
rule's NamedTuple (the header's structs have the same fields in the same order,
checked by the tests), so there is one piece of code for every rule.
"""
from __future__ import annotations

import operator

import numpy as np

from .. import buffers, denormals, environment, native, threads
from ..formats import BFLOAT16, FLOAT16, FLOAT32, INT8

name = "c"
device = "cpu"
#: run_list with a table reads only the table, len(params), params[0].itemsize and which states are None.
runs_from_table = True

_ext = None  # the loaded extension module
_reason: str | None = None  # why it could not load ("" once loaded)
_table: dict = {}  # (kernel, itemsize) -> (C function, pointer type, scalars struct type)
_list_table: dict = {}  # (kernel, itemsize) -> (C list function, pointer type, table type, table pointer type, scalars struct type)
_from_buffer = _new = _null = None  # the extension's ffi.from_buffer, ffi.new, ffi.NULL once loaded
#: kernel -> ((address of fastopt_<kernel>_f32, of _f64), number of float scalars): run_checked's calls
_host_calls: dict = {}
_host_call = None  # fastopt._tables.host_call once loaded (None: not built)
#: kernel -> ((address of fastopt_<kernel>_list_f32, of _list_f64), number of float scalars)
_table_calls: dict = {}
_table_call = None  # fastopt._tables.table_call once loaded
_NONES, _is_not = (None,) * 8, operator.is_not  # (which state buffers a call uses, at C speed)


def _kernels() -> tuple[str, ...]:
    """The element kernels of the rule table: each has fastopt_<kernel>_f32/_f64 in C."""
    from ..rules import KERNEL_SCALARS
    return tuple(KERNEL_SCALARS)


def _load() -> str:
    """Load the extension once; return "" or the reason it is unavailable."""
    global _ext, _reason
    if _reason is None:
        try:
            ext = native.load_extension("_c")
            environment.warn_ignored_isa()  # FASTOPT_ISA=<unknown> falls back silently in C: say so
            ffi, lib = ext.ffi, ext.lib
            table, list_table = {}, {}
            for kernel in _kernels():
                struct = ffi.typeof(f"fastopt_{kernel}_scalars *")
                for itemsize, (suffix, ctype) in {4: ("f32", "float"), 8: ("f64", "double")}.items():
                    table[kernel, itemsize] = (getattr(lib, f"fastopt_{kernel}_{suffix}"), ctype + "[]", struct)
                    list_table[kernel, itemsize] = (getattr(lib, f"fastopt_{kernel}_list_{suffix}"), ctype + "[]",
                                                    ffi.typeof(ctype + " *[]"), ffi.typeof(ctype + " **"), struct)
            lib.fastopt_set_num_threads(threads.get_num_threads())
            lib.fastopt_set_flush_denormal(int(denormals.get_flush_denormal()))
            global _from_buffer, _new, _null
            _from_buffer, _new, _null = ffi.from_buffer, ffi.new, ffi.NULL
            _list_table.update(list_table)
            _table.update(table)  # only once everything loaded: run() relies on it
            _load_host_calls(ffi, lib)
            _ext, _reason = ext, ""
        except Exception as exc:  # a missing or broken library is a reason, never a crash
            _reason = f"{type(exc).__name__}: {exc}"
    return _reason


def _load_host_calls(ffi, lib) -> None:
    """The entry points run_checked calls through fastopt._tables.host_call, which
    packs the scalars as doubles then ints: only structs laid out exactly so are used."""
    global _host_call, _table_call
    tables = buffers._extension()
    if not tables or not hasattr(tables, "host_call"):
        return
    for kernel in _kernels():
        fields = ffi.typeof(f"fastopt_{kernel}_scalars").fields
        nfloat = sum(f.type.cname == "double" for _, f in fields)
        expected = [("double", 8 * k) if k < nfloat else ("int", 8 * nfloat + 4 * (k - nfloat))
                    for k in range(len(fields))]
        if [(f.type.cname, f.offset) for _, f in fields] != expected:
            continue
        def address(name: str) -> int:
            return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))
        _host_calls[kernel] = ((address(f"fastopt_{kernel}_f32"), address(f"fastopt_{kernel}_f64")), nfloat)
        _table_calls[kernel] = ((address(f"fastopt_{kernel}_list_f32"), address(f"fastopt_{kernel}_list_f64")),
                                nfloat)
    _host_call, _table_call = tables.host_call, tables.table_call


def unavailable_reason() -> str:
    """"" when the C library loads here, else why not."""
    return _load()


def set_num_threads(n: int) -> None:
    """OpenMP threads for the next updates (fastopt.set_num_threads calls this)."""
    if _ext is not None:
        _ext.lib.fastopt_set_num_threads(n)


def set_flush_denormal(on: bool) -> None:
    """Store subnormal results as zeros from the next update on (fastopt.set_flush_denormal)."""
    if _ext is not None:
        _ext.lib.fastopt_set_flush_denormal(int(on))


def cpu_path() -> str:
    """The kernels' CPU path: "avx512", "avx2" or "baseline" (FASTOPT_ISA forces a lower one)."""
    if _load():
        raise RuntimeError(f"backend 'c' is unavailable: {_reason}")
    return _ext.ffi.string(_ext.lib.fastopt_isa()).decode()


# One caller per number of state buffers, so the hot path has no loop, list,
# helper call or star-unpacking (measured: 1.9 -> 1.3 us for a 2^10 AdamW call
# through run()). An unused optional buffer is passed as NULL.
def _call1(fn, ctype, struct, p, g, state, scalars):
    (a,) = state
    fb, null = _from_buffer, _null
    return fn(fb(ctype, p), fb(ctype, g), null if a is None else fb(ctype, a), p.size, _new(struct, scalars))


def _call2(fn, ctype, struct, p, g, state, scalars):
    a, b = state
    fb, null = _from_buffer, _null
    return fn(fb(ctype, p), fb(ctype, g), null if a is None else fb(ctype, a),
              null if b is None else fb(ctype, b), p.size, _new(struct, scalars))


def _call3(fn, ctype, struct, p, g, state, scalars):
    a, b, c = state
    fb, null = _from_buffer, _null
    return fn(fb(ctype, p), fb(ctype, g), null if a is None else fb(ctype, a),
              null if b is None else fb(ctype, b), null if c is None else fb(ctype, c), p.size,
              _new(struct, scalars))


def _call_any(fn, ctype, struct, p, g, state, scalars):
    """Any number of state buffers (rules with more than three)."""
    fb, null = _from_buffer, _null
    return fn(fb(ctype, p), fb(ctype, g), *[null if a is None else fb(ctype, a) for a in state], p.size,
              _new(struct, scalars))


class _Callers(dict):
    def __missing__(self, nstate):
        return _call_any


_CALLERS = _Callers({1: _call1, 2: _call2, 3: _call3})


def run(kernel: str, param, grad, state, scalars, stream=None) -> None:
    """Apply one update in place (buffers already validated by fastopt.buffers)."""
    try:
        fn, ctype, struct = _table[kernel, param.itemsize]
    except KeyError:  # not loaded yet (or not loadable)
        if _load():
            raise RuntimeError(f"backend 'c' is unavailable: {_reason}") from None
        fn, ctype, struct = _table[kernel, param.itemsize]
    rc = _CALLERS[len(state)](fn, ctype, struct, param, grad, state, scalars)
    if rc:
        raise RuntimeError(f"fastopt_{kernel}: {_ext.ffi.string(_ext.lib.fastopt_strerror(rc)).decode()}")


def run_checked(kernel: str, calls: tuple) -> bool:
    """Check and run flat updates in one compiled step, if they are the common case.

    ``calls``: a tuple of ``(arrays, scalars)`` pairs, one update each, with
    ``arrays`` = ``(param, grad, *state)`` in the kernel's order (None for an
    unused state buffer). True when done: every array was a plain aligned host
    array that :func:`fastopt.buffers.check_buffers` accepts, no two arrays of
    the whole call overlap (the compiled checks of ``fastopt._tables.host_call``),
    and the kernels ran in order. False when nothing was run (the extension is
    not loaded, or it is not the common case): the caller then runs the Python
    checks, which name any problem, and :func:`run`. Costs ~0.4 us for a 2^10
    update, where the Python checks and ``run`` cost ~3 us.
    """
    if not _host_calls:
        if _reason is None:
            _load()
        if not _host_calls:
            return False
    functions, nfloat = _host_calls[kernel]
    rc = _host_call(functions, calls, nfloat)
    if rc is None:
        return False
    if rc:
        raise RuntimeError(f"fastopt_{kernel}: {_ext.ffi.string(_ext.lib.fastopt_strerror(rc)).decode()}")
    return True


def run_list(kernel: str, params, grads, states, scalars, stream=None, table=None) -> None:
    """Apply one update in place to many tensors in one native call.

    ``params``, ``grads``: lists of C-contiguous arrays (any shape) of one dtype,
    already validated by :func:`fastopt.buffers.check_lists`; ``states``: a tuple
    in the rule's state order, each a list of arrays (one per tensor) or None
    when the call does not use that buffer. The C library splits the total
    element count over its threads (``fastopt_<kernel>_list_*``); the result is
    bitwise that of one ``run`` per tensor. The pointer tables are the rows of
    ``table`` (the backend contract, ``fastopt.backends``) when given: a few
    casts for the whole call; else one ``ffi.from_buffer`` per array.
    """
    entry = _table_calls.get(kernel) if table is not None else None
    if entry is not None:  # (the struct packed in C: ~1 us less than cffi's casts)
        functions, nfloat = entry
        rc = _table_call(functions[params[0].itemsize == 8], table, tuple(map(_is_not, states, _NONES)), scalars,
                         nfloat)
        if rc:
            raise RuntimeError(f"fastopt_{kernel}_list: {_ext.ffi.string(_ext.lib.fastopt_strerror(rc)).decode()}")
        return
    if not params:
        return
    try:
        fn, ctype, tabletype, rowtype, struct = _list_table[kernel, params[0].itemsize]
    except KeyError:  # not loaded yet (or not loadable)
        if _load():
            raise RuntimeError(f"backend 'c' is unavailable: {_reason}") from None
        fn, ctype, tabletype, rowtype, struct = _list_table[kernel, params[0].itemsize]
    if table is not None:
        cast, null = _ext.ffi.cast, _null
        base, row = table.__array_interface__["data"][0], table.shape[1] * 8
        rc = fn(cast(rowtype, base), cast(rowtype, base + row),
                *[null if st is None else cast(rowtype, base + (2 + k) * row) for k, st in enumerate(states)],
                cast("int64_t *", base + (table.shape[0] - 1) * row), len(params), _new(struct, scalars))
    else:
        fb, new, null = _from_buffer, _new, _null
        tables = [new(tabletype, [fb(ctype, a) for a in params]), new(tabletype, [fb(ctype, a) for a in grads])]
        tables += [null if st is None else new(tabletype, [fb(ctype, a) for a in st]) for st in states]
        rc = fn(*tables, new("int64_t[]", [a.size for a in params]), len(params), new(struct, scalars))
    if rc:
        raise RuntimeError(f"fastopt_{kernel}_list: {_ext.ffi.string(_ext.lib.fastopt_strerror(rc)).decode()}")


#: The formats run_mixed takes (fastopt.formats' codes, the C library's FASTOPT_FORMAT_*):
#: float32, bfloat16, float16 and 8-bit blockwise state (INT8, state buffers only).
mixed_formats = (FLOAT32, BFLOAT16, FLOAT16, INT8)
_mixed_fns: dict = {}  # kernel -> (fastopt_<kernel>_mixed_list, its scalars struct type)


def _mixed_fn(kernel: str):
    got = _mixed_fns.get(kernel)
    if got is None:
        if _load():
            raise RuntimeError(f"backend 'c' is unavailable: {_reason}")
        lib = _ext.lib
        if not hasattr(lib, f"fastopt_{kernel}_mixed_list"):
            raise TypeError(f"the c backend has no mixed-format update for the {kernel} kernel")
        got = (getattr(lib, f"fastopt_{kernel}_mixed_list"), _ext.ffi.typeof(f"fastopt_{kernel}_scalars *"))
        _mixed_fns[kernel] = got
    return got


def run_mixed(kernel: str, params, grads, states, masters, formats, scalars, key: int) -> None:
    """A mixed-format update (:mod:`fastopt.formats`) over lists of tensors in one
    native call, ``fastopt_<kernel>_mixed_list``: bitwise
    ``fastopt.backends.reference.run_mixed``, for any thread count.

    ``params``, ``grads``: lists of validated C-contiguous host arrays, each role of
    one dtype (float32, ``ml_dtypes.bfloat16`` or float16); ``states``: per state
    buffer of the rule a list (float32, bfloat16, or ``fastopt.formats.Int8State``:
    its codes go in the state table, its absmax arrays in ``fastopt_formats.absmax``,
    its map in ``signed_map``) or None when unused; ``masters``: None or a list of
    float32 arrays, the params' master copies; ``formats``: the call's
    ``fastopt.formats.CallFormats``; ``key``: its 32-bit rounding key.

    The C library takes one map per state buffer (fastopt.formats.check_int8 makes
    sure a list's Int8States share theirs)."""
    if not params:
        return
    fn, struct = _mixed_fn(kernel)
    fb, new, null = _from_buffer, _new, _null

    def table(arrays):  # (from_buffer: ~0.5 us an array, __array_interface__ ~3.5)
        return null if arrays is None else new("void *[]", [fb(a) for a in arrays])

    master = null if masters is None else new("float *[]", [fb("float[]", a) for a in masters])
    state_formats = [0 if f is None else f for f in formats.state]  # (an unused buffer's is never read)
    fields = {"param": formats.param, "grad": formats.grad, "state": state_formats, "key": key}
    if INT8 in formats.state:
        state_tables, absmax, signed = [], [null] * len(states), [0] * len(states)
        for k, (st, fk) in enumerate(zip(states, formats.state)):
            if st is None or fk != INT8:
                state_tables.append(table(st))
                continue
            codes, scales = [], []
            for x in st:
                codes.append(fb(x.codes))
                scales.append(fb("float[]", x.absmax))
            state_tables.append(new("void *[]", codes))
            absmax[k], signed[k] = new("float *[]", scales), int(st[0].signed)
        fields["absmax"], fields["signed_map"] = absmax, signed  # (absmax: kept alive here for the call)
        tables = [table(params), table(grads), *state_tables, master]
    else:
        tables = [table(params), table(grads), *map(table, states), master]
    sizes = new("int64_t[]", [a.size for a in params])
    f = new("fastopt_formats *", fields)
    rc = fn(f, *tables, sizes, len(params), new(struct, scalars))
    if rc:
        raise RuntimeError(f"fastopt_{kernel}_mixed_list: {_ext.ffi.string(_ext.lib.fastopt_strerror(rc)).decode()}")


def _reduce_list(what: str, arrays, each) -> float:
    """``fastopt_<what>_list_f32/_f64`` over validated host arrays of one dtype: the
    reduction of every element, each array's own into ``each`` (float64) when given."""
    if _load():
        raise RuntimeError(f"backend 'c' is unavailable: {_reason}")
    if not arrays:
        return 0.0
    ffi, lib = _ext.ffi, _ext.lib
    f32 = arrays[0].itemsize == 4
    ptrs = np.array([a.__array_interface__["data"][0] for a in arrays], dtype=np.int64)
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    out = ffi.new("double *")
    fn = getattr(lib, f"fastopt_{what}_list_{'f32' if f32 else 'f64'}")
    rc = fn(ffi.cast("float **" if f32 else "double **", ptrs.ctypes.data), ffi.cast("int64_t *", sizes.ctypes.data),
            len(arrays), out, ffi.NULL if each is None else ffi.cast("double *", each.ctypes.data))
    if rc != 0:
        raise RuntimeError(f"fastopt_{what}_list failed: {ffi.string(lib.fastopt_strerror(rc)).decode()}")
    return out[0]


def sumsq_list(arrays, each=None) -> float:
    """The sum of squares of every element of ``arrays`` (validated host arrays of
    one dtype): ``fastopt_sumsq_list_f32/_f64``, bitwise reproducible; each
    array's own into ``each`` (a float64 array, one per array) when given."""
    return _reduce_list("sumsq", arrays, each)


def maxabs_list(arrays, each=None) -> float:
    """The largest magnitude of every element of ``arrays`` (validated host arrays
    of one dtype) as a float64: ``fastopt_maxabs_list_f32/_f64`` (NaN anywhere: the
    canonical NaN); each array's own into ``each`` (a float64 array) when given."""
    return _reduce_list("maxabs", arrays, each)


# ---- the two-pass rules (fastopt.trust): fastopt_<rule>_norms_*, _trust_* ----

_trust_fns: dict = {}  # (kernel, itemsize, what) -> (C function, pointer type, table type, table pointer type)


def _trust_fn(kernel: str, itemsize: int, what: str):
    """``what``: "norms_list", "trust_list" or "trust" (flat)."""
    key = (kernel, itemsize, what)
    got = _trust_fns.get(key)
    if got is None:
        if _load():
            raise RuntimeError(f"backend 'c' is unavailable: {_reason}")
        ctype = "float" if itemsize == 4 else "double"
        const = "const " if what == "norms_list" else ""
        got = (getattr(_ext.lib, f"fastopt_{kernel}_{what}_{'f32' if itemsize == 4 else 'f64'}"), ctype + "[]",
               _ext.ffi.typeof(f"{const}{ctype} *[]"), _ext.ffi.typeof(f"{const}{ctype} **"))
        _trust_fns[key] = got
    return got


def _trust_tables(params, grads, states, table, ctype, tabletype, rowtype):
    """The pointer-table arguments (param, grad, each state; then the sizes) of a list call:
    the rows of the call's pointer ``table`` when given, else tables of the arrays."""
    if table is not None:
        cast = _ext.ffi.cast
        base, row = table.__array_interface__["data"][0], table.shape[1] * 8
        args = [cast(rowtype, base), cast(rowtype, base + row)]
        args += [_null if st is None else cast(rowtype, base + (2 + k) * row) for k, st in enumerate(states)]
        args.append(cast("int64_t *", base + (table.shape[0] - 1) * row))
        return args
    fb, new = _from_buffer, _new
    args = [new(tabletype, [fb(ctype, a) for a in params]), new(tabletype, [fb(ctype, a) for a in grads])]
    args += [_null if st is None else new(tabletype, [fb(ctype, a) for a in st]) for st in states]
    args.append(new("int64_t[]", [a.size for a in params]))
    return args


def _trust_fail(name: str, rc: int) -> None:
    if rc:
        raise RuntimeError(f"{name}: {_ext.ffi.string(_ext.lib.fastopt_strerror(rc)).decode()}")


def trust_sums(kernel: str, params, grads, states, scalars, table=None):
    """Pass 1 of a two-pass kernel over lists of tensors (``fastopt_<kernel>_norms_list_*``):
    per tensor ``sum(p*p)`` and ``sum(u*u)``, float64 arrays, bitwise reproducible.
    ``scalars``: pass 1's; ``states``: None where not read (the library reads only the
    rule's ``trust.reads``)."""
    fn, ctype, tabletype, rowtype = _trust_fn(kernel, params[0].itemsize, "norms_list")
    args = _trust_tables(params, grads, states, table, ctype, tabletype, rowtype)
    count = len(params)
    param_sumsq, update_sumsq = np.zeros(count), np.zeros(count)
    cast = _ext.ffi.cast
    rc = fn(*args, count, _new(f"fastopt_{kernel}_scalars *", scalars),
            cast("double *", param_sumsq.ctypes.data), cast("double *", update_sumsq.ctypes.data))
    _trust_fail(f"fastopt_{kernel}_norms_list", rc)
    return param_sumsq, update_sumsq


def trust_update(kernel: str, params, grads, states, scalars, table=None) -> None:
    """Both passes of a two-pass kernel in one native call (``fastopt_<kernel>_trust_list_*``,
    or the flat ``fastopt_<kernel>_trust_*`` for one tensor without a table): the
    per-tensor sums, the trust ratios (the rule's, generated in C) and the update with
    them, the threads spread over all the elements in each pass."""
    itemsize = params[0].itemsize
    struct = f"fastopt_{kernel}_scalars *"
    if table is None and len(params) == 1:
        fn, ctype, _, _ = _trust_fn(kernel, itemsize, "trust")
        fb, null = _from_buffer, _null
        p = params[0]
        rc = fn(fb(ctype, p), fb(ctype, grads[0]), *[null if st is None else fb(ctype, st[0]) for st in states],
                p.size, _new(struct, scalars))
        _trust_fail(f"fastopt_{kernel}_trust", rc)
        return
    fn, ctype, tabletype, rowtype = _trust_fn(kernel, itemsize, "trust_list")
    args = _trust_tables(params, grads, states, table, ctype, tabletype, rowtype)
    rc = fn(*args, len(params), _new(struct, scalars))
    _trust_fail(f"fastopt_{kernel}_trust_list", rc)


def trust_grad_sumsq(grads, table=None) -> float:
    """The sum of squares of every gradient (``fastopt_sumsq_list_*``), from the call's
    pointer table (its grad row and sizes) when there is one."""
    if table is None:
        return sumsq_list(list(grads))
    if _load():
        raise RuntimeError(f"backend 'c' is unavailable: {_reason}")
    ffi, lib = _ext.ffi, _ext.lib
    f32 = grads[0].itemsize == 4
    base, row = table.__array_interface__["data"][0], table.shape[1] * 8
    out = ffi.new("double *")
    fn = lib.fastopt_sumsq_list_f32 if f32 else lib.fastopt_sumsq_list_f64
    rc = fn(ffi.cast("float **" if f32 else "double **", base + row),
            ffi.cast("int64_t *", base + (table.shape[0] - 1) * row), table.shape[1], out, ffi.NULL)
    _trust_fail("fastopt_sumsq_list", rc)
    return out[0]
