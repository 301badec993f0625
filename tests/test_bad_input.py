"""Every bad input raises before anything is written, naming the argument.

Each case builds valid buffers for a rule, breaks one thing, calls the update
and checks (1) the exception type, (2) that the message names the offending
argument, (3) that every buffer is byte-identical to before the call.
"""
import numpy as np
import pytest

import fastopt
from fastopt.rules import RULES
from oracle import hyper, needed_state

# Validation happens before dispatch, but every backend is exercised to prove no
# backend path writes before checking.
BACKENDS = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]

# One option set per rule that needs every state buffer the rule can take.
FULL = {"sgd": dict(lr=0.1, momentum=0.9), "adagrad": {}, "rmsprop": dict(momentum=0.9, centered=True),
        "adadelta": {}, "adam": dict(amsgrad=True), "adamw": dict(amsgrad=True), "adamax": {},
        "nadam": {}, "lion": {}}


def make(rule, n=33, dtype=np.float32):
    rng = np.random.default_rng(1)
    bufs = {"param": rng.standard_normal(n).astype(dtype), "grad": rng.standard_normal(n).astype(dtype)}
    for name in needed_state(rule, FULL[rule]):
        bufs[name] = np.abs(rng.standard_normal(n)).astype(dtype)
    return bufs


def call(rule, bufs, **over):
    kwargs = dict(FULL[rule])
    if RULES[rule].takes_step:
        kwargs["step"] = 3
    if rule == "nadam":
        kwargs["mu_product"] = 0.5
    kwargs.update(over)
    fn = getattr(fastopt, rule + "_")
    return fn(bufs["param"], bufs["grad"], *[bufs.get(n) for n in RULES[rule].state], **kwargs)


def expect_rejected(rule, bufs, exc, words, **over):
    snapshot = {k: v.tobytes() for k, v in bufs.items()}
    with pytest.raises(exc) as info:
        call(rule, bufs, **over)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!r}"
    for k, v in bufs.items():
        assert v.tobytes() == snapshot[k], f"{k} was modified by a rejected call"


def test_valid_call_writes():
    """The harness itself: an unbroken call must change the parameters."""
    for rule in RULES:
        bufs = make(rule)
        before = bufs["param"].copy()
        call(rule, bufs)
        assert not np.array_equal(before, bufs["param"]), rule


RULE_NAMES = list(RULES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_buffer_problems(rule, backend):
    names = ["param", "grad", *needed_state(rule, FULL[rule])]
    for victim in names:
        # wrong dtype
        bufs = make(rule)
        bufs[victim] = bufs[victim].astype(np.float64)
        expect_rejected(rule, bufs, TypeError, [victim, "float64"], backend=backend)
        # integer dtype
        bufs = make(rule)
        bufs[victim] = bufs[victim].astype(np.int32)
        expect_rejected(rule, bufs, TypeError, [victim, "dtype"], backend=backend)
        # wrong shape
        bufs = make(rule)
        bufs[victim] = np.zeros(34, np.float32)
        expect_rejected(rule, bufs, ValueError, [victim, "shape"], backend=backend)
        # non-contiguous view of the right shape
        bufs = make(rule)
        bufs[victim] = np.zeros(66, np.float32)[::2]
        expect_rejected(rule, bufs, ValueError, [victim, "contiguous"], backend=backend)
        # not an array at all
        bufs = make(rule)
        bufs[victim] = list(bufs[victim])
        with pytest.raises(TypeError, match=victim):
            call(rule, bufs, backend=backend)
    for victim in names:
        if victim == "grad":
            continue  # the gradient is only read: a read-only one is accepted
        bufs = make(rule)
        bufs[victim].flags.writeable = False
        expect_rejected(rule, bufs, ValueError, [victim, "read-only"], backend=backend)
    # aliasing: the same array twice, and two overlapping views
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            bufs = make(rule)
            bufs[b] = bufs[a]
            expect_rejected(rule, bufs, ValueError, [a, b, "overlaps"], backend=backend)
            bufs = make(rule)
            base = np.zeros(40, np.float32)
            bufs[a], bufs[b] = base[:33], base[5:38]
            expect_rejected(rule, bufs, ValueError, ["overlaps"], backend=backend)


def test_read_only_grad_is_accepted():
    bufs = make("adam")
    bufs["grad"].flags.writeable = False
    call("adam", bufs)


@pytest.mark.parametrize("rule,option,why", [
    ("adam", "max_exp_avg_sq", "amsgrad"), ("adamw", "max_exp_avg_sq", "amsgrad"),
    ("sgd", "momentum_buffer", "momentum"), ("rmsprop", "momentum_buffer", "momentum"),
    ("rmsprop", "grad_avg", "centered"), ("adagrad", "state_sum", "adagrad_"),
    ("nadam", "exp_avg_sq", "nadam_"), ("lion", "exp_avg", "lion_"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_state(rule, option, why, backend):
    bufs = make(rule)
    del bufs[option]
    expect_rejected(rule, bufs, ValueError, [option, why, "None"], backend=backend)


# (rule, argument, bad value, exception, words in the message)
BAD_HYPER = []
for _rule in RULE_NAMES:
    h = hyper(_rule, FULL[_rule])
    for _arg in ("lr", "eps", "weight_decay", "momentum", "lr_decay", "momentum_decay"):
        if _arg in h:
            BAD_HYPER += [(_rule, _arg, -0.1, ValueError, [_arg, ">= 0", "-0.1"]),
                          (_rule, _arg, float("nan"), ValueError, [_arg, "finite"]),
                          (_rule, _arg, float("inf"), ValueError, [_arg, "finite"]),
                          (_rule, _arg, "0.1", TypeError, [_arg, "real number"])]
    if "betas" in h:
        BAD_HYPER += [(_rule, "betas", (1.0, 0.9), ValueError, ["betas[0]", "[0, 1)"]),
                      (_rule, "betas", (0.9, -0.5), ValueError, ["betas[1]", "[0, 1)"]),
                      (_rule, "betas", (0.9, float("nan")), ValueError, ["betas[1]", "finite"]),
                      (_rule, "betas", 0.9, TypeError, ["betas", "pair"])]
    if RULES[_rule].takes_step:
        BAD_HYPER += [(_rule, "step", 0, ValueError, ["step", ">= 1"]),
                      (_rule, "step", -3, ValueError, ["step", ">= 1"]),
                      (_rule, "step", 1.5, TypeError, ["step", "int"]),
                      (_rule, "step", True, TypeError, ["step", "int"])]
BAD_HYPER += [
    ("rmsprop", "alpha", 1.5, ValueError, ["alpha", "[0, 1]"]),
    ("adadelta", "rho", -0.5, ValueError, ["rho", "[0, 1]"]),
    ("nadam", "mu_product", 1.5, ValueError, ["mu_product", "[0, 1]"]),
    ("nadam", "mu_product", float("nan"), ValueError, ["mu_product", "finite"]),
    ("adam", "amsgrad", "yes", TypeError, ["amsgrad", "bool"]),
    ("sgd", "maximize", 2, TypeError, ["maximize", "bool"]),
]


@pytest.mark.parametrize("rule,arg,value,exc,words", BAD_HYPER,
                         ids=[f"{r}-{a}={v!r}" for r, a, v, _, _ in BAD_HYPER])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_hyperparameter(rule, arg, value, exc, words, backend):
    expect_rejected(rule, make(rule), exc, words, backend=backend, **{arg: value})


def test_nesterov_needs_momentum_without_dampening():
    expect_rejected("sgd", make("sgd"), ValueError, ["nesterov", "dampening"], nesterov=True, dampening=0.1)
    bufs = make("sgd")
    expect_rejected("sgd", bufs, ValueError, ["nesterov", "momentum"], nesterov=True, momentum=0.0)


def test_unknown_backend():
    expect_rejected("adam", make("adam"), ValueError, ["backend", "'fortran'"], backend="fortran")


def test_env_backend(monkeypatch):
    from fastopt import dispatch
    try:
        monkeypatch.setenv("FASTOPT_BACKEND", "fortran")
        dispatch.refresh_environment()
        expect_rejected("adam", make("adam"), ValueError, ["backend", "'fortran'"])
        monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
        dispatch.refresh_environment()
        assert dispatch.select(None, False).name == "numpy"
        call("adam", make("adam"))
    finally:
        monkeypatch.undo()
        dispatch.refresh_environment()
    assert dispatch.select(None, False) is dispatch.select("auto", False)  # the setting is gone again


class FakeDeviceArray:
    """Looks like a GPU array (``__cuda_array_interface__``) but points at host memory."""

    def __init__(self, a):
        self._a = a
        self.__cuda_array_interface__ = dict(shape=a.shape, typestr=a.dtype.str, strides=None,
                                             data=(a.__array_interface__["data"][0], False), version=3)


def test_host_device_mix_is_rejected():
    bufs = make("adam")
    bufs["exp_avg"] = FakeDeviceArray(bufs["exp_avg"])
    snapshot = bufs["param"].tobytes()
    with pytest.raises(TypeError, match="exp_avg.*device"):
        call("adam", bufs)
    assert bufs["param"].tobytes() == snapshot


def test_host_arrays_on_cuda_backend_rejected():
    expect_rejected("adam", make("adam"), (TypeError, RuntimeError), ["cuda"], backend="cuda")


def test_validation_cache_is_not_fooled():
    """Validated hyperparameters are cached per call signature; a later bad value,
    or a bool equal to a cached number (True == 1), must still be rejected."""
    bufs = make("adam")
    call("adam", bufs, lr=1)
    call("adam", bufs, lr=1)
    expect_rejected("adam", make("adam"), TypeError, ["lr", "real number"], lr=True)
    expect_rejected("adam", make("adam"), ValueError, ["lr", ">= 0"], lr=-1)
    call("adam", bufs, betas=[0.9, 0.99])  # unhashable: checked every time
    expect_rejected("adam", make("adam"), ValueError, ["betas[1]"], betas=[0.9, 1.5])
