"""fastopt.torch against torch.optim: a small MLP trained 200 steps both ways.

Tolerance. Both runs start from the same weights and see the same batches, so
they differ only by the optimizer arithmetic: the reference backend and
torch's single-tensor path evaluate the same formulas in float32 but not in
the same order (torch fuses some steps, e.g. ``addcdiv``, ``lerp``), so each
update differs by about an ulp of the parameter (2^-23 * |p|, |p| < 2 here).
The difference feeds back through the next gradients; in a stable training
regime it random-walks: sqrt(200 steps) * 1.2e-7 * 2 ~= 3e-6 expected, and
200 * 1.2e-7 * 2 ~= 5e-5 if every step's error had the same sign. Measured
worst case over the cases below: 7e-7. We check ``atol=2e-5, rtol=1e-5``
(30x the measured), and that training moved the weights by far more
(> 0.01, 500x the tolerance), so a wrong coefficient (an error of order lr per step, >= 1e-3)
cannot pass. The options use learning rates at which this MLP trains stably;
``maximize=True`` runs ascend the negated loss (the same descent), since
ascending a loss diverges and a diverging run amplifies any ulp difference
without bound.
"""
from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")

import fastopt  # noqa: E402
import fastopt.torch as ft  # noqa: E402
from fastopt.rules import RULES  # noqa: E402
from oracle import FULL  # noqa: E402

STEPS = 200
TOL = dict(atol=2e-5, rtol=1e-5)

#: Learning rates where the rule's default does not train this MLP stably (centered
#: RMSprop at 1e-2 reaches sqrt of a negative rounding residue: NaN on both sides).
STABLE_LR = {"RMSprop": 1e-3}
#: Options the all-on case keeps at their defaults for the same reason: Rprop's
#: step sizes grow by etaplus per agreeing step, and 1.8 (the varied value) on
#: minibatch gradients diverges on both sides.
STABLE_OPTIONS = {"Rprop": {"etas": (0.5, 1.2)}}


def _mlp_cases():
    """(torch.optim class name, options) from the rule table: each rule that torch has,
    with its defaults and with every option on (oracle.FULL), at the rule's default
    learning rate (SGD, which has none: 0.05) unless STABLE_LR says otherwise."""
    out = []
    for name, rule in RULES.items():
        if getattr(torch.optim, rule.title, None) is None:
            continue
        defaults = {**{h.name: h.default for h in rule.optimizer_hyper}, **rule.defaults}  # (Rprop's lr: an initial value)
        lr = {"lr": STABLE_LR.get(rule.title, defaults["lr"] or 0.05)}
        full = {**FULL[name], **lr, **{h.name: 0.1 for h in rule.optimizer_hyper if h.name not in lr},
                **STABLE_OPTIONS.get(rule.title, {})}
        if "weight_decay" in full:  # 0.1 (L2) outweighs this small regression's loss: it would not train
            full["weight_decay"] = 0.01
        out += [(rule.title, lr), (rule.title, full)]
    return out


MLP_CASES = _mlp_cases()
IDS = [f"{name}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "defaults") for name, o in MLP_CASES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (see conftest.py)


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4)).to(dtype)


_gen = torch.Generator().manual_seed(1)
X = torch.randn(256, 8, generator=_gen)
Y = torch.sin(2 * X[:, :4]) + 0.1 * torch.randn(256, 4, generator=_gen)
BATCHES = torch.randint(0, 256, (STEPS, 32), generator=_gen)


def train(model, opt, steps, start=0, maximize=False, scheduler=None):
    """``steps`` minibatch steps (batches ``start..start+steps-1``); returns the losses."""
    losses = []
    for t in range(start, start + steps):
        opt.zero_grad()
        b = BATCHES[t]
        loss = torch.nn.functional.mse_loss(model(X[b]), Y[b])
        (-loss if maximize else loss).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(model_a, model_b, moved_from=None):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), **TOL)
    if moved_from is not None:
        moved = max((p.detach() - p0).abs().max().item() for p, p0 in zip(model_a.parameters(), moved_from))
        assert moved > 0.01, "training barely moved the weights: the comparison would prove nothing"


@pytest.mark.parametrize("name,options", MLP_CASES, ids=IDS)
def test_mlp_trains_like_torch(name, options):
    ours, theirs = mlp(), mlp()
    start = params(theirs)
    maximize = options.get("maximize", False)
    loss_theirs = train(theirs, getattr(torch.optim, name)(theirs.parameters(), foreach=False, **options),
                        STEPS, maximize=maximize)
    loss_ours = train(ours, getattr(ft, name)(ours.parameters(), **options), STEPS, maximize=maximize)
    # Minibatch losses are noisy: compare the mean of the last 20 with the first 20.
    assert sum(loss_ours[-20:]) < sum(loss_ours[:20]), "the run did not train"
    assert_same_params(ours, theirs, moved_from=start)
    assert max(abs(a - b) for a, b in zip(loss_ours, loss_theirs)) < 1e-4


#: Every option on, every rule (descending: the switching runs train the loss itself).
SWITCH_CASES = [(name, {k: v for k, v in o.items() if k != "maximize"}) for name, o in MLP_CASES[1::2]]


@pytest.mark.parametrize("name,options", SWITCH_CASES, ids=[f"{n}-{o}" for n, o in SWITCH_CASES])
def test_switching_through_state_dicts_continues_the_trajectory(name, options):
    """torch (70 steps) -> fastopt (70) -> torch (60) lands where 200 torch steps land."""
    make_torch = lambda m: getattr(torch.optim, name)(m.parameters(), foreach=False, **options)  # noqa: E731
    straight = mlp()
    train(straight, make_torch(straight), STEPS)

    model = mlp()
    first = make_torch(model)
    train(model, first, 70)
    middle = getattr(ft, name)(model.parameters(), **options)
    middle.load_state_dict(first.state_dict())
    train(model, middle, 70, start=70)
    last = make_torch(model)
    last.load_state_dict(middle.state_dict())
    train(model, last, 60, start=140)
    assert_same_params(model, straight)


def test_param_groups_with_their_own_hyperparameters():
    """No weight decay and a larger lr on biases: two groups, one list call each."""
    def groups(m):
        weights = [p for n, p in m.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in m.named_parameters() if n.endswith("bias")]
        return [{"params": weights}, {"params": biases, "weight_decay": 0.0, "lr": 1e-2}]

    ours, theirs = mlp(), mlp()
    start = params(theirs)
    opt = ft.AdamW(groups(ours), lr=3e-3, weight_decay=0.1)
    train(theirs, torch.optim.AdamW(groups(theirs), lr=3e-3, weight_decay=0.1, foreach=False), STEPS)
    train(ours, opt, STEPS)
    assert_same_params(ours, theirs, moved_from=start)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS),
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.3),
], ids=["OneCycleLR", "StepLR"])
def test_lr_scheduler_is_honoured(make_scheduler):
    ours, theirs = mlp(), mlp()
    o_ours = ft.AdamW(ours.parameters(), lr=3e-3)
    o_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-3, foreach=False)
    s_ours, s_theirs = make_scheduler(o_ours), make_scheduler(o_theirs)
    train(theirs, o_theirs, STEPS, scheduler=s_theirs)
    train(ours, o_ours, STEPS, scheduler=s_ours)
    assert o_ours.param_groups[0]["lr"] == o_theirs.param_groups[0]["lr"]
    assert_same_params(ours, theirs)
    # and the schedule mattered: a constant lr ends elsewhere
    constant = mlp()
    train(constant, ft.AdamW(constant.parameters(), lr=3e-3), STEPS)
    assert max((a - b).abs().max().item() for a, b in zip(constant.parameters(), ours.parameters())) > 1e-2


class PublishedLion(torch.optim.Optimizer):
    """Lion as published (Chen et al. 2023, Algorithm 2), written with torch ops."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - lr * wd).add_((b1 * m + (1 - b1) * p.grad).sign(), alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


def test_lion_trains_like_the_published_algorithm():
    ours, theirs = mlp(), mlp()
    start = params(theirs)
    train(theirs, PublishedLion(theirs.parameters(), lr=3e-4, weight_decay=0.1), STEPS)
    train(ours, ft.Lion(ours.parameters(), lr=3e-4, weight_decay=0.1), STEPS)
    assert_same_params(ours, theirs, moved_from=start)


class PublishedAdEMAMix(torch.optim.Optimizer):
    """AdEMAMix as its authors' PyTorch reference steps it (apple/ml-ademamix, warmups off)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2, b3), alpha, eps, wd = (group[k] for k in ("lr", "betas", "alpha", "eps", "weight_decay"))
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(step=0, m1=torch.zeros_like(p), m2=torch.zeros_like(p), nu=torch.zeros_like(p))
                st["step"] += 1
                t, g = st["step"], p.grad
                st["m1"].mul_(b1).add_(g, alpha=1 - b1)
                st["m2"].mul_(b3).add_(g, alpha=1 - b3)
                st["nu"].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (st["nu"].sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                update = (st["m1"].div(1 - b1 ** t) + alpha * st["m2"]) / denom
                update.add_(p, alpha=wd)
                p.add_(-lr * update)


@pytest.mark.parametrize("options", [{}, {"lr": 3e-3, "betas": (0.8, 0.99, 0.999), "alpha": 5.0, "weight_decay": 0.1}],
                         ids=["defaults", "all-varied"])
def test_ademamix_trains_like_the_published_algorithm(options):
    ours, theirs = mlp(), mlp()
    start = params(theirs)
    train(theirs, PublishedAdEMAMix(theirs.parameters(), **options), STEPS)
    opt = ft.AdEMAMix(ours.parameters(), **options)
    train(ours, opt, STEPS)
    assert_same_params(ours, theirs, moved_from=start)
    assert set(opt.state[next(ours.parameters())]) == {"step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"}


# ---- torch.optim semantics --------------------------------------------------------


def test_parameters_keep_their_own_storage_and_state_is_per_parameter():
    model = mlp()
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = ft.Adam(model.parameters(), lr=1e-3)
    model(X).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters()]
    opt.step()
    assert [p.data_ptr() for p in model.parameters()] == pointers  # nothing re-homed
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    for p in model.parameters():
        st = opt.state[p]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].item() == 1
        assert st["exp_avg"].shape == p.shape and st["exp_avg"].untyped_storage().nbytes() == p.numel() * 4


def assert_states_equal(a, b, params_a, params_b):
    for pa, pb in zip(params_a, params_b):
        sa, sb = a.state.get(pa, {}), b.state.get(pb, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k].float(), sb[k].float(), **TOL)


@pytest.mark.parametrize("name,options", [("AdamW", {"weight_decay": 0.1}),
                                          ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
                                          ("NAdam", {"lr": 1e-2, "weight_decay": 0.01})])
def test_frozen_and_unused_parameters_are_skipped_as_torch_skips_them(name, options):
    """The first layer frozen for 10 steps, the middle layer unused on odd steps: no
    decay and no momentum where there is no gradient, and a step count per parameter."""
    models = [mlp(), mlp()]
    for m in models:
        m[0].weight.requires_grad_(False)
    extra = {"foreach": False}
    opts = [getattr(ft, name)(models[0].parameters(), **options),
            getattr(torch.optim, name)(models[1].parameters(), **options, **extra)]
    start = params(models[1])

    def loss_of(m, t):
        h = torch.tanh(m[0](X[BATCHES[t]]))
        h = torch.tanh(m[2](h)) if t % 2 == 0 else h  # m[2] unused on odd steps: its grad becomes None
        return torch.nn.functional.mse_loss(m[4](h), Y[BATCHES[t]])

    for t in range(30):
        if t == 10:
            for m in models:
                m[0].weight.requires_grad_(True)
        for m, o in zip(models, opts):
            o.zero_grad()  # set_to_none=True: an unused parameter's grad stays None
            loss_of(m, t).backward()
            o.step()
    assert_same_params(models[0], models[1], moved_from=start)
    assert_states_equal(opts[0], opts[1], list(models[0].parameters()), list(models[1].parameters()))
    if name != "SGD":  # 20 steps for the unfrozen layer, 15 for the sometimes-unused one, 30 for the rest
        assert [int(opts[0].state[p]["step"]) for p in models[0].parameters()] == [20, 30, 15, 15, 30, 30]


def test_add_param_group_unfreezes_progressively_like_torch():
    models = [mlp(), mlp()]
    opts = [ft.AdamW(models[0][4].parameters(), lr=3e-3),
            torch.optim.AdamW(models[1][4].parameters(), lr=3e-3, foreach=False)]
    start = params(models[1])
    for t in range(40):
        if t == 15:
            for m, o in zip(models, opts):
                o.add_param_group({"params": list(m[2].parameters()), "lr": 1e-3, "weight_decay": 0.0})
        for m, o in zip(models, opts):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(X[BATCHES[t]]), Y[BATCHES[t]]).backward()
            o.step()
    assert_same_params(models[0], models[1], moved_from=start)
    assert len(opts[0].param_groups) == 2 and opts[0].param_groups[1]["weight_decay"] == 0.0
    assert torch.equal(models[0][0].weight, mlp()[0].weight)  # never in the optimizer: never moved
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opts[0].add_param_group({"params": list(models[0][0].parameters()), "lr": -1.0})
    assert len(opts[0].param_groups) == 2  # the bad group was not added
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check
        opts[0].add_param_group({"params": list(models[0][2].parameters())})


def test_editing_opt_state_takes_effect_like_torch():
    models = [mlp(), mlp()]
    opts = [ft.Adam(models[0].parameters(), lr=3e-3), torch.optim.Adam(models[1].parameters(), lr=3e-3,
                                                                        foreach=False)]
    start = params(models[1])
    for t in range(30):
        for m, o in zip(models, opts):
            ps = list(m.parameters())
            if t == 10:
                del o.state[ps[0]]  # that parameter starts over: step 1, fresh moments
                o.state[ps[2]]["exp_avg"] = torch.zeros_like(ps[2])  # a replaced buffer is the one stepped
            if t == 20:
                o.state.clear()
            o.zero_grad()
            torch.nn.functional.mse_loss(m(X[BATCHES[t]]), Y[BATCHES[t]]).backward()
            o.step()
    assert_same_params(models[0], models[1], moved_from=start)
    assert_states_equal(opts[0], opts[1], list(models[0].parameters()), list(models[1].parameters()))
    assert int(opts[0].state[next(models[0].parameters())]["step"]) == 10


def test_state_dict_hooks_are_called():
    model = mlp()
    opt = ft.AdamW(model.parameters())
    train(model, opt, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "hooked"})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step pre"))
    sd = opt.state_dict()
    assert sd["note"] == "hooked"
    opt.load_state_dict(sd)
    train(model, opt, 1, start=2)
    assert calls == ["pre", "load pre", "load post", "step pre"]


def test_zero_grad_as_torch():
    model = mlp()
    opt = ft.SGD(model.parameters(), lr=0.1)
    model(X).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()  # torch's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # nothing has a gradient: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), mlp().parameters()))


def test_a_duplicate_parameter_is_handled_as_torch_handles_it():
    """torch warns, then steps a parameter listed twice twice (with one state)."""
    models = [mlp(), mlp()]
    opts = []
    for m, module in zip(models, (ft, torch.optim)):
        ps = list(m.parameters())
        with pytest.warns(UserWarning, match="duplicate parameters"):
            opts.append(module.Adam(ps + ps[:1], lr=1e-2, **({} if module is ft else {"foreach": False})))
    train(models[0], opts[0], 5)
    train(models[1], opts[1], 5)
    assert_same_params(models[0], models[1])
    assert int(opts[0].state[next(models[0].parameters())]["step"]) == 10


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_its_own_copy_of_the_model(how):
    import copy
    import pickle

    model = mlp()
    opt = ft.AdamW(model.parameters(), lr=3e-3, skip_nonfinite=True)
    train(model, opt, 5)
    twin_model, twin = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert twin.skip_nonfinite
    train(model, opt, 10, start=5)
    train(twin_model, twin, 10, start=5)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    assert int(twin.state[next(twin_model.parameters())]["step"]) == 15


def test_per_parameter_steps_load_from_torch_and_continue():
    """A torch run that had a frozen layer: its parameters' steps differ; loading keeps them."""
    straight = mlp()
    model = mlp()
    for m in (straight, model):
        m[0].weight.requires_grad_(False)
    o_straight = torch.optim.Adam(straight.parameters(), lr=3e-3, foreach=False)
    first = torch.optim.Adam(model.parameters(), lr=3e-3, foreach=False)
    train(straight, o_straight, 5)
    train(model, first, 5)
    for m in (straight, model):
        m[0].weight.requires_grad_(True)
    train(straight, o_straight, 25, start=5)
    train(model, first, 5, start=5)
    ours = ft.Adam(model.parameters(), lr=1.0)
    ours.load_state_dict(first.state_dict())
    assert [int(ours.state[p]["step"]) for p in model.parameters()] == [5, 10, 10, 10, 10, 10]
    train(model, ours, 20, start=10)
    assert_same_params(model, straight)


def test_casting_the_model_after_making_the_optimizer():
    """HF Trainer and accelerate move the model after building the optimizer."""
    models = [mlp(), mlp()]
    opts = [ft.Adam(models[0].parameters(), lr=3e-3), torch.optim.Adam(models[1].parameters(), lr=3e-3,
                                                                        foreach=False)]
    Xd, Yd = X.double(), Y.double()
    for m in models:
        m.double()
    for m, o in zip(models, opts):
        for t in range(10):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(Xd[BATCHES[t]]), Yd[BATCHES[t]]).backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # Cast again after steps: the state follows the parameters (as load_state_dict casts it).
    models[0].float()
    train(models[0], opts[0], 1, start=10)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opts[0].state.values())


def test_mixed_dtypes_in_one_group():
    """One call per dtype inside a group (torch groups its fused calls the same way)."""
    models = [mlp(), mlp()]
    for m in models:
        m[4].double()
    opts = [ft.AdamW(models[0].parameters(), lr=3e-3),
            torch.optim.AdamW(models[1].parameters(), lr=3e-3, foreach=False)]
    start = params(models[1])
    for m, o in zip(models, opts):
        for t in range(20):
            o.zero_grad()
            h = m[3](m[2](m[1](m[0](X[BATCHES[t]]))))
            torch.nn.functional.mse_loss(m[4](h.double()), Y[BATCHES[t]].double()).backward()
            o.step()
    assert_same_params(models[0], models[1], moved_from=start)


@pytest.mark.parametrize("backend", ["numpy", "numba", "c"])
@pytest.mark.parametrize("name,options", [("AdamW", {"amsgrad": True}), ("NAdam", {"lr": 1e-2}),
                                          ("SGD", {"lr": 0.05, "momentum": 0.9})])
def test_replayed_steps_are_bitwise_the_general_path(backend, name, options, monkeypatch):
    """After its first step a group replays its plan (a pointer table on numba and c);
    a twin whose plans are dropped before every step takes the general path."""
    monkeypatch.setenv("FASTOPT_BACKEND", backend)
    fastopt.dispatch.refresh_environment()
    try:
        models = [mlp(), mlp()]
        opts = [getattr(ft, name)(m.parameters(), **options) for m in models]
        for t in range(20):
            opts[1]._plans.clear()
            for m, o in zip(models, opts):
                o.zero_grad()
                torch.nn.functional.mse_loss(m(X[BATCHES[t]]), Y[BATCHES[t]]).backward()
                o.step()
            if t == 0:
                plan = opts[0]._plans[0]
            assert opts[0]._plans[0] is plan  # replayed (the general path makes a new plan)
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
        assert_states_equal(opts[0], opts[1], list(models[0].parameters()), list(models[1].parameters()))
    finally:
        monkeypatch.delenv("FASTOPT_BACKEND")
        fastopt.dispatch.refresh_environment()


def test_a_gradient_aliasing_a_parameter_is_refused_on_every_path():
    """The kernels write parameters while reading gradients: they must not share memory."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False))
    opt = ft.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # the second step replays the plan
        model(torch.ones(1, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    model(torch.ones(1, 4)).sum().backward()
    model[0].weight.grad = model[1].weight.detach()  # the same memory as a parameter the step writes
    before = params(model)
    with pytest.raises(ValueError, match="overlap"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_closure_and_float64():
    model, reference = mlp(torch.float64), mlp(torch.float64)
    Xd, Yd = X.double(), Y.double()
    opt, ref = ft.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)
    for m, o in ((model, opt), (reference, ref)):
        def closure(m=m, o=o):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(Xd), Yd)
            loss.backward()
            return loss
        for _ in range(20):
            last = o.step(closure)
        assert isinstance(last, torch.Tensor)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=1e-12)


def test_adam_with_decoupled_weight_decay_is_torchs():
    """torch.optim.Adam(decoupled_weight_decay=True) is AdamW; so is fastopt.torch.Adam's, per group."""
    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "decoupled_weight_decay": True}, {"params": ps[2:]}]

    models = [mlp(), mlp()]
    opts = [ft.Adam(groups(models[0]), lr=3e-3, weight_decay=0.05),
            torch.optim.Adam(groups(models[1]), lr=3e-3, weight_decay=0.05, foreach=False)]
    start = params(models[1])
    for m, o in zip(models, opts):
        train(m, o, 50)
    assert_same_params(models[0], models[1], moved_from=start)
    plain = mlp()
    train(plain, ft.Adam(plain.parameters(), lr=3e-3, weight_decay=0.05), 50)
    assert (plain[0].weight - models[0][0].weight).abs().max() > 1e-4  # the option changed the first group


def test_construction_errors():
    with pytest.raises(TypeError, match="decoupled_weight_decay must be a bool"):
        ft.Adam(mlp().parameters(), decoupled_weight_decay="yes")
    for option in ("capturable", "differentiable"):
        with pytest.raises(ValueError, match=f"{option}=True is not supported"):
            ft.AdamW(mlp().parameters(), **{option: True})
    ft.AdamW(mlp().parameters(), foreach=False, fused=None)  # implementation choices: accepted, ignored
    with pytest.raises(TypeError, match="unknown hyperparameter 'momentom'"):
        ft.SGD(mlp().parameters(), lr=0.1, momentom=0.9)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ft.Adam(mlp().parameters(), lr=-1.0)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\] is a torch.float16 tensor"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ValueError, match="empty parameter list"):  # torch's own check
        ft.Adam([])


def test_bad_gradients_raise_before_anything_is_written():
    model = mlp()
    opt = ft.Adam([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    train(model, opt, 1)
    model(X).sum().backward()
    before, state = params(model), {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    last = list(model.parameters())[-2]  # the last weight, (4, 32)
    last.grad_dtype = None  # torch refuses a gradient of another dtype unless told
    cases = [(lambda: opt.param_groups[1].update(lr=-0.5), ValueError, "lr must be >= 0"),
             (lambda: setattr(last, "grad", last.grad.double()), TypeError,
              r"the gradient of param_groups\[1\]\['params'\]\[2\] is a torch.float64"),
             (lambda: setattr(last, "grad", torch.zeros(32, 4).t()), ValueError,
              r"param_groups\[1\]\['params'\]\[2\] or its gradient is not contiguous")]
    for breaking, error, message in cases:
        saved_lr, saved_grad = opt.param_groups[1]["lr"], last.grad
        breaking()
        with pytest.raises(error, match=message):
            opt.step()
        opt.param_groups[1]["lr"], last.grad = saved_lr, saved_grad
        for a, b in zip(before, params(model)):
            assert torch.equal(a, b)
        for p, s in opt.state.items():
            assert all(torch.equal(s[k], v) for k, v in state[p].items())


# ---- state dict validation --------------------------------------------------------


def trained_adam():
    model = mlp()
    opt = ft.Adam(model.parameters(), lr=3e-3, amsgrad=True)
    train(model, opt, 5)
    return model, opt


def snapshot(opt):
    sd = copy.deepcopy(opt.state_dict())  # torch's state_dict holds the live tensors
    return sd, [p.detach().clone() for group in opt.param_groups for p in group["params"]]


def assert_unchanged(opt, snap):
    sd, before = snap
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        assert now["state"][k].keys() == sd["state"][k].keys()
        for key, value in sd["state"][k].items():
            assert torch.equal(now["state"][k][key], value)
    for p, p0 in zip([p for group in opt.param_groups for p in group["params"]], before):
        assert torch.equal(p, p0)


def _bad(mutate):
    def make(sd):
        mutate(sd)
        return sd
    return make


BAD_STATE_DICTS = {
    "wrong shape": (_bad(lambda sd: sd["state"][0].update(exp_avg=torch.zeros(3))), ValueError,
                    r"state_dict\['state'\]\[0\]\['exp_avg'\] has shape \(3,\)"),
    "unknown key": (_bad(lambda sd: sd["state"][1].update(velocity=torch.zeros(1))), ValueError,
                    r"\[1\] has an unknown key 'velocity'"),
    "missing buffer": (_bad(lambda sd: sd["state"][2].pop("max_exp_avg_sq")), ValueError,
                       r"\[2\] is missing 'max_exp_avg_sq'"),
    "integer state": (_bad(lambda sd: sd["state"][0].update(exp_avg=sd["state"][0]["exp_avg"].long())), TypeError,
                      r"\['exp_avg'\] has dtype torch.int64"),
    "negative step": (_bad(lambda sd: sd["state"][3].update(step=torch.tensor(-1.0))), ValueError,
                      r"\[3\]\['step'\] must be a whole number >= 0"),
    "fractional step": (_bad(lambda sd: sd["state"][0]["step"].fill_(2.5)), ValueError, "whole number"),
    "bad hyperparameter": (_bad(lambda sd: sd["param_groups"][0].update(betas=(0.9, 1.5))), ValueError,
                           r"betas\[1\] must be in \[0, 1\)"),
    "missing hyperparameter": (_bad(lambda sd: sd["param_groups"][0].pop("eps")), ValueError, "missing hyperparameter 'eps'"),
    "group count": (_bad(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), ValueError,
                    "2 groups"),
    "parameter count": (_bad(lambda sd: sd["param_groups"][0]["params"].pop()), ValueError, "has 5 parameters"),
    "no such parameter": (_bad(lambda sd: sd["state"].update({17: {}})), ValueError, "entry 17 for no parameter"),
    "missing state": (_bad(lambda sd: sd.pop("state")), ValueError, "missing 'state'"),
}


@pytest.mark.parametrize("case", list(BAD_STATE_DICTS))
def test_bad_state_dict_raises_and_leaves_the_optimizer_unchanged(case):
    mutate, error, message = BAD_STATE_DICTS[case]
    model, opt = trained_adam()
    snap = snapshot(opt)
    with pytest.raises(error, match=message):
        opt.load_state_dict(mutate(copy.deepcopy(opt.state_dict())))  # (torch's state_dict shares the state)
    assert_unchanged(opt, snap)
    train(model, opt, 1, start=5)  # and it still steps


def test_state_dict_shares_the_live_state_as_torch_does_and_round_trips():
    model, opt = trained_adam()
    first = next(iter(model.parameters()))
    assert opt.state_dict()["state"][0]["exp_avg"] is opt.state[first]["exp_avg"]  # as torch's state_dict
    other_model = mlp()
    other = ft.Adam(other_model.parameters(), lr=1.0)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.param_groups[0]["lr"] == 3e-3 and other.param_groups[0]["amsgrad"]
    sd, now = opt.state_dict(), other.state_dict()
    for k in sd["state"]:
        for key, value in sd["state"][k].items():
            assert torch.equal(now["state"][k][key], value)
    train(model, opt, 3, start=5)
    train(other_model, other, 3, start=5)
    assert int(other.state[next(iter(other_model.parameters()))]["step"]) == 8


def test_sgd_state_dict_has_torch_layout():
    """torch.optim.SGD keeps no step and no state without momentum; fastopt.torch.SGD saves the same."""
    model = mlp()
    plain = ft.SGD(model.parameters(), lr=0.1)
    train(model, plain, 2)
    assert plain.state_dict()["state"] == {}
    heavy = ft.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, heavy, 2)
    assert set(heavy.state_dict()["state"][0]) == {"momentum_buffer"}
    assert math.isclose(heavy.param_groups[0]["momentum"], 0.9)


def test_a_scheduler_that_sets_lr_to_zero_stops_the_updates():
    model = mlp()
    opt = ft.SGD(model.parameters(), lr=torch.tensor(0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)
    train(model, opt, 1)
    sched.step()  # lr is now 0 (a tensor lr is filled in place)
    before = params(model)
    train(model, opt, 3, start=1)
    for a, b in zip(before, params(model)):
        assert torch.equal(a, b)


# ---- torch.amp.GradScaler -----------------------------------------------------------


def train_scaled(model, opt, scaler, steps, poison=(), unscale_and_clip=False):
    """Loss-scaled steps through ``scaler``; at the steps in ``poison`` one gradient
    element is made Inf (an overflow). Returns the scale after each step and, per step,
    whether the gradients came out of ``scaler.step`` as they went in (no unscaling pass)."""
    scales, untouched = [], []
    for t in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X[BATCHES[t]]), Y[BATCHES[t]])
        scaler.scale(loss).backward()
        if t in poison:
            model[0].weight.grad[0, 0] = float("inf")
        if unscale_and_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        before = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        untouched.append(all(torch.equal(b.view(torch.int32), p.grad.view(torch.int32))  # (bits: NaN == NaN)
                             for b, p in zip(before, model.parameters())))
        scales.append(scaler.get_scale())
    return scales, untouched


@pytest.mark.parametrize("unscale_and_clip", [False, True], ids=["folded", "unscale_-then-clip"])
def test_grad_scaler_matches_torch_fused(unscale_and_clip):
    """The same scale trajectory and skipped steps as torch.optim.AdamW(fused=True),
    and the same training; the loss scale is folded into the update as the gradients are
    read (they are never rewritten), or, after the user's own unscale_ and clipping,
    not applied twice."""
    poison = {3, 4, 11}
    runs = []
    for make in (lambda m: ft.AdamW(m.parameters(), lr=3e-3),
                 lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, fused=True)):
        model = mlp()
        opt = make(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=4)
        runs.append((model, opt, *train_scaled(model, opt, scaler, 30, poison, unscale_and_clip)))
    (ours, opt, scales, untouched), (theirs, ref, ref_scales, ref_untouched) = runs
    assert scales == ref_scales and len(set(scales)) > 2  # backed off at the Infs, grew in between
    # The gradients come out of our step as they went in; torch's fused kernel writes them
    # back unscaled in its pass (but for the skipped steps), unless unscale_ already did.
    assert all(untouched)
    assert ref_untouched == [unscale_and_clip or t in poison for t in range(30)]
    assert_same_params(ours, theirs, moved_from=params(mlp()))
    steps = [int(opt.state[p]["step"]) for p in ours.parameters()]
    assert steps == [int(ref.state[p]["step"]) for p in theirs.parameters()] == [30 - len(poison)] * 6
    assert opt.skipped_steps == len(poison)


# ---- clip_grad_norm_, folded into the next step ---------------------------------------


@pytest.mark.parametrize("norm_type,max_norm", [(2.0, 0.2), (math.inf, 0.02), ("inf", 0.02)],
                         ids=["l2", "inf", "inf-string"])
@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "GradScaler"])
def test_clip_grad_norm_folded_matches_torchs_clip_then_step(with_scaler, norm_type, max_norm):
    """opt.clip_grad_norm_ returns torch's total norm (to 1e-6) and the next
    step equals torch's clip + step (to round-off), without writing the gradients; with
    a GradScaler it also does unscale_'s job (scale trajectory and skipped steps as torch)."""
    poison = {6, 13} if with_scaler else set()
    results = []
    for ours in (True, False):
        model = mlp()
        opt = (ft.AdamW(model.parameters(), lr=3e-3) if ours else
               torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=False))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=5) if with_scaler else None
        norms, scales, untouched = [], [], []
        for t in range(30):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[BATCHES[t]]), Y[BATCHES[t]])
            (scaler.scale(loss) if scaler else loss).backward()
            if t in poison:
                model[2].weight.grad[1, 1] = float("inf")
            before = [p.grad.clone() for p in model.parameters()]
            if ours:
                norms.append(opt.clip_grad_norm_(max_norm, norm_type, grad_scaler=scaler).item())
            else:
                if scaler:
                    scaler.unscale_(opt)
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type).item())
            untouched.append(all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters())))
            if scaler:
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
            else:
                opt.step()
        results.append((model, opt, norms, scales, untouched))
    (ours, opt, norms, scales, untouched), (theirs, ref, ref_norms, ref_scales, ref_untouched) = results
    finite = [t for t in range(30) if t not in poison]
    for t in finite:
        assert norms[t] == pytest.approx(ref_norms[t], rel=1e-6), f"step {t}"
    assert sum(n > max_norm for n in norms) > 10, "the norm rarely exceeded max_norm: clipping went untested"
    assert all(untouched) and not all(ref_untouched)  # folded: our gradients are never rewritten
    assert scales == ref_scales
    assert_same_params(ours, theirs, moved_from=params(mlp()))
    assert [int(opt.state[p]["step"]) for p in ours.parameters()] == [30 - len(poison)] * 6


def test_clip_grad_norm_errors():
    model = mlp()
    opt = ft.AdamW(model.parameters())
    model(X).sum().backward()
    for bad in (1.0, 3, True, "two", -math.inf):
        with pytest.raises(ValueError, match="norm_type must be 2.0 or math.inf"):
            opt.clip_grad_norm_(1.0, norm_type=bad)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    scaler = torch.amp.GradScaler("cpu")
    opt.zero_grad()
    scaler.scale(model(X).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_.. or step.. was already called"):
        opt.clip_grad_norm_(1.0, grad_scaler=scaler)


def test_step_hooks_and_profiler_range_are_torchs():
    """fastopt.torch wraps step() as torch.optim does (pre-hooks, which may replace the
    arguments, then post-hooks, global and per-optimizer, in torch's order) and opens
    the profiler range 'Optimizer.step#<class>.step' only while a profiler records."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    model = mlp()
    opt = ft.AdamW(model.parameters())
    calls = []
    closure_calls = []

    def closure():
        closure_calls.append(1)
        return torch.tensor(0.0)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        opt.register_step_pre_hook(lambda o, a, k: (calls.append("pre"), ((o,), {"closure": closure}))[1]),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", k.get("closure") is closure))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
    ]
    try:
        train(model, opt, 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", ("post", True), "global post"]
    assert closure_calls == [1]  # the pre-hook's replacement arguments were used
    with torch.profiler.profile() as prof:
        train(model, opt, 1, start=1)
    assert any(e.name == "Optimizer.step#AdamW.step" for e in prof.events())
