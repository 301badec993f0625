"""The shared element functions, run as plain Python on NumPy scalars, equal the
NumPy reference bit for bit (same operation order, same dtype, no FMA), for
every rule and option over several steps. This pins the math the Numba CPU and
CUDA backends compile before any compiler is involved."""
import types

import numpy as np
import pytest

from fastopt.backends import reference
from fastopt.kernels import elements
from fastopt.rules import RULES
from oracle import MATRIX, MATRIX_IDS, hyper, inputs, needed_state


def element_step(kernel, p, g, state, scalars):
    rule_state = list(state)
    for i in range(p.size):
        vals = [x[i] if x is not None else p.dtype.type(0) for x in rule_state]
        out = getattr(elements, kernel)(p[i], g[i], *vals, scalars)
        p[i] = out[0]
        for x, v in zip(rule_state, out[1:]):
            if x is not None:
                x[i] = v


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_elements_equal_reference_bitwise(rule, options, dtype, monkeypatch):
    # Python's math.sqrt returns a float64; Numba's keeps float32. np.sqrt does too (and np.copysign).
    monkeypatch.setattr(elements, "math", types.SimpleNamespace(sqrt=np.sqrt, copysign=np.copysign))
    r = RULES[rule]
    p0, grads = inputs(19, 5, dtype, seed=3)
    grads[2][:4] = [np.nan, np.inf, -np.inf, 0.0]  # non-finite values propagate identically
    need = needed_state(rule, options)
    runs = []
    for use_elements in (False, True):
        p = p0.copy()
        state = tuple(np.zeros_like(p) if n in need else None for n in r.state)
        carried = dict([r.carry]) if r.carry else {}
        for t, g in enumerate(grads, start=1):
            scalars, extra = r.prepare({**hyper(rule, options), **carried}, t)
            carried = {r.carry[0]: extra} if r.carry else {}
            cast = type(scalars)(*(dtype(x) if isinstance(x, float) else x for x in scalars))
            with np.errstate(all="ignore"):
                if use_elements:
                    element_step(r.kernel, p, g, state, cast)
                else:
                    reference.run(r.kernel, p, g, state, scalars)
        runs.append((p, state))
    (p_ref, s_ref), (p_el, s_el) = runs
    np.testing.assert_array_equal(p_el, p_ref)
    for a, b in zip(s_el, s_ref):
        if a is not None:
            np.testing.assert_array_equal(a, b)
