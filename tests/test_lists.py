"""Updates over lists of tensors: one call over many arrays equals one call per array.

A list call (``fastopt.adamw_([p1, p2, ...], [g1, g2, ...], ...)``) runs the same
element math as a flat call, only over a table of tensors, so on every backend
it must equal calling the same update tensor by tensor, bit for bit, and equal
the NumPy reference: checked on the 75 parameter tensors of a small GPT (many
shapes, 1-D and 2-D, sizes from 8 to 128), every rule with every state buffer
in use, float32 and float64, over several steps, and across thread counts.
"""
import numpy as np
import pytest

import fastopt
from oracle import FULL, gpt_shapes, list_inputs, run_lists

BACKENDS = ["numpy", "numba", "c"]
CASES = list(FULL.items())


@pytest.fixture(params=BACKENDS)
def backend(request):
    info = fastopt.backends()[request.param]
    assert info.available, f"backend {request.param} did not load: {info.reason}"
    return request.param


def assert_lists_equal(a, b, what):
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what}[{i}]"
        assert x.tobytes() == y.tobytes(), f"{what}[{i}] differs"


def test_the_model_has_75_tensors():
    assert len(gpt_shapes()) == 75


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_list_call_equals_per_tensor_calls(backend, rule, options, dtype):
    p0, grads = list_inputs(gpt_shapes(), 3, dtype, seed=4)
    p_list, s_list = run_lists(rule, options, p0, grads, backend=backend)
    p_each, s_each = run_lists(rule, options, p0, grads, backend=backend, per_tensor=True)
    p_ref, s_ref = run_lists(rule, options, p0, grads, backend="numpy", per_tensor=True)
    assert any(not np.array_equal(a, b) for a, b in zip(p_list, p0)), "the update did not move the parameters"
    assert_lists_equal(p_list, p_each, "param")
    assert_lists_equal(p_list, p_ref, "param vs reference")
    for name in s_list:
        assert_lists_equal(s_list[name], s_each[name], name)
        assert_lists_equal(s_list[name], s_ref[name], f"{name} vs reference")


@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_list_call_is_independent_of_the_thread_count(backend, rule, options):
    shapes = [(1000,), (3, 700), (1,), (0,), (50_000,), (257, 129)]  # big enough for several threads
    p0, grads = list_inputs(shapes, 2, np.float32, seed=9)
    before = fastopt.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            fastopt.set_num_threads(threads)
            runs.append(run_lists(rule, options, p0, grads, backend=backend))
    finally:
        fastopt.set_num_threads(before)
    (p1, s1), (p2, s2) = runs
    assert_lists_equal(p1, p2, "param")
    for name in s1:
        assert_lists_equal(s1[name], s2[name], name)


def test_one_tensor_list_equals_flat_call(backend):
    p0, grads = list_inputs([(4099,)], 3, np.float32, seed=1)
    p_list, s_list = run_lists("adamw", FULL["adamw"], p0, grads, backend=backend)
    p = p0[0].copy()
    m, v, vmax = (np.zeros_like(p) for _ in range(3))
    for t, g in enumerate(grads, start=1):
        fastopt.adamw_(p, g[0], m, v, vmax, step=t, backend=backend, **FULL["adamw"])
    assert p_list[0].tobytes() == p.tobytes()
    assert s_list["max_exp_avg_sq"][0].tobytes() == vmax.tobytes()
