"""Numba CPU backend specifics: serial vs parallel path, vectorised float32
loops, on-disk cache, thread settings, fork safety, and the host buffer
checks the small-call path relies on.

The math itself is covered by test_backends.py (every rule x option x dtype
against the reference)."""
import inspect
import os
import re
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastopt
from fastopt.backends import numba_cpu
from fastopt.kernels import numba_loops
from fastopt.kernels import elements, stores
from fastopt.rules import RULES
from oracle import FULL, MATRIX, MATRIX_IDS, hyper, inputs, needed_state, run_fastopt

#: Each element kernel with the first rule that runs it.
KERNEL_RULE = {}
for _name, _rule in RULES.items():
    KERNEL_RULE.setdefault(_rule.kernel, _name)
#: Where the fastopt under test lives (the installed package in CI, src/ with
#: PYTHONPATH=src): child processes must import the same one, compiled extensions included.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__)))


@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_serial_and_parallel_paths_bitwise_equal(rule, options, monkeypatch):
    p0, grads = inputs(4099, 3, np.float32, seed=2)
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_BYTES", 1 << 62)
    serial = run_fastopt(rule, options, p0, grads, backend="numba")
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN_BYTES", 0)
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(2)
    try:
        parallel = run_fastopt(rule, options, p0, grads, backend="numba")
    finally:
        fastopt.set_num_threads(before)
    assert serial[0].tobytes() == parallel[0].tobytes()
    assert all(serial[1][k].tobytes() == parallel[1][k].tobytes() for k in serial[1])


def _fresh_asm(kernel, args):
    """Assembly of the serial loop compiled anew (cached code cannot be inspected)."""
    fn = numba.njit(error_model="numpy")(numba_loops.LOOPS[kernel, stores.keep][0].py_func)
    fn(*args)
    return next(iter(fn.inspect_asm().values()))


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 assembly")
@pytest.mark.parametrize("kernel", sorted(KERNEL_RULE))
def test_float32_loop_is_vectorised_without_float64_promotion(kernel):
    # The two measured pitfalls: a float64 scalar promotes the float32 loop
    # (float32 -> float64 conversions appear) and a loop that does not vectorise (no packed
    # single-precision arithmetic). Flags and None buffers must not stop it.
    from fastopt.rules import KERNEL_SCALARS
    rule = KERNEL_RULE[kernel]
    opts = dict(FULL[rule])  # every state buffer and flag of the rule in use
    scalars, _ = RULES[rule].prepare(hyper(rule, opts), 3)
    n = numba_loops.N_FLOATS[kernel]
    x = np.ones(64, np.float32)
    need = needed_state(rule, opts)
    state = [x.copy() if name in need else None for name in RULES[rule].state]
    assert type(scalars) is KERNEL_SCALARS[kernel]
    asm = _fresh_asm(kernel, (x.copy(), x.copy(), *state, scalars[:n], scalars[n:], np.float32(1e-38)))
    # (float64 -> float32 conversions are expected: the scalars are cast once.)
    assert not re.search(r"cvtss2sd|cvtps2pd", asm), "float32 values widened to float64"
    assert re.search(r"\b(v?)(mul|add|sub)ps\b", asm), "float32 loop not vectorised"
    source = inspect.getsource(getattr(elements, kernel))
    if "math.sqrt(" in source and " / " in source:
        assert re.search(r"\bv?sqrtps\b", asm) and re.search(r"\bv?divps\b", asm), "sqrt/div not vectorised"


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 assembly")
@pytest.mark.parametrize("kernel", ["adam", "lion"])
def test_float32_list_loop_is_vectorised(kernel):
    """The list loop runs the flat loop over views made from raw addresses: it
    must still vectorise (and a None buffer must still be pruned)."""
    rule = KERNEL_RULE[kernel]
    scalars, _ = RULES[rule].prepare(hyper(rule, {}), 3)
    n = numba_loops.N_FLOATS[kernel]
    arrays = [np.ones(64, np.float32) for _ in range(2 + len(RULES[rule].state))]
    table = np.array([[a.__array_interface__["data"][0]] for a in arrays] + [[64]], np.int64)
    rows = tuple(2 + k if name in needed_state(rule, {}) else None for k, name in enumerate(RULES[rule].state))
    fn = numba.njit(error_model="numpy")(numba_loops.LIST_LOOPS[kernel, stores.keep][0].py_func)
    fn(table, rows, scalars[:n], scalars[n:], np.float32(1e-38), 1)
    asm = next(iter(fn.inspect_asm().values()))
    assert not re.search(r"cvtss2sd|cvtps2pd", asm), "float32 values widened to float64"
    assert re.search(r"\bv?(mul|add|sub)ps\s+%[xy]mm", asm), "float32 list loop not vectorised"


def test_set_num_threads_is_clamped_to_numba_pool():
    before = fastopt.get_num_threads()
    try:
        fastopt.set_num_threads(10_000)
        assert numba_cpu._threads == numba.config.NUMBA_NUM_THREADS
        fastopt.set_num_threads(1)
        assert numba_cpu._threads == 1
    finally:
        fastopt.set_num_threads(before)


def _run_child(code, env):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_second_process_loads_compiled_loops_from_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = """
        import numpy as np, fastopt
        from fastopt.kernels.numba_loops import LOOPS
        x = [np.ones(100, np.float32) for _ in range(4)]
        fastopt.adamw_(*x, step=1, backend="numba")
        fastopt.adamw_(*([a] for a in x), step=1, backend="numba")  # a list call: the list loop
        from fastopt.kernels import stores
        from fastopt.kernels.numba_loops import LIST_LOOPS
        for loop in (LOOPS["adam", stores.keep][0], LIST_LOOPS["adam", stores.keep][0]):
            s = loop.stats
            print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))
    """
    assert _run_child(code, env).split() == ["0", "1"] * 2  # compiled and saved
    assert _run_child(code, env).split() == ["1", "0"] * 2  # loaded, not compiled


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_after_parallel_use_still_updates(tmp_path):
    # GNU OpenMP aborts a forked child that uses the parent's pool; the backend
    # falls back to the serial loop there.
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = """
        import os, numpy as np, fastopt
        fastopt.set_num_threads(2)
        x = [np.ones(1 << 17, np.float32) for _ in range(4)]
        fastopt.adamw_(*x, step=1, backend="numba")
        pid = os.fork()
        if pid == 0:
            fastopt.adamw_(*x, step=2, backend="numba")
            os._exit(0 if np.isfinite(x[0]).all() else 3)
        print(os.waitpid(pid, 0)[1])
    """
    assert _run_child(code, env).strip() == "0"


def test_host_overlap_checks_views_and_owned_arrays():
    # The small-call path tests owned arrays by identity and views with
    # np.may_share_memory; adjacent views and a repeated empty array are fine.
    base = np.zeros(40, np.float32)
    p, g, m, v = base[0:10], base[10:20], base[20:30], base[30:40]
    fastopt.adam_(p, g, m, v, step=1, backend="numba")
    e = np.zeros(0, np.float32)
    fastopt.adam_(e, e, e, e, step=1, backend="numba")
    with pytest.raises(ValueError, match="exp_avg_sq overlaps exp_avg"):
        fastopt.adam_(p, g, m, base[25:35], step=1, backend="numba")
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="exp_avg_sq overlaps param"):
        fastopt.adam_(a, np.zeros(10, np.float32), np.zeros(10, np.float32), a, step=1, backend="numba")


def test_cache_key_covers_element_and_scalars_sources():
    # Numba checks only the loop's own file for staleness; each loop carries a
    # hash of elements.py and rules.py in its closure (part of the cache key),
    # so editing an element function cannot load a stale compiled loop.
    assert numba_loops._source_key() == numba_loops.SOURCE_KEY
    for serial, parallel in numba_loops.LOOPS.values():
        for loop in (serial, parallel):
            assert numba_loops.SOURCE_KEY in [c.cell_contents for c in loop.py_func.__closure__]
