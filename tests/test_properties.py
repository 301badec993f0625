"""Differential property tests: every compiled backend against the NumPy reference.

Hypothesis draws a rule, valid hyperparameters and options, a size (0 .. 10^5,
odd tails included), a dtype, and gradients/state salted with special values
(0, -0, subnormals, huge, +-inf, NaN), then runs several consecutive steps on
every available CPU backend and on the reference.

Agreement: bitwise, NaN payloads aside (see ``close``).

Budget: the ``ci`` profile (default) runs ``CI_EXAMPLES`` examples per test;
``HYPOTHESIS_PROFILE=long`` runs 20x more for a local soak.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastopt
from fastopt.rules import RULES
from oracle import fastopt_step, hyper

CI_EXAMPLES = 150
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=20 * CI_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

COMPILED = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"
            and name != "numpy"]

unit = st.floats(0.0, 0.999)
rate = st.floats(0.0, 1.0)
small = st.floats(0.0, 0.5)
tiny = st.sampled_from([0.0, 1e-12, 1e-8, 1e-6, 1e-3])

#: For each rule, a strategy of valid hyperparameters and options (everything but step).
SPACE = {
    "sgd": st.fixed_dictionaries(dict(lr=rate, momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
                                      dampening=small, weight_decay=small, maximize=st.booleans(),
                                      nesterov=st.booleans())).map(
        lambda h: dict(h, dampening=0.0) if h["nesterov"] else h).map(
        lambda h: dict(h, momentum=0.9) if h["nesterov"] and h["momentum"] == 0 else h),
    "adagrad": st.fixed_dictionaries(dict(lr=rate, lr_decay=small, weight_decay=small, eps=tiny,
                                          maximize=st.booleans())),
    "rmsprop": st.fixed_dictionaries(dict(lr=rate, alpha=unit, eps=tiny, weight_decay=small,
                                          momentum=st.sampled_from([0.0, 0.5, 0.9]), centered=st.booleans(),
                                          maximize=st.booleans())),
    "adadelta": st.fixed_dictionaries(dict(lr=rate, rho=unit, eps=tiny, weight_decay=small,
                                           maximize=st.booleans())),
    "adam": st.fixed_dictionaries(dict(lr=rate, betas=st.tuples(unit, unit), eps=tiny, weight_decay=small,
                                       amsgrad=st.booleans(), maximize=st.booleans())),
    "adamw": st.fixed_dictionaries(dict(lr=rate, betas=st.tuples(unit, unit), eps=tiny, weight_decay=small,
                                        amsgrad=st.booleans(), maximize=st.booleans())),
    "adamax": st.fixed_dictionaries(dict(lr=rate, betas=st.tuples(unit, unit), eps=tiny, weight_decay=small,
                                         maximize=st.booleans())),
    "nadam": st.fixed_dictionaries(dict(lr=rate, betas=st.tuples(unit, unit), eps=tiny, weight_decay=small,
                                        momentum_decay=st.sampled_from([0.0, 4e-3, 0.1]),
                                        decoupled_weight_decay=st.booleans(), maximize=st.booleans())),
    "lion": st.fixed_dictionaries(dict(lr=rate, betas=st.tuples(unit, unit), weight_decay=small,
                                       maximize=st.booleans())),
}

SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, -1e-40, 1e-310, 3e38, -3e38, 1e300]

sizes = st.one_of(st.integers(0, 40), st.integers(41, 5000), st.integers(5001, 100_000))


@st.composite
def problems(draw):
    rule = draw(st.sampled_from(sorted(RULES)))
    options = draw(SPACE[rule])
    n = draw(sizes)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    steps = draw(st.integers(1, 4))
    special_rate = draw(st.sampled_from([0.0, 0.001, 0.05, 0.5]))
    seed = draw(st.integers(0, 2**32 - 1))
    return rule, options, n, dtype, steps, special_rate, seed


def salted(rng, n, dtype, rate, scale=1.0, positive=False):
    """Normal values with a fraction ``rate`` replaced by special values."""
    with np.errstate(all="ignore"):
        x = (rng.standard_normal(n) * scale).astype(dtype)
        if positive:
            x = np.abs(x)
        k = rng.random(n) < rate
        x[k] = rng.choice(np.array(SPECIAL), size=int(k.sum())).astype(dtype)
        if positive:
            x[k] = np.abs(x[k])
    return x


def close(a, b, dtype, what):
    """Agreement of two results: bitwise, except that NaNs compare by position only.

    The compiled CPU backends evaluate the reference's operations in the same
    order and dtype, without FMA contraction, with IEEE sqrt and division, so
    nothing looser is needed (a backend that contracts would need a
    round-off tolerance here, scaled by the magnitudes involved).
    """
    assert a.dtype == b.dtype == dtype, what
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN positions differ"
    keep = ~np.isnan(b)
    np.testing.assert_array_equal(a[keep].view(np.uint8), b[keep].view(np.uint8), err_msg=what)


@pytest.mark.skipif(not COMPILED, reason="no compiled CPU backend available")
@given(problems())
def test_backends_agree_with_reference(problem):
    rule, options, n, dtype, steps, special_rate, seed = problem
    rng = np.random.default_rng(seed)
    p0 = salted(rng, n, dtype, special_rate)
    need = RULES[rule].needs(hyper(rule, options))
    # State starts from plausible values (squares are non-negative), salted too.
    state0 = {name: salted(rng, n, dtype, special_rate, positive=name not in ("exp_avg", "momentum_buffer",
                                                                            "grad_avg"))
              for name in need}
    grads = [salted(rng, n, dtype, special_rate) for _ in range(steps)]
    results = {}
    for backend in ["numpy", *COMPILED]:
        p = p0.copy()
        state = {k: v.copy() for k, v in state0.items()}
        extra: dict = {}
        with np.errstate(all="ignore"):
            for t, g in enumerate(grads, start=1):
                fastopt_step(rule, options, p, g, state, t, extra, backend=backend)
        results[backend] = (p, state, extra.get("mu_product"))
    p_ref, s_ref, mu_ref = results.pop("numpy")
    for backend, (p, state, mu) in results.items():
        close(p, p_ref, dtype, f"param on {backend}")
        for name in need:
            close(state[name], s_ref[name], dtype, f"{name} on {backend}")
        assert mu == mu_ref, backend
