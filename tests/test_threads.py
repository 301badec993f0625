"""The thread count setting (fastopt.threads) and the FASTOPT_ISA check
(fastopt.environment): validation, clamping, and the environment variables."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import dispatch, environment, threads

# The directory of the fastopt this test imported (the installed package in CI,
# src/ when run from a checkout): children must load the same one, C extension included.
SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__)))
THREAD_VARS = ("FASTOPT_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")


def _c_available() -> bool:
    return not isinstance(dispatch._load("c"), str)


@pytest.fixture
def restore_threads():
    before = fastopt.get_num_threads()
    yield
    fastopt.set_num_threads(before)


# ---- set_num_threads -----------------------------------------------------------

def test_integer_likes_are_accepted(restore_threads):
    fastopt.set_num_threads(np.int64(3))
    assert fastopt.get_num_threads() == 3 and type(fastopt.get_num_threads()) is int
    fastopt.set_num_threads(np.int32(2))
    assert fastopt.get_num_threads() == 2


@pytest.mark.parametrize("bad", [0, -1, np.int64(0), -2**40])
def test_counts_below_one_raise_value_error_naming_n(bad, restore_threads):
    fastopt.set_num_threads(2)
    with pytest.raises(ValueError, match=rf"\bn must be >= 1, got {int(bad)}"):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == 2  # nothing changed


@pytest.mark.parametrize("bad", [True, False, np.True_, 2.0, "4", None, np.float64(2.0)])
def test_non_integers_raise_type_error_and_change_nothing(bad, restore_threads):
    fastopt.set_num_threads(2)
    with pytest.raises(TypeError, match=r"\bn must be an int >= 1"):
        fastopt.set_num_threads(bad)
    assert fastopt.get_num_threads() == 2


@pytest.mark.parametrize("huge", [2**31, 2**63, 10**30, 99999999999])
def test_huge_counts_are_clamped_even_with_the_c_backend_loaded(huge, restore_threads):
    dispatch._load("c")  # pushes the count into the C library's int from now on, when it loads
    dispatch._load("numba")
    fastopt.set_num_threads(huge)  # was OverflowError (C int) after the count had changed
    assert fastopt.get_num_threads() == threads.MAX_THREADS
    assert threads.MAX_THREADS < 2**31
    if _c_available():
        p, g = np.zeros(8, np.float32), np.ones(8, np.float32)
        fastopt.set_num_threads(2)
        fastopt.sgd_(p, g, step=1, lr=0.5, backend="c")
        assert (p == -0.5).all()


def test_max_threads_is_sane():
    assert 1024 <= threads.MAX_THREADS < 2**31


# ---- the environment, read at import: each case in a fresh interpreter ---------

_PROBE = textwrap.dedent("""
    import json, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import fastopt
        from fastopt import dispatch, threads
        c = dispatch._load("c")
    print(json.dumps({"n": fastopt.get_num_threads(), "max": threads.MAX_THREADS,
                      "cores": threads._usable_cores(),
                      "c": None if not isinstance(c, str) else c,
                      "warnings": [(w.category.__name__, str(w.message)) for w in caught]}))
""")


def _probe(**env):
    full = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    full.update(env)
    full["PYTHONPATH"] = SRC + os.pathsep + full.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thread_warnings(result):
    return [m for cat, m in result["warnings"] if cat == "RuntimeWarning" and "NUM_THREADS" in m]


@pytest.mark.parametrize("var,value", [("FASTOPT_NUM_THREADS", "99999999999"), ("OMP_NUM_THREADS", "2147483648")])
def test_huge_environment_counts_are_clamped_and_keep_the_c_backend(var, value):
    result = _probe(**{var: value})
    assert result["n"] == result["max"]
    assert any(value in m and str(result["max"]) in m for m in _thread_warnings(result)), result["warnings"]
    if _c_available():  # this checkout's C library loads here: a huge count must not disable it
        assert result["c"] is None, result["c"]


@pytest.mark.parametrize("value", ["0", "-1", "abc", "2.5", " ", "4x"])
def test_bad_environment_values_warn_and_fall_back(value):
    result = _probe(FASTOPT_NUM_THREADS=value, OMP_NUM_THREADS="3")
    if not value.strip():  # blank: unset, silently
        assert result["n"] == 3 and not _thread_warnings(result)
        return
    assert result["n"] == 3
    (message,) = _thread_warnings(result)
    assert "FASTOPT_NUM_THREADS" in message and repr(value) in message
    assert "using 3 threads (from OMP_NUM_THREADS)" in message


def test_bad_environment_value_falls_back_to_the_cores():
    result = _probe(OMP_NUM_THREADS="zero")
    assert result["n"] == min(result["cores"], result["max"])
    (message,) = _thread_warnings(result)
    assert "OMP_NUM_THREADS='zero'" in message and "usable cores" in message


def test_omp_nested_list_uses_the_outer_level():
    result = _probe(OMP_NUM_THREADS="3,2")
    assert result["n"] == 3 and not _thread_warnings(result)


def test_valid_environment_value_is_silent():
    result = _probe(FASTOPT_NUM_THREADS=" 2 ", OMP_NUM_THREADS="garbage-not-read")
    assert result["n"] == 2 and not _thread_warnings(result)


# ---- FASTOPT_ISA -----------------------------------------------------------------

@pytest.fixture
def fresh_isa_check(monkeypatch):
    monkeypatch.setattr(environment, "_warned", False)
    return monkeypatch


@pytest.mark.parametrize("value", [None, "", "avx512", "avx2", "baseline", "scalar"])
def test_accepted_isa_values_are_silent(value, fresh_isa_check):
    if value is None:
        fresh_isa_check.delenv("FASTOPT_ISA", raising=False)
    else:
        fresh_isa_check.setenv("FASTOPT_ISA", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert environment.warn_ignored_isa() is False


@pytest.mark.parametrize("value", ["avx3", "AVX2", " avx2", "sse4"])
def test_unknown_isa_warns_once_naming_value_and_accepted(value, fresh_isa_check):
    fresh_isa_check.setenv("FASTOPT_ISA", value)
    with pytest.warns(RuntimeWarning) as caught:
        assert environment.warn_ignored_isa() is True
    (w,) = caught
    message = str(w.message)
    assert "FASTOPT_ISA" in message and repr(value) in message
    for accepted in ("avx512", "avx2", "baseline", "scalar"):
        assert accepted in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call (another load) is silent
        assert environment.warn_ignored_isa() is True
