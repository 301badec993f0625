"""Every compiled CPU backend against the NumPy reference: one matrix for all.

rule x option x dtype x backend, over many steps, plus odd sizes, non-finite
gradients and thread-count determinism. A backend listed in ``CPU_BACKENDS``
must load here: an unavailable one fails (CI has a compiler and Numba).

Exactness. Both backends promise more than closeness: they evaluate the
reference's operations in the same order, in the buffer dtype, without FMA
contraction (Numba: no ``contract`` flag; C: ``-ffp-contract=off``) and with
IEEE sqrt and division, so their results must be *bitwise* equal to the
reference, NaN payloads aside (any NaN matches any NaN, in the same place).
"""
import numpy as np
import pytest

import fastopt
from oracle import FULL, MATRIX, MATRIX_IDS, inputs, run_fastopt

#: Every rule with all its state buffers in use.
FULL_CASES = list(FULL.items())

CPU_BACKENDS = ["numba", "c"]


def assert_same(a, b, dtype, what):
    """Bitwise equal, except that NaNs compare by position only (payloads may differ)."""
    assert a.dtype == b.dtype == dtype, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what + " (NaN positions)")
    keep = ~np.isnan(b)
    # Compare bit patterns, so -0.0 != +0.0 and every ulp counts.
    np.testing.assert_array_equal(a[keep].view(np.uint8), b[keep].view(np.uint8), err_msg=what)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    info = fastopt.backends()[request.param]
    assert info.available, f"backend {request.param} did not load: {info.reason}"
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_matches_reference(backend, rule, options, dtype):
    p0, grads = inputs(1031, 20, dtype, seed=7)
    p, state = run_fastopt(rule, options, p0, grads, backend=backend)
    p_ref, state_ref = run_fastopt(rule, options, p0, grads, backend="numpy")
    assert_same(p, p_ref, dtype, f"param {backend} {rule} {options}")
    for name in state:
        assert_same(state[name], state_ref[name], dtype, f"{name} {backend} {rule} {options}")


@pytest.mark.parametrize("n", [0, 1, 3, 17, 1000003])
@pytest.mark.parametrize("rule,options", FULL_CASES, ids=[r for r, _ in FULL_CASES])
def test_odd_sizes(backend, rule, options, n):
    p0, grads = inputs(n, 3, np.float32, seed=n)
    p, state = run_fastopt(rule, options, p0, grads, backend=backend)
    p_ref, state_ref = run_fastopt(rule, options, p0, grads, backend="numpy")
    assert_same(p, p_ref, np.float32, f"param n={n}")
    for name in state:
        assert_same(state[name], state_ref[name], np.float32, f"{name} n={n}")


SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-45], dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_nonfinite_gradients_propagate_like_reference(backend, rule, options, dtype):
    p0, grads = inputs(103, 4, dtype, seed=11)
    for k, g in enumerate(grads):
        g[k::13][:SPECIALS.size] = SPECIALS[: g[k::13].size].astype(dtype)
    with np.errstate(all="ignore"):
        p, state = run_fastopt(rule, options, p0, grads, backend=backend)
        p_ref, state_ref = run_fastopt(rule, options, p0, grads, backend="numpy")
    # The special values reached the result (some parameter or state is not finite).
    assert not all(np.isfinite(x).all() for x in (p_ref, *state_ref.values()))
    assert_same(p, p_ref, dtype, f"param {backend} {rule} {options}")
    for name in state:
        assert_same(state[name], state_ref[name], dtype, f"{name} {backend} {rule} {options}")


@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_bitwise_identical_across_thread_counts(backend, rule, options):
    p0, grads = inputs(300007, 3, np.float32, seed=5)
    results = []
    before = fastopt.get_num_threads()
    try:
        for threads in (1, 2, 1):
            fastopt.set_num_threads(threads)
            results.append(run_fastopt(rule, options, p0, grads, backend=backend))
    finally:
        fastopt.set_num_threads(before)
    (p1, s1), (p2, s2), (p3, s3) = results
    assert p1.tobytes() == p2.tobytes() == p3.tobytes()
    for name in s1:
        assert s1[name].tobytes() == s2[name].tobytes() == s3[name].tobytes()


def test_backend_modules_import_and_the_report_stays_callable():
    """``fastopt.backends`` is the backends package and is callable (the report):
    ``import fastopt.backends.c`` works, in a fresh process, before or after the
    report, and a lazy backend import does not replace the report."""
    import subprocess
    import sys
    code = ("import fastopt.backends.c as c, fastopt.backends.numba_cpu as nb, fastopt; "
            "assert c.name == 'c' and nb.name == 'numba'; r = fastopt.backends(); "
            "assert set(r) == {'numpy', 'numba', 'c', 'cuda'}, r; "
            "fastopt.adam_(*[__import__('numpy').ones(4, 'float32') for _ in range(4)], step=1, backend='numpy'); "
            "assert callable(fastopt.backends) and fastopt.backends()['numpy'].available")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
