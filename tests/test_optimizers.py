"""Stateful flat optimizers (fastopt.SGD ... fastopt.Lion) and FlatParams.

The stateful classes only organise calls to the functional API, so against a
hand-written sequence of functional calls on the same backend they must agree
bit for bit: every comparison here is exact (``assert_array_equal``). What
they add is checked directly: groups as segments with their own
hyperparameters, frozen elements outside every group, lazy state, the step
count and NAdam's carried ``mu_product``, AdaGrad's initial accumulator, the
``lr`` setter, state dicts (round trip, validation that leaves the optimizer
unchanged), and the packing of FlatParams (views, alignment, padding).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt.flat import ALIGN, FlatParams, layout
from fastopt.rules import RULES
from oracle import FULL, MATRIX, MATRIX_IDS, TORCH_STATE_NAME, fastopt_step, initial_state, needed_state

#: The stateful class of every rule of the table.
CLASSES = {name: getattr(fastopt, rule.title) for name, rule in RULES.items()}
SHAPES = [(7, 5), (5,), (3, 4, 2), (1,), (33,)]
STEPS = 12


def arrays(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def grads(n, dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(dtype) for _ in range(STEPS)]


def functional_run(rule, options, p, gs, state=None):
    """The functional reference: one call per step on ``p`` (in place); returns the state."""
    state = state if state is not None else initial_state(rule, options, p)
    extra: dict = {}
    for t, g in enumerate(gs, start=1):
        fastopt_step(rule, options, p, g, state, t, extra)
    return state


# ---- against the functional API ---------------------------------------------


@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_stateful_matches_functional(rule, options):
    flat = FlatParams(arrays())
    opt = CLASSES[rule](flat, **options)
    expected = flat.data.copy()
    gs = grads(flat.data.size)
    ref_state = functional_run(rule, options, expected, gs)
    for g in gs:
        flat.grad[...] = g
        opt.step()
    np.testing.assert_array_equal(flat.data, expected)
    assert opt.state[0]["step"] == STEPS
    for name, buf in ref_state.items():
        np.testing.assert_array_equal(opt.state[0][name], buf, err_msg=name)
    assert set(opt.state[0]) == {"step", *ref_state, *CLASSES[rule].algorithm.carry}  # lazily allocated: only what is needed


def test_groups_are_segments_with_their_own_hyperparameters():
    """Two groups with different hyperparameters, and one array in no group (frozen)."""
    flat = FlatParams(arrays())
    start = flat.data.copy()
    w, b = flat.span(0, 1), flat.span(2, 5)  # array 1 is in no group
    opt = fastopt.AdamW(flat, lr=1e-2, weight_decay=0.1,
                        groups=[{"params": w}, {"params": b, "weight_decay": 0.0, "lr": 3e-2, "amsgrad": True}])
    gs = grads(flat.data.size)
    for g in gs:
        flat.grad[...] = g
        opt.step()
    for seg, options in ((w, dict(lr=1e-2, weight_decay=0.1)), (b, dict(lr=3e-2, weight_decay=0.0, amsgrad=True))):
        expected = start[seg].copy()
        functional_run("adamw", options, expected, [g[seg] for g in gs])
        np.testing.assert_array_equal(flat.data[seg], expected)
    frozen = flat.span(1)
    np.testing.assert_array_equal(flat.data[frozen], start[frozen])
    assert "max_exp_avg_sq" not in opt.state[0] and "max_exp_avg_sq" in opt.state[1]


def test_adagrad_initial_accumulator_value():
    flat = FlatParams(arrays())
    opt = fastopt.Adagrad(flat, lr=0.1, initial_accumulator_value=0.5)
    expected = flat.data.copy()
    gs = grads(flat.data.size)
    functional_run("adagrad", dict(lr=0.1), expected, gs, {"state_sum": np.full_like(expected, 0.5)})
    for g in gs:
        opt.step(g)
    np.testing.assert_array_equal(flat.data, expected)


def test_nadam_carries_mu_product_and_lion_counts_steps():
    flat = FlatParams(arrays())
    opt = fastopt.NAdam(flat)
    for g in grads(flat.data.size)[:3]:
        opt.step(g)
    b1, md = 0.9, 4e-3
    mu = np.prod([b1 * (1 - 0.5 * 0.96 ** (t * md)) for t in (1, 2, 3)])
    assert opt.state[0]["mu_product"] == pytest.approx(mu, rel=1e-15)
    lion = fastopt.Lion(flat)
    lion.step(flat.grad)
    assert lion.state[0]["step"] == 1


def test_lr_setter_is_a_schedule():
    flat = FlatParams(arrays())
    opt = fastopt.Adam(flat, lr=1e-2)
    expected = flat.data.copy()
    gs = grads(flat.data.size)
    state = {n: np.zeros_like(expected) for n in ("exp_avg", "exp_avg_sq")}
    for t, g in enumerate(gs, start=1):
        lr = 1e-2 * 0.5 ** t
        opt.lr = lr
        assert opt.lr == lr
        opt.step(g)
        fastopt.adam_(expected, g, state["exp_avg"], state["exp_avg_sq"], step=t, lr=lr)
    np.testing.assert_array_equal(flat.data, expected)
    two = fastopt.Adam(flat, groups=[{"params": flat.span(0)}, {"params": flat.span(1), "lr": 0.5}])
    with pytest.raises(ValueError, match="different learning rates"):
        two.lr
    two.lr = 0.25
    assert [g["lr"] for g in two.param_groups] == [0.25, 0.25]


def test_padding_stays_zero_and_float64():
    flat = FlatParams(arrays(np.float64))
    used = np.zeros(flat.data.size, bool)
    for o, n in zip(flat.offsets, flat.sizes):
        used[o:o + n] = True
    for cls, options in ((fastopt.Adamax, {}), (fastopt.RMSprop, dict(centered=True, momentum=0.9)),
                         (fastopt.Adagrad, dict(initial_accumulator_value=1.0)), (fastopt.Lion, {})):
        opt = cls(flat, **options)
        for g in grads(flat.data.size, np.float64):
            flat.grad[...] = np.where(used, g, 0.0)  # gradients only exist for real elements
            opt.step()
        assert flat.data.dtype == np.float64
        assert not flat.data[~used].any(), cls.__name__


# ---- state dicts -------------------------------------------------------------------


# Every rule with every state buffer in use, and its optimizer-only options (AdaGrad's initial value).
ROUND_TRIP = [(name, {**FULL[name], **{h.name: 0.1 for h in rule.optimizer_hyper}}) for name, rule in RULES.items()]


@pytest.mark.parametrize("rule,options", ROUND_TRIP, ids=[r for r, _ in ROUND_TRIP])
def test_state_dict_round_trip_continues_the_run(rule, options):
    gs = grads(FlatParams(arrays()).data.size)
    straight = FlatParams(arrays())
    opt = CLASSES[rule](straight, **options)
    for g in gs:
        opt.step(g)

    first_flat = FlatParams(arrays())
    first = CLASSES[rule](first_flat, **options)
    for g in gs[:5]:
        first.step(g)
    saved = first.state_dict()
    resumed_flat = FlatParams(arrays())
    resumed_flat.data[...] = first_flat.data
    resumed = CLASSES[rule](resumed_flat, lr=0.123)  # hyperparameters come from the state dict
    resumed.load_state_dict(saved)
    for g in gs[5:]:
        resumed.step(g)
    np.testing.assert_array_equal(resumed_flat.data, straight.data)
    options = {k: v for k, v in options.items() if k in RULES[rule].defaults}
    assert set(saved["state"][0]) == {"step", *CLASSES[rule].algorithm.carry, *RULES[rule].derived,
                                      *(TORCH_STATE_NAME.get(n, n) for n in needed_state(rule, options))}


def test_state_dict_is_a_copy():
    flat = FlatParams(arrays())
    opt = fastopt.Adam(flat)
    opt.step(flat.grad + 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"][...] = 7
    sd["param_groups"][0]["lr"] = 9.0
    assert not (opt.state[0]["exp_avg"] == 7).any() and opt.param_groups[0]["lr"] == 1e-3


def adam_with_state():
    flat = FlatParams(arrays())
    opt = fastopt.Adam(flat, groups=[{"params": flat.span(0, 2)}, {"params": flat.span(2, 5), "amsgrad": True}])
    for g in grads(flat.data.size)[:3]:
        opt.step(g)
    return flat, opt


def _set(path, value):
    def mutate(sd):
        *head, last = path
        target = sd
        for k in head:
            target = target[k]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value(target[last]) if callable(value) else value
        return sd
    return mutate


_DELETE = object()

BAD = {
    "wrong size": (_set(["state", 0, "exp_avg"], lambda a: a[:-1]), ValueError,
                   r"state_dict\['state'\]\[0\]\['exp_avg'\] has shape"),
    "wrong dtype": (_set(["state", 1, "exp_avg_sq"], lambda a: a.astype(np.float64)), TypeError,
                    r"\[1\]\['exp_avg_sq'\] has dtype float64, expected float32"),
    "not an array": (_set(["state", 0, "exp_avg"], [1.0]), TypeError, r"\['exp_avg'\] must be an array"),
    "missing buffer": (_set(["state", 1, "max_exp_avg_sq"], _DELETE), ValueError,
                       r"\[1\] is missing 'max_exp_avg_sq'"),
    "unknown buffer": (_set(["state", 0, "momentum"], np.zeros(3, np.float32)), ValueError,
                       r"\[0\] has an unknown key 'momentum'"),
    "missing step": (_set(["state", 0, "step"], _DELETE), ValueError, r"\[0\] is missing 'step'"),
    "negative step": (_set(["state", 0, "step"], -1), ValueError, r"\['step'\] must be a whole number"),
    "entry for no group": (_set(["state", 2], {}), ValueError, "entry 2 for no group"),
    "missing hyperparameter": (_set(["param_groups", 0, "eps"], _DELETE), ValueError,
                               r"param_groups'\]\[0\] is missing 'eps'"),
    "unknown hyperparameter": (_set(["param_groups", 1, "nesterov"], True), ValueError,
                               r"\[1\] has an unknown key 'nesterov'"),
    "bad hyperparameter": (_set(["param_groups", 1, "lr"], -1.0), ValueError, "lr must be >= 0"),
    "group count": (_set(["param_groups"], lambda gs: gs[:1]), ValueError, "has 1 groups"),
    "missing top-level key": (_set(["state"], _DELETE), ValueError, "missing 'state'"),
    "unknown top-level key": (_set(["extra"], 1), ValueError, "unknown key 'extra'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_state_dict_raises_naming_the_key_and_changes_nothing(case):
    mutate, error, message = BAD[case]
    flat, opt = adam_with_state()
    before = opt.state_dict()
    with pytest.raises(error, match=message):
        opt.load_state_dict(mutate(opt.state_dict()))
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i, entry in before["state"].items():
        assert after["state"][i].keys() == entry.keys()
        for k, v in entry.items():
            np.testing.assert_array_equal(after["state"][i][k], v)
    opt.step(flat.grad)  # still usable


def test_construction_errors():
    flat = FlatParams(arrays())
    with pytest.raises(TypeError, match="unknown hyperparameter 'momentom'"):
        fastopt.SGD(flat, lr=0.1, momentom=0.9)
    with pytest.raises(TypeError, match="lr must be a real number"):
        fastopt.SGD(flat)  # SGD has no default lr
    with pytest.raises(ValueError, match="betas"):
        fastopt.Adam(flat, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="overlap"):
        fastopt.Adam(flat, groups=[{"params": slice(0, 40)}, {"params": slice(30, 50)}])
    with pytest.raises(TypeError, match=r"groups\[0\]\['params'\] must be a slice"):
        fastopt.Adam(flat, groups=[{"params": [0, 1]}])
    with pytest.raises(ValueError, match="contiguous"):
        fastopt.Adam(flat, groups=[{"params": slice(0, 40, 2)}])
    with pytest.raises(ValueError, match="1-D buffer"):
        fastopt.Adam(flat.params[0])
    with pytest.raises(TypeError, match="needs a gradient"):
        fastopt.Adam(flat.data).step()
    with pytest.raises(ValueError, match="grad has shape"):
        fastopt.Adam(flat).step(np.zeros(3, np.float32))


# ---- FlatParams ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flat_params_views_and_alignment(dtype):
    src = arrays(dtype)
    flat = FlatParams(src)
    assert flat.data.ndim == 1 and flat.data.dtype == dtype and flat.grad.shape == flat.data.shape
    for view, gview, a, o in zip(flat.params, flat.grads, src, flat.offsets):
        np.testing.assert_array_equal(view, a)
        assert view.shape == a.shape and np.shares_memory(view, flat.data) and np.shares_memory(gview, flat.grad)
        assert view.ctypes.data % ALIGN == 0 and gview.ctypes.data % ALIGN == 0
        assert view.ctypes.data == flat.data.ctypes.data + o * flat.data.itemsize
    assert not flat.grad.any()
    flat.params[2][1, 2, 0] = 42  # writes through
    assert flat.data[flat.offsets[2] + 1 * 8 + 2 * 2] == 42
    assert flat.span(1, 3) == slice(flat.offsets[1], flat.offsets[2] + 24)


def test_layout_and_packing_errors():
    assert layout([1, 16, 17, 0, 3], 4) == ((0, 16, 32, 64, 64), 80)
    assert layout([3], 8, align=16) == ((0,), 4)
    with pytest.raises(ValueError, match="multiple of the item size"):
        layout([3], 8, align=12)
    with pytest.raises(TypeError, match="pass dtype="):
        FlatParams([np.zeros(2, np.float32), np.zeros(2)])
    assert FlatParams([np.zeros(2, np.float32), np.ones(2)], dtype=np.float32).data.dtype == np.float32
    with pytest.raises(IndexError):
        FlatParams([np.zeros(2)]).span(0, 2)


def test_import_fastopt_does_not_import_torch():
    code = "import sys, fastopt; fastopt.AdamW; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_assigning_flat_grad_is_used_by_the_next_step():
    flat = FlatParams(arrays())
    opt = fastopt.SGD(flat, lr=0.1)
    other = np.ones_like(flat.data)
    before = flat.data.copy()
    flat.grad = other
    assert flat.grads[0].base is other or np.shares_memory(flat.grads[0], other)
    opt.step()
    np.testing.assert_array_equal(flat.data, before - np.float32(0.1) * other)
    with pytest.raises(ValueError, match="grad has shape"):
        flat.grad = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="grad has dtype"):
        flat.grad = np.ones_like(flat.data, dtype=np.float64)
    assert flat.grad is other  # a rejected assignment changes nothing


def test_every_update_function_takes_step():
    """README: every function takes ``step=``; Lion's update does not depend on it,
    but the keyword is accepted (and checked) for one calling convention."""
    x = [np.ones(4, np.float32) for _ in range(3)]
    fastopt.lion_(*x, step=5)
    with pytest.raises(ValueError, match="step"):
        fastopt.lion_(*x, step=0)


def test_a_step_checks_every_group_before_writing_any():
    """A bad second group (edited span, overlapping span, out-of-range carried value,
    state of the wrong size) fails the step before the first group is written."""
    def two_groups(cls=fastopt.NAdam):
        flat = FlatParams(arrays())
        opt = cls(flat, groups=[{"params": flat.span(0, 2)}, {"params": flat.span(2, 5)}])
        flat.grad[...] = 1.0
        opt.step()
        return flat, opt

    edits = [
        (lambda o, f: o.state[1].__setitem__("mu_product", 1.5), ValueError, "mu_product"),
        (lambda o, f: o.param_groups[1].__setitem__("params", slice(f.offsets[1], f.data.size)), ValueError, "overlap"),
        (lambda o, f: o.param_groups[1].__setitem__("params", slice(f.offsets[2], f.data.size - 1)), ValueError,
         "shape"),
        (lambda o, f: o.param_groups[1].__setitem__("params", [0, 1]), TypeError, "slice"),
        (lambda o, f: o.param_groups[1].__setitem__("lr", -1.0), ValueError, r"param_groups\[1\]: lr"),
    ]
    for edit, exc, word in edits:
        flat, opt = two_groups()
        edit(opt, flat)
        before = flat.data.copy(), [dict(s) for s in opt.state]
        steps = [s["step"] for s in opt.state]
        with pytest.raises(exc, match=word):
            opt.step()
        np.testing.assert_array_equal(flat.data, before[0])
        assert [s["step"] for s in opt.state] == steps


def test_loaded_carried_value_is_range_checked_at_load():
    flat = FlatParams(arrays())
    opt = fastopt.NAdam(flat)
    opt.step(np.ones_like(flat.data))
    saved = opt.state_dict()
    saved["state"][0]["mu_product"] = 1.5
    with pytest.raises(ValueError, match=r"mu_product.*\[0, 1\]"):
        opt.load_state_dict(saved)


def test_bad_hyperparameter_in_a_state_dict_names_the_group_and_key():
    flat = FlatParams(arrays())
    opt = fastopt.Adam(flat, groups=[{"params": flat.span(0, 2)}, {"params": flat.span(2, 5)}])
    saved = opt.state_dict()
    saved["param_groups"][1]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[1\]: lr must be >= 0"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["lr"] == 1e-3


def test_prepared_steps_see_every_edit_between_steps():
    """From the second step on, step() runs a prepared call (checked once, then
    re-proved by identity and equality): every edit of the groups or state between
    steps must still take effect, exactly as through the checked path."""
    def fresh():
        flat = FlatParams(arrays())
        flat.grad[...] = np.linspace(-1, 1, flat.data.size, dtype=np.float32)
        opt = fastopt.AdamW(flat, groups=[{"params": flat.span(0, 2)}, {"params": flat.span(2, 5)}], lr=0.01)
        opt.step()
        opt.step()
        return flat, opt

    def reference(edit):
        """The same edit on an optimizer whose every step takes the checked path."""
        flat, opt = fresh()
        edit(opt, flat)
        opt._prepared = None
        opt.step()
        return flat.data.copy(), [dict(s) for s in opt.state]

    edits = {
        "lr": lambda o, f: o.param_groups[1].__setitem__("lr", 0.5),
        "betas": lambda o, f: o.param_groups[0].__setitem__("betas", (0.5, 0.9)),
        "weight_decay as an int": lambda o, f: o.param_groups[0].__setitem__("weight_decay", 1),
        "step count": lambda o, f: o.state[0].__setitem__("step", 100),
        "state buffer": lambda o, f: o.state[1].__setitem__("exp_avg", np.full_like(o.state[1]["exp_avg"], 0.25)),
        "a group replaced by a copy": lambda o, f: o.param_groups.__setitem__(0, dict(o.param_groups[0], lr=0.2)),
    }
    for name, edit in edits.items():
        flat, opt = fresh()
        assert opt._prepared is not None or fastopt.dispatch.select(None, False).run_checked is None
        edit(opt, flat)
        opt.step()
        want, want_state = reference(edit)
        np.testing.assert_array_equal(flat.data, want, err_msg=name)
        for got, expected in zip(opt.state, want_state):
            assert got["step"] == expected["step"], name
            for key in ("exp_avg", "exp_avg_sq"):
                np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")


def test_prepared_steps_still_refuse_bad_buffers_before_writing_any_group():
    flat = FlatParams(arrays())
    flat.grad[...] = 1.0
    opt = fastopt.Adam(flat, groups=[{"params": flat.span(0, 2)}, {"params": flat.span(2, 5)}])
    opt.step()
    opt.step()
    opt.state[1]["exp_avg"].flags.writeable = False  # the same array, now read-only
    before, steps = flat.data.copy(), [s["step"] for s in opt.state]
    with pytest.raises(ValueError, match="read-only"):
        opt.step()
    np.testing.assert_array_equal(flat.data, before)
    assert [s["step"] for s in opt.state] == steps
