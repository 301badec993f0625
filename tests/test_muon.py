"""Muon (``fastopt.muon_``, ``fastopt.torch.Muon``) against ``torch.optim.Muon``.

torch runs the Newton-Schulz iteration in bfloat16; fastopt runs it in the
parameters' dtype. So the anchor for the exact comparison is torch's own
step with its iteration in that dtype (``_zeropower_via_newtonschulz``
replaced by the same code without the cast to bfloat16). Tolerances: the
matrix products sum in BLAS's order (OpenBLAS in NumPy, torch's own), and the
quintic iteration amplifies a rounding difference by its coefficients (~3-5
per step, 5 steps): a few 1e-5 of O's entries in float32 per step, times
lr = 0.02, random-walking over 60 steps: well inside atol = rtol = 1e-5 on
parameters that move ~0.5 (measured 5e-7), and 1e-11 in float64 (measured
1e-15). Against the bfloat16 torch the difference is bfloat16's round-off
(~0.4% of O), checked as a fraction of the distance moved.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from fastopt.muon import lr_ratio, newton_schulz

torch = pytest.importorskip("torch")
import torch.optim._muon as torch_muon  # noqa: E402

import fastopt.torch as ft  # noqa: E402
from anchor_runs import close_to, model, switch_and_resume, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOST = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
SHAPES = [(24, 40), (48, 12), (16, 16)]
CASES = [{}, dict(nesterov=False), dict(momentum=0.3), dict(momentum=0.3, nesterov=False),
         dict(weight_decay=0.0, adjust_lr_fn="match_rms_adamw"), dict(adjust_lr_fn="original", ns_steps=3),
         dict(ns_coefficients=(2.0, -1.5, 0.5), eps=1e-3)]
IDS = ["defaults", "no-nesterov", "momentum=0.3", "momentum=0.3-no-nesterov", "match_rms_adamw", "ns_steps=3",
       "coefficients"]


def _zeropower_in_own_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz without its cast to bfloat16."""
    a, b, c = ns_coefficients
    x = grad.clone()
    if grad.size(0) > grad.size(1):
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if grad.size(0) > grad.size(1) else x


@pytest.fixture
def torch_in_own_dtype(monkeypatch):
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _zeropower_in_own_dtype)


def inputs(dtype, steps=60, seed=0):
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return p0, grads


def run_fastopt(p0, grads, options, backend=None, lists=True):
    p = [x.copy() for x in p0]
    bufs = [np.zeros_like(x) for x in p0]
    for g in grads:
        if lists:
            fastopt.muon_(p, g, bufs, lr=0.02, **options, backend=backend)
        else:
            for k in range(len(p)):
                fastopt.muon_(p[k], g[k], bufs[k], lr=0.02, **options, backend=backend)
    return p, bufs


def run_torch(p0, grads, options):
    params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in p0]
    opt = torch.optim.Muon(params, lr=0.02, **options)
    for g in grads:
        for p, gk in zip(params, g):
            p.grad = torch.from_numpy(gk.copy())
        opt.step()
    return [p.detach().numpy() for p in params], [opt.state[p]["momentum_buffer"].numpy() for p in params]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", CASES, ids=IDS)
def test_matches_torch_with_its_iteration_in_the_same_dtype(options, dtype, torch_in_own_dtype):
    p0, grads = inputs(dtype)
    p, bufs = run_fastopt(p0, grads, options)
    p_ref, bufs_ref = run_torch(p0, grads, options)
    for k in range(len(SHAPES)):
        assert np.max(np.abs(p[k] - p0[k])) > 0.1  # (moved, or the comparison proves nothing)
        np.testing.assert_allclose(p[k], p_ref[k], **TOL[dtype])
        np.testing.assert_allclose(bufs[k], bufs_ref[k], **TOL[dtype])


@pytest.mark.parametrize("options", CASES[:2], ids=IDS[:2])
def test_matches_torch_in_bfloat16_to_its_round_off(options):
    p0, grads = inputs(np.float32, steps=20)
    p, _ = run_fastopt(p0, grads, options)
    p_ref, _ = run_torch(p0, grads, options)
    for k in range(len(SHAPES)):
        moved = np.max(np.abs(p_ref[k] - p0[k]))
        assert np.max(np.abs(p[k] - p_ref[k])) < 0.02 * moved


@pytest.mark.parametrize("backend", HOST)
def test_every_backend_and_list_calls_are_bitwise_the_same(backend):
    p0, grads = inputs(np.float32, steps=10, seed=1)
    p_ref, bufs_ref = run_fastopt(p0, grads, CASES[0], backend="numpy", lists=False)
    for lists in (True, False):
        p, bufs = run_fastopt(p0, grads, CASES[0], backend=backend, lists=lists)
        for k in range(len(SHAPES)):
            assert p[k].tobytes() == p_ref[k].tobytes() and bufs[k].tobytes() == bufs_ref[k].tobytes()


def test_newton_schulz_orthogonalizes_and_lr_ratio_follows_torch():
    rng = np.random.default_rng(2)
    for shape in SHAPES:
        o = newton_schulz(rng.standard_normal(shape).astype(np.float64), steps=10)
        singular = np.linalg.svd(o, compute_uv=False)
        assert o.shape == shape and o.flags.c_contiguous
        assert 0.6 < singular.min() and singular.max() < 1.3  # (the quintic's band around 1, not exactly 1)
        for fn in (None, "original", "match_rms_adamw"):
            assert lr_ratio(fn, shape) * 0.02 == torch_muon._adjust_lr(0.02, fn, torch.Size(shape))


def test_torch_adapter_trains_like_torch_and_state_dicts_load_both_ways(torch_in_own_dtype):
    options = dict(lr=0.02, weight_decay=0.05)
    ours, theirs = model(bias=False), model(bias=False)
    o_ours, o_theirs = ft.Muon(ours.parameters(), **options), torch.optim.Muon(theirs.parameters(), **options)
    train(ours, o_ours, 40)
    train(theirs, o_theirs, 40)
    close_to(1e-5, 1e-5, ("momentum_buffer",))(ours, o_ours, theirs, o_theirs)
    assert o_ours.state_dict()["param_groups"] == o_theirs.state_dict()["param_groups"]
    switch_and_resume(lambda: model(bias=False), lambda ps: torch.optim.Muon(ps, **options),
                      lambda ps: ft.Muon(ps, **options), close_to(1e-5, 1e-5))


# ---- bad input: a clear error naming the argument, and nothing written ------------------

BAD = [(dict(ns_steps=100), ValueError, "ns_steps must be in"), (dict(ns_steps=-1), ValueError, "ns_steps"),
       (dict(ns_steps=2.0), TypeError, "ns_steps must be an int"), (dict(ns_steps=True), TypeError, "ns_steps"),
       (dict(ns_coefficients=(1.0, 2.0)), TypeError, "ns_coefficients must be a triple"),
       (dict(ns_coefficients=(1.0, float("nan"), 2.0)), ValueError, r"ns_coefficients\[1\]"),
       (dict(eps=-1.0), ValueError, "eps"), (dict(adjust_lr_fn="rms"), ValueError, "adjust_lr_fn must be"),
       (dict(lr=-0.1), ValueError, "lr"), (dict(momentum=1.5), ValueError, "momentum"),
       (dict(weight_decay=float("inf")), ValueError, "weight_decay"), (dict(nesterov="yes"), TypeError, "nesterov")]


@pytest.mark.parametrize("options,error,message", BAD, ids=[str(o) for o, _, _ in BAD])
def test_bad_hyperparameters_are_refused_before_anything_is_written(options, error, message):
    p0, grads = inputs(np.float32, steps=1)
    p, bufs = [x.copy() for x in p0], [np.ones_like(x) for x in p0]
    with pytest.raises(error, match=message):
        fastopt.muon_(p, grads[0], bufs, **options)
    assert all(np.array_equal(a, b) for a, b in zip(p, p0)) and all((b == 1).all() for b in bufs)
    with pytest.raises(error, match=message):
        ft.Muon([torch.nn.Parameter(torch.zeros(3, 4))], **options)


def test_bad_buffers_are_refused_before_anything_is_written():
    p0, grads = inputs(np.float32, steps=1)
    p, bufs = [x.copy() for x in p0], [np.ones_like(x) for x in p0]
    for args, error, message in [
        (([p[0], p[1].reshape(-1)], grads[0][:2], bufs[:2]), ValueError, r"param\[1\] has shape \(576,\): Muon "
                                                                         "updates 2-D parameters only"),
        ((p, grads[0][:2] + [grads[0][1]], bufs), ValueError, r"grad\[2\]"),
        ((p, grads[0], bufs[:2] + [bufs[2].astype(np.float64)]), TypeError, r"momentum_buffer\[2\]"),
        ((p, grads[0], [bufs[0], bufs[1], p[2]]), ValueError, "overlap"),
    ]:
        with pytest.raises(error, match=message):
            fastopt.muon_(*args)
        assert all(np.array_equal(a, b) for a, b in zip(p, p0)) and all((b == 1).all() for b in bufs)


def test_torch_adapter_checks_every_group_before_stepping_any():
    a, b = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3, 5))
    opt = ft.Muon([{"params": [a]}, {"params": [b]}], lr=0.02)
    a.grad, b.grad = torch.ones(4, 3), torch.ones(3, 5)
    opt.param_groups[1]["ns_steps"] = 200
    with pytest.raises(ValueError, match=r"param_groups\[1\]: ns_steps must be in"):
        opt.step()
    assert torch.equal(a, torch.ones(4, 3)) and not opt.state
    opt.param_groups[1]["ns_steps"] = 5
    b.grad = torch.ones(5, 3).T  # (not contiguous)
    with pytest.raises(ValueError, match=r"param_groups\[1\]: grad\[0\]"):
        opt.step()
    assert torch.equal(a, torch.ones(4, 3)) and not opt.state
