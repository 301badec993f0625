"""Runs the CUDA backend under Numba's CUDA simulator; started by test_cuda_backend.py.

NUMBA_ENABLE_CUDASIM must be set before ``numba.cuda`` is first imported, so
this runs in a child process: ``NUMBA_ENABLE_CUDASIM=1 python cuda_sim_worker.py OUT``.
It writes ``OUT.npz`` (param and state after a few steps, per matrix case and
dtype) and ``OUT.json`` (the outcome of the other checks); the parent compares.

The simulator runs the generated kernels as Python, one thread per CUDA
thread: the indexing, the grid-stride loop, the presence variants and the
argument plumbing are the GPU's, the arithmetic is NumPy's. ``math.sqrt`` is
swapped for ``np.sqrt`` (as in test_elements.py) so float32 stays float32 and
the results must equal the NumPy reference bit for bit. Blocks of 8 threads
and a grid of 2 blocks make every thread loop over several elements.
"""
import json
import os
import sys
import time
import types
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from oracle import (FULL, MATRIX, SCHEDULE_FREE_RUNS, fastopt_step, gpt_shapes, initial_state, inputs,  # noqa: E402
                    list_inputs, needed_state, run_flush_case, run_lists, run_schedulefree)

N, STEPS = 37, 3
DTYPES = {"f32": np.float32, "f64": np.float64}
#: Other interface objects are tried on these cases, with 2-D (5, 7) buffers.
CAI_CASES = {"adamw_amsgrad": ("adamw", dict(amsgrad=True)),
             "rmsprop_centered": ("rmsprop", dict(centered=True, momentum=0.5))}


def case_inputs(case: int, dtype):
    """Inputs of matrix case ``case``: non-finite gradient values must propagate exactly as in the reference."""
    p0, grads = inputs(N, STEPS, dtype, seed=case)
    grads[1][:5] = [np.nan, np.inf, -np.inf, -0.0, 1e-40]
    return p0, grads


def cai_inputs():
    p0, grads = inputs(35, 2, np.float32, seed=1)
    return p0.reshape(5, 7), [g.reshape(5, 7) for g in grads]


def run_on_device(rule, options, p0, grads, wrap=lambda a: a):
    """Like oracle.run_fastopt, on simulated device arrays; returns host copies."""
    p = cuda.to_device(p0)
    state = {n: cuda.to_device(a) for n, a in initial_state(rule, options, p0).items()}
    extra = {}
    for t, g in enumerate(grads, start=1):
        fastopt_step(rule, options, wrap(p), wrap(cuda.to_device(g)),
                     {k: wrap(v) for k, v in state.items()}, t, extra)
    return p.copy_to_host(), {k: v.copy_to_host() for k, v in state.items()}


def list_case_inputs():
    """The small GPT's 75 tensors (tiny dims: the simulator runs threads in Python), 2 steps."""
    return list_inputs(gpt_shapes(vocab=4, d=2, layers=6), 2, np.float32, seed=5)


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # reported to the parent, which asserts on type and text
        return [type(exc).__name__, str(exc)]
    return None


class FakeTensor:
    """A non-Numba __cuda_array_interface__ object, like a torch CUDA tensor:
    with requires_grad it refuses to export the interface; detach() does."""

    def __init__(self, dev, requires_grad=False, readonly=False, stream=None):
        self.dev, self.requires_grad, self.readonly, self.stream = dev, requires_grad, readonly, stream

    def detach(self):
        return FakeTensor(self.dev, False, self.readonly, self.stream)

    @property
    def __cuda_array_interface__(self):
        if self.requires_grad:
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")
        a = self.dev._ary
        return {"shape": a.shape, "typestr": a.dtype.str, "strides": None, "version": 3,
                "data": (a.__array_interface__["data"][0], self.readonly), "stream": self.stream}


def main(out):
    assert os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", "run with NUMBA_ENABLE_CUDASIM=1"
    global cuda, fastopt, backend
    from numba import cuda

    import fastopt
    from fastopt.backends import cuda as backend
    from fastopt.kernels import elements

    elements.math = types.SimpleNamespace(sqrt=np.sqrt, copysign=np.copysign)
    # NaN/Inf arithmetic in the simulated threads (np.seterr is per thread), silent as on a GPU.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    backend.THREADS_PER_BLOCK = 8
    backend.MAX_BLOCKS = 2

    report = {}
    results = {}
    launches = []
    real_launch = backend._launch
    backend._launch = lambda *a: (launches.append(a[1]), real_launch(*a))

    t0 = time.perf_counter()
    for i, (rule, options) in enumerate(MATRIX):
        for dname, dtype in DTYPES.items():
            p0, grads = case_inputs(i, dtype)
            p, state = run_on_device(rule, options, p0, grads)
            results[f"{i}-{dname}-param"] = p
            for k, v in state.items():
                results[f"{i}-{dname}-{k}"] = v
    report["matrix_seconds"] = time.perf_counter() - t0
    report["matrix_launches"] = len(launches)

    # Lists of tensors: one list call per step over the small GPT's 75 tensors.
    p0, grads = list_case_inputs()
    for rule, options in FULL.items():
        params, state = run_lists(rule, options, p0, grads, to_device=cuda.to_device, to_host=lambda a: a.copy_to_host())
        for i, p in enumerate(params):
            results[f"list-{rule}-param-{i}"] = p
        for k, v in state.items():
            for i, a in enumerate(v):
                results[f"list-{rule}-{k}-{i}"] = a

    # Flushing subnormal results (fastopt.set_flush_denormal): every rule, subnormal state.
    fastopt.set_flush_denormal(True)
    try:
        for rule, options in FULL.items():
            p, state = run_flush_case(rule, options, to_device=cuda.to_device, to_host=lambda a: a.copy_to_host())
            results[f"flush-{rule}-param"] = p
            for k, v in state.items():
                results[f"flush-{rule}-{k}"] = v
    finally:
        fastopt.set_flush_denormal(False)

    # Zero-copy views of other interface objects, requires_grad included, on any shape.
    shaped = cai_inputs()
    for label, wrap in [("fake_tensor", FakeTensor),
                        ("requires_grad", lambda d: FakeTensor(d, requires_grad=True)),
                        ("named_stream", lambda d: FakeTensor(d, stream=1))]:
        for case, (rule, options) in CAI_CASES.items():
            p, state = run_on_device(rule, options, *shaped, wrap=wrap)
            results[f"{label}-{case}-param"] = p
            for k, v in state.items():
                results[f"{label}-{case}-{k}"] = v
    t = FakeTensor(cuda.to_device(shaped[0]))
    report["view_cached"] = backend.flat_view(t)[0] is backend.flat_view(t)[0]

    d = {k: cuda.to_device(np.ones(16, np.float32)) for k in ("p", "g", "m", "v")}
    report["host_device_mix"] = error_of(lambda: fastopt.adam_(d["p"], d["g"], np.zeros(16, np.float32), d["v"],
                                                                step=1))
    report["device_on_numpy_backend"] = error_of(lambda: fastopt.adam_(*d.values(), step=1, backend="numpy"))
    report["readonly_param"] = error_of(lambda: fastopt.adam_(FakeTensor(d["p"], readonly=True), *list(d.values())[1:],
                                                              step=1))
    report["readonly_grad_ok"] = error_of(lambda: fastopt.adam_(d["p"], FakeTensor(d["g"], readonly=True), d["m"],
                                                                d["v"], step=1))
    report["bad_stream"] = error_of(lambda: fastopt.adam_(*d.values(), step=1, stream="s1"))
    report["explicit_stream"] = error_of(lambda: fastopt.adam_(*d.values(), step=1, stream=cuda.stream()))

    before = len(launches)
    empty = [cuda.to_device(np.zeros(0, np.float32)) for _ in range(4)]
    report["empty_error"] = error_of(lambda: fastopt.adamw_(*empty, step=1))
    report["empty_launches"] = len(launches) - before

    report["all_finite"] = {}
    for dname, dtype in DTYPES.items():
        a = np.linspace(-1, 1, 29).astype(dtype)
        got = [backend.all_finite(cuda.to_device(a)), backend.all_finite(cuda.to_device(a[:0]))]
        for bad, where in [(np.nan, 0), (np.inf, 28), (-np.inf, 13)]:
            b = a.copy()
            b[where] = bad
            got.append(backend.all_finite(cuda.to_device(b)))
        report["all_finite"][dname] = got

    report["variants"] = sorted(f"{k[0]}-{k[1]}-{''.join('1' if x else '0' for x in k[2])}"
                                for k in backend._compiled if len(k) == 3)
    # The schedule-free rules' driver on device arrays (after the variants report: its
    # kernels are not the matrix's).
    p0, grads = inputs(N, STEPS + 1, np.float32, seed=11)
    for kind in SCHEDULE_FREE_RUNS:
        for k, v in run_schedulefree(kind, p0, grads, cuda.to_device, lambda a: a.copy_to_host()).items():
            results[f"schedulefree-{kind}-{k}"] = v
    np.savez(out + ".npz", **results)
    with open(out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
