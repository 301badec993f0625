"""Every bad input raises before anything is written, naming the argument.

Each case builds valid buffers for a rule, breaks one thing, calls the update
and checks (1) the exception type, (2) that the message names the offending
argument, (3) that every buffer is byte-identical to before the call.
"""
import numpy as np
import pytest

import fastopt
from fastopt.checks import closed_unit, flag, nonneg, real, unit, warmup_steps
from fastopt.rules import RULES
from fastopt.rule import Hyper
from oracle import FULL, check_of_pair, needed_state

# Validation happens before dispatch, but every backend is exercised to prove no
# backend path writes before checking.
BACKENDS = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]

# FULL (from oracle): per rule, one option set that needs every state buffer the rule can take.


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
    if RULES[rule].carry:
        kwargs[RULES[rule].carry[0]] = 0.5
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


# Every state buffer of every rule: the message names it and the option that needs
# it (or the function, for a buffer the rule always needs).
MISSING = [(name, buf.name, buf.why.split()[0].split("=")[0] if buf.why else name + "_")
           for name, rule in RULES.items() for buf in rule.buffers]


@pytest.mark.parametrize("rule,option,why", MISSING, ids=[f"{r}-{o}" for r, o, _ in MISSING])
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_state(rule, option, why, backend):
    bufs = make(rule)
    del bufs[option]
    expect_rejected(rule, bufs, ValueError, [option, why, "None"], backend=backend)


def _bad_values(h):
    """(bad value, exception, words in the message) for one hyperparameter, from its check."""
    name, check = h.name, h.check
    arity = getattr(check, "arity", 1)
    if arity > 1:  # a pair or triple (betas): each bad value of its element check, in turn at [0], [1], ...
        out = []
        for k, (bad, exc, words) in enumerate(_bad_values(Hyper(name, h.default[0], check_of_pair(check)))):
            at = k % arity
            value = tuple(bad if j == at else h.default[j] for j in range(arity))
            out.append((value, exc, [f"{name}[{at}]", *words[1:]]))
        kind = "pair" if arity == 2 else "triple"
        return out + [(h.default[0], TypeError, [name, kind]), (h.default[:-1], TypeError, [name, kind])]
    if check is flag:
        return [("yes", TypeError, [name, "bool"]), (2, TypeError, [name, "bool"])]
    if check is warmup_steps:  # None or a number of steps
        return [(0, ValueError, [name, ">= 1", "0"]), (-1, ValueError, [name, ">= 1", "-1"]),
                (1.5, TypeError, [name, "int", "1.5"]), (True, TypeError, [name, "int", "True"]),
                (2.0, TypeError, [name, "int"]), ("10", TypeError, [name, "int"]),
                (2**53 + 1, ValueError, [name, "2**53"])]
    common = [(float("nan"), ValueError, [name, "finite"]), (float("inf"), ValueError, [name, "finite"]),
              ("0.1", TypeError, [name, "real number"])]
    if check is nonneg:
        return common + [(-0.1, ValueError, [name, ">= 0", "-0.1"])]
    if check is closed_unit:
        return common + [(1.5, ValueError, [name, "[0, 1]"]), (-0.5, ValueError, [name, "[0, 1]"])]
    if check is unit:
        return common + [(1.0, ValueError, [name, "[0, 1)"]), (-0.5, ValueError, [name, "[0, 1)"])]
    assert check is real, f"no bad values for the check of {name}"
    return common


# (rule, argument, bad value, exception, words in the message): every hyperparameter of the table.
BAD_HYPER = [(name, h.name, *bad) for name, rule in RULES.items() for h in rule.hyper for bad in _bad_values(h)]
for _rule in RULE_NAMES:
    if RULES[_rule].takes_step:
        BAD_HYPER += [(_rule, "step", 0, ValueError, ["step", ">= 1"]),
                      (_rule, "step", -3, ValueError, ["step", ">= 1"]),
                      (_rule, "step", 1.5, TypeError, ["step", "int"]),
                      (_rule, "step", True, TypeError, ["step", "int"])]


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


@pytest.mark.parametrize("over", [dict(etas=(1.0, 1.2)), dict(etas=(0.0, 1.2)), dict(etas=(0.5, 1.0)),
                                  dict(step_sizes=(1.0, 0.5))], ids=["etaminus=1", "etaminus=0", "etaplus=1", "min>max"])
def test_rprop_relation(over):
    """Rprop's etas must straddle 1 (0 < etaminus < 1 < etaplus, as torch checks) and its
    step sizes be ordered: one message naming all four, nothing written."""
    expect_rejected("rprop", make("rprop"), ValueError, ["0 < etaminus < 1 < etaplus", "step_size_min"], **over)


def test_carried_value_is_checked_every_call_but_not_cached():
    """NAdam's mu_product changes every step: it must not make every call a cache
    miss (the cache would fill and the checks run each step), and a bad value
    must still be rejected after the same other values were cached."""
    rule = RULES["nadam"]
    rule._validated.clear()
    bufs = make("nadam")
    mu = 1.0
    for t in range(1, 6):
        mu = call("nadam", bufs, mu_product=mu, step=t)
    assert len(rule._validated) == 1
    for bad, words in [(2.0, ["mu_product"]), (float("nan"), ["mu_product"]), (-0.5, ["mu_product"])]:
        expect_rejected("nadam", make("nadam"), ValueError, words, mu_product=bad)
    assert len(rule._validated) == 1
    # the value passed is the one used: the same call with two mu_products differs
    a, b = make("nadam"), make("nadam")
    call("nadam", a, mu_product=1.0, step=3)
    call("nadam", b, mu_product=0.5, step=3)
    assert a["param"].tobytes() != b["param"].tobytes()


# ---- lists of tensors ---------------------------------------------------------


def make_lists(rule, shapes=((3, 4), (5,), (1,)), dtype=np.float32):
    rng = np.random.default_rng(2)
    roles = ["param", "grad", *needed_state(rule, FULL[rule])]
    return {r: [np.abs(rng.standard_normal(sh)).astype(dtype) for sh in shapes] for r in roles}


def call_lists(rule, bufs, **over):
    return call(rule, {k: v for k, v in bufs.items()}, **over)


def expect_lists_rejected(rule, bufs, exc, words, **over):
    snapshot = {k: [a.tobytes() for a in v] for k, v in bufs.items()}
    with pytest.raises(exc) as info:
        call_lists(rule, bufs, **over)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value!r}"
    for k, v in bufs.items():
        assert [a.tobytes() for a in v] == snapshot[k], f"{k} was modified by a rejected call"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_list_problems(rule, backend):
    roles = list(make_lists(rule))
    good = make_lists(rule)
    before = [a.copy() for a in good["param"]]
    call_lists(rule, good, backend=backend)
    assert all(not np.array_equal(a, b) for a, b in zip(before, good["param"]))
    for victim in roles:
        bufs = make_lists(rule)
        bufs[victim] = bufs[victim][:2]  # one tensor short
        # (when param is short, the first other role is reported against it)
        expect_lists_rejected(rule, bufs, ValueError, [victim, "arrays, expected"], backend=backend)
        bufs = make_lists(rule)
        bufs[victim][1] = np.zeros(6, np.float32)  # the wrong shape at one position
        expect_lists_rejected(rule, bufs, ValueError, [f"{victim}[1]", "shape"], backend=backend)
        bufs = make_lists(rule)
        bufs[victim][2] = bufs[victim][2].astype(np.float64)
        expect_lists_rejected(rule, bufs, TypeError, [f"{victim}[2]", "float64"], backend=backend)
        bufs = make_lists(rule)
        bufs[victim][0] = np.zeros((3, 8), np.float32)[:, ::2]
        expect_lists_rejected(rule, bufs, ValueError, [f"{victim}[0]", "contiguous"], backend=backend)
    bufs = make_lists(rule)
    bufs["param"] = bufs["param"][0]  # an array where the others are lists
    with pytest.raises(TypeError):
        call_lists(rule, bufs, backend=backend)
    # One dtype per call, across positions too.
    bufs = {r: [a.astype(np.float64) if i == 1 else a for i, a in enumerate(v)]
            for r, v in make_lists(rule).items()}
    expect_lists_rejected(rule, bufs, TypeError, ["param[1]", "float64", "one dtype"], backend=backend)
    # Overlap across tensors: a state buffer of tensor 2 inside the parameter of tensor 0.
    bufs = make_lists(rule)
    base = np.zeros(40, np.float32)
    last = roles[-1]
    bufs["param"][0] = base[:12].reshape(3, 4)
    bufs[last][2] = base[10:11]
    expect_lists_rejected(rule, bufs, ValueError, ["overlaps", f"{last}[2]", "param[0]"], backend=backend)


def test_empty_lists_are_a_no_op():
    fastopt.adam_([], [], [], [], step=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ndarray_subclasses_are_refused_before_any_write(backend, tmp_path):
    """np.matrix (whose * is a matrix product), masked arrays (whose mask no kernel
    reads) and memmaps: refused on every backend, naming the argument; np.asarray
    views of the same memory are the supported form."""
    for make_sub in (np.asmatrix, lambda a: np.ma.masked_array(a, mask=a > 1),
                     lambda a: np.memmap(tmp_path / "m.bin", a.dtype, "w+", shape=a.shape)):
        for victim in ("param", "grad", "exp_avg_sq"):
            bufs = make("adam")
            bufs[victim] = make_sub(bufs[victim].reshape(1, -1) if make_sub is np.asmatrix else bufs[victim])
            if make_sub is np.asmatrix:
                bufs = {k: (v if k == victim else v.reshape(1, -1)) for k, v in bufs.items()}
            expect_rejected("adam", bufs, TypeError, [victim, "np.asarray"], backend=backend)
    m = np.memmap(tmp_path / "p.bin", np.float32, "w+", shape=(33,))
    m[:] = 1.0
    bufs = make("adam")
    bufs["param"] = np.asarray(m)
    call("adam", bufs, backend=backend)
    assert not np.array_equal(np.asarray(m), np.ones(33, np.float32))  # the update landed in the mapped memory


@pytest.mark.parametrize("shape", [(), (33, 1), (3, 11), (1, 3, 11)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_any_c_contiguous_shape_on_every_backend(backend, shape):
    """0-d, (n, 1), 2-D and 3-D arrays are updated elementwise like their flat view."""
    rng = np.random.default_rng(3)
    flat = {k: np.abs(rng.standard_normal(int(np.prod(shape)))).astype(np.float32) for k in ("p", "g", "m", "v")}
    shaped = {k: v.copy().reshape(shape) for k, v in flat.items()}
    fastopt.adam_(*flat.values(), step=2, backend=backend)
    fastopt.adam_(*shaped.values(), step=2, backend=backend)
    for k in flat:
        assert shaped[k].shape == shape and shaped[k].tobytes() == flat[k].tobytes(), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_hyperparameters_changed_in_place_take_effect(backend):
    """A tensor lr (or betas) can change in place between calls, as torch's LR
    schedulers do with tensor learning rates: its validated value must not be
    cached by identity. And lr=-0.0 is lr=0.0, cached or not."""
    torch = pytest.importorskip("torch")
    p, g = np.ones(4, np.float32), np.ones(4, np.float32)
    lr = torch.tensor(0.1)
    fastopt.sgd_(p, g, step=1, lr=lr, backend=backend)
    lr.fill_(0.0)
    fastopt.sgd_(p, g, step=2, lr=lr, backend=backend)
    assert p[0] == np.float32(0.9)
    betas = (torch.tensor(0.9), 0.999)
    m, v = np.zeros(4, np.float32), np.zeros(4, np.float32)
    fastopt.adam_(p, g, m, v, step=1, betas=betas, backend=backend)
    betas[0].fill_(0.5)
    fastopt.adam_(p, g, m, v, step=2, betas=betas, backend=backend)
    assert m[0] == np.float32(0.5) * np.float32(0.1) + np.float32(0.5)  # beta1 = 0.5 was used
    results = []
    for lr in (0.0, -0.0, 0.0, -0.0):  # cached after the first call or not: -0.0 acts as 0.0
        q = np.array([-0.0, 0.0, 1.0, -1.0], np.float32)
        fastopt.sgd_(q, g, step=1, lr=lr, backend=backend)
        results.append(q.tobytes())
    assert len(set(results)) == 1
