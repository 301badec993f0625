"""fastopt.torch with 8-bit blockwise state: ``state_dtype="int8"`` and ``min_8bit_size``.

Bitwise tests, as in test_torch_formats.py. A step of ``fastopt.torch.AdamW``
with 8-bit state is, per (group, dtype, format) bucket, one functional list
call: the parameters with at least ``min_8bit_size`` elements take
``fastopt.Int8State`` buffers (over the memory of their ``state[p]["exp_avg"]``
codes and ``state[p]["exp_avg_absmax"]`` tensors), the smaller ones float32
buffers, in a call of their own. The reference makes those calls itself on a
twin model (same start, same batches) with the numpy backend; while every step
matches, the twins see the same gradients, so parameters, codes, absmax, float32
state and master copies must be equal bit for bit at every step. The
optimizer runs on each host backend whose ``run_mixed`` takes 8-bit state
(skipped, with the reason, where not), so the numba run is bitwise the numpy
one. The other rules are checked against the host flat optimizers
(``fastopt.<Rule>(flat, state_dtype="int8")``), whose 8-bit state is tested in
test_optimizer_formats.py: a tensor's blocks are those of its flat buffer.

The model: Linear(64, 64) (a 64x64 weight: 4096 elements, 16 blocks of 256),
Tanh, Linear(64, 18) (1152 elements: 4 blocks and a short one), LayerNorm(18);
with ``min_8bit_size=1024`` the two weights are 8-bit and the four vectors
(64, 18, 18, 18 elements) keep float32 state.
"""
from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt import formats  # noqa: E402
from fastopt.formats import Int8State  # noqa: E402

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.999), 1e-8, 0.01
MIN = 1024  # min_8bit_size: the weights (4096, 1152 elements) are 8-bit, the vectors not
STEPS = 20


def _backends():
    out = []
    for name in ("numpy", "numba", "c"):
        info = fastopt.backends()[name]
        reason = None
        if not info.available:
            reason = f"the {name} backend is unavailable here: {info.reason}"
        elif formats.INT8 not in getattr(fastopt.dispatch.get_backend(name), "mixed_formats", ()):
            reason = f"the {name} backend does not run 8-bit state (mixed_formats) yet"
        out.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return out


BACKENDS = _backends()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (see conftest.py)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend fastopt.torch steps with (FASTOPT_BACKEND); numpy unless parametrized."""
    name = getattr(request, "param", "numpy")
    monkeypatch.setenv("FASTOPT_BACKEND", name)
    fastopt.dispatch.refresh_environment()
    yield name
    monkeypatch.delenv("FASTOPT_BACKEND")
    fastopt.dispatch.refresh_environment()


def with_backends(fn):
    return pytest.mark.parametrize("backend", BACKENDS, indirect=True)(fn)


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 18),
                               torch.nn.LayerNorm(18)).to(dtype)


_gen = torch.Generator().manual_seed(1)
X = torch.randn(64, 64, generator=_gen)
Y = torch.randn(64, 18, generator=_gen)
BATCHES = torch.randint(0, 64, (40, 16), generator=_gen)


def backward(model, t):
    for p in model.parameters():
        p.grad = None
    dtype = model[0].weight.dtype
    loss = torch.nn.functional.mse_loss(model(X[BATCHES[t]].to(dtype)).float(), Y[BATCHES[t]])
    loss.backward()
    return loss.item()


def array(t):
    t = t.detach()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype is torch.bfloat16 else t.numpy()


def bits(t):
    t = t.detach()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a, b, what):
    a, b = (torch.from_numpy(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in (a, b))
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(bits(a), bits(b)), what


class FunctionalInt8AdamW:
    """The reference: ``fastopt.adamw_`` on the numpy backend, per step one list call
    over the 8-bit parameters (Int8State buffers: exp_avg signed, exp_avg_sq unsigned)
    and one over the others (float32 buffers), each in the model's order, as the
    adapter's contract says; float32 master copies of 16-bit parameters when ``master``."""

    def __init__(self, model, master=False, seed=0, min_8bit_size=MIN):
        self.params = list(model.parameters())
        self.eight = [p.numel() >= min_8bit_size for p in self.params]
        self.seed, self.t = seed, 0
        self.exp_avg = [Int8State.zeros(tuple(p.shape), True) if e else np.zeros(tuple(p.shape), np.float32)
                        for p, e in zip(self.params, self.eight)]
        self.exp_avg_sq = [Int8State.zeros(tuple(p.shape), False) if e else np.zeros(tuple(p.shape), np.float32)
                           for p, e in zip(self.params, self.eight)]
        low = (torch.bfloat16, torch.float16)
        self.master = [p.detach().float().clone().numpy() if master and p.dtype in low else None
                       for p in self.params]

    def step(self):
        self.t += 1
        for eight in (True, False):
            ks = [k for k, e in enumerate(self.eight) if e is eight]
            masters = [self.master[k] for k in ks] if self.master[ks[0]] is not None else None
            fastopt.adamw_([array(self.params[k]) for k in ks], [array(self.params[k].grad) for k in ks],
                           [self.exp_avg[k] for k in ks], [self.exp_avg_sq[k] for k in ks], step=self.t, lr=LR,
                           betas=BETAS, eps=EPS, weight_decay=WD, master_param=masters, rounding_seed=self.seed,
                           backend="numpy")


def assert_twins(model, opt, twin, ref, what):
    for k, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_bitwise(p, q, f"{what}: parameter {k}")
        state = opt.state[p]
        for key, buf in (("exp_avg", ref.exp_avg[k]), ("exp_avg_sq", ref.exp_avg_sq[k])):
            if ref.eight[k]:
                assert state[key].dtype is torch.uint8 and state[key + "_absmax"].dtype is torch.float32
                assert_bitwise(state[key], buf.codes, f"{what}: {key} codes {k}")
                assert_bitwise(state[key + "_absmax"], buf.absmax, f"{what}: {key}_absmax {k}")
            else:
                assert key + "_absmax" not in state
                assert_bitwise(state[key], buf, f"{what}: {key} {k}")
        if ref.master[k] is not None:
            assert_bitwise(state["master_param"], ref.master[k], f"{what}: master_param {k}")
        else:
            assert "master_param" not in state
        assert int(state["step"]) == ref.t


def train_twins(model, opt, twin, ref, steps):
    for t in range(steps):
        backward(model, t)
        backward(twin, t)
        opt.step()
        ref.step()
        assert_twins(model, opt, twin, ref, f"step {t + 1}")


# ---- bit for bit: the functional calls with Int8State -------------------------------------------


@with_backends
def test_adamw_int8_is_the_functional_update(backend):
    """float32 model, one group: the weights 8-bit, the vectors float32 state (two calls
    a step); on every backend bitwise the numpy functional calls, so numba's run is numpy's."""
    model, twin = net(), net()
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype="int8",
                   min_8bit_size=MIN)
    ref = FunctionalInt8AdamW(twin)
    train_twins(model, opt, twin, ref, STEPS)
    weight = model[0].weight
    assert opt.state[weight]["exp_avg_absmax"].shape == (16,) and opt.state[model[2].weight]["exp_avg_absmax"].shape \
        == (5,)
    assert float(opt.state[weight]["exp_avg_sq_absmax"].min()) > 0  # (the state moved: real 8-bit values)
    exp_avg = Int8State(opt.state[weight]["exp_avg"].numpy(), opt.state[weight]["exp_avg_absmax"].numpy(), True)
    assert (exp_avg.dequantize() < 0).any() and (exp_avg.dequantize() > 0).any()


@with_backends
@pytest.mark.parametrize("dtype,master", [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float16, True)],
                         ids=["bf16-master", "bf16-stochastic", "fp16-master"])
def test_16_bit_parameters_with_int8_state(backend, dtype, master):
    model, twin = net(dtype), net(dtype)
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype="int8",
                   min_8bit_size=MIN, master_weights=master, rounding_seed=5)
    ref = FunctionalInt8AdamW(twin, master=master, seed=5)
    train_twins(model, opt, twin, ref, 12)
    if master:
        for p in model.parameters():
            assert_bitwise(p, opt.state[p]["master_param"].to(dtype), "the parameter is its master's nearest value")


def test_torch_int8_spelling_and_min_8bit_size_default(backend):
    """``torch.int8`` is the same option; the default min_8bit_size is 4096 (>=: a 64x64
    weight is 8-bit, a 4095-element one not); min_8bit_size=0: every parameter 8-bit."""
    params = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4095)),
              torch.nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = ft.AdamW(params, state_dtype=torch.int8)
    opt.step()
    assert opt.state_dtype is torch.int8 and opt.min_8bit_size == 4096
    assert [opt.state[p]["exp_avg"].dtype for p in params] == [torch.uint8, torch.float32, torch.float32]
    every = ft.AdamW(params, state_dtype="int8", min_8bit_size=0)
    every.step()
    assert all(every.state[p]["exp_avg"].dtype is torch.uint8 for p in params)
    assert every.state[params[2]]["exp_avg_absmax"].shape == (1,)
    for twin in (copy.deepcopy(every), pickle.loads(pickle.dumps(every))):
        assert (twin.state_dtype, twin.min_8bit_size) == (torch.int8, 0)
        assert all(twin.state[q]["exp_avg"].dtype is torch.uint8 for q in twin.state)


# ---- the other rules: against the host flat optimizers --------------------------------------------


RULES = [("AdamW", {"lr": 1e-2, "weight_decay": 0.1}), ("Adam", {"lr": 1e-2, "amsgrad": True}),
         ("SGD", {"lr": 0.05, "momentum": 0.9}), ("Lion", {"lr": 1e-3, "weight_decay": 0.1}),
         ("Adagrad", {"lr": 0.1, "initial_accumulator_value": 0.1})]


@with_backends
@pytest.mark.parametrize("name,hyper", RULES, ids=[name for name, _ in RULES])
def test_rules_take_int8_state(backend, name, hyper):
    """Two groups, as bitsandbytes users set them: 64x64 weights (8-bit, the default
    min_8bit_size) and a vector (float32 state). Each tensor is stepped as the host flat
    optimizer steps its flat copy (8-bit blocks are the flat buffer's, in C order);
    the weights' group replays its plan after the first step."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.nn.Parameter(torch.randn(64, 64, generator=gen)) for _ in range(2)]
    bias = torch.nn.Parameter(torch.randn(40, generator=gen))
    opt = getattr(ft, name)([{"params": weights}, {"params": [bias]}], state_dtype="int8", **hyper)
    hosts = [getattr(fastopt, name)(p.detach().clone().reshape(-1).numpy(), state_dtype="int8", **hyper)
             for p in weights] + [getattr(fastopt, name)(bias.detach().clone().numpy(), **hyper)]
    params = [*weights, bias]
    signed = {b.key: b.signed for b in getattr(ft, name).core.rule.buffers}
    functional = {b.key: b.name for b in getattr(ft, name).core.rule.buffers}
    for t in range(8):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g, host in zip(params, grads, hosts):
            p.grad = g
            host.step(g.reshape(-1).numpy())
        opt.step()
        if t == 0:
            plan = opt._plans[0]
            assert isinstance(plan, ft.steps.MixedPlan)
        assert opt._plans[0] is plan
    for k, (p, host) in enumerate(zip(params, hosts)):
        assert_bitwise(p.detach().reshape(-1), host.data, f"{name} parameter {k}")
        state = opt.state[p]
        keys = [key for key in signed if key in state]
        assert keys and len(keys) == len([n for n in host.state[0] if n in functional.values()])
        for key in keys:
            buf = host.state[0][functional[key]]
            if k < 2:
                assert type(buf) is Int8State and buf.signed is signed[key]
                assert_bitwise(state[key].reshape(-1), buf.codes, f"{name} {key} codes")
                assert_bitwise(state[key + "_absmax"], buf.absmax, f"{name} {key}_absmax")
            else:
                assert_bitwise(state[key], buf, f"{name} {key}")
        if opt.saves_step:
            assert int(state["step"]) == 8
        else:
            assert "step" not in state  # (torch.optim.SGD's layout: 8-bit rounding draws no random bits)


# ---- state dicts --------------------------------------------------------------------------------


def _trained(dtype=torch.float32, steps=5, **options):
    model = net(dtype)
    opt = ft.AdamW(model.parameters(), lr=LR, weight_decay=WD, state_dtype="int8", min_8bit_size=MIN, **options)
    for t in range(steps):
        backward(model, t)
        opt.step()
    return model, opt


def _assert_same_state(a, b, what):
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        assert_bitwise(value, b[key], f"{what} {key}")


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
def test_state_dict_round_trip_and_resume_bitwise(backend, dtype, master):
    """Saved and loaded exactly (torch's load would cast the codes and, for a bfloat16
    parameter, the absmax to the parameter's dtype), and the resumed run continues
    as the uninterrupted one."""
    options = dict(master_weights=master, rounding_seed=4)
    model, opt = _trained(dtype, **options)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    entry = checkpoint["opt"]["state"][0]
    assert entry["exp_avg"].dtype is torch.uint8 and entry["exp_avg_absmax"].dtype is torch.float32
    assert "exp_avg_absmax" not in checkpoint["opt"]["state"][1]
    resumed = net(dtype)
    resumed.load_state_dict(checkpoint["model"])
    again = ft.AdamW(resumed.parameters(), lr=1.0, state_dtype="int8", min_8bit_size=MIN, **options)
    again.load_state_dict(checkpoint["opt"])
    for p, q in zip(model.parameters(), resumed.parameters()):
        _assert_same_state(opt.state[p], again.state[q], "loaded")
    for t in range(5, 12):
        for m, o in ((model, opt), (resumed, again)):
            backward(m, t)
            o.step()
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert_bitwise(p, q, "resumed parameter")
        _assert_same_state(opt.state[p], again.state[q], "resumed")


def test_state_dict_fp32_is_what_torch_optim_loads(backend):
    model, opt = _trained()
    live = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    sd = opt.state_dict_fp32()
    for k, p in enumerate(model.parameters()):
        entry = sd["state"][k]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            assert entry[key].dtype is torch.float32 and entry[key].shape == p.shape
            if p.numel() >= MIN:
                values = Int8State(opt.state[p][key].numpy(), opt.state[p][key + "_absmax"].numpy(),
                                   signed).dequantize()
                assert_bitwise(entry[key], values, key)
            else:
                assert entry[key] is opt.state[p][key]  # (float32 as it is, as state_dict() gives it)
    for p, s in opt.state.items():  # the optimizer's own state is unchanged
        _assert_same_state(s, live[p], "live")
    float_model = net()
    theirs = torch.optim.AdamW(float_model.parameters(), lr=LR, weight_decay=WD)
    theirs.load_state_dict(sd)
    backward(float_model, 0)
    theirs.step()
    weight = float_model[0].weight
    assert int(theirs.state[weight]["step"]) == 6 and theirs.state[weight]["exp_avg"].dtype is torch.float32


def test_loading_float_state_quantizes_and_8bit_state_into_float_state_dequantizes(backend):
    model = net()
    theirs = torch.optim.AdamW(model.parameters(), lr=LR)
    for t in range(4):
        backward(model, t)
        theirs.step()
    saved = copy.deepcopy(theirs.state_dict())
    for dtype in (torch.float32, torch.bfloat16):  # (a bfloat16 model's uint8 codes are not cast)
        eight = ft.AdamW(net(dtype).parameters(), state_dtype="int8", min_8bit_size=MIN, master_weights=True)
        eight.load_state_dict(copy.deepcopy(saved))
        for k, p in enumerate(eight.param_groups[0]["params"]):
            state = eight.state[p]
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                value = saved["state"][k][key]
                if p.numel() >= MIN:
                    q = Int8State.from_float(value.numpy(), signed)
                    assert_bitwise(state[key], q.codes, f"{key} codes")
                    assert_bitwise(state[key + "_absmax"], q.absmax, f"{key} absmax")
                else:
                    assert_bitwise(state[key], value, key)  # (float32 state: exactly)
    resumed = net()
    eight = ft.AdamW(resumed.parameters(), state_dtype="int8", min_8bit_size=MIN)
    eight.load_state_dict(copy.deepcopy(saved))
    backward(resumed, 4)
    eight.step()  # and it steps on
    assert int(eight.state[resumed[0].weight]["step"]) == 5
    # 8-bit state into float state (state_dtype=None, or a larger min_8bit_size): dequantized.
    _, opt = _trained()
    sd = copy.deepcopy(opt.state_dict())
    for options in ({}, {"state_dtype": "int8", "min_8bit_size": 10 ** 6}):
        plain = ft.AdamW(net().parameters(), **options)
        plain.load_state_dict(copy.deepcopy(sd))
        for k, p in enumerate(plain.param_groups[0]["params"]):
            state = plain.state[p]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                entry = sd["state"][k]
                want = Int8State(entry[key].numpy(), entry[key + "_absmax"].numpy(), signed).dequantize() \
                    if key + "_absmax" in entry else entry[key]
                assert_bitwise(state[key], want, key)


# ---- bad input: clear errors, nothing written ----------------------------------------------------


def test_bad_options():
    params = list(net().parameters())
    for options, error, message in [
            (dict(min_8bit_size=-1), ValueError, r"min_8bit_size must be an int >= 0, got -1"),
            (dict(min_8bit_size=1.5), TypeError, r"min_8bit_size must be an int >= 0 .*got float 1.5"),
            (dict(min_8bit_size=True), TypeError, r"min_8bit_size must be an int >= 0 .*got bool"),
            (dict(min_8bit_size="4096"), TypeError, r"min_8bit_size must be an int"),
            (dict(state_dtype="int4"), ValueError, r"state_dtype must be None, .*'int8'.*got 'int4'"),
            (dict(state_dtype=torch.uint8), ValueError, r"state_dtype must be .*torch.uint8")]:
        with pytest.raises(error, match=message):
            ft.AdamW(params, state_dtype=options.pop("state_dtype", "int8"), **options)
    for name in ("LAMB", "LARS"):
        with pytest.raises(TypeError, match=rf"state_dtype='int8': fastopt.torch.{name} steps float32 or float64 "
                                            r"state only \(a two-pass rule has no 8-bit"):
            getattr(ft, name)(params, lr=0.1, state_dtype="int8", min_8bit_size=10 ** 6)  # (small ones too)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is float64.*state_dtype='int8' "
                                         "needs float32, bfloat16 or float16"):
        ft.AdamW(net(torch.float64).parameters(), state_dtype="int8")
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is a torch.float16 tensor: .*"
                                        r"master_weights=True"):
        ft.AdamW(net(torch.float16).parameters(), state_dtype="int8")
    opt = ft.AdamW(params, state_dtype="int8")
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] is float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1  # (not added)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_refused():
    with pytest.raises(TypeError, match="CUDA tensor with state_dtype='int8'.*CPU tensors only"):
        ft.AdamW(net().cuda().parameters(), state_dtype="int8", min_8bit_size=10 ** 6)  # (small ones too)


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for p, p0 in zip(model.parameters(), params):
        assert_bitwise(p, p0, "parameter")
    assert opt.state.keys() == state.keys()
    for p, s in opt.state.items():
        _assert_same_state(s, state[p], "state")


def test_bad_state_raises_before_anything_is_written(backend):
    model, opt = _trained(steps=1)
    weight = model[2].weight  # (18, 64): 5 blocks
    state = opt.state[weight]
    where = r"param_groups\[0\]\['params'\]\[2\]"
    cases = [("exp_avg", state["exp_avg"].float(), TypeError,
              rf"state\['exp_avg'\] of {where} is a torch.float32 tensor; expected a torch.uint8 tensor \(8-bit codes"),
             ("exp_avg", state["exp_avg"][:4], ValueError,
              rf"state\['exp_avg'\] of {where} has shape \(4, 64\) on cpu; expected a contiguous \(18, 64\)"),
             ("exp_avg", state["exp_avg"].t().contiguous().t(), ValueError, r"\(not contiguous\)"),
             ("exp_avg_absmax", state["exp_avg_absmax"][:4], ValueError,
              rf"state\['exp_avg_absmax'\] of {where} has shape \(4,\) on cpu; expected a contiguous \(5,\)"),
             ("exp_avg_absmax", state["exp_avg_absmax"].double(), TypeError,
              rf"state\['exp_avg_absmax'\] of {where} is a torch.float64 tensor; expected a torch.float32"),
             ("exp_avg_sq_absmax", None, ValueError,
              rf"state\['exp_avg_sq'\] of {where} holds 8-bit codes, but state\['exp_avg_sq_absmax'\].*missing"),
             ]
    bias = model[2].bias
    backward(model, 1)
    for key, bad, error, message in cases:
        snap = _snapshot(model, opt)
        good = state[key]
        if bad is None:
            del state[key]
        else:
            state[key] = bad
        with pytest.raises(error, match=message):
            opt.step()
        state[key] = good
        _assert_unchanged(model, opt, snap)
    good = opt.state[bias]["exp_avg"]  # a small parameter's state is float32
    opt.state[bias]["exp_avg"] = good.to(torch.uint8)
    with pytest.raises(TypeError, match=r"state\['exp_avg'\] of param_groups\[0\]\['params'\]\[3\] is a torch.uint8 "
                                        r"tensor; expected a torch.float32 tensor \(state_dtype='int8': it has "
                                        r"fewer than min_8bit_size=1024 elements"):
        opt.step()
    opt.state[bias]["exp_avg"] = good
    opt.step()  # and it still steps
    assert int(state["step"]) == 2


def test_a_backend_without_8bit_state_is_refused_before_anything_is_written(monkeypatch):
    """A backend whose run_mixed takes no 8-bit state (the c one, until it does): the step
    refuses before any call runs, the float32 ones included."""
    if not fastopt.backends()["c"].available:
        pytest.skip("the c backend is unavailable here")
    monkeypatch.setattr(fastopt.dispatch.get_backend("c"), "mixed_formats", (0, 1, 2))
    monkeypatch.setenv("FASTOPT_BACKEND", "c")
    fastopt.dispatch.refresh_environment()
    try:
        model = net()
        opt = ft.AdamW(model.parameters(), state_dtype="int8", min_8bit_size=MIN)
        backward(model, 0)
        snap = _snapshot(model, opt)
        with pytest.raises(TypeError, match="the c backend does not run updates with 8-bit state yet"):
            opt.step()
        params, _ = snap
        for p, p0 in zip(model.parameters(), params):
            assert_bitwise(p, p0, "parameter")
    finally:
        monkeypatch.delenv("FASTOPT_BACKEND")
        fastopt.dispatch.refresh_environment()


def test_bad_state_dicts_raise_before_anything_changes(backend):
    model, opt = _trained()
    snap = _snapshot(model, opt)
    at = r"state_dict\['state'\]\[0\]"
    cases = [(lambda e: e.update(exp_avg=e["exp_avg"][:32]), ValueError,
              rf"{at}\['exp_avg'\] has shape \(32, 64\), expected \(64, 64\) \(the parameter's: one 8-bit code"),
             (lambda e: e.update(exp_avg_absmax=e["exp_avg_absmax"][:15]), ValueError,
              rf"{at}\['exp_avg_absmax'\] has shape \(15,\), expected \(16,\) \(one absmax per block of 256"),
             (lambda e: e.update(exp_avg_sq_absmax=torch.zeros(17)), ValueError,
              rf"{at}\['exp_avg_sq_absmax'\] has shape \(17,\), expected \(16,\)"),
             (lambda e: e.update(exp_avg_absmax=e["exp_avg_absmax"].double()), TypeError,
              rf"{at}\['exp_avg_absmax'\] must be a torch.float32 tensor, got a torch.float64 tensor"),
             (lambda e: e.update(exp_avg=e["exp_avg"].float()), TypeError,
              rf"{at}\['exp_avg'\] must be a torch.uint8 tensor \(8-bit codes, with 'exp_avg_absmax'\)"),
             (lambda e: e.pop("exp_avg_absmax"), ValueError,
              rf"{at}\['exp_avg'\] is 8-bit codes \(torch.uint8\), but {at} has no 'exp_avg_absmax'"),
             (lambda e: e.pop("exp_avg"), ValueError, rf"{at} has 'exp_avg_absmax' but no 'exp_avg'"),
             (lambda e: e.update(exp_avg_max=torch.zeros(16)), ValueError, r"unknown key 'exp_avg_max'")]
    for mutate, error, message in cases:
        sd = copy.deepcopy(opt.state_dict())
        mutate(sd["state"][0])
        with pytest.raises(error, match=message):
            opt.load_state_dict(sd)
        _assert_unchanged(model, opt, snap)


def test_dtensor_parameters_are_refused():
    """8-bit absmax blocks are per local shard, which a DTensor state could not reshard."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, and no process group in this process")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = DeviceMesh("cpu", [0])
        p = torch.nn.Parameter(distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)]))
        with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is a DTensor \(FSDP2\) with "
                                            "state_dtype='int8': fastopt.torch keeps 8-bit state for plain"):
            ft.AdamW([p], state_dtype="int8", min_8bit_size=10 ** 6)  # (small ones too)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,options", [(torch.float32, {}), (torch.bfloat16, {"master_weights": True})],
                         ids=["fp32", "bf16-master"])
def test_a_group_of_8bit_and_float32_state_replays_its_calls_bitwise(dtype, options):
    """The usual group (weights with 8-bit state, vectors under min_8bit_size with float32
    state) makes two calls a step: it replays them as one GroupPlan, bitwise the general
    path (a twin whose plans are dropped before every step); a frozen bias that gets a
    gradient again makes the step go the general way, and it is stepped."""
    models = [net(dtype), net(dtype)]
    opts = [ft.AdamW(m.parameters(), state_dtype="int8", min_8bit_size=MIN, **options) for m in models]
    for t in range(12):
        opts[1]._plans.clear()
        for m, o in zip(models, opts):
            backward(m, t)
            if t in (3, 4, 5):
                m[2].bias.grad = None  # (frozen for three steps)
            o.step()
        if t in (1, 7):  # (made at steps 1 and 7, after the bias froze and thawed; replayed after)
            plan = opts[0]._plans[0]
            # (3 calls after the thaw: the bias counts its own steps)
            assert type(plan).__name__ == "GroupPlan" and len(plan.plans) == (2 if t == 1 else 3)
        if t in (2, 8, 11):
            assert opts[0]._plans[0] is plan
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert_bitwise(p, q, "parameter")
        assert opts[0].state[p].keys() == opts[1].state[q].keys()
        for key, value in opts[0].state[p].items():
            assert_bitwise(value, opts[1].state[q][key], key)
    assert int(opts[0].state[models[0][2].bias]["step"]) == 9  # (12 steps, 3 without a gradient)
