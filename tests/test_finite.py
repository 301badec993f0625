"""fastopt.all_finite: the check behind skipping a step on non-finite gradients."""
import numpy as np
import pytest

import fastopt


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 100, (1 << 15) + 3, 200000])
def test_all_finite(n, dtype):
    a = np.random.default_rng(n).standard_normal(n).astype(dtype)
    assert fastopt.all_finite(a)
    for bad in (np.nan, np.inf, -np.inf):
        for where in {0, n // 2, n - 1} if n else ():
            b = a.copy()
            b[where] = bad
            assert not fastopt.all_finite(b), (bad, where)
    assert fastopt.all_finite(np.full(7, np.finfo(dtype).max, dtype))


def test_all_finite_rejects_non_float():
    with pytest.raises(TypeError, match="floating"):
        fastopt.all_finite(np.zeros(3, np.int32))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        fastopt.all_finite([1.0, 2.0])
