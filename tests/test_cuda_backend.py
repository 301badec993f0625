"""The CUDA backend, checked without a GPU (and on one when present).

1. Simulator: one child process runs every rule x option x dtype of the test
   matrix under ``NUMBA_ENABLE_CUDASIM=1`` (see cuda_sim_worker.py; the variable
   must be set before numba.cuda is imported, so not in this process), plus the
   device-array plumbing: other ``__cuda_array_interface__`` objects, torch's
   requires_grad refusal, read-only buffers, host/device mixes, empty buffers,
   streams. The simulator computes with NumPy scalars, so the results must equal
   the NumPy reference bit for bit.
2. PTX: every kernel variant the matrix reaches (kernel x present state
   buffers) x dtype compiles with ``numba.cuda.compile_ptx`` for compute
   capability 8.0 and 9.0, and the ptxas of the ``nvidia-cuda-nvcc`` wheel
   assembles it. The PTX is checked for the float64 promotion pitfall and for
   IEEE division/sqrt without flush-to-zero (denormals and NaN/Inf behave as
   in the reference).
3. GPU (skipped without one): the matrix on real device arrays. NVVM contracts
   ``a*b + c`` into FMAs (numba-cuda has no switch for it short of fastmath),
   so results may differ from the reference by a rounding per operation: the
   C backend's tolerance of test_backends.py applies.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import fastopt
from fastopt.kernels import cuda_kernels, elements
from fastopt.rules import MATRIX_RULES, RULES, SCHEDULE_FREE_RULES
from cuda_sim_worker import CAI_CASES, N, STEPS, cai_inputs, case_inputs, list_case_inputs
from oracle import (FULL, MATRIX, MATRIX_IDS, SCHEDULE_FREE_RUNS, fastopt_step, inputs, needed_state, run_fastopt,
                    run_flush_case, run_lists, run_schedulefree)

DTYPES = {"f32": np.float32, "f64": np.float64}
HERE = os.path.dirname(__file__)


# ---------------------------------------------------------------------------
# 1. The simulator
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sim(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cudasim") / "sim")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cuda_sim_worker.py"), out], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"simulator worker failed:\n{proc.stdout}\n{proc.stderr}"
    with open(out + ".json") as f:
        report = json.load(f)
    report["wall_seconds"] = time.perf_counter() - start
    with np.load(out + ".npz") as z:
        arrays = dict(z)
    return report, arrays


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=what)


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("case", range(len(MATRIX)), ids=MATRIX_IDS)
def test_simulator_matches_reference_bitwise(sim, case, dname):
    _, arrays = sim
    rule, options = MATRIX[case]
    p0, grads = case_inputs(case, DTYPES[dname])
    with np.errstate(all="ignore"):
        p_ref, state_ref = run_fastopt(rule, options, p0, grads, backend="numpy")
    assert_bitwise(arrays[f"{case}-{dname}-param"], p_ref, f"param {rule} {options}")
    for name in needed_state(rule, options):
        assert_bitwise(arrays[f"{case}-{dname}-{name}"], state_ref[name], f"{name} {rule} {options}")


@pytest.mark.parametrize("rule", FULL)
def test_simulator_list_call_equals_per_tensor_reference(sim, rule):
    """One list call per step over the small GPT's 75 tensors equals the per-tensor reference."""
    _, arrays = sim
    p0, grads = list_case_inputs()
    with np.errstate(all="ignore"):
        p_ref, s_ref = run_lists(rule, FULL[rule], p0, grads, backend="numpy", per_tensor=True)
    for i, p in enumerate(p_ref):
        assert_bitwise(arrays[f"list-{rule}-param-{i}"], p, f"param[{i}]")
    for k, v in s_ref.items():
        for i, a in enumerate(v):
            assert_bitwise(arrays[f"list-{rule}-{k}-{i}"], a, f"{k}[{i}]")


@pytest.mark.parametrize("rule", FULL)
def test_simulator_flush_denormal_matches_reference(sim, rule):
    _, arrays = sim
    fastopt.set_flush_denormal(True)
    try:
        with np.errstate(all="ignore"):
            p_ref, s_ref = run_flush_case(rule, FULL[rule], backend="numpy")
    finally:
        fastopt.set_flush_denormal(False)
    assert_bitwise(arrays[f"flush-{rule}-param"], p_ref, "param")
    for k, v in s_ref.items():
        assert_bitwise(arrays[f"flush-{rule}-{k}"], v, k)


@pytest.mark.parametrize("wrap", ["fake_tensor", "requires_grad", "named_stream"])
@pytest.mark.parametrize("case", CAI_CASES)
def test_simulator_other_interface_objects(sim, wrap, case):
    """A non-Numba interface object (torch-like, 2-D, with requires_grad or a
    CAI stream) is viewed in place and updated like the reference."""
    _, arrays = sim
    rule, options = CAI_CASES[case]
    p_ref, state_ref = run_fastopt(rule, options, *cai_inputs(), backend="numpy")
    assert_bitwise(arrays[f"{wrap}-{case}-param"], p_ref, "param")
    for name in needed_state(rule, options):
        assert_bitwise(arrays[f"{wrap}-{case}-{name}"], state_ref[name], name)


def test_simulator_errors_and_plumbing(sim):
    report, _ = sim
    kind, msg = report["host_device_mix"]
    assert kind == "TypeError" and "exp_avg" in msg and "host" in msg and "device" in msg
    kind, msg = report["device_on_numpy_backend"]
    assert kind == "TypeError" and "numpy" in msg
    kind, msg = report["readonly_param"]
    assert kind == "ValueError" and "param is read-only" in msg
    assert report["readonly_grad_ok"] is None  # the gradient is only read
    kind, msg = report["bad_stream"]
    assert kind == "TypeError" and "stream" in msg
    assert report["explicit_stream"] is None
    assert report["empty_error"] is None and report["empty_launches"] == 0  # n = 0 launches nothing
    assert report["view_cached"]
    for dname in DTYPES:
        assert report["all_finite"][dname] == [True, True, False, False, False]


@pytest.mark.parametrize("kind", SCHEDULE_FREE_RUNS)
def test_simulator_schedule_free_steps_and_switches_match_reference_bitwise(sim, kind):
    _, arrays = sim
    p0, grads = inputs(N, STEPS + 1, np.float32, seed=11)
    with np.errstate(all="ignore"):
        ref = run_schedulefree(kind, p0, grads)  # (host arrays: the auto backend; every host backend is bitwise)
    for k, v in ref.items():
        assert_bitwise(arrays[f"schedulefree-{kind}-{k}"], v, f"{kind} {k}")


def test_simulator_compiles_one_variant_per_presence_and_dtype(sim):
    report, _ = sim
    expected = sorted(f"{k}-{np.dtype(d).name}-{''.join('1' if x else '0' for x in present)}"
                      for k, present in reached_variants() for d in DTYPES.values())
    assert report["variants"] == expected
    assert report["matrix_launches"] == len(MATRIX) * len(DTYPES) * 3


def test_simulator_runtime(sim):
    """Keep the simulator part cheap: it runs in CI on every push."""
    report, _ = sim
    print(f"simulator: {report['matrix_launches']} launches in {report['matrix_seconds']:.1f} s, "
          f"worker {report['wall_seconds']:.1f} s wall")
    assert report["wall_seconds"] < 120


# ---------------------------------------------------------------------------
# 2. PTX and ptxas
# ---------------------------------------------------------------------------

def reached_variants() -> list[tuple[str, tuple[bool, ...]]]:
    """(kernel, present state buffers) for every case of the matrix."""
    seen = {}
    for rule, options in MATRIX:
        r = RULES[rule]
        need = needed_state(rule, options)
        seen[(r.kernel, tuple(n in need for n in r.state))] = None
    return list(seen)


def driven_variants() -> list[tuple[str, tuple[bool, ...]]]:
    """(kernel, present state buffers) of the kernels whose driver modules call them
    (Muon's, the schedule-free rules'): both phases, with every buffer and with none."""
    return [(r.kernel, present) for r in (*MATRIX_RULES.values(), *SCHEDULE_FREE_RULES.values())
            for present in ((True,) * len(r.state), (False,) * len(r.state))]


VARIANTS = reached_variants() + driven_variants()
VARIANT_IDS = [cuda_kernels._variant_name(k, p) for k, p in VARIANTS]
CCS = [(8, 0), (9, 0)]


def ptxas_path() -> str:
    from cuda import pathfinder

    path = pathfinder.find_nvidia_binary_utility("ptxas")
    assert path, "ptxas not found: install the test extra (nvidia-cuda-nvcc)"
    return path


def assemble(ptx: str, cc, tmp_path) -> str:
    src = tmp_path / f"k{cc[0]}{cc[1]}.ptx"
    src.write_text(ptx)
    proc = subprocess.run([ptxas_path(), f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(src), "-o", str(src) + ".cubin"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(str(src) + ".cubin") > 0
    return proc.stderr  # the -v report


def instructions(ptx: str) -> list[str]:
    return [line.split()[0] for line in ptx.splitlines()
            if line.startswith("\t") and line.split() and line.split()[0][0].isalpha()]


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("kernel,present", VARIANTS, ids=VARIANT_IDS)
def test_ptx_compiles_and_assembles(kernel, present, dname, tmp_path):
    from numba import cuda

    fn = cuda_kernels.make_kernel(kernel, present)
    sig = cuda_kernels.signature(kernel, DTYPES[dname], present)
    bits = "f32" if dname == "f32" else "f64"
    for cc in CCS:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        ops = instructions(ptx)
        if dname == "f32":
            # The promotion pitfall: a float64 constant or scalar would show up as .f64 arithmetic.
            assert not [op for op in ops if ".f64" in op], f"float64 arithmetic in a float32 kernel: {set(ops)}"
        # IEEE-rounded division and sqrt, denormals kept: the reference's semantics.
        assert not [op for op in ops if ".ftz" in op or ".approx" in op or ".full" in op], set(ops)
        assert f"ld.global.{bits}" in ops and f"st.global.{bits}" in ops
        if "math.sqrt" in inspect.getsource(getattr(elements, kernel)):
            assert f"sqrt.rn.{bits}" in ops
        report = assemble(ptx, cc, tmp_path)
        assert "0 bytes spill stores" in report, report
        regs = int(re.search(r"Used (\d+) registers", report).group(1))
        # 8 blocks of 256 threads fit an SM (65536 registers) at <= 32 registers,
        # 6 at <= 40; beyond ~64 the bandwidth-bound loop would lose occupancy.
        assert regs <= 64, report


FLUSH_VARIANTS = sorted({(k, p) for k, p in VARIANTS if all(p)})


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("kernel,present", FLUSH_VARIANTS, ids=[k for k, _ in FLUSH_VARIANTS])
def test_ptx_flush_variant_compiles_and_assembles(kernel, present, dname, tmp_path):
    """The flush-denormal store (fastopt.set_flush_denormal) compiles to PTX with no
    float64 in a float32 kernel and no flush-to-zero arithmetic (the flush is a select)."""
    from numba import cuda

    fn = cuda_kernels.make_kernel(kernel, present, flush=True)
    sig = cuda_kernels.signature(kernel, DTYPES[dname], present)
    for cc in CCS:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
        ops = instructions(ptx)
        if dname == "f32":
            assert not [op for op in ops if ".f64" in op], set(ops)
        assert not [op for op in ops if ".ftz" in op or ".approx" in op], set(ops)
        assemble(ptx, cc, tmp_path)


@pytest.mark.parametrize("dname", DTYPES)
def test_ptx_nonfinite_kernel(dname, tmp_path):
    from numba import cuda

    sig = cuda_kernels.NONFINITE_SIGNATURES[np.dtype(DTYPES[dname])]
    for cc in CCS:
        ptx, _ = cuda.compile_ptx(cuda_kernels.nonfinite_kernel, sig, cc=cc)
        if dname == "f32":
            assert not [op for op in instructions(ptx) if ".f64" in op]
        assemble(ptx, cc, tmp_path)


def test_absent_state_is_not_an_argument():
    for kernel, present in VARIANTS:
        params = list(inspect.signature(cuda_kernels.make_kernel(kernel, present)).parameters)
        state = [n for n, here in zip(cuda_kernels.STATE[kernel], present) if here]
        assert params == ["param", "grad", *state, "s", "tiny"]
        assert len(cuda_kernels.signature(kernel, np.float32, present)) == len(params)


# ---------------------------------------------------------------------------
# Host-side logic that needs no device
# ---------------------------------------------------------------------------

def test_launch_config(monkeypatch):
    from fastopt.backends import cuda as backend

    monkeypatch.setattr(backend, "THREADS_PER_BLOCK", 256)
    monkeypatch.setattr(backend, "MAX_BLOCKS", None)
    wave = 132 * 8  # H100: 132 SMs x 8 resident blocks of 256 threads
    assert backend.launch_config(1, wave) == (1, 256)
    assert backend.launch_config(256 * 10 + 1, wave) == (11, 256)
    assert backend.launch_config(1 << 26, wave) == (wave, 256)  # one wave, grid-stride beyond
    monkeypatch.setattr(backend, "MAX_BLOCKS", 264)
    assert backend.launch_config(1 << 26, wave) == (264, 256)


def test_stream_plan():
    from fastopt.backends.cuda import plan_streams

    assert plan_streams(None, [None, None]) == (None, [])  # default stream, nothing to wait for
    assert plan_streams(None, [7, None, 7]) == (7, [])  # run where the data was produced
    assert plan_streams(None, [7, 9]) == (7, [9])  # and wait for the other producer
    assert plan_streams(5, [None]) == (5, [])
    assert plan_streams(5, [5, 9, 9]) == (5, [9])


def test_stream_argument_forms():
    from fastopt.backends.cuda import as_stream

    class TorchLike:
        cuda_stream = 0

    class ProtocolLike:
        def __cuda_stream__(self):
            return (0, 0)

    for s in (0, TorchLike(), ProtocolLike()):
        assert as_stream(s) == (0, 0)  # the default stream, with no driver call
    for bad in ("s", 1.5, True):
        with pytest.raises(TypeError, match="stream must be"):
            as_stream(bad)


def test_unavailable_without_gpu_is_reported_not_raised():
    from numba import cuda

    if cuda.is_available():
        pytest.skip("a GPU is present")
    from fastopt.backends import cuda as backend

    assert "CUDA" in backend.unavailable_reason()
    info = fastopt.backends()["cuda"]
    assert not info.available and info.device == "cuda" and info.reason


# ---------------------------------------------------------------------------
# 3. On a GPU
# ---------------------------------------------------------------------------

TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-13, atol=1e-14)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=list(DTYPES))
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_gpu_matches_reference(rule, options, dtype):
    from numba import cuda

    if not cuda.is_available():
        pytest.skip("no CUDA GPU")
    for n in (1, 1031, (1 << 20) + 7):
        p0, grads = inputs(n, 5, dtype, seed=n)
        p = cuda.to_device(p0)
        state = {k: cuda.to_device(np.zeros_like(p0)) for k in needed_state(rule, options)}
        extra: dict = {}
        for t, g in enumerate(grads, start=1):
            fastopt_step(rule, options, p, cuda.to_device(g), state, t, extra)
        p_ref, state_ref = run_fastopt(rule, options, p0, grads, backend="numpy")
        np.testing.assert_allclose(p.copy_to_host(), p_ref, **TOL[dtype], equal_nan=True)
        for k in state:
            np.testing.assert_allclose(state[k].copy_to_host(), state_ref[k], **TOL[dtype], equal_nan=True)
