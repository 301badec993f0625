"""``grad_multiplier``: the gradient multiplied as the kernel reads it, with no pass of its own.

Every rule reads ``g = grad*grad_sign`` first, and ``grad_sign`` is +-1, so
folding a factor ``m`` into it makes the kernel read ``±(grad*m)``, the same
bits as a separate pass that wrote ``grad*m`` (rounded once, in the arrays'
dtype) and the plain update after it. So the check is bitwise, for every rule
with every option on, on every host backend, flat and in lists, and the
gradient must come out unchanged. (The CUDA kernels read the same scalars.)
"""
import numpy as np
import pytest

import fastopt
from oracle import FULL, fastopt_step, initial_state, inputs, gpt_shapes, list_inputs

BACKENDS = ["numpy", "numba", "c"]
CASES = list(FULL.items())
MULTIPLIERS = [2.0 ** -10, 0.37, 3.0]


def run(rule, options, p0, grads, backend, multiplier=None):
    p = p0.copy()
    state = initial_state(rule, options, p)
    extra: dict = {}
    for t, g in enumerate(grads, start=1):
        opts = dict(options) if multiplier is None else dict(options, grad_multiplier=multiplier)
        fastopt_step(rule, opts, p, g, state, t, extra, backend)
    return p, state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_folded_multiplier_is_bitwise_a_separate_pass(backend, rule, options, dtype):
    p0, grads = inputs(257, 4, dtype, seed=7)
    for m in MULTIPLIERS:
        kept = [g.copy() for g in grads]
        p_folded, s_folded = run(rule, options, p0, grads, backend, multiplier=m)
        assert all(np.array_equal(g, k) for g, k in zip(grads, kept)), "the gradient was written"
        p_pass, s_pass = run(rule, options, p0, [g * dtype(m) for g in grads], backend)
        assert p_folded.tobytes() == p_pass.tobytes(), f"param differs at grad_multiplier={m}"
        for name in s_folded:
            assert s_folded[name].tobytes() == s_pass[name].tobytes(), f"{name} differs at grad_multiplier={m}"
    # (Lion and Rprop move the parameter by signs alone, but their state sees the factor)
    plain, s_plain = run(rule, options, p0, grads, backend)
    assert not (np.array_equal(plain, p_folded) and all(np.array_equal(s_plain[k], s_folded[k]) for k in s_plain)), \
        "the multiplier had no effect: the test would prove nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_calls_take_the_multiplier(backend):
    p0, grads = list_inputs(gpt_shapes(), 1, np.float32, seed=3)
    states = [[np.zeros_like(p) for p in p0] for _ in range(2)]
    folded = [p.copy() for p in p0]
    fastopt.adamw_(folded, grads[0], *[[s.copy() for s in st] for st in states], step=1, lr=0.1,
                   grad_multiplier=0.25, backend=backend)
    separate = [p.copy() for p in p0]
    fastopt.adamw_(separate, [g * np.float32(0.25) for g in grads[0]], *states, step=1, lr=0.1, backend=backend)
    for a, b in zip(folded, separate):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bad,error,message", [
    (float("inf"), ValueError, "grad_multiplier must be finite, got inf"),
    (float("nan"), ValueError, "grad_multiplier must be finite, got nan"),
    ("0.5", TypeError, "grad_multiplier must be a real number"),
    (np.ones(2), TypeError, "grad_multiplier must be a real number"),
])
def test_a_bad_multiplier_is_refused_before_anything_is_written(bad, error, message):
    p, g, m, v = (np.ones(8, np.float32) for _ in range(4))
    with pytest.raises(error, match=message):
        fastopt.adamw_(p, g, m, v, step=1, grad_multiplier=bad)
    assert (p == 1).all() and (m == 1).all() and (v == 1).all()


# ---- found_inf: GradScaler's "skip this step" flag ----------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_found_inf_leaves_every_buffer_untouched(backend, rule, options):
    """A nonzero flag (as GradScaler hands it: a one-element float tensor) skips the
    update; zero runs it exactly as without the flag."""
    torch = pytest.importorskip("torch")
    p0, grads = inputs(257, 3, np.float32, seed=11)
    p = p0.copy()
    state = initial_state(rule, options, p)
    extra: dict = {}
    fastopt_step(rule, options, p, grads[0], state, 1, extra, backend)  # (nonzero state to keep)
    before = (p.copy(), {k: v.copy() for k, v in state.items()}, dict(extra))
    for flag in (torch.tensor([1.0]), np.array(float("nan")), 1, True):
        fastopt_step(rule, dict(options, found_inf=flag), p, grads[1], state, 2, extra, backend)
        assert p.tobytes() == before[0].tobytes(), f"param written with found_inf={flag!r}"
        for name in state:
            assert state[name].tobytes() == before[1][name].tobytes(), f"{name} written with found_inf={flag!r}"
        assert extra == before[2], "the carried value moved"
    ran, ran_state = p.copy(), {k: v.copy() for k, v in state.items()}
    ran_extra = dict(extra)
    fastopt_step(rule, dict(options, found_inf=torch.tensor([0.0])), p, grads[1], state, 2, extra, backend)
    fastopt_step(rule, options, ran, grads[1], ran_state, 2, ran_extra, backend)
    assert p.tobytes() == ran.tobytes() and not np.array_equal(p, before[0])
    for name in state:
        assert state[name].tobytes() == ran_state[name].tobytes()


def test_found_inf_skips_list_calls_and_still_validates():
    p, g, m, v = ([np.ones(5, np.float32), np.ones(3, np.float32)] for _ in range(4))
    fastopt.adamw_(p, g, m, v, step=1, found_inf=np.ones(1))
    assert all((a == 1).all() for a in p + m + v)
    with pytest.raises(ValueError, match="lr must be"):  # a bad hyperparameter still raises
        fastopt.adamw_(p[0], g[0], m[0], v[0], step=1, lr=-1.0, found_inf=1.0)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):  # and so does a bad buffer
        fastopt.adamw_(p[0], g[0], m[0], np.ones(4, np.float32), step=1, found_inf=1.0)


@pytest.mark.parametrize("bad", ["1", np.ones(2), [1.0], object()])
def test_a_bad_found_inf_is_refused_before_anything_is_written(bad):
    p, g, m, v = (np.ones(8, np.float32) for _ in range(4))
    with pytest.raises(TypeError, match="found_inf must be None, a number or a one-element array"):
        fastopt.adamw_(p, g, m, v, step=1, found_inf=bad)
    assert (p == 1).all() and (m == 1).all() and (v == 1).all()
