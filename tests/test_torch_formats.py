"""fastopt.torch on bfloat16 and float16 models: ``state_dtype``, ``master_weights``, ``rounding_seed``.

Bitwise tests. A step of ``fastopt.torch.AdamW`` is, per (group, dtype) bucket,
one functional list call (``fastopt.adamw_([p...], [g...], [m...], [v...],
step=t, master_param=[...], rounding_seed=s)``) on NumPy views of the model's
tensors. Each test trains the model with the optimizer and a twin (same start,
same batches) with those functional calls made here, on the twin's own
arrays; while every step matches, the twins see the same gradients, so the
parameters, master copies and state must be equal bit for bit at every step
(stochastic rounding included: its bits depend only on the seed, the step,
the tensor's position in its call and the element). Run on each host backend
whose ``run_mixed`` exists (skipped, with the reason, where it does not).

Tolerance of the comparisons with ``torch.optim.AdamW`` on a float32 copy
(``test_loss_tracks_float32_adamw``). The bf16 model's forward and backward
run in bfloat16 (8-bit mantissa, a relative rounding error up to 2^-9 ~= 0.2%
per operation, on inputs, weights and activations), so its loss is not the
float32 model's even at equal weights: at step 0 the two differ by ~0.1%.
With master weights the update is float32 AdamW's, rounded once into the
parameter, and the runs stay close (measured maximum per-step relative
difference of the loss over 100 steps: 0.13%, 0.11% with bfloat16 state); with
a bfloat16 parameter rounded stochastically (no master copy) each step adds a
rounding error of up to an ulp (2^-8 relative) that random-walks, measured
0.32% (0.30% with bfloat16 state). The checks are 1% and 2% (8x and 6x the
measured), and the loss falls by 26% over those steps (13x the larger
tolerance; checked, > 20%), so an optimizer that did not train, or diverged,
fails. The update's arithmetic itself is checked bit for bit above.
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

STEPS = 100
LR, BETAS, EPS, WD = 3e-3, (0.9, 0.999), 1e-8, 0.01


def _backends():
    """The host backends, each skipped (with the reason) where it cannot run mixed-format calls."""
    out = []
    for name in ("numpy", "numba", "c"):
        info = fastopt.backends()[name]
        reason = None
        if not info.available:
            reason = f"the {name} backend is unavailable here: {info.reason}"
        elif getattr(fastopt.dispatch.get_backend(name), "run_mixed", None) is None:
            reason = f"the {name} backend has no run_mixed (no bfloat16/float16 calls) yet"
        out.append(pytest.param(name, marks=pytest.mark.skip(reason=reason)) if reason else name)
    return out


BACKENDS = _backends()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (see conftest.py)


@pytest.fixture
def backend(request, monkeypatch):
    """The backend fastopt.torch steps with (through FASTOPT_BACKEND, as its users choose one)."""
    monkeypatch.setenv("FASTOPT_BACKEND", request.param)
    fastopt.dispatch.refresh_environment()
    yield request.param
    monkeypatch.delenv("FASTOPT_BACKEND")
    fastopt.dispatch.refresh_environment()


def with_backends(fn):
    return pytest.mark.parametrize("backend", BACKENDS, indirect=True)(fn)


def mlp(dtype=torch.bfloat16, last=None):
    """A small MLP in ``dtype`` (its last layer in ``last``, when given: a mixed model)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 4)).to(dtype)
    if last is not None:
        model[4].to(last)
    return model


_gen = torch.Generator().manual_seed(1)
X = torch.randn(256, 8, generator=_gen)
Y = torch.sin(2 * X[:, :4]) + 0.1 * torch.randn(256, 4, generator=_gen)
BATCHES = torch.randint(0, 256, (STEPS, 32), generator=_gen)


def backward(model, t):
    """The gradients of batch ``t``'s loss (computed in the first layer's dtype); returns the loss."""
    for p in model.parameters():
        p.grad = None
    x = X[BATCHES[t]].to(model[0].weight.dtype)
    h = model[3](model[2](model[1](model[0](x))))
    loss = torch.nn.functional.mse_loss(model[4](h.to(model[4].weight.dtype)).float(), Y[BATCHES[t]])
    loss.backward()
    return loss.item()


def array(t):
    """A NumPy view of a CPU tensor's memory (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype is torch.bfloat16 else t.numpy()


def bits(t):
    """A tensor's bits, to compare bit for bit (NaNs included)."""
    t = t.detach()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(bits(a), bits(b)), what


class FunctionalAdamW:
    """The reference: AdamW through the functional API, one list call per dtype of
    parameter (in the model's order), as the adapter's documented contract says,
    with state of ``state_dtype`` (None: float32 for 16-bit parameters) and float32
    master copies of the 16-bit parameters when ``master``."""

    def __init__(self, model, backend, state_dtype=None, master=False, seed=0, lr=LR):
        self.params = list(model.parameters())
        self.backend, self.seed, self.lr = backend, seed, lr
        low = (torch.bfloat16, torch.float16)

        def state(p):
            dtype = state_dtype or (torch.float32 if p.dtype in low else p.dtype)
            return torch.zeros(p.shape, dtype=dtype)
        self.exp_avg = [state(p) for p in self.params]
        self.exp_avg_sq = [state(p) for p in self.params]
        self.master = [p.detach().float().clone() if master and p.dtype in low else None for p in self.params]
        self.t = 0

    def step(self, grad_multiplier=1.0):
        self.t += 1
        for dtype in dict.fromkeys(p.dtype for p in self.params):
            ks = [k for k, p in enumerate(self.params) if p.dtype is dtype]
            masters = [array(self.master[k]) for k in ks] if self.master[ks[0]] is not None else None
            fastopt.adamw_([array(self.params[k]) for k in ks], [array(self.params[k].grad) for k in ks],
                           [array(self.exp_avg[k]) for k in ks], [array(self.exp_avg_sq[k]) for k in ks],
                           step=self.t, lr=self.lr, betas=BETAS, eps=EPS, weight_decay=WD,
                           master_param=masters, rounding_seed=self.seed, grad_multiplier=grad_multiplier,
                           backend=self.backend)


def assert_twins(model, opt, ref_model, ref, what):
    for k, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
        assert_bitwise(p, q, f"{what}: parameter {k}")
        state = opt.state[p]
        assert_bitwise(state["exp_avg"], ref.exp_avg[k], f"{what}: exp_avg {k}")
        assert_bitwise(state["exp_avg_sq"], ref.exp_avg_sq[k], f"{what}: exp_avg_sq {k}")
        if ref.master[k] is not None:
            assert_bitwise(state["master_param"], ref.master[k], f"{what}: master_param {k}")
        else:
            assert "master_param" not in state
        assert int(state["step"]) == ref.t


def train_twins(model, opt, ref_model, ref, steps):
    for t in range(steps):
        backward(model, t)
        backward(ref_model, t)
        opt.step()
        ref.step()
        assert_twins(model, opt, ref_model, ref, f"step {t + 1}")


# ---- bit for bit: the functional calls ------------------------------------------------------


@with_backends
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("state_dtype", [None, "bfloat16"], ids=["fp32-state", "bf16-state"])
def test_master_weights_are_the_functional_update(backend, dtype, state_dtype):
    model, twin = mlp(dtype), mlp(dtype)
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, master_weights=True,
                   state_dtype=state_dtype, rounding_seed=7)
    ref = FunctionalAdamW(twin, backend, state_dtype=torch.bfloat16 if state_dtype else None, master=True, seed=7)
    train_twins(model, opt, twin, ref, 20)
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].dtype == (torch.bfloat16 if state_dtype else torch.float32)
        assert state["master_param"].dtype == torch.float32
        assert_bitwise(p, state["master_param"].to(dtype), "the parameter is its master's nearest value")
    assert isinstance(opt._plans[0], ft.steps.MixedPlan)  # (the steps after the first replayed it)


@with_backends
@pytest.mark.parametrize("state_dtype", [None, "bfloat16"], ids=["fp32-state", "bf16-state"])
def test_stochastic_parameter_rounding_is_the_functional_update(backend, state_dtype):
    """A bfloat16 model without master copies: the parameters are rounded stochastically."""
    model, twin = mlp(), mlp()
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype=state_dtype,
                   rounding_seed=2 ** 64 - 1)
    ref = FunctionalAdamW(twin, backend, state_dtype=torch.bfloat16 if state_dtype else None, seed=2 ** 64 - 1)
    train_twins(model, opt, twin, ref, 20)
    other = mlp()  # another seed draws other bits
    opt = ft.AdamW(other.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, state_dtype=state_dtype)
    for t in range(20):
        backward(other, t)
        opt.step()
    assert any(not torch.equal(bits(p), bits(q)) for p, q in zip(model.parameters(), other.parameters()))


@with_backends
def test_a_model_mixing_float32_and_bfloat16(backend):
    """A float32 head on a bfloat16 body: one call per dtype; master copies only for
    the bfloat16 parameters; bfloat16 state for all (float32 parameters too)."""
    model, twin = mlp(last=torch.float32), mlp(last=torch.float32)
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, master_weights=True,
                   state_dtype="bfloat16", rounding_seed=3)
    ref = FunctionalAdamW(twin, backend, state_dtype=torch.bfloat16, master=True, seed=3)
    train_twins(model, opt, twin, ref, 15)
    dtypes = [p.dtype for p in model.parameters()]
    assert dtypes == [torch.bfloat16] * 4 + [torch.float32] * 2
    assert [("master_param" in opt.state[p]) for p in model.parameters()] == [True] * 4 + [False] * 2
    assert all(opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in model.parameters())


@with_backends
def test_a_float32_model_with_master_weights_is_the_plain_float32_step(backend):
    """master_weights=True has nothing to do for float32 parameters: bitwise the default."""
    models = [mlp(torch.float32), mlp(torch.float32)]
    opts = [ft.AdamW(models[0].parameters(), lr=LR, master_weights=True), ft.AdamW(models[1].parameters(), lr=LR)]
    for t in range(10):
        for m, o in zip(models, opts):
            backward(m, t)
            o.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert_bitwise(p, q, "float32")
        assert set(opts[0].state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert type(opts[0]._plans[0]) is ft.steps.Plan  # the float32 fast path (a pointer table on c and numba)


@with_backends
def test_float32_gradients_of_bfloat16_parameters(backend):
    """A bfloat16 parameter may have a float32 gradient (``p.grad_dtype = torch.float32``)."""
    model, twin = mlp(), mlp()
    for m in (model, twin):
        for p in m.parameters():
            p.grad_dtype = torch.float32
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, master_weights=True)
    ref = FunctionalAdamW(twin, backend, master=True)
    train_twins(model, opt, twin, ref, 5)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


@with_backends
def test_a_float16_model_under_grad_scaler(backend):
    """The classic float16 recipe: master weights and a loss scale. GradScaler hands the
    step its scale (read as the gradients are: grad_multiplier=1/scale) and skips the
    steps whose scaled gradients overflowed; bitwise the functional calls."""
    model, twin = mlp(torch.float16), mlp(torch.float16)
    opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, master_weights=True)
    ref = FunctionalAdamW(twin, backend, master=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    poison, scales = {4, 9}, []
    for t in range(14):
        for m in (model, twin):
            for p in m.parameters():
                p.grad = None
            x = X[BATCHES[t]].half()
            loss = torch.nn.functional.mse_loss(m(x).float(), Y[BATCHES[t]])
            scaler.scale(loss).backward()
            if t in poison:
                m[2].weight.grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if t not in poison:
            ref.step(grad_multiplier=1.0 / scale)
        scales.append(scaler.get_scale())
        assert_twins(model, opt, twin, ref, f"step {t + 1}")
    assert len(set(scales)) > 1 and opt.skipped_steps == len(poison)  # backed off at the Infs, grew in between


@with_backends
@pytest.mark.parametrize("name,options", [("AdamW", {"amsgrad": True}), ("SGD", {"lr": 0.05, "momentum": 0.9}),
                                          ("Lion", {"lr": 1e-4}), ("NAdam", {"lr": 1e-2}), ("Adagrad", {})])
def test_replayed_steps_are_bitwise_the_general_path(backend, name, options):
    """A bfloat16 group replays its plan (a MixedPlan, with arrays); a twin whose plans
    are dropped before every step takes the general path."""
    models = [mlp(), mlp()]
    opts = [getattr(ft, name)(m.parameters(), state_dtype="bfloat16", master_weights=True, rounding_seed=11,
                              **options) for m in models]
    for t in range(12):
        opts[1]._plans.clear()
        for m, o in zip(models, opts):
            backward(m, t)
            o.step()
        if t == 0:
            plan = opts[0]._plans[0]
        assert opts[0]._plans[0] is plan
    assert plan.prepared is not None  # (the replays ran its prepared update, fastopt.functional.PreparedMixed)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert_bitwise(p, q, name)
        assert opts[0].state[p].keys() == opts[1].state[q].keys()
        for key, value in opts[0].state[p].items():
            assert_bitwise(value, opts[1].state[q][key], f"{name} {key}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16-master", "fp32"])
@pytest.mark.parametrize("alias", ["another parameter", "a state buffer", "another gradient"])
def test_a_replayed_step_with_an_aliasing_gradient_raises_before_writing(alias, dtype):
    """A replayed bfloat16 plan checks only what a new gradient can change, its overlap
    with every other buffer of the call included: an aliasing gradient sends its group
    down the general path, whose calls are all checked before the first one runs, so
    the step raises naming the overlap and no group is written (group 0, replayed and
    fine, is not written either)."""
    torch.manual_seed(3)
    layers = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
    model = torch.nn.Sequential(*layers).to(dtype)
    params = list(model.parameters())
    low = dtype is torch.bfloat16
    opt = ft.AdamW([{"params": params[:1]}, {"params": params[1:]}], master_weights=low)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    if low:
        assert all(plan.prepared is not None for plan in opt._plans.values())
    state = opt.state[params[0]]
    buffer = opt.state[params[1]]["master_param" if low else "exp_avg"]
    params[2].grad = {"another parameter": params[1].data,
                      "a state buffer": buffer.view(-1).view(dtype)[:64].view(8, 8),
                      "another gradient": params[1].grad}[alias]
    before = [t.clone() for p in params for t in (p.detach(), *opt.state[p].values())]
    with pytest.raises(ValueError, match="overlaps"):
        opt.step()
    after = [t for p in params for t in (p.detach(), *opt.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and int(state["step"]) == 3


@with_backends
def test_sgd_counts_steps_when_it_rounds_stochastically(backend):
    """torch.optim.SGD keeps no step, but stochastic rounding draws its bits by step:
    with bfloat16 state SGD counts steps in state['step'] (and, without, keeps torch's layout)."""
    model, twin = mlp(), mlp()
    opt = ft.SGD(model.parameters(), lr=0.05, momentum=0.9, state_dtype="bfloat16", master_weights=True)
    params = list(twin.parameters())
    bufs = [torch.zeros(p.shape, dtype=torch.bfloat16) for p in params]
    masters = [p.detach().float().clone() for p in params]
    for t in range(1, 8):
        backward(model, t)
        backward(twin, t)
        opt.step()
        fastopt.sgd_([array(p) for p in params], [array(p.grad) for p in params], [array(b) for b in bufs], step=t,
                     lr=0.05, momentum=0.9, master_param=[array(m) for m in masters], backend=backend)
    for k, p in enumerate(model.parameters()):
        assert int(opt.state[p]["step"]) == 7
        assert_bitwise(opt.state[p]["momentum_buffer"], bufs[k], "momentum_buffer")
        assert_bitwise(p, params[k], "param")
    plain = ft.SGD(model.parameters(), lr=0.05, momentum=0.9, master_weights=True)  # nothing stochastic
    backward(model, 0)
    plain.step()
    assert set(plain.state_dict()["state"][0]) == {"momentum_buffer", "master_param"}


# ---- training: against torch.optim.AdamW in float32 (tolerance: see the module docstring) ----


@pytest.mark.parametrize("options,tol", [({"master_weights": True}, 0.01),
                                         ({"master_weights": True, "state_dtype": "bfloat16"}, 0.01),
                                         ({}, 0.02), ({"state_dtype": "bfloat16"}, 0.02)],
                         ids=["master", "master-bf16-state", "stochastic", "stochastic-bf16-state"])
def test_loss_tracks_float32_adamw(options, tol, monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    fastopt.dispatch.refresh_environment()
    try:
        reference, model = mlp(torch.float32), mlp()
        ref = torch.optim.AdamW(reference.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
        opt = ft.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **options)
        ours, theirs = [], []
        for t in range(STEPS):
            for m, o, losses in ((model, opt, ours), (reference, ref, theirs)):
                losses.append(backward(m, t))
                o.step()
    finally:
        monkeypatch.delenv("FASTOPT_BACKEND")
        fastopt.dispatch.refresh_environment()
    worst = max(abs(a - b) / b for a, b in zip(ours, theirs))
    assert worst <= tol, f"the bf16 run's loss left float32 AdamW's by {worst:.1%}"
    first, last = np.mean(theirs[:10]), np.mean(theirs[-10:])
    assert last < 0.8 * first  # it trained: the tolerance is far below what training moved
    assert np.mean(ours[-10:]) < 0.8 * np.mean(ours[:10])
    want = torch.bfloat16 if "state_dtype" in options else torch.float32
    assert all(s["exp_avg"].dtype == want and s["exp_avg_sq"].dtype == want for s in opt.state.values())


# ---- state dicts ------------------------------------------------------------------------------


def _trained(backend_steps=6, **options):
    model = mlp(last=torch.float32)
    opt = ft.AdamW(model.parameters(), lr=LR, weight_decay=WD, **options)
    for t in range(backend_steps):
        backward(model, t)
        opt.step()
    return model, opt


@with_backends
def test_state_dict_round_trip_and_resume_bitwise(backend):
    options = dict(master_weights=True, state_dtype="bfloat16", rounding_seed=5)
    model, opt = _trained(**options)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    saved = opt.state_dict()
    for k, p in enumerate(model.parameters()):
        entry = saved["state"][k]
        assert entry["exp_avg"].dtype == entry["exp_avg_sq"].dtype == torch.bfloat16
        assert ("master_param" in entry) == (p.dtype is torch.bfloat16)
        assert p.dtype is torch.float32 or entry["master_param"].dtype == torch.float32
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = mlp(last=torch.float32)
    resumed.load_state_dict(checkpoint["model"])
    again = ft.AdamW(resumed.parameters(), lr=1.0, **options)
    again.load_state_dict(checkpoint["opt"])
    for p, q in zip(model.parameters(), resumed.parameters()):  # loaded exactly
        assert opt.state[p].keys() == again.state[q].keys()
        for key, value in opt.state[p].items():
            assert_bitwise(value, again.state[q][key], key)
    for t in range(6, 16):
        for m, o in ((model, opt), (resumed, again)):
            backward(m, t)
            o.step()
    for p, q in zip(model.parameters(), resumed.parameters()):  # and continues as the uninterrupted run
        assert_bitwise(p, q, "resumed parameter")
        for key, value in opt.state[p].items():
            assert_bitwise(value, again.state[q][key], f"resumed {key}")


def test_loading_float32_state_rounds_into_bfloat16_state_and_keeps_float32_state_exact():
    """A torch.optim.AdamW state dict of a float32 model: into bfloat16 state, each buffer
    rounded to nearest even (fastopt.formats' rule); into a bfloat16 model's float32
    state (state_dtype=None), exactly (torch's own load would cast it to bfloat16)."""
    model = mlp(torch.float32)
    theirs = torch.optim.AdamW(model.parameters(), lr=LR)
    for t in range(5):
        backward(model, t)
        theirs.step()
    saved = copy.deepcopy(theirs.state_dict())
    bf16_state = ft.AdamW(mlp(torch.float32).parameters(), state_dtype="bfloat16")
    bf16_state.load_state_dict(copy.deepcopy(saved))
    bf16_model = ft.AdamW(mlp().parameters(), master_weights=True)
    bf16_model.load_state_dict(copy.deepcopy(saved))
    for k, (p, q) in enumerate(zip(bf16_state.state, bf16_model.state)):
        for key in ("exp_avg", "exp_avg_sq"):
            value = saved["state"][k][key]
            nearest = torch.from_numpy(formats.bf16_nearest(value.numpy()).view(np.int16))
            assert torch.equal(bits(bf16_state.state[p][key]), nearest.view(value.shape))
            assert_bitwise(bf16_model.state[q][key], value, key)
        assert "master_param" not in bf16_model.state[q]  # (made from the parameter at its first step)
    # A master copy saved with a bfloat16 parameter loads as float32, exactly.
    model, opt = _trained(master_weights=True)
    other = ft.AdamW(mlp(last=torch.float32).parameters(), master_weights=True)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p, q in zip(opt.state, other.state):
        assert_bitwise(other.state[q]["exp_avg"], opt.state[p]["exp_avg"], "exp_avg")
        if p.dtype is torch.bfloat16:
            assert_bitwise(other.state[q]["master_param"], opt.state[p]["master_param"], "master_param")
    # Loaded without master weights, a saved master copy is dropped.
    plain = ft.AdamW(mlp(last=torch.float32).parameters())
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert not any("master_param" in s for s in plain.state.values())


def test_state_dict_fp32_is_what_torch_optim_loads():
    model, opt = _trained(master_weights=True, state_dtype="bfloat16")
    live = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    sd = opt.state_dict_fp32()
    for k, p in enumerate(model.parameters()):
        entry = sd["state"][k]
        assert set(entry) == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("exp_avg", "exp_avg_sq"):
            assert entry[key].dtype == torch.float32
            assert torch.equal(entry[key], opt.state[p][key].float())
    for p, s in opt.state.items():  # the optimizer's own state is unchanged
        assert all(v.dtype == live[p][k].dtype and torch.equal(v, live[p][k]) for k, v in s.items())
    float_model = mlp(torch.float32)
    theirs = torch.optim.AdamW(float_model.parameters(), lr=LR)
    theirs.load_state_dict(sd)
    backward(float_model, 0)
    theirs.step()
    assert int(theirs.state[next(iter(float_model.parameters()))]["step"]) == 7
    small = mlp()
    sgd = ft.SGD(small.parameters(), lr=0.1, momentum=0.9, state_dtype="bfloat16")
    backward(small, 0)
    sgd.step()
    assert set(sgd.state_dict()["state"][0]) == {"step", "momentum_buffer"}  # (counted for the rounding)
    assert set(sgd.state_dict_fp32()["state"][0]) == {"momentum_buffer"}  # (torch.optim.SGD's layout)


def test_deepcopy_and_pickle_keep_the_options():
    model, opt = _trained(master_weights=True, state_dtype="bfloat16", rounding_seed=9)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (twin.state_dtype, twin.master_weights, twin.rounding_seed) == (torch.bfloat16, True, 9)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch's load goes through __setstate__)
    assert (opt.state_dtype, opt.master_weights, opt.rounding_seed) == (torch.bfloat16, True, 9)


# ---- the model changes after the optimizer is made ----------------------------------------------


def test_casting_the_model_makes_and_drops_master_copies(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    fastopt.dispatch.refresh_environment()
    try:
        model = mlp(torch.float32)
        opt = ft.AdamW(model.parameters(), lr=LR, master_weights=True)
        backward(model, 0)
        opt.step()
        assert not any("master_param" in s for s in opt.state.values())  # nothing to keep for float32
        model.bfloat16()
        backward(model, 1)
        before = [p.detach().float().clone() for p in model.parameters()]
        opt.step()
        for p, p0 in zip(model.parameters(), before):
            state = opt.state[p]
            assert state["exp_avg"].dtype == torch.float32  # (state_dtype=None: float32 for bfloat16)
            assert state["master_param"].dtype == torch.float32
            assert not torch.equal(state["master_param"], p0)  # made from the parameter, then stepped
        model.float()
        backward(model, 2)
        opt.step()
        assert not any("master_param" in s for s in opt.state.values())  # a float32 parameter is its own master
    finally:
        monkeypatch.delenv("FASTOPT_BACKEND")
        fastopt.dispatch.refresh_environment()


def test_clipping_and_skipping_with_bfloat16_gradients(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    fastopt.dispatch.refresh_environment()
    try:
        model = mlp()
        opt = ft.AdamW(model.parameters(), lr=LR, master_weights=True, skip_nonfinite=True)
        backward(model, 0)
        norm = opt.clip_grad_norm_(0.1)
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double())
                                                         for p in model.parameters()]))
        assert norm.dtype == torch.bfloat16  # (as torch's clip_grad_norm_ returns it: the gradients' dtype)
        assert abs(float(norm) - float(expected)) <= 2 ** -8 * float(expected)
        # (the coefficient is computed from the exact norm, in float32)
        assert opt._clip_multiplier == pytest.approx(0.1 / float(expected), rel=1e-5)
        opt.step()
        assert not opt.last_step_skipped
        backward(model, 1)
        model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        assert opt.last_step_skipped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    finally:
        monkeypatch.delenv("FASTOPT_BACKEND")
        fastopt.dispatch.refresh_environment()


# ---- bad input: clear errors, nothing written ------------------------------------------------


def test_bad_options():
    params = list(mlp().parameters())
    cases = [(dict(state_dtype="int4"), ValueError, "state_dtype must be None, 'float32', 'bfloat16'.*'int4'"),
             (dict(state_dtype=torch.float16), ValueError, "state_dtype must be .*torch.float16"),
             (dict(state_dtype=[]), ValueError, r"state_dtype must be .*got \[\]"),
             (dict(master_weights="yes"), TypeError, "master_weights must be a bool"),
             (dict(rounding_seed=-1), ValueError, r"rounding_seed must be an int in \[0, 2\*\*64\), got -1"),
             (dict(rounding_seed=2 ** 64), ValueError, "rounding_seed must be an int"),
             (dict(rounding_seed=1.5), TypeError, "rounding_seed must be an int")]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            ft.AdamW(params, **options)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is a torch.float16 tensor: .*"
                                        r"master_weights=True"):
        ft.AdamW(mlp(torch.float16).parameters())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is float64.*state_dtype='bfloat16'"):
        ft.AdamW(mlp(torch.float64).parameters(), state_dtype="bfloat16")
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is torch.bfloat16: fastopt.torch.LAMB"):
        ft.LAMB(params)
    with pytest.raises(TypeError, match="state_dtype='bfloat16': fastopt.torch.LARS"):
        ft.LARS(mlp(torch.float32).parameters(), lr=0.1, state_dtype="bfloat16")
    opt = ft.AdamW(mlp(torch.float32).parameters())
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] is a torch.float16 tensor"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1  # (not added)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_refused_in_mixed_calls():
    with pytest.raises(TypeError, match="CUDA tensor.*CPU tensors only"):
        ft.AdamW(mlp().cuda().parameters())
    with pytest.raises(TypeError, match="CUDA tensor with state_dtype"):
        ft.AdamW(mlp(torch.float32).cuda().parameters(), state_dtype="bfloat16")


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for p, p0 in zip(model.parameters(), params):
        assert_bitwise(p, p0, "parameter")
    assert opt.state.keys() == state.keys()
    for p, s in opt.state.items():
        assert s.keys() == state[p].keys()
        for k, v in s.items():
            assert_bitwise(v, state[p][k], k)


def test_bad_state_raises_before_anything_is_written(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    fastopt.dispatch.refresh_environment()
    try:
        model = mlp()
        opt = ft.AdamW(model.parameters(), lr=LR, state_dtype="bfloat16", master_weights=True)
        backward(model, 0)
        opt.step()
        third = list(model.parameters())[2]
        state = opt.state[third]
        cases = [("exp_avg", state["exp_avg"].double(), TypeError,
                  r"state\['exp_avg'\] of param_groups\[0\]\['params'\]\[2\] is a torch.float64 tensor; expected a "
                  r"torch.bfloat16 tensor \(state_dtype='bfloat16'\)"),
                 ("exp_avg_sq", 0.0, TypeError,
                  r"state\['exp_avg_sq'\] of param_groups\[0\]\['params'\]\[2\] is a float"),
                 ("master_param", state["master_param"].bfloat16(), TypeError,
                  r"state\['master_param'\] of param_groups\[0\]\['params'\]\[2\] is a torch.bfloat16 tensor; "
                  "expected a torch.float32"),
                 ("master_param", state["master_param"].t(), ValueError,
                  r"state\['master_param'\] of param_groups\[0\]\['params'\]\[2\] has shape \(32, 32\) \(not "
                  r"contiguous\)"),
                 ("master_param", state["master_param"][:4], ValueError, r"has shape \(4, 32\); expected"),
                 ("exp_avg", state["exp_avg"][:4], ValueError, r"exp_avg\[2\]")]  # (the functional API's check)
        backward(model, 1)
        for key, bad, error, message in cases:
            snap = _snapshot(model, opt)
            good = state[key]
            state[key] = bad
            with pytest.raises(error, match=message):
                opt.step()
            state[key] = good
            _assert_unchanged(model, opt, snap)
        third.grad_dtype = None  # (torch refuses a gradient of another dtype unless told)
        good = third.grad
        third.grad = good.double()
        snap = _snapshot(model, opt)
        with pytest.raises(TypeError, match=r"the gradient of param_groups\[0\]\['params'\]\[2\] is a "
                                            r"torch.float64 torch.strided tensor; expected a dense torch.bfloat16 "
                                            r"one, like the parameter \(or float32\)"):
            opt.step()
        _assert_unchanged(model, opt, snap)
        third.grad = good
        opt.step()  # and it still steps
        assert int(state["step"]) == 2
    finally:
        monkeypatch.delenv("FASTOPT_BACKEND")
        fastopt.dispatch.refresh_environment()


def test_bad_state_dicts_raise_before_anything_changes():
    model, opt = _trained(master_weights=True, state_dtype="bfloat16")
    snap = _snapshot(model, opt)
    cases = [(lambda sd: sd["state"][0].update(master_param=torch.zeros(3)), ValueError,
              r"state_dict\['state'\]\[0\]\['master_param'\] has shape \(3,\)"),
             (lambda sd: sd["state"][0].update(master_param=sd["state"][0]["master_param"].long()), TypeError,
              r"\['master_param'\] has dtype torch.int64"),
             (lambda sd: sd["state"][1].update(master=torch.zeros(1)), ValueError, "unknown key 'master'")]
    for mutate, error, message in cases:
        sd = copy.deepcopy(opt.state_dict())
        mutate(sd)
        with pytest.raises(error, match=message):
            opt.load_state_dict(sd)
        _assert_unchanged(model, opt, snap)
