"""Schedule-Free AdamW and SGD against the schedulefree package (1.4, ``foreach=False``).

The package computes the schedule in Python doubles and each step with torch
ops in the parameters' dtype, as fastopt does with one fused pass, so the
two agree to a few float32 ulp per step (torch's ``addcmul`` and ``add`` with
an alpha may fuse a multiply-add; the lerp's ``1 - w`` is rounded in float32
there, in double here): with |p| ~ 1 over 60 steps within test_reference_vs_torch's
2e-5 (measured 2-8e-7), and 1e-11 in float64. The train/eval switch (y <-> x)
is compared after it too, mid-run and at the end; every host backend is
bitwise the reference.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.schedulefree import schedule

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")
import fastopt.torch as ft  # noqa: E402
from anchor_runs import close_to, model, switch_and_resume, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOST = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
ADAMW = [dict(lr=0.01), dict(lr=0.01, warmup_steps=10, weight_decay=0.1, r=0.5, weight_lr_power=1.0),
         dict(lr=0.02, betas=(0.3, 0.9), eps=1e-3)]
SGD = [dict(lr=0.1), dict(lr=0.1, momentum=0.4, warmup_steps=7, weight_decay=0.01, r=1.0, weight_lr_power=0.0)]
CASES = [("adamw", o) for o in ADAMW] + [("sgd", o) for o in SGD]
IDS = [f"{k}-{o}" for k, o in CASES]
SWITCH_AT = 25  # eval() and train() again after this step, as an evaluation in the middle of training


def beta1(kind, options):
    return options.get("betas", (0.9,))[0] if kind == "adamw" else options.get("momentum", 0.9)


def run_fastopt(kind, options, p0, grads, backend=None):
    y, z = p0.copy(), p0.copy()
    v = np.zeros_like(p0)
    lr_max, weight_sum = -1.0, 0.0
    for t, g in enumerate(grads, start=1):
        if kind == "adamw":
            lr_max, weight_sum = fastopt.adamw_schedulefree_(y, g, z, v, step=t, lr_max=lr_max, weight_sum=weight_sum,
                                                             backend=backend, **options)
        else:
            lr_max, weight_sum = fastopt.sgd_schedulefree_(y, g, z, step=t, lr_max=lr_max, weight_sum=weight_sum,
                                                           backend=backend, **options)
        if t == SWITCH_AT:
            fastopt.schedulefree_eval_(y, z, beta1(kind, options), backend=backend)
            fastopt.schedulefree_train_(y, z, beta1(kind, options), backend=backend)
    trained = y.copy()
    fastopt.schedulefree_eval_(y, z, beta1(kind, options), backend=backend)
    return trained, y, z, v, (lr_max, weight_sum)


def run_package(kind, options, p0, grads):
    cls = schedulefree.AdamWScheduleFree if kind == "adamw" else schedulefree.SGDScheduleFree
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = cls([p], foreach=False, **options)
    opt.train()
    for t, g in enumerate(grads, start=1):
        p.grad = torch.from_numpy(g.copy())
        opt.step()
        if t == SWITCH_AT:
            opt.eval()
            opt.train()
    trained = p.detach().numpy().copy()
    opt.eval()
    state = opt.state[p]
    v = state["exp_avg_sq"].numpy() if "exp_avg_sq" in state else None
    group = opt.param_groups[0]
    return trained, p.detach().numpy(), state["z"].numpy(), v, (group["lr_max"], group["weight_sum"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind,options", CASES, ids=IDS)
def test_matches_the_schedulefree_package(kind, options, dtype):
    rng = np.random.default_rng(len(str(options)))
    p0 = rng.standard_normal(257).astype(dtype)
    grads = [rng.standard_normal(257).astype(dtype) for _ in range(60)]
    ours = run_fastopt(kind, options, p0, grads, backend="numpy")
    theirs = run_package(kind, options, p0, grads)
    assert np.max(np.abs(ours[0] - p0)) > 1e-2 and np.max(np.abs(ours[1] - ours[0])) > 1e-4  # (moved; x != y)
    for a, b, what in zip(ours[:3], theirs[:3], ("y", "x", "z")):
        np.testing.assert_allclose(a, b, **TOL[dtype], err_msg=what)
    if kind == "adamw":
        np.testing.assert_allclose(ours[3], theirs[3], **TOL[dtype], err_msg="exp_avg_sq")
    assert ours[4] == theirs[4]  # the schedule: the same doubles


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("kind,options", CASES, ids=IDS)
def test_every_backend_is_bitwise_the_reference(kind, options, backend):
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(30)]
    ours = run_fastopt(kind, options, p0, grads, backend=backend)
    ref = run_fastopt(kind, options, p0, grads, backend="numpy")
    for a, b in zip(ours[:4], ref[:4]):
        assert a.tobytes() == b.tobytes()


def test_schedule_follows_the_package_formulas():
    # warmup of 4: lr_t = lr*(k+1)/4, then lr; weight = (k+1)**r * lr_max**power
    lr_max, weight_sum = -1.0, 0.0
    for t in range(1, 8):
        lr_t, lr_max, weight_sum, ckp1 = schedule(t, 0.1, 4, 0.5, 2.0, lr_max, weight_sum)
        expected_lr = 0.1 * min(1.0, t / 4)
        assert lr_t == (0.1 * (t / 4) if t - 1 < 4 else 0.1 * 1.0) and abs(lr_t - expected_lr) < 1e-15
        assert lr_max == lr_t and ckp1 == (t ** 0.5) * lr_max ** 2.0 / weight_sum
    assert schedule(1, 0.0, 0, 0.0, 2.0, -1.0, 0.0)[3] == 0.0  # (lr 0: no weight yet, ckp1 = 0 as the package)


TORCH_CASES = [("AdamWScheduleFree", dict(lr=0.01, warmup_steps=5, weight_decay=0.01)),
               ("SGDScheduleFree", dict(lr=0.1, warmup_steps=5, momentum=0.8))]


@pytest.mark.parametrize("name,options", TORCH_CASES, ids=[n for n, _ in TORCH_CASES])
def test_torch_adapter_trains_like_the_package_and_state_dicts_load_both_ways(name, options):
    ours_cls, theirs_cls = getattr(ft, name), getattr(schedulefree, name)
    ours, theirs = model(), model()
    o_ours, o_theirs = ours_cls(ours.parameters(), **options), theirs_cls(theirs.parameters(), foreach=False,
                                                                         **options)
    train(ours, o_ours, 40)
    train(theirs, o_theirs, 40)
    close_to(2e-5, 2e-5, ("z",))(ours, o_ours, theirs, o_theirs)
    saved, expected = o_ours.state_dict(), o_theirs.state_dict()
    assert {k: v for k, v in saved["param_groups"][0].items() if k != "foreach"} == \
        {k: v for k, v in expected["param_groups"][0].items() if k != "foreach"}
    assert all(set(saved["state"][k]) == set(expected["state"][k]) for k in expected["state"])
    # (switching in eval mode, as the package says to save and load)
    switch_and_resume(model, lambda ps: theirs_cls(ps, foreach=False, **options), lambda ps: ours_cls(ps, **options),
                      close_to(2e-5, 2e-5))


def test_a_step_outside_train_mode_raises_as_the_package():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = ft.AdamWScheduleFree([p])
    with pytest.raises(RuntimeError, match="not in train mode"):
        opt.step()
    assert torch.equal(p, torch.ones(3)) and not opt.state


# ---- bad input: a clear error naming the argument, nothing written -----------------------

BAD = [("adamw", dict(lr=-1.0), ValueError, "lr"), ("adamw", dict(warmup_steps=-1), ValueError, "warmup_steps"),
       ("adamw", dict(warmup_steps=1.5), TypeError, "warmup_steps must be an int"),
       ("adamw", dict(lr_max=-2.0), ValueError, "lr_max must be -1"),
       ("adamw", dict(weight_sum=-1.0), ValueError, "weight_sum"),
       ("adamw", dict(weight_lr_power=-1.0, lr=0.0), ValueError, "averaging weight"),
       ("adamw", dict(r=1e300, step=2), ValueError, "averaging weight"),
       ("adamw", dict(betas=(0.9, 1.5)), ValueError, r"betas\[1\]"), ("adamw", dict(step=0), ValueError, "step"),
       ("sgd", dict(momentum=0.0), ValueError, "momentum must be in"),
       ("sgd", dict(momentum=1.0), ValueError, "momentum"), ("sgd", dict(weight_decay=-0.1), ValueError, "weight_decay")]


@pytest.mark.parametrize("kind,options,error,message", BAD, ids=[f"{k}-{o}" for k, o, _, _ in BAD])
def test_bad_input_is_refused_before_anything_is_written(kind, options, error, message):
    y, z, v, g = np.ones(8, np.float32), np.ones(8, np.float32), np.full(8, 2.0, np.float32), np.ones(8, np.float32)
    options = {"step": 1, **options}
    with pytest.raises(error, match=message):
        if kind == "adamw":
            fastopt.adamw_schedulefree_(y, g, z, v, **options)
        else:
            fastopt.sgd_schedulefree_(y, g, z, **options)
    assert (y == 1).all() and (z == 1).all() and (v == 2).all()


def test_bad_buffers_and_swaps_are_refused_before_anything_is_written():
    y, z, v, g = np.ones(8, np.float32), np.ones(8, np.float32), np.full(8, 2.0, np.float32), np.ones(8, np.float32)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fastopt.adamw_schedulefree_(y, g, z, np.zeros(7, np.float32), step=1)
    with pytest.raises(ValueError, match="beta1 must be in"):
        fastopt.schedulefree_eval_(y, z, 0.0)
    with pytest.raises(ValueError, match="grad"):  # (z travels in the grad slot of the swap)
        fastopt.schedulefree_train_(y, np.ones(9, np.float32), 0.9)
    assert (y == 1).all() and (z == 1).all() and (v == 2).all()


def test_torch_adapter_checks_every_group_before_stepping_any():
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = ft.AdamWScheduleFree([{"params": [a]}, {"params": [b]}])
    opt.train()
    a.grad, b.grad = torch.ones(4), torch.ones(3)
    opt.param_groups[1]["warmup_steps"] = -3
    with pytest.raises(ValueError, match=r"param_groups\[1\]: warmup_steps must be >= 0"):
        opt.step()
    assert torch.equal(a, torch.ones(4)) and not opt.state and opt.param_groups[0]["k"] == 0
