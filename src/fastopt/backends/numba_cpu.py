"""The Numba CPU backend: one fused, in-place, multithreaded pass per update.

The loops live in :mod:`fastopt.kernels.numba_loops` (compiled from the
shared element functions, cached on disk). This module only picks the serial
or the parallel loop and passes the thread count. Mixed-format updates
(:func:`run_mixed`: bfloat16/float16 buffers) run the loops of
:mod:`fastopt.kernels.numba_formats`, imported at the first such call.

Updates that move less than :data:`PARALLEL_MIN_BYTES` take the serial loop:
waking Numba's thread pool costs 1-4 microseconds per call (more on a busy
machine), more than the whole update of a small buffer.

Oversubscribed machines: with Numba's ``omp`` layer (GNU OpenMP, spinning
workers by default), a parallel update on cores shared with other busy
processes often waits a whole scheduler slice (~8 ms at 2^20 instead of
~0.12 ms, measured on the shared 2-core dev machine; torch's OpenMP pool does
the same). ``OMP_WAIT_POLICY=PASSIVE`` or ``NUMBA_THREADING_LAYER=workqueue``
removes the stalls at ~2x the best-case time of a parallel update, and
``fastopt.set_num_threads(1)`` avoids the pool altogether. fastopt leaves
these process-wide settings to the user.
"""
from __future__ import annotations

import os
import threading

import numba

import numpy as np

from .. import denormals, threads
from . import run_each
from ..formats import BFLOAT16, FLOAT16, FLOAT32, INT8
from ..kernels import stores
from ..kernels.numba_loops import LIST_LOOPS, LOOPS, N_FLOATS

name = "numba"
device = "cpu"
#: run_list with a table reads only the table, len(params), params[0].itemsize and which states are None.
runs_from_table = True

#: Bytes an update must move (reads + writes of every buffer) to use the
#: parallel loop. Measured serial/parallel crossover on 2 threads, fp32, cache
#: resident: AdamW (28 B/elem) 2^14..2^16 elements, SGD momentum and AdaGrad
#: (20 B/elem) 2^16..2^17, the higher end on a loaded machine; in bytes that is
#: 0.5..2 MiB for every rule, so the threshold is in bytes, not elements.
PARALLEL_MIN_BYTES = 1 << 20

_threads = 1
# Numba's thread count is per calling thread; remember what each thread set
# (numba.get_num_threads() costs ~0.5 us, a tenth of a small update).
_numba_threads = threading.local()

# One parallel region at a time. Numba's ``workqueue`` threading layer aborts
# the process on concurrent parallel calls from several Python threads, and on
# any layer concurrent regions only oversubscribe the cores; a call that finds
# the pool busy runs the serial loop instead (bitwise the same result).
_pool = threading.Lock()
# GNU OpenMP (Numba's ``omp`` layer) aborts a forked child that uses a pool
# started by its parent; such a child updates serially.
_pool_started = False
_pool_usable = True


def _after_fork_in_child() -> None:
    global _pool, _pool_usable
    _pool = threading.Lock()
    _pool_usable = not _pool_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(n: int) -> None:
    """Use ``n`` threads from the next update on (at most Numba's pool size)."""
    global _threads
    _threads = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))


set_num_threads(threads.get_num_threads())

#: The smallest normal value by item size, as a scalar of that dtype (the store functions' ``tiny``).
_TINY = {np.dtype(t).itemsize: t(np.finfo(t).tiny) for t in (np.float32, np.float64)}
_active: dict = {}  # kernel -> (serial, parallel) loops of the current store function
_active_lists: dict = {}  # kernel -> (serial, parallel) list loops of the current store function


def set_flush_denormal(on: bool) -> None:
    """Store subnormal results as zeros from the next update on (fastopt.set_flush_denormal)."""
    store = stores.flush_subnormal if on else stores.keep
    _active.clear()
    _active.update({kernel: loops for (kernel, s), loops in LOOPS.items() if s is store})
    _active_lists.clear()
    _active_lists.update({kernel: loops for (kernel, s), loops in LIST_LOOPS.items() if s is store})


set_flush_denormal(denormals.get_flush_denormal())


def _moved(itemsize: int, elements: int, state) -> int:
    """Bytes an update moves: p and every used state buffer read and written, g read."""
    rw = 3
    for buf in state:
        if buf is not None:
            rw += 2
    return itemsize * elements * rw


def _on_pool(moved: int) -> bool:
    """Whether an update moving ``moved`` bytes takes the parallel loop; when
    True, the pool is held (for this many threads) and the caller releases it."""
    global _pool_started
    if moved < PARALLEL_MIN_BYTES or _threads == 1 or not _pool_usable or not _pool.acquire(blocking=False):
        return False
    try:
        if getattr(_numba_threads, "n", 0) != _threads:
            numba.set_num_threads(_threads)
            _numba_threads.n = _threads
    except BaseException:
        _pool.release()
        raise
    _pool_started = True
    return True


def run(kernel: str, param, grad, state, scalars, stream=None) -> None:
    """Apply one update in place (buffers already validated by the caller)."""
    if param.ndim != 1:  # the loops are compiled for 1-D arrays: view any C-contiguous shape flat
        param, grad = param.reshape(-1), grad.reshape(-1)
        state = tuple(None if s is None else s.reshape(-1) for s in state)
    n = N_FLOATS[kernel]
    serial, parallel = _active[kernel]
    args = (param, grad, *state, scalars[:n], scalars[n:], _TINY[param.itemsize])  # floats, flags: plain tuples
    if not _on_pool(_moved(param.itemsize, param.size, state)):
        serial(*args)
        return
    try:
        parallel(*args)
    finally:
        _pool.release()


def run_list(kernel: str, params, grads, states, scalars, stream=None, table=None) -> None:
    """The update over lists of tensors: one compiled call over the pointer
    ``table`` when there is one (``fastopt.backends``: the threads share the
    total, as in the C library), else one call per tensor."""
    if table is None:
        run_each(run, kernel, params, grads, states, scalars)
        return
    n = N_FLOATS[kernel]
    serial, parallel = _active_lists[kernel]
    itemsize = params[0].itemsize
    rows = tuple(None if st is None else 2 + k for k, st in enumerate(states))
    args = (table, rows, scalars[:n], scalars[n:], _TINY[itemsize])
    if not _on_pool(_moved(itemsize, int(table[-1].sum()), states)):
        serial(*args, 1)
        return
    try:
        parallel(*args, _threads)
    finally:
        _pool.release()


# ---- mixed-format updates (fastopt.formats) ---------------------------------------

#: The formats run_mixed takes: all of them.
mixed_formats = (FLOAT32, BFLOAT16, FLOAT16, INT8)
#: Bytes per element of each of those formats, by code.
_FORMAT_BYTES = {FLOAT32: 4, BFLOAT16: 2, FLOAT16: 2, INT8: 1}  # (8-bit: plus 4 bytes per 256)


def _mixed_moved(formats, elements: int) -> int:
    """Bytes a mixed-format update moves: param (and master) and each used state
    buffer read and written, grad read, each in its format."""
    per = 2 * _FORMAT_BYTES[formats.param] + _FORMAT_BYTES[formats.grad] + (8 if formats.master else 0)
    for fmt in formats.state:
        if fmt is not None:
            per += 2 * _FORMAT_BYTES[fmt]
    return per * elements


def _addresses(arrays) -> list:
    return [a.__array_interface__["data"][0] for a in arrays]


def run_mixed(kernel: str, params, grads, states, masters, formats, scalars, key: int) -> None:
    """A mixed-format update over lists of tensors (validated host arrays; ``formats``
    a ``fastopt.formats.CallFormats``, ``key`` the call's rounding key) in one
    compiled call over their pointer table (:mod:`fastopt.kernels.numba_formats`),
    bitwise the NumPy reference's ``run_mixed``."""
    from ..kernels.numba_formats import FIRST_STATE, MIXED_LOOPS
    sizes = [a.size for a in params]
    unused = [0] * len(params)  # the row of a buffer the call does not have (never read)
    # rows: numba_formats.PARAM, GRAD, MASTER, then per state buffer k two, FIRST_STATE + 2k
    # (its values, or an 8-bit one's codes) and the next (an 8-bit one's absmax), then
    # the element counts
    state_rows = []
    for st, f in zip(states, formats.state):
        int8 = f == INT8
        state_rows.append(unused if st is None else _addresses([s.codes for s in st] if int8 else st))
        state_rows.append(_addresses([s.absmax for s in st]) if int8 else unused)
    table = np.array([_addresses(params), _addresses(grads), unused if masters is None else _addresses(masters),
                      *state_rows, sizes], dtype=np.int64)
    rows = tuple(None if st is None else FIRST_STATE + 2 * k for k, st in enumerate(states))
    roles = (formats.param, formats.grad, formats.master)
    fmts = tuple(FLOAT32 if f is None else f for f in formats.state)
    signs = tuple(f == INT8 and st[0].signed for st, f in zip(states, formats.state))
    n = N_FLOATS[kernel]
    store = stores.flush_subnormal if denormals.get_flush_denormal() else stores.keep
    serial, parallel = MIXED_LOOPS[kernel, store]
    args = (table, rows, roles, fmts, signs, scalars[:n], scalars[n:], _TINY[4], key)
    if not _on_pool(_mixed_moved(formats, sum(sizes))):
        serial(*args, 1)
        return
    try:
        parallel(*args, _threads)
    finally:
        _pool.release()


_NO_EACH = np.empty(0)  # sumsq_list without per-tensor sums


def _reduce_list(which: str, arrays, each) -> float:
    """The reduction ``which`` (a (serial, parallel) pair of kernels/numba_norms.py) over
    validated host arrays of one dtype; each array's own into ``each`` when given."""
    from ..kernels import numba_norms
    if not arrays:
        return 0.0
    table = np.array([[a.__array_interface__["data"][0] for a in arrays], [a.size for a in arrays]], dtype=np.int64)
    first = numba_norms.block_starts(table[1])
    tiny = _TINY[arrays[0].itemsize]
    serial, parallel = getattr(numba_norms, which)
    out = each if each is not None else _NO_EACH
    if not _on_pool(arrays[0].itemsize * int(table[1].sum())):
        return float(serial(table, first, tiny, out))
    try:
        return float(parallel(table, first, tiny, out))
    finally:
        _pool.release()


def sumsq_list(arrays, each=None) -> float:
    """The sum of squares of every element of ``arrays`` (validated host arrays of
    one dtype), in the order of :mod:`fastopt.kernels.numba_norms`; each array's
    own into ``each`` (float64, one per array) when given."""
    return _reduce_list("SUMSQ", arrays, each)


def maxabs_list(arrays, each=None) -> float:
    """The largest magnitude of every element of ``arrays`` (validated host arrays
    of one dtype) as a float64, NaN (``np.nan``) if any is NaN, over the blocks of
    :mod:`fastopt.kernels.numba_norms`; each array's own into ``each`` (float64,
    one per array) when given."""
    return _reduce_list("MAXABS", arrays, each)


# ---- the two-pass rules (fastopt.trust) -------------------------------------------

def _table_of(params, grads, states) -> np.ndarray:
    """The pointer table of a list call (rows: param, grad, each state (0 when None), sizes)."""
    rows = [params, grads] + [st for st in states]
    return np.array([[0] * len(params) if r is None else [a.__array_interface__["data"][0] for a in r]
                     for r in rows] + [[a.size for a in params]], dtype=np.int64)


def trust_sums(kernel: str, params, grads, states, scalars, table=None):
    """Pass 1 of a two-pass kernel over lists of tensors (``scalars``: pass 1's, ``states``:
    None where not read): per tensor ``sum(p*p)`` and ``sum(u*u)``, float64 arrays, in the
    order of :mod:`fastopt.kernels.numba_trust` (bitwise the C library's)."""
    from ..kernels.numba_trust import SUMS, block_starts
    if table is None:
        table = _table_of(params, grads, states)
    n = N_FLOATS[kernel]
    count = len(params)
    param_sumsq, update_sumsq = np.zeros(count), np.zeros(count)
    rows = tuple(None if st is None else 2 + k for k, st in enumerate(states))
    first = block_starts(table[-1])
    args = (table, rows, scalars[:n], scalars[n:], _TINY[params[0].itemsize], first, param_sumsq, update_sumsq)
    serial, parallel = SUMS[kernel]
    read = sum(1 for st in states if st is not None) + 2
    if not _on_pool(params[0].itemsize * int(table[-1].sum()) * read):
        serial(*args)
    else:
        try:
            parallel(*args)
        finally:
            _pool.release()
    return param_sumsq, update_sumsq


def run_list_each(kernel: str, params, grads, states, scalars, values, table=None) -> None:
    """Pass 2 of a two-pass kernel: the update over lists of tensors, tensor i with
    ``scalars`` whose field ``trust.field`` is ``values[i]`` (float64), in one compiled
    call whose threads share the total element count."""
    from ..kernels.numba_trust import EACH_LIST_LOOPS
    if table is None:
        table = _table_of(params, grads, states)
    n = N_FLOATS[kernel]
    values = np.ascontiguousarray(values, dtype=np.float64)
    store = stores.flush_subnormal if denormals.get_flush_denormal() else stores.keep
    serial, parallel = EACH_LIST_LOOPS[kernel, store]
    rows = tuple(None if st is None else 2 + k for k, st in enumerate(states))
    args = (table, rows, scalars[:n], scalars[n:], _TINY[params[0].itemsize])
    if not _on_pool(_moved(params[0].itemsize, int(table[-1].sum()), states)):
        serial(*args, 1, values)
        return
    try:
        parallel(*args, _threads, values)
    finally:
        _pool.release()


def trust_grad_sumsq(grads, table=None) -> float:
    """The sum of squares of every gradient (the order of :func:`sumsq_list`), from the
    call's pointer table (its grad row and sizes) when there is one."""
    if table is None:
        return sumsq_list(list(grads))
    from ..kernels.numba_norms import SUMSQ, block_starts
    rows = np.ascontiguousarray(table[[1, table.shape[0] - 1]])
    first = block_starts(rows[1])
    serial, parallel = SUMSQ
    if not _on_pool(grads[0].itemsize * int(rows[1].sum())):
        return float(serial(rows, first, _TINY[grads[0].itemsize], _NO_EACH))
    try:
        return float(parallel(rows, first, _TINY[grads[0].itemsize], _NO_EACH))
    finally:
        _pool.release()
