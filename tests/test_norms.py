"""``fastopt.total_norm`` / ``sum_of_squares`` / ``max_abs``: reproducible reductions on every backend.

The summation order is fixed by the sizes alone (csrc/src/norm.c), so every
host backend and every thread count must give the same bits as the NumPy
reference, on sizes around the block (4096) and lane (8) boundaries. Accuracy:
the sum is accumulated in double, so it must agree with an exactly rounded sum
(math.fsum of the float64 squares) to a few ulps of double (1e-13 relative
for these sizes), far inside torch's float32 norm, which it must match to 1e-6.
The max |x| (the inf norm) is exact: numpy's ``np.max(np.abs(x))`` as a
float64, bit for bit, a NaN anywhere giving the canonical NaN.

Device arrays: the CUDA backend runs under Numba's simulator in a child
process (cuda_sim_norms_worker.py), which must give the reference's bits; the
kernels compile to PTX for sm_80/sm_90 and assemble with ptxas, with no FMA
in the sum of squares (a contracted ``acc + v*v`` would round differently).
"""
import json
import math
import os
import re
import struct
import subprocess
import sys

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
    ([[1.0, 2.0]], TypeError, r"arrays\[0\] must be a numpy.ndarray or a __cuda_array_interface__ array, got list"),
    (3.0, TypeError, "arrays must be a numpy.ndarray or a __cuda_array_interface__ array, got float"),
])
@pytest.mark.parametrize("fn", ["sum_of_squares", "sums_of_squares", "max_abs", "max_abs_each", "total_norm"])
def test_bad_input_names_the_array(bad, error, message, fn):
    with pytest.raises(error, match=message):
        getattr(fastopt, fn)(bad)



# ---------------------------------------------------------------------------
# max |x|: the inf norm
# ---------------------------------------------------------------------------

NAN_BITS = "7ff8000000000000"  # the canonical quiet NaN (float("nan"), C's NAN)


def bits(v) -> str:
    """The float64 bits of ``v`` in hex, most significant first (as cuda_sim_norms_worker.enc)."""
    return struct.pack(">d", v).hex()


def unbits(h: str) -> float:
    return struct.unpack(">d", bytes.fromhex(h))[0]


def numpy_max_abs(a) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def planted(dtype, seed):
    """arrays() with the largest magnitude a negative value in the middle of a big tensor."""
    xs = arrays(dtype, seed=seed)
    xs[-1].reshape(-1)[123_457] = -9.5
    xs[7].reshape(-1)[4096] = 6.0  # a tensor's largest: the first element of its second block
    return xs


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_max_abs_is_numpys_on_every_backend_and_thread_count(dtype, threads):
    xs = planted(dtype, seed=11)
    want_each = [numpy_max_abs(a) for a in xs]
    want = float(np.max(np.abs(np.concatenate([a.reshape(-1) for a in xs]))))
    assert want == 9.5 and max(want_each) == want and want_each[0] == 0.0
    for n in (1, 2):
        fastopt.set_num_threads(n)
        for backend in BACKENDS:
            where = f"{backend}, {n} threads"
            assert bits(fastopt.max_abs(xs, backend=backend)) == bits(want), where
            total, each = fastopt.max_abs_each(xs, backend=backend)
            assert bits(total) == bits(want) and each.dtype == np.float64, where
            assert [bits(v) for v in each] == [bits(v) for v in want_each], where
            assert bits(fastopt.total_norm(xs, math.inf, backend=backend)) == bits(want), where
            assert [bits(fastopt.max_abs(a, backend=backend)) for a in xs] == [bits(v) for v in want_each], where


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_max_abs_non_finite_values(backend, dtype, threads):
    """An Inf of either sign gives +Inf; a NaN (any sign and payload, in a block's
    vectorised body or its tail) gives the canonical NaN, also next to an Inf, in
    the total and in its own tensor's entry only, on 1 and 2 threads."""
    udtype = np.uint32 if dtype == np.float32 else np.uint64
    payload_nan = np.array([0xFFC01234 if dtype == np.float32 else 0xFFF8000000001234], udtype).view(dtype)[0]
    for n in (1, 2):
        fastopt.set_num_threads(n)
        xs = planted(dtype, seed=12)
        xs[6].reshape(-1)[100] = -np.inf
        total, each = fastopt.max_abs_each(xs, backend=backend)
        assert total == np.inf and each[6] == np.inf and np.isfinite(np.delete(each, 6)).all()
        for where in [(9, 7), (10, 200_003), (5, 4094), (2, 6)]:  # body, a later block, a tail, a short tensor
            ys = [a.copy() for a in xs]
            ys[where[0]].reshape(-1)[where[1]] = payload_nan
            total, each = fastopt.max_abs_each(ys, backend=backend)
            assert bits(total) == NAN_BITS, (where, n)
            assert bits(each[where[0]]) == NAN_BITS, (where, n)
            assert not np.isnan(np.delete(each, where[0])).any(), (where, n)
            assert bits(fastopt.total_norm(ys, math.inf, backend=backend)) == NAN_BITS
        assert np.isnan(fastopt.total_norm(ys, backend=backend))  # and the 2-norm's sum of squares too


def test_max_abs_empty_and_signed_zeros():
    for backend in BACKENDS:
        assert bits(fastopt.max_abs([], backend=backend)) == bits(0.0)
        total, each = fastopt.max_abs_each([np.zeros(0, np.float32), np.zeros((0, 3), np.float32)], backend=backend)
        assert bits(total) == bits(0.0) and [bits(v) for v in each] == [bits(0.0)] * 2
        assert bits(fastopt.max_abs(np.full(9, -0.0), backend=backend)) == bits(0.0)  # |-0.0| is +0.0
        assert fastopt.max_abs(np.array([-np.finfo(np.float32).tiny / 4], np.float32), backend=backend) \
            == float(np.finfo(np.float32).tiny / 4)  # subnormals are values like any other
        assert fastopt.total_norm([], math.inf, backend=backend) == 0.0


def test_total_norm_norm_types():
    xs = planted(np.float32, seed=13)
    l2 = math.sqrt(fastopt.sum_of_squares(xs))
    assert fastopt.total_norm(xs) == l2 == fastopt.total_norm(xs, 2) == fastopt.total_norm(xs, norm_type=np.float64(2))
    assert fastopt.total_norm(xs, float("inf")) == 9.5 == fastopt.total_norm(xs, norm_type=np.inf)
    for bad in (1.0, 1, 0, -math.inf, 3.5, math.nan, "inf", None, True, [2.0]):
        with pytest.raises(ValueError, match=r"norm_type must be 2\.0 \(the L2 norm\) or math\.inf \(the max norm\), "
                                             f"got {re.escape(repr(bad))}$"):
            fastopt.total_norm(xs, bad)


class FakeDevice:
    """A __cuda_array_interface__ object: dispatch sees a device array (never read here)."""

    def __init__(self, n=4, typestr="<f4", strides=None):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": typestr, "data": (0, False), "version": 3,
                                         "strides": strides}


@pytest.mark.parametrize("fn", ["sum_of_squares", "sums_of_squares", "max_abs", "max_abs_each", "total_norm"])
def test_host_and_device_arrays_do_not_mix(fn):
    f = getattr(fastopt, fn)
    with pytest.raises(TypeError, match=r"arrays\[1\] is a device array but arrays\[0\] is a numpy.ndarray on the "
                                        r"host; all arrays of one norm must be on the same device"):
        f([np.ones(4, np.float32), FakeDevice()])
    with pytest.raises(TypeError, match=r"arrays\[2\] is a numpy.ndarray on the host but arrays\[0\] is a device "
                                        r"array; all arrays of one norm must be on the same device"):
        f([FakeDevice(), FakeDevice(), np.ones(4, np.float32)])
    with pytest.raises(TypeError, match=r"arrays\[1\] has dtype float64, expected float32"):
        f([FakeDevice(), FakeDevice(typestr="<f8")])
    with pytest.raises(TypeError, match=r"arrays\[0\] must have dtype float32 or float64, got int32"):
        f([FakeDevice(typestr="<i4")])
    with pytest.raises(ValueError, match=r"arrays\[0\] must be C-contiguous"):
        f([FakeDevice(strides=(8,))])
    with pytest.raises(TypeError, match="backend 'c' runs on cpu but the buffers are device"):
        f([FakeDevice()], backend="c")


def test_device_arrays_go_to_the_cuda_backend():
    """No longer refused by the norms: with no GPU here, the cuda backend says why it cannot run."""
    if fastopt.backends()["cuda"].available:
        pytest.skip("a GPU is here: the fake device array would be read")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        fastopt.max_abs([FakeDevice()])
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        fastopt.sum_of_squares(FakeDevice())


# ---------------------------------------------------------------------------
# Device arrays: the CUDA simulator, PTX
# ---------------------------------------------------------------------------

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cudasim_norms") / "sim")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cuda_sim_norms_worker.py"), out], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"simulator worker failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out + ".json") as f:
        report = json.load(f)
    with np.load(out + ".npz") as z:
        inputs = dict(z)
    return report, inputs


def sim_cases(report):
    return sorted(k for k, v in report.items() if isinstance(v, dict) and "count" in v)


def test_simulator_equals_the_reference_bitwise(sim):
    """Every case (sizes around 4096, f32 and f64, 256 and 16 threads per block,
    one tensor, 2-D tensors, other interface objects, Inf, empty tensors): the
    device sum of squares (total and each) has the NumPy reference's bits, the
    device max |x| numpy's max, bit for bit."""
    report, inputs = sim
    cases = sim_cases(report)
    assert len(cases) == 2 * 10, cases
    for key in cases:
        got = report[key]
        xs = [inputs[f"{key}/{i}"] for i in range(got["count"])]
        if key.endswith("/nan"):
            continue  # test_simulator_non_finite
        total, each = fastopt.sums_of_squares(xs, backend="numpy")
        assert got["sumsq_total"] == bits(total), key
        assert got["sumsq_each"] == [bits(v) for v in each], key
        want_each = [numpy_max_abs(a) for a in xs]
        assert got["maxabs_total"] == bits(max(want_each, default=0.0)), key
        assert got["maxabs_each"] == [bits(v) for v in want_each], key
        if "sumsq" in got:
            assert got["sumsq"] == bits(total) and got["norm2"] == bits(math.sqrt(total)), key
            assert got["maxabs"] == got["norminf"] == got["maxabs_total"], key


def test_simulator_non_finite(sim):
    report, inputs = sim
    for d in ("f32", "f64"):
        inf, nan = report[f"{d}/inf"], report[f"{d}/nan"]
        assert unbits(inf["maxabs_total"]) == math.inf and unbits(inf["sumsq_total"]) == math.inf
        # the NaN (negative, with a payload) becomes the canonical NaN, in its own tensor's entry only
        assert nan["maxabs_total"] == NAN_BITS and nan["maxabs_each"][-1] == NAN_BITS
        assert not any(math.isnan(unbits(v)) for v in nan["maxabs_each"][:-1])
        assert math.isnan(unbits(nan["sumsq_total"])) and math.isnan(unbits(nan["sumsq_each"][-1]))
        assert not any(math.isnan(unbits(v)) for v in nan["sumsq_each"][:-1])
        xs = [inputs[f"{d}/nan/{i}"] for i in range(nan["count"])]
        assert bits(fastopt.max_abs(xs, backend="numpy")) == NAN_BITS  # the host's, bit for bit


def test_simulator_plumbing(sim):
    report, _ = sim
    assert report["empty_list"] == [0.0, 0.0, 0.0]
    assert report["single_array"] == bits(2.0)
    assert report["compiled"] == ["maxabs/float32", "maxabs/float64", "sumsq/float32", "sumsq/float64"]
    errors = report["errors"]
    assert errors["device_then_host"] == ["TypeError", "arrays[1] is a numpy.ndarray on the host but arrays[0] is a "
                                          "device array; all arrays of one norm must be on the same device"]
    assert errors["host_then_device"] == ["TypeError", "arrays[1] is a device array but arrays[0] is a numpy.ndarray "
                                          "on the host; all arrays of one norm must be on the same device"]
    assert errors["mixed_dtypes"] == ["TypeError",
                                      "arrays[1] has dtype float64, expected float32 (the dtype of arrays[0])"]
    assert errors["bad_dtype"] == ["TypeError", "arrays[0] must have dtype float32 or float64, got int32"]
    assert errors["not_contiguous"][0] == "ValueError" and "C-contiguous" in errors["not_contiguous"][1]
    assert errors["host_backend"][0] == "TypeError" and "backend 'c' runs on cpu" in errors["host_backend"][1]
    assert errors["bad_norm_type"] == ["ValueError", "norm_type must be 2.0 (the L2 norm) or math.inf (the max norm), "
                                       "got 1.0"]


def test_cuda_norm_constants_are_the_hosts():
    from fastopt.backends.reference import NORM_BLOCK, NORM_LANES
    from fastopt.kernels import cuda_norms, numba_norms

    assert (cuda_norms.BLOCK, cuda_norms.LANES) == (numba_norms.BLOCK, numba_norms.LANES) == (NORM_BLOCK, NORM_LANES)
    assert cuda_norms.grid(1, 8) == 1 and cuda_norms.grid(33, 256) == 2 and cuda_norms.grid(3, 16) == 2
    with pytest.raises(ValueError, match="multiple of 8"):
        cuda_norms.grid(1, 12)


@pytest.mark.parametrize("dname", ["f32", "f64"])
@pytest.mark.parametrize("kind", ["sumsq", "maxabs"])
def test_ptx_reduction_kernels_compile_and_assemble(kind, dname, tmp_path):
    """Both kernels, both dtypes, for sm_80 and sm_90: the sum of squares has an
    uncontracted ``mul.rn.f64`` and no FMA (the host's rounding), every kernel a
    barrier between the lanes and their combination, loads of the buffer dtype;
    ptxas assembles them without spills."""
    from numba import cuda

    from fastopt.kernels import cuda_norms
    from test_cuda_backend import CCS, assemble, instructions

    kernel = cuda_norms.sumsq_kernel if kind == "sumsq" else cuda_norms.maxabs_kernel
    sig = cuda_norms.SIGNATURES[np.dtype(np.float32 if dname == "f32" else np.float64)]
    assert (9, 0) in CCS
    for cc in CCS:
        ptx, _ = cuda.compile_ptx(kernel, sig, cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        ops = instructions(ptx)
        assert not [op for op in ops if op.startswith("fma")], set(ops)
        assert not [op for op in ops if ".ftz" in op or ".approx" in op], set(ops)
        assert f"ld.global.{dname}" in ops and "st.global.f64" in ops and "bar.sync" in ops
        if kind == "sumsq":
            assert "mul.rn.f64" in ops, set(ops)
        report = assemble(ptx, cc, tmp_path)
        assert "0 bytes spill stores" in report, report
