"""The NumPy reference against torch.optim: every rule, every option, 60 steps.

Tolerances. Both sides compute in the buffer dtype with the same formulas up to
operation order (and torch's CPU kernels may fuse multiply-adds), so each step
can differ by a few units in the last place (ulp) of each value, and the
difference random-walks over the steps. With |p| ~ 1 and 60 steps that is at
most ~60 ulp: 60 * 6e-8 = 4e-6 in float32, so rtol=atol=2e-5 leaves a 5x margin
and would still catch a wrong coefficient (an error of lr*1e-3 or more). In
float64 the same count of ulp is ~1e-14, checked at 1e-11.
"""
import numpy as np
import pytest

from oracle import MATRIX, MATRIX_IDS, inputs, run_fastopt, run_torch

pytest.importorskip("torch")

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
STEPS = 60


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_reference_matches_torch(rule, options, dtype):
    p0, grads = inputs(257, STEPS, dtype, seed=hash((rule, str(options))) % 2**32)
    p, state = run_fastopt(rule, options, p0, grads, backend="numpy")
    p_ref, state_ref = run_torch(rule, options, p0, grads)
    assert p.dtype == dtype
    # The run must have moved the parameters, or the comparison proves nothing.
    assert np.max(np.abs(p - p0)) > 1e-4
    np.testing.assert_allclose(p, p_ref, **TOL[dtype], err_msg=f"param of {rule} {options}")
    assert state.keys() == state_ref.keys()
    for name in state:
        np.testing.assert_allclose(state[name], state_ref[name], **TOL[dtype], err_msg=f"{name} of {rule} {options}")


def _from_end_cases():
    """(rule, options, state buffer) for every running average that follows torch's lerp:
    options that put its weight at >= 0.5 (a decay of 0.3), found from the table."""
    from fastopt.checks import closed_unit
    from fastopt.rules import RULES
    from oracle import FULL, hyper  # noqa: F811

    out = []
    for name, rule in RULES.items():
        for h in rule.hyper:
            if getattr(h.check, "arity", 1) == 2:
                value = (0.3, h.default[1])
            elif h.check is closed_unit and h.name != rule.carry_name:
                value = 0.3
            else:
                continue
            options = {**{k: v for k, v in FULL[name].items() if k in ("lr", "centered")}, h.name: value}
            scalars, _ = rule.prepare(hyper(name, options), 1)
            for field, on in scalars._asdict().items():
                if field.endswith("_from_end") and on and field[:-len("_from_end")] in rule.state:
                    out.append((name, options, field[:-len("_from_end")]))
    return out


FROM_END = _from_end_cases()


@pytest.mark.parametrize("backend", ["numpy", "numba", "c"])
@pytest.mark.parametrize("rule,options,buffer", FROM_END, ids=[f"{r}-{b}" for r, _, b in FROM_END])
def test_running_averages_keep_torchs_infinities(rule, options, buffer, backend):
    """torch's lerp(a, b, w) is b - (b - a)*(1 - w) for w >= 0.5: when b - a
    overflows (huge gradients of opposite signs), that is -inf where
    a + w*(b - a) gives +inf (or NaN where the other gives an infinity)."""
    import torch

    if getattr(torch.optim, RULES_TITLE[rule], None) is None:
        pytest.skip(f"torch.optim has no {RULES_TITLE[rule]}")
    p0, grads = inputs(64, 2, np.float32, seed=3)
    grads[0][::5], grads[1][::5] = 3e38, -3e38  # g - a overflows at the second step
    grads[0][2::5], grads[1][2::5] = -3e38, 3e38
    with np.errstate(all="ignore"):
        _, state = run_fastopt(rule, options, p0, grads, backend=backend)
        _, state_ref = run_torch(rule, options, p0, grads)
    ours, theirs = state[buffer], state_ref[buffer]
    assert np.isinf(theirs).any(), "the case does not reach an infinite average"
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=f"{buffer}: NaN where torch has none")
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(theirs))
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))


RULES_TITLE = {name: rule.title for name, rule in __import__("fastopt.rules", fromlist=["RULES"]).RULES.items()}
