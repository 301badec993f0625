"""The stateful LAMB and LARS: fastopt.LAMB/LARS over a flat buffer, fastopt.torch.LAMB/LARS.

The functional two-pass updates are checked in test_trust_rules.py (against
torch versions of apex's FusedLAMB and vicreg's LARS, bitwise across
backends). What the stateful classes add is checked here: groups with their
own hyperparameters, LAMB's clipping by the norm of *every* group's
gradients (as apex's FusedLAMB computes its global norm once per step), the
state and step counts, state dicts, and the torch drop-ins against the same
torch references on a model's 1-D and 2-D parameters.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.flat import FlatParams

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

from test_trust_rules import torch_lamb, torch_lars  # noqa: E402

SHAPES = [(7, 5), (5,), (3, 4, 2), (33,)]
STEPS = 12


def arrays(seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(scale * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]


def grad_steps(seed=1, scale=0.5):
    return [arrays(seed + t, scale) for t in range(STEPS)]


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_flat_lamb_groups_clip_by_the_norm_of_every_group(max_grad_norm):
    """Two groups with their own lr and weight decay: each group's update is lamb_
    on its segment, with the clipping norm taken over both segments' gradients."""
    flat = FlatParams(arrays())
    spans = [flat.span(0, 2), flat.span(2, 4)]
    opt = fastopt.LAMB(flat, groups=[{"params": spans[0]}, {"params": spans[1], "lr": 3e-3, "weight_decay": 0.1}],
                       max_grad_norm=max_grad_norm)
    p = flat.data.copy()
    state = [{"exp_avg": np.zeros(s.stop - s.start, np.float32), "exp_avg_sq": np.zeros(s.stop - s.start, np.float32)}
             for s in spans]
    hyper = [{}, {"lr": 3e-3, "weight_decay": 0.1}]
    clipped = 0
    for t, gs in enumerate(grad_steps(), start=1):
        flat.grad[...] = 0.0
        for view, g in zip(flat.grads, gs):
            view[...] = g * np.float32(4.0)  # (norms above 1: the clipping acts)
        opt.step()
        norm = fastopt.total_norm([flat.grad[s] for s in spans])
        clipped += max_grad_norm is not None and norm > max_grad_norm
        for s, st, h in zip(spans, state, hyper):
            fastopt.lamb_(p[s], flat.grad[s], st["exp_avg"], st["exp_avg_sq"], step=t, max_grad_norm=max_grad_norm,
                          grad_norm=norm, **h)
        np.testing.assert_array_equal(flat.data, p)
    for got, want in zip(opt.state, state):
        assert got["step"] == STEPS
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    assert clipped == (STEPS if max_grad_norm is not None else 0), "the clipping went untested"


def _torch_run(cls, options, p0, gs):
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    opt = cls(params, **options)
    for step_grads in gs:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return params, opt


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.0}, {"max_grad_norm": None, "use_nvlamb": True},
                                     {"adam_w_mode": False, "bias_correction": False, "grad_averaging": False}],
                         ids=["apex-defaults", "no-decay", "nvlamb-unclipped", "l2-no-correction"])
def test_torch_lamb_is_apex_fused_lamb(options):
    p0, gs = arrays(), grad_steps(scale=2.0)
    params, opt = _torch_run(ft.LAMB, dict(options, lr=1e-2), p0, gs)
    want, want_state = torch_lamb(dict(options, lr=1e-2), p0, gs)
    for p, w, m, v in zip(params, want, want_state["exp_avg"], want_state["exp_avg_sq"]):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m, rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), v, rtol=2e-5, atol=1e-9)
        assert int(opt.state[p]["step"]) == STEPS
    assert not all(np.allclose(p.detach().numpy(), a) for p, a in zip(params, p0))


@pytest.mark.parametrize("options", [{"lr": 0.1}, {"lr": 0.1, "weight_decay": 1e-2, "eta": 0.02},
                                     {"lr": 0.1, "momentum": 0.0}, {"lr": 0.1, "lars_adaptation": False}],
                         ids=["default", "decay", "no-momentum", "no-adaptation"])
def test_torch_lars_is_vicregs(options):
    p0, gs = arrays(), grad_steps()
    params, opt = _torch_run(ft.LARS, options, p0, gs)
    want, want_state = torch_lars(options, p0, gs)
    for i, (p, w) in enumerate(zip(params, want)):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=2e-5, atol=1e-6)
        if "momentum_buffer" in want_state:
            np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), want_state["momentum_buffer"][i],
                                       rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("cls,options", [(ft.LAMB, {"lr": 1e-2}), (ft.LARS, {"lr": 0.1})], ids=["LAMB", "LARS"])
def test_torch_state_dicts_resume_exactly(cls, options):
    p0, gs = arrays(), grad_steps()
    straight, _ = _torch_run(cls, options, p0, gs)
    first, opt = _torch_run(cls, options, p0, gs[:5])
    saved = opt.state_dict()
    params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = cls(params, **options)
    resumed.load_state_dict(saved)
    for step_grads in gs[5:]:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g.copy())
        resumed.step()
    for a, b in zip(params, straight):
        assert torch.equal(a, b)


def test_bad_max_grad_norm_is_refused_naming_it():
    with pytest.raises(ValueError, match="max_grad_norm"):
        ft.LAMB([torch.nn.Parameter(torch.zeros(3))], max_grad_norm=-1.0)
    flat = FlatParams(arrays())
    with pytest.raises(TypeError, match="max_grad_norm"):
        fastopt.LAMB(flat, max_grad_norm="big")
