"""``fastopt.total_norm`` / ``sum_of_squares``: one reproducible reduction on every backend.

The summation order is fixed by the sizes alone (csrc/src/norm.c), so every
host backend and every thread count must give the same bits as the NumPy
reference, on sizes around the block (4096) and lane (8) boundaries. Accuracy:
the sum is accumulated in double, so it must agree with an exactly rounded sum
(math.fsum of the float64 squares) to a few ulps of double (1e-13 relative
for these sizes), far inside torch's float32 norm, which it must match to 1e-6.
"""
import math

import numpy as np
import pytest

import fastopt

BACKENDS = ["numpy", "numba", "c"]
SIZES = [0, 1, 7, 8, 9, 4095, 4096, 4097, 3 * 4096 + 5, 50_000, (1 << 18) + 3]


def arrays(dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(n)).astype(dtype).reshape((n,) if n % 2 else (-1, 1) if n else (0,))
            for n in SIZES]


@pytest.fixture
def threads():
    before = fastopt.get_num_threads()
    yield
    fastopt.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_every_backend_and_thread_count_gives_the_reference_bits(dtype, threads):
    xs = arrays(dtype)
    want = fastopt.sum_of_squares(xs, backend="numpy")
    exact = math.fsum(float(v) ** 2 for a in xs for v in a.reshape(-1).astype(np.float64))
    assert want == pytest.approx(exact, rel=1e-13)
    for n in (1, 2):
        fastopt.set_num_threads(n)
        for backend in BACKENDS:
            got = fastopt.sum_of_squares(xs, backend=backend)
            assert got.hex() == want.hex(), f"{backend}, {n} threads"
    assert fastopt.total_norm(xs, backend="c") == math.sqrt(want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_per_tensor_sums_are_each_tensors_own_in_the_same_order(dtype, threads):
    """sums_of_squares: the same total, and each tensor's sum bitwise that tensor's own
    sum_of_squares (its blocks added in order), on every backend and thread count."""
    xs = arrays(dtype, seed=3)
    want_each = [fastopt.sum_of_squares([a], backend="numpy") for a in xs]
    want = fastopt.sum_of_squares(xs, backend="numpy")
    for n in (1, 2):
        fastopt.set_num_threads(n)
        for backend in BACKENDS:
            total, each = fastopt.sums_of_squares(xs, backend=backend)
            assert total.hex() == want.hex() and each.dtype == np.float64, f"{backend}, {n} threads"
            assert [v.hex() for v in each] == [v.hex() for v in want_each], f"{backend}, {n} threads"


def test_one_array_and_empty_lists():
    x = np.arange(10, dtype=np.float32)
    assert fastopt.sum_of_squares(x) == 285.0
    for backend in BACKENDS:
        assert fastopt.sum_of_squares([], backend=backend) == 0.0
        assert fastopt.sum_of_squares([np.zeros(0, np.float32)], backend=backend) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_values_propagate(backend):
    xs = arrays(np.float32, seed=2)
    xs[6].reshape(-1)[100] = np.inf
    assert fastopt.sum_of_squares(xs, backend=backend) == np.inf
    xs[9].reshape(-1)[7] = np.nan
    assert np.isnan(fastopt.sum_of_squares(xs, backend=backend))


def test_matches_torchs_total_norm():
    torch = pytest.importorskip("torch")
    xs = arrays(np.float32, seed=5, scale=1e-3)
    params = [torch.nn.Parameter(torch.zeros(a.shape)) for a in xs]
    for p, a in zip(params, xs):
        p.grad = torch.from_numpy(a.copy())
    theirs = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9).item()
    assert fastopt.total_norm(xs) == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("bad,error,message", [
    ([np.ones(4, np.float32), np.ones(4, np.float64)], TypeError, r"arrays\[1\] has dtype float64, expected float32"),
    ([np.ones(4, np.int64)], TypeError, r"arrays\[0\] must have dtype float32 or float64, got int64"),
    ([np.ones((4, 4), np.float32)[:, 1]], ValueError, r"arrays\[0\] must be C-contiguous"),
    ([[1.0, 2.0]], TypeError, r"arrays\[0\] must be a numpy.ndarray, got list"),
    (3.0, TypeError, "arrays must be a numpy.ndarray, got float"),
])
def test_bad_input_names_the_array(bad, error, message):
    with pytest.raises(error, match=message):
        fastopt.sum_of_squares(bad)
