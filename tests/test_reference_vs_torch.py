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
