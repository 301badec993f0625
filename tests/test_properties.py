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
from fastopt.checks import closed_unit, flag, nonneg, real, unit, warmup_steps
from oracle import fastopt_step, needed_state

CI_EXAMPLES = 150
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=20 * CI_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

COMPILED = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"
            and name != "numpy"]

#: A strategy of valid values per hyperparameter check (fastopt.checks).
_VALUES = {
    nonneg: st.one_of(st.sampled_from([0.0, 1e-12, 1e-8, 1e-6, 1e-3]), st.floats(0.0, 1.0)),
    unit: st.floats(0.0, 0.999),
    closed_unit: st.floats(0.0, 1.0),
    real: st.floats(-0.5, 0.5),
    flag: st.booleans(),
    warmup_steps: st.one_of(st.none(), st.integers(1, 6)),  # (steps 1-4 are run: on, crossing T, or past it)
}


def _strategy(h):
    arity = getattr(h.check, "arity", 1)
    if arity > 1:  # a pair or triple (betas): each value from its element check's strategy
        return st.tuples(*[_VALUES[h.check.element]] * arity)
    return _VALUES[h.check]


def _make_valid(rule, options):
    """Repair drawn options until the rule's relation holds: turn flags off one by
    one (SGD: nesterov needs momentum, no dampening), then order the pairs
    (Rprop: step_size_min <= step_size_max), then put hyperparameters back to
    their defaults one by one (Rprop's etas must straddle 1)."""
    def valid(o):
        try:
            rule.checked({**rule.defaults, **o, **dict([rule.carry] if rule.carry else [])})
            return True
        except ValueError:
            return False
    candidates = [options]
    for name in (h.name for h in rule.hyper if h.check is flag):
        candidates.append({**candidates[-1], name: False})
    pairs = [h.name for h in rule.hyper if getattr(h.check, "arity", 1) == 2 and h.name in options]
    candidates.append({**candidates[-1], **{k: tuple(sorted(options[k])) for k in pairs}})
    for h in rule.hyper:
        if h.check is not flag and h.name in options and not h.required:
            candidates.append({**candidates[-1], h.name: h.default})
    for o in candidates:
        if valid(o):
            return o
    raise AssertionError(f"no valid options for {rule.name} from {options}")


#: For each rule, a strategy of valid hyperparameters and options (everything but step), from the table.
SPACE = {name: st.fixed_dictionaries({h.name: _strategy(h) for h in rule.hyper if h.name != rule.carry_name})
         .map(lambda o, rule=rule: _make_valid(rule, o))
         for name, rule in RULES.items()}

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
    need = needed_state(rule, options)
    # State starts from plausible values (squares are non-negative), salted too.
    signed = {s.name: s.signed for s in RULES[rule].buffers}
    state0 = {name: salted(rng, n, dtype, special_rate, positive=not signed[name]) for name in need}
    grads = [salted(rng, n, dtype, special_rate) for _ in range(steps)]
    results = {}
    for backend in ["numpy", *COMPILED]:
        p = p0.copy()
        state = {k: v.copy() for k, v in state0.items()}
        extra: dict = {}
        with np.errstate(all="ignore"):
            for t, g in enumerate(grads, start=1):
                fastopt_step(rule, options, p, g, state, t, extra, backend=backend)
        results[backend] = (p, state, extra)
    p_ref, s_ref, mu_ref = results.pop("numpy")
    for backend, (p, state, mu) in results.items():
        close(p, p_ref, dtype, f"param on {backend}")
        for name in need:
            close(state[name], s_ref[name], dtype, f"{name} on {backend}")
        assert mu == mu_ref, backend
