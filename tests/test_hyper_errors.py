"""Hyperparameter errors name the argument, whatever the value (fastopt.checks),
through the public functional API."""
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

import fastopt
from fastopt import checks
from fastopt.rules import RULES

N = 8


def _sgd(**kw):
    p, g = np.zeros(N, np.float32), np.ones(N, np.float32)
    args = dict(step=1, lr=0.1, backend="numpy")
    args.update(kw)
    fastopt.sgd_(p, g, **args)
    return p


def _adam(**kw):
    p, g = np.zeros(N, np.float32), np.ones(N, np.float32)
    m, v, vmax = (np.zeros(N, np.float32) for _ in range(3))
    args = dict(step=1, lr=0.1, backend="numpy")
    args.update(kw)
    if args.get("amsgrad"):
        args["max_exp_avg_sq"] = vmax
    fastopt.adam_(p, g, m, v, **args)
    return p


def _raises(exc, name, fn, **kw):
    """fn(**kw) raises exc with a message that starts by naming ``name``."""
    with pytest.raises(exc) as info:
        fn(**kw)
    message = str(info.value)
    assert re.match(rf"{re.escape(name)} must\b", message), message
    assert len(message) < 300, message  # a short message, even for a 401-digit int
    return message


# ---- numbers --------------------------------------------------------------------

@pytest.mark.parametrize("value", [10**400, -10**400, Fraction(10**400), 10**5000],
                         ids=["1e400", "-1e400", "fraction", "1e5000"])
def test_huge_lr_is_a_value_error(value):
    _raises(ValueError, "lr", _sgd, lr=value)


@pytest.mark.parametrize("value", [10**400, 2**63], ids=["1e400", "2**63"])
def test_huge_step_is_a_value_error(value):
    _raises(ValueError, "step", _adam, step=value)


def test_largest_step_is_accepted():
    assert np.isfinite(_adam(step=2**63 - 1)).all()


@pytest.mark.parametrize("value", [np.array([.1]), np.array([[.1]]), np.zeros(0), np.array([.1, .2])])
def test_arrays_with_dimensions_are_refused_naming_argument_and_shape(value):
    message = _raises(TypeError, "lr", _sgd, lr=value)
    assert str(value.shape) in message


def test_tensors_with_dimensions_are_refused_naming_argument_and_shape():
    torch = pytest.importorskip("torch")
    for value in (torch.tensor([.1, .2]), torch.tensor([.1])):
        message = _raises(TypeError, "lr", _sgd, lr=value)
        assert str(tuple(value.shape)) in message


@pytest.mark.parametrize("value", [np.array(0.1), np.float32(0.1), np.float64(0.1), np.int64(1), Decimal("0.1"),
                                   Fraction(1, 10)])
def test_zero_d_arrays_and_numpy_scalars_are_numbers(value):
    expected = _sgd(lr=float(value))
    np.testing.assert_array_equal(_sgd(lr=value), expected)


def test_zero_d_tensors_are_numbers():
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(_sgd(lr=torch.tensor(0.25)), _sgd(lr=0.25))
    np.testing.assert_array_equal(_adam(lr=torch.tensor(0.25, dtype=torch.float64)), _adam(lr=0.25))


@pytest.mark.parametrize("value", [Decimal("sNaN"), Decimal("NaN"), Decimal("Infinity"), float("nan")])
def test_decimal_specials_name_the_argument(value):
    _raises(ValueError, "lr", _sgd, lr=value)


@pytest.mark.parametrize("value", [True, False, np.True_, np.False_, np.array(True), 1 + 0j, np.complex128(1),
                                   "0.1", None, [0.1]])
def test_non_real_lr_is_a_type_error(value):
    _raises(TypeError, "lr", _sgd, lr=value)


def test_bool_like_as_a_number_is_refused_everywhere():
    _raises(TypeError, "weight_decay", _adam, weight_decay=np.True_)
    _raises(TypeError, "momentum", _sgd, momentum=np.False_)
    _raises(TypeError, "betas[0]", _adam, betas=(np.True_, 0.9))


def test_negative_zero_is_normalized():
    assert checks.real("lr", -0.0) == 0.0
    assert str(checks.real("lr", -0.0)) == "0.0"
    assert str(checks.nonneg("weight_decay", np.float64(-0.0))) == "0.0"


# ---- flags ----------------------------------------------------------------------

@pytest.mark.parametrize("on", [True, 1, np.True_, np.int64(1), np.int32(1)])
def test_flag_likes_are_accepted(on):
    np.testing.assert_array_equal(_adam(amsgrad=on), _adam(amsgrad=True))
    np.testing.assert_array_equal(_sgd(maximize=on), _sgd(maximize=True))


@pytest.mark.parametrize("off", [False, 0, np.False_, np.int64(0)])
def test_flag_likes_off(off):
    np.testing.assert_array_equal(_sgd(maximize=off), _sgd(maximize=False))


@pytest.mark.parametrize("value", [2, -1, np.int64(2), 1.0, np.float64(1.0), "yes", None])
def test_bad_flags_name_the_argument(value):
    _raises(TypeError, "amsgrad", _adam, amsgrad=value)


# ---- pairs ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [{0.9, 0.99}, {0.9: 0, 0.99: 1}, "ab", frozenset({0.9, 0.99}),
                                   iter((0.9, 0.99)), 0.9, np.array([[0.9, 0.99]]), np.array(0.9)])
def test_unordered_or_non_pairs_are_refused(value):
    _raises(TypeError, "betas", _adam, betas=value)


@pytest.mark.parametrize("value", [(0.9,), [0.9, 0.99, 0.5], ()])
def test_wrong_length_pairs_are_refused(value):
    message = _raises(TypeError, "betas", _adam, betas=value)
    assert str(len(value)) in message


def test_ordered_pairs_are_accepted():
    expected = _adam(betas=(0.8, 0.9))
    np.testing.assert_array_equal(_adam(betas=[0.8, 0.9]), expected)
    np.testing.assert_array_equal(_adam(betas=np.array([0.8, 0.9])), expected)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(_adam(betas=torch.tensor([0.8, 0.9], dtype=torch.float64)), expected)


def test_pair_items_are_named():
    _raises(ValueError, "betas[1]", _adam, betas=(0.9, 10**400))
    _raises(TypeError, "betas[0]", _adam, betas=(np.array([0.9]), 0.99))


# ---- the checks keep what the code generator reads ------------------------------

def test_checks_keep_their_c_predicates():
    assert checks.real.c == "isfinite"
    assert checks.nonneg.c == "fo_nonneg"
    assert checks.unit.c == "fo_unit"
    assert checks.closed_unit.c == "fo_unit_closed"
    assert checks.flag.c is None
    assert checks.warmup_steps.c == "fo_warmup"
    pair = checks.pair(checks.unit)
    assert pair.c == "fo_unit" and pair.arity == 2


@pytest.mark.parametrize("name", list(RULES))
def test_each_function_passes_its_hyperparameters_in_the_rule_order(name, monkeypatch):
    """The functions hand their hyperparameters to the rule as a tuple in the order of
    the rule's table (no names travel with them): a swap of two would check and use
    each value as the other, silently when both are floats."""
    from fastopt import functional
    rule = RULES[name]
    seen = []
    monkeypatch.setattr(functional, "_update", lambda rule_, p, g, state, hyper, *a: seen.append(hyper))
    sentinels = {h.name: object() for h in rule.hyper}
    getattr(fastopt, name + "_")(None, None, *[None] * len(rule.state), step=1, **sentinels)
    assert seen == [tuple(sentinels[h.name] for h in rule.hyper)]
