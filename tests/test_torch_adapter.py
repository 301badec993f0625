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

import math

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402
from fastopt.flat import ALIGN  # noqa: E402
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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls run 30x slower when torch's threads fight over 2 shared cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    """No weight decay and a larger lr on biases: two groups, each one segment and one call."""
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
    # Each group is one contiguous segment of the flat buffer.
    assert opt._segments[0].stop <= opt._segments[1].start


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


# ---- the flat buffer ------------------------------------------------------------


def test_parameters_and_grads_are_views_of_two_flat_buffers():
    model = mlp()
    before = params(model)
    opt = ft.Adam(model.parameters(), lr=1e-3)
    flat, flat_grad = opt._flat, opt._flat_grad
    assert flat.data_ptr() % ALIGN == 0
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p.detach(), p0)  # values kept
        assert p.data_ptr() % ALIGN == 0 and p.grad.data_ptr() % ALIGN == 0
        o, n = opt._where[p]
        assert p.data_ptr() == flat[o:].data_ptr() and p.grad.data_ptr() == flat_grad[o:].data_ptr()
    loss = model(X).pow(2).mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    reference = mlp()
    reference(X).pow(2).mean().backward()
    for g, p in zip(grads, reference.parameters()):
        torch.testing.assert_close(g, p.grad)  # backward wrote into the flat grad, in place
    assert flat_grad.abs().sum() > 0
    opt.step()
    # The optimizer state is a view of one buffer per state name too.
    st = opt.state[next(iter(model.parameters()))]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and st["step"].item() == 1


def test_zero_grad_keeps_the_aliasing():
    model = mlp()
    opt = ft.SGD(model.parameters(), lr=0.1)
    model(X).sum().backward()
    views = [p.grad for p in model.parameters()]
    opt.zero_grad()  # set_to_none=True by default in torch: here a memset of the flat grad
    assert all(p.grad is v for p, v in zip(model.parameters(), views))
    assert opt._flat_grad.abs().sum() == 0
    model(X).sum().backward()
    assert opt._flat_grad.abs().sum() > 0


def test_a_gradient_set_to_none_or_replaced_is_brought_back():
    model, reference = mlp(), mlp()
    opt = ft.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, foreach=False)
    weight = next(iter(model.parameters()))
    weight.grad = None  # by hand, as torch.optim.Optimizer.zero_grad would
    model(X).sum().backward()  # autograd makes a fresh grad for it, outside the flat buffer
    reference(X).sum().backward()
    opt.step()
    ref_opt.step()
    assert_same_params(model, reference)
    assert weight.grad.data_ptr() == opt._flat_grad.data_ptr()  # re-attached


def test_moving_the_model_after_construction_is_an_error():
    model = mlp()
    opt = ft.Adam(model.parameters())
    model.double()
    with pytest.raises(RuntimeError, match="no longer lives in fastopt's flat buffer"):
        opt.step()


def test_frozen_parameters_are_refused():
    """torch.optim skips a parameter without grad; one flat call would still decay it."""
    model = mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="parameter 0 does not require grad"):
        ft.AdamW(model.parameters())
    opt = ft.AdamW([p for p in model.parameters() if p.requires_grad])
    model[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="parameter 0 does not require grad .frozen after"):
        opt.step()


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


def test_construction_errors():
    with pytest.raises(ValueError, match="decoupled_weight_decay=True is not supported"):
        ft.Adam(mlp().parameters(), decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="capturable"):
        ft.AdamW(mlp().parameters(), capturable=True)
    ft.AdamW(mlp().parameters(), foreach=False, fused=None)  # implementation choices: accepted, ignored
    with pytest.raises(TypeError, match="unknown hyperparameter 'momentom'"):
        ft.SGD(mlp().parameters(), lr=0.1, momentom=0.9)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        ft.Adam(mlp().parameters(), lr=-1.0)
    with pytest.raises(TypeError, match="one dtype and device"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    opt = ft.Adam(mlp().parameters())
    with pytest.raises(NotImplementedError, match="pass all parameter groups to the constructor"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})


def test_bad_lr_from_a_schedule_raises_before_any_group_is_written():
    model = mlp()
    opt = ft.Adam([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    model(X).sum().backward()
    before = opt._flat.clone()
    opt.param_groups[1]["lr"] = -0.5
    with pytest.raises(ValueError, match=r"lr must be >= 0"):
        opt.step()
    assert torch.equal(opt._flat, before)


# ---- state dict validation --------------------------------------------------------


def trained_adam():
    model = mlp()
    opt = ft.Adam(model.parameters(), lr=3e-3, amsgrad=True)
    train(model, opt, 5)
    return model, opt


def snapshot(opt):
    sd = opt.state_dict()
    return sd, opt._flat.clone()


def assert_unchanged(opt, snap):
    sd, flat = snap
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        assert now["state"][k].keys() == sd["state"][k].keys()
        for key, value in sd["state"][k].items():
            assert torch.equal(now["state"][k][key], value)
    assert torch.equal(opt._flat, flat)


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
    "steps differ in a group": (_bad(lambda sd: sd["state"][3]["step"].fill_(2.0)), ValueError,
                                "need one step count"),
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
        opt.load_state_dict(mutate(opt.state_dict()))
    assert_unchanged(opt, snap)
    train(model, opt, 1, start=5)  # and it still steps


def test_state_dict_is_a_copy_and_round_trips():
    model, opt = trained_adam()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"].fill_(7.0)
    assert not torch.equal(opt.state[next(iter(model.parameters()))]["exp_avg"], sd["state"][0]["exp_avg"])
    other_model = mlp()
    other = ft.Adam(other_model.parameters(), lr=1.0)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 3e-3 and other.param_groups[0]["amsgrad"]
    assert_unchanged(other, (opt.state_dict(), other._flat))  # state equal (params differ: not part of it)


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
