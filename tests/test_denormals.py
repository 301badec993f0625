"""fastopt.set_flush_denormal: subnormal results stored as zeros, the same bits everywhere.

With flushing on, every stored value (parameter and state) that is subnormal
becomes a zero of its sign; intermediates are not flushed, so the NumPy
reference defines the result exactly and every backend must equal it bit for
bit, for every rule, starting from subnormal state (where it matters). Off
(the default), nothing changes: the backend tests hold the default to the
reference as before.
"""
import numpy as np
import pytest

import fastopt
from oracle import FULL, run_flush_case

BACKENDS = ["numpy", "numba", "c"]
CASES = list(FULL.items())


@pytest.fixture
def flushing():
    fastopt.set_flush_denormal(True)
    try:
        yield
    finally:
        fastopt.set_flush_denormal(False)


def subnormal(a):
    return (a != 0) & (np.abs(a) < np.finfo(a.dtype).tiny)


def test_off_by_default_and_checked():
    assert fastopt.get_flush_denormal() is False
    with pytest.raises(TypeError, match="on must be a bool"):
        fastopt.set_flush_denormal("yes")
    assert fastopt.get_flush_denormal() is False


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_the_case_reaches_subnormals_without_flushing(rule, options, dtype):
    p, state = run_flush_case(rule, options, backend="numpy", dtype=dtype)
    assert any(subnormal(x).any() for x in (p, *state.values())), "no subnormal result: the flush tests prove nothing"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flushing_is_exact_on_every_backend(flushing, backend, rule, options, dtype):
    info = fastopt.backends()[backend]
    assert info.available, info.reason
    with np.errstate(all="ignore"):
        p, state = run_flush_case(rule, options, backend=backend, dtype=dtype)
        p_ref, state_ref = run_flush_case(rule, options, backend="numpy", dtype=dtype)
    for name, ours, ref in [("param", p, p_ref), *((k, state[k], state_ref[k]) for k in state)]:
        assert not subnormal(ours).any(), f"{name}: a subnormal value was stored"
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
        keep = ~np.isnan(ref)
        assert ours[keep].tobytes() == ref[keep].tobytes(), f"{name} differs from the reference on {backend}"


def test_zeros_keep_their_sign(flushing):
    tiny = np.finfo(np.float32).tiny
    for backend in BACKENDS:
        p = np.array([tiny / 4, -tiny / 4, 1.0, -1.0], np.float32)
        g = np.zeros(4, np.float32)
        fastopt.sgd_(p, g, step=1, lr=0.0, backend=backend)
        assert np.signbit(p).tolist() == [False, True, False, True] and (p[:2] == 0).all(), backend
