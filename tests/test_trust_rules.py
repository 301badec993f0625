"""LAMB and LARS, the two-pass rules (fastopt.trust): a trust ratio per tensor.

- The NumPy reference (fastopt.backends.reference, with fastopt.trust's ratios)
  against straightforward per-tensor torch implementations written here from
  the published algorithms and their reference code: LAMB as NVIDIA apex's
  FusedLAMB computes it (apex/optimizers/fused_lamb.py,
  csrc/multi_tensor_lamb.cu: stage 1, the global-norm clipping, stage 2 with
  its zero guards; You et al. 2020, Algorithm 2), LARS as facebookresearch/vicreg's
  LARS class (You, Gitman & Ginsburg 2017). 60 steps, float32 and float64,
  several tensors of different shapes, one of them all zeros (the zero guards).
- Every host backend equals the reference bit for bit (NaN payloads aside), flat
  and list calls, every option, special values; 1 and 2 threads alike; pass 1's
  sums of squares of the parameters are fastopt.sums_of_squares' bits.
- The element functions (run as plain Python) equal the reference, both passes;
  pass 1 does not depend on the state it does not read; the C library's ratio
  (translated from the rule table) equals Python's on edge values.
- Bad input raises ValueError/TypeError naming the argument before anything is
  written.
- The CUDA kernels of pass 2 (generated from the table like every rule's) equal
  the reference in the CUDA simulator; the first pass has no device kernel yet.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

import fastopt
from fastopt import trust
from fastopt.backends import reference
from fastopt.kernels import elements
from fastopt.rules import LAMB, LARS, TWO_PASS_RULES

HOST = ["numpy", "numba", "c"]
COMPILED = ["numba", "c"]

#: Tensors of different shapes; the zero one (parameter and gradient) keeps both
#: norms 0 at every step (LAMB's ratio stays lr, LARS's q stays 1); the one with a
#: zero gradient has ||u|| = 0 where the decay adds nothing.
SHAPES = [(33, 17), (64,), (5, 1, 3), (20,), (4097,), (12,)]
ZERO, ZERO_GRAD = 3, 5

LAMB_CASES = [
    {},  # apex's defaults: decoupled decay 0.01 (the ratio applies), bias correction, clipping at 1.0
    {"weight_decay": 0.0},  # no ratio: one pass with step_size = lr
    {"weight_decay": 0.0, "use_nvlamb": True},
    {"adam_w_mode": False, "weight_decay": 0.05},
    {"bias_correction": False, "max_grad_norm": 10.0},
    {"grad_averaging": False, "max_grad_norm": None},
    {"max_grad_norm": 1e6},  # the norm is computed, never above: no clipping
    {"maximize": True, "grad_multiplier": 0.25, "max_grad_norm": 3.0},
    {"lr": 5e-3, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.1, "use_nvlamb": True},
]
LARS_CASES = [
    {"lr": 2.0},
    {"lr": 2.0, "weight_decay": 1e-3},
    {"lr": 1.0, "momentum": 0.0, "weight_decay": 1e-3},  # no momentum buffer
    {"lr": 0.01, "lars_adaptation": False, "weight_decay": 1e-4},  # plain momentum SGD, one pass
    {"lr": 0.5, "eta": 0.02, "maximize": True, "grad_multiplier": 0.5},
    {"lr": 1.0, "momentum": 0.5, "weight_decay": 5e-4, "eta": 0.005},
]
CASES = [("lamb", o) for o in LAMB_CASES] + [("lars", o) for o in LARS_CASES]
CASE_IDS = [f"{r}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "defaults") for r, o in CASES]


def state_names(rule: str, options: dict) -> tuple[str, ...]:
    r = TWO_PASS_RULES[rule]
    hyper = {**r.defaults, **{k: v for k, v in options.items() if k in r.defaults}}
    return tuple(r.needs(hyper))


def make_inputs(dtype, steps: int, seed: int = 0, shapes=SHAPES, specials: bool = False):
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    if shapes is SHAPES:
        p0[ZERO][...] = 0
        for gs in grads:
            gs[ZERO][...] = 0
            gs[ZERO_GRAD][...] = 0
    if specials:  # non-finite values propagate identically everywhere (clipping: a NaN norm never clips)
        grads[1][1].reshape(-1)[:4] = [np.nan, np.inf, -np.inf, -0.0]
        grads[2][4].reshape(-1)[7] = np.inf
    return p0, grads


def call(rule: str, options: dict, params, grads, state: dict, step: int, backend: str):
    names = TWO_PASS_RULES[rule].state
    args = [state.get(n) for n in names]
    if rule == "lamb":
        fastopt.lamb_(params, grads, *args, step=step, backend=backend, **options)
    else:
        fastopt.lars_(params, grads, *args, step=step, backend=backend, **options)


def run_fastopt(rule: str, options: dict, p0, grads, backend: str, flat: bool = False):
    """Every step as one list call (or one flat call per tensor: a ratio each); returns (params, state)."""
    params = [p.copy() for p in p0]
    state = {n: [np.zeros_like(p) for p in p0] for n in state_names(rule, options)}
    with np.errstate(all="ignore"):
        for t, gs in enumerate(grads, start=1):
            if flat:
                for i, (p, g) in enumerate(zip(params, gs)):
                    opts = dict(options)
                    if rule == "lamb" and opts.get("max_grad_norm", 1.0):  # the global norm of the list call
                        opts["grad_norm"] = abs(opts.get("grad_multiplier", 1.0)) * fastopt.total_norm(gs)
                    call(rule, opts, p, g, {k: v[i] for k, v in state.items()}, t, backend)
            else:
                call(rule, options, params, gs, state, t, backend)
    return params, state


# ---- the torch references, from the published algorithms and their reference code ----

def torch_lamb(options: dict, p0, grads):
    """apex FusedLAMB's step, per tensor, with torch ops (fused_lamb.py + multi_tensor_lamb.cu)."""
    import torch
    o = {**LAMB.defaults, "max_grad_norm": 1.0, "grad_multiplier": 1.0, **options}
    lr, (b1, b2), eps, wd = o["lr"], o["betas"], o["eps"], o["weight_decay"]
    b3 = 1.0 - b1 if o["grad_averaging"] else 1.0
    params = [torch.from_numpy(p.copy()) for p in p0]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for t, gs in enumerate(grads, start=1):
        gs = [torch.from_numpy(g) * (-o["grad_multiplier"] if o["maximize"] else o["grad_multiplier"]) for g in gs]
        clip = 1.0
        if o["max_grad_norm"]:
            global_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
            if global_norm > o["max_grad_norm"]:
                clip = global_norm / o["max_grad_norm"]
        bc1 = 1 - b1 ** t if o["bias_correction"] else 1.0
        bc2 = 1 - b2 ** t if o["bias_correction"] else 1.0
        for p, g, m, v in zip(params, gs, ms, vs):
            g = g / clip  # apex: scaled_grad = g / clipped_global_grad_norm
            if not o["adam_w_mode"]:
                g = g + wd * p
            m.mul_(b1).add_(g, alpha=b3)
            v.mul_(b2).add_((1 - b2) * g * g)
            update = (m / bc1) / ((v / bc2).sqrt() + eps)
            if o["adam_w_mode"]:
                update = update + wd * p
            ratio = lr
            if o["use_nvlamb"] or wd != 0:  # stage 2: the ratio only with weight decay or nvlamb
                param_norm, update_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                if param_norm != 0 and update_norm != 0:
                    ratio = lr * (param_norm / update_norm)
            p.sub_(ratio * update)
    return [p.numpy() for p in params], {"exp_avg": [m.numpy() for m in ms], "exp_avg_sq": [v.numpy() for v in vs]}


def torch_lars(options: dict, p0, grads):
    """facebookresearch/vicreg's LARS.step (main_vicreg.py), per tensor, with torch ops."""
    import torch
    o = {**LARS.defaults, "grad_multiplier": 1.0, **options}
    params = [torch.from_numpy(p.copy()) for p in p0]
    mus = [torch.zeros_like(p) for p in params]
    for gs in grads:
        for p, g, mu in zip(params, gs, mus):
            dp = torch.from_numpy(g) * (-o["grad_multiplier"] if o["maximize"] else o["grad_multiplier"])
            dp = dp.add(p, alpha=o["weight_decay"])
            if o["lars_adaptation"]:
                param_norm = torch.norm(p)
                update_norm = torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0., torch.where(update_norm > 0, (o["eta"] * param_norm / update_norm),
                                                             one), one)
                dp = dp.mul(q)
            mu.mul_(o["momentum"]).add_(dp)
            p.add_(mu, alpha=-o["lr"])
    state = {"momentum_buffer": [mu.numpy() for mu in mus]} if o["momentum"] != 0 else {}
    return [p.numpy() for p in params], state


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=CASE_IDS)
def test_reference_matches_torch_over_60_steps(rule, options, dtype):
    pytest.importorskip("torch")
    p0, grads = make_inputs(dtype, 60, seed=11)
    ours, state = run_fastopt(rule, options, p0, grads, "numpy")
    theirs, their_state = (torch_lamb if rule == "lamb" else torch_lars)(options, p0, grads)
    tol = 2e-5 if dtype == np.float32 else 1e-11
    for i, (a, b) in enumerate(zip(ours, theirs)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"param[{i}]")
    assert set(state) == set(their_state)
    for name in state:
        for i, (a, b) in enumerate(zip(state[name], their_state[name])):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"{name}[{i}]")
    assert not ours[ZERO].any()  # both norms 0 throughout: the guards kept the step finite (and zero)
    assert all(np.isfinite(p).all() for p in ours)


# ---- every host backend, bit for bit --------------------------------------------------

def assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=what + " (NaN positions)")
    keep = ~np.isnan(b)
    np.testing.assert_array_equal(a[keep].view(np.uint8), b[keep].view(np.uint8), err_msg=what)


def assert_runs_equal(got, want, what):
    (p, s), (p_ref, s_ref) = got, want
    for i, (a, b) in enumerate(zip(p, p_ref)):
        assert_same(a, b, f"{what}: param[{i}]")
    assert set(s) == set(s_ref)
    for name in s:
        for i, (a, b) in enumerate(zip(s[name], s_ref[name])):
            assert_same(a, b, f"{what}: {name}[{i}]")


@pytest.fixture
def threads():
    before = fastopt.get_num_threads()
    yield
    fastopt.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=CASE_IDS)
def test_every_backend_is_the_reference_bitwise(rule, options, dtype):
    p0, grads = make_inputs(dtype, 4, seed=3, specials=True)
    want = run_fastopt(rule, options, p0, grads, "numpy")
    for backend in COMPILED:
        assert_runs_equal(run_fastopt(rule, options, p0, grads, backend), want, f"{backend} list")
    assert_runs_equal(run_fastopt(rule, options, p0, grads, "c", flat=True),
                      run_fastopt(rule, options, p0, grads, "numpy", flat=True), "c flat")


BIG = [(70_001,), (4096 * 9,), (3,), (1000, 33)]  # over the thread thresholds of both passes


@pytest.mark.parametrize("rule,options", [("lamb", {}), ("lamb", {"adam_w_mode": False, "max_grad_norm": None}),
                                          ("lars", {"lr": 1.0, "weight_decay": 1e-3}),
                                          ("lars", {"lr": 1.0, "momentum": 0.0})],
                         ids=["lamb", "lamb-l2", "lars", "lars-no-momentum"])
def test_one_and_two_threads_give_the_same_bits(rule, options, threads):
    p0, grads = make_inputs(np.float32, 3, seed=5, shapes=BIG)
    want = run_fastopt(rule, options, p0, grads, "numpy")
    for backend in COMPILED:
        for n in (1, 2):
            fastopt.set_num_threads(n)
            assert_runs_equal(run_fastopt(rule, options, p0, grads, backend), want, f"{backend}, {n} threads")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_first_pass_sums_agree_everywhere(dtype, threads):
    """Pass 1 alone (fastopt.trust.trust_sums): the same bits on every backend and thread
    count, and the parameters' sums are fastopt.sums_of_squares' per-tensor sums."""
    p0, grads = make_inputs(dtype, 1, seed=9, shapes=BIG + SHAPES)
    m = [np.abs(g) * 0.1 for g in grads[0]]
    v = [g * g for g in grads[0]]
    _, each = fastopt.sums_of_squares(p0, backend="numpy")
    for rule, state, opts in (("lamb", (m, v), {"step": 3}), ("lars", (m,), {"lr": 0.1, "weight_decay": 0.01})):
        want = trust.trust_sums(rule, p0, grads[0], *state, backend="numpy", **opts)
        assert [x.hex() for x in want[0]] == [x.hex() for x in each]
        for n in (1, 2):
            fastopt.set_num_threads(n)
            for backend in HOST:
                got = trust.trust_sums(rule, p0, grads[0], *state, backend=backend, **opts)
                for a, b in zip(got, want):
                    assert a.dtype == np.float64 and [x.hex() for x in a] == [x.hex() for x in b], (rule, backend, n)


def test_flush_denormal_is_the_references(threads):
    tiny = np.finfo(np.float32).tiny
    p0, grads = make_inputs(np.float32, 3, seed=2)
    p0 = [p * tiny for p in p0]
    grads = [[g * tiny * 0.01 for g in gs] for gs in grads]
    try:
        fastopt.set_flush_denormal(True)
        for rule, options in (("lamb", {"max_grad_norm": None}), ("lars", {"lr": 1.0, "weight_decay": 0.5})):
            want = run_fastopt(rule, options, p0, grads, "numpy")
            for backend in COMPILED:
                assert_runs_equal(run_fastopt(rule, options, p0, grads, backend), want, f"{rule} {backend} flush")
    finally:
        fastopt.set_flush_denormal(False)


# ---- the rule's pieces -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", CASES, ids=CASE_IDS)
def test_elements_equal_the_reference_in_both_passes(rule, options, dtype, monkeypatch):
    """The element function as plain Python (what Numba, CUDA and the C generator compile)
    equals the array-level reference: pass 1's u and pass 2's update."""
    monkeypatch.setattr(elements, "math", types.SimpleNamespace(sqrt=np.sqrt, copysign=np.copysign))
    r = TWO_PASS_RULES[rule]
    hyper = {**r.defaults, **{k: v for k, v in options.items() if k in r.defaults}}
    scalars, _ = r.prepare(hyper, 2)
    rng = np.random.default_rng(1)
    n = 23
    p, g = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
    g[:3] = [np.nan, np.inf, 0.0]
    need = r.needs(hyper)
    state = [np.abs(rng.standard_normal(n)).astype(dtype) if name in need else None for name in r.state]
    cast = lambda s: type(s)(*(dtype(x) if isinstance(x, float) else x for x in s))  # noqa: E731
    fn = getattr(elements, r.kernel)
    with np.errstate(all="ignore"):
        u_ref = reference.measure(r.kernel, p, g, tuple(state), r.trust.first_pass(scalars))
        first = cast(r.trust.first_pass(scalars))
        u = np.array([fn(p[i], g[i], *[s[i] if s is not None else dtype(0) for s in state], first)[0]
                      for i in range(n)], dtype=dtype)
        assert_same(u, u_ref, "pass 1")
        # the state pass 1 does not read does not matter to it
        for k, name in enumerate(r.state):
            if name not in r.trust.reads and state[k] is not None:
                garbage = [s if j != k else np.full(n, np.nan, dtype) for j, s in enumerate(state)]
                u2 = np.array([fn(p[i], g[i], *[s[i] if s is not None else dtype(0) for s in garbage], first)[0]
                               for i in range(n)], dtype=dtype)
                assert_same(u2, u_ref, f"pass 1 with garbage in {name}")
        second = r.trust.tensor_scalars(scalars, 2.0, 3.0)
        p_ref, st_ref = p.copy(), [None if s is None else s.copy() for s in state]
        reference.run(r.kernel, p_ref, g, tuple(st_ref), second)
        c2 = cast(second)
        out = [fn(p[i], g[i], *[s[i] if s is not None else dtype(0) for s in state], c2) for i in range(n)]
    assert_same(np.array([o[0] for o in out], dtype), p_ref, "pass 2 param")
    for k, s in enumerate(st_ref):
        if s is not None:
            assert_same(np.array([o[1 + k] for o in out], dtype), s, f"pass 2 {r.state[k]}")


def test_ratios_and_their_zero_guards():
    s, _ = LAMB.prepare(dict(LAMB.defaults), 1)
    t = LAMB.trust
    assert t.value(s, 4.0, 16.0) == s.step_size * (2.0 / 4.0)
    assert t.value(s, 0.0, 16.0) == s.step_size and t.value(s, 4.0, 0.0) == s.step_size  # apex: lr
    assert math.isnan(t.value(s, math.nan, 1.0))  # apex's `!= 0` guards let a NaN through
    assert t.applies(s) and not t.applies(LAMB.prepare({**LAMB.defaults, "weight_decay": 0.0}, 1)[0])
    assert t.applies(LAMB.prepare({**LAMB.defaults, "weight_decay": 0.0, "use_nvlamb": True}, 1)[0])
    s, _ = LARS.prepare({**LARS.defaults, "lr": 0.1}, 1)
    t = LARS.trust
    assert t.value(s, 4.0, 16.0) == s.eta * 2.0 / 4.0
    assert t.value(s, 0.0, 16.0) == 1.0 and t.value(s, 4.0, 0.0) == 1.0
    assert t.value(s, math.nan, 1.0) == 1.0  # vicreg's `> 0` guards: a NaN norm gives q = 1
    assert not t.applies(LARS.prepare({**LARS.defaults, "lr": 0.1, "lars_adaptation": False}, 1)[0])


def test_c_ratio_is_the_rule_tables():
    """fastopt_<rule>_ratio is translated from Trust.ratio: the same double on edge values."""
    from fastopt.backends import c
    if c.unavailable_reason():
        pytest.skip(c.unavailable_reason())
    ffi, lib = c._ext.ffi, c._ext.lib
    values = [0.0, 5e-324, 1e-300, 0.25, 1.0, 3.0, 1e300, math.inf, math.nan]
    for rule, hyper in (("lamb", dict(LAMB.defaults)), ("lamb", {**LAMB.defaults, "weight_decay": 0.0}),
                        ("lars", {**LARS.defaults, "lr": 0.1}), ("lars", {**LARS.defaults, "lr": 0.1, "eta": 0.3})):
        r = TWO_PASS_RULES[rule]
        s, _ = r.prepare(hyper, 3)
        cs = ffi.new(f"fastopt_{rule}_scalars *", tuple(s))
        out = ffi.new(f"fastopt_{rule}_scalars *")
        for a in values:
            for b in values:
                assert getattr(lib, f"fastopt_{rule}_ratio")(out, cs, a, b) == 0
                want = r.trust.tensor_scalars(s, a, b) if r.trust.applies(s) else s
                got = getattr(out, r.trust.field)
                expected = getattr(want, r.trust.field)
                assert got == expected or (math.isnan(got) and math.isnan(expected)), (rule, a, b, got, expected)
        assert getattr(lib, f"fastopt_{rule}_ratio")(ffi.NULL, cs, 1.0, 1.0) == lib.FASTOPT_ERR_NULL


def test_no_ratio_is_the_plain_update():
    """Without weight decay (and use_nvlamb), LAMB is one pass: the element update with
    step_size = lr, exactly; LARS without adaptation likewise with q = 1."""
    p0, grads = make_inputs(np.float32, 3, seed=4)
    for rule, options in (("lamb", {"weight_decay": 0.0, "max_grad_norm": None}),
                          ("lars", {"lr": 0.1, "lars_adaptation": False})):
        r = TWO_PASS_RULES[rule]
        hyper = {**r.defaults, **options}
        hyper.pop("max_grad_norm", None)
        params = [p.copy() for p in p0]
        state = [[np.zeros_like(p) for p in p0] if name in r.needs(hyper) else None for name in r.state]
        for t, gs in enumerate(grads, start=1):
            s, _ = r.prepare(hyper, t)
            for i, (p, g) in enumerate(zip(params, gs)):
                reference.run(r.kernel, p, g, tuple(None if st is None else st[i] for st in state), s)
        got, _ = run_fastopt(rule, options, p0, grads, "c")
        for a, b in zip(got, params):
            assert_same(a, b, rule)


def test_max_grad_norm_semantics():
    """None and 0 turn the clipping off; clipping is the multiplier max_norm/global_norm
    folded into the gradient; a given grad_norm replaces the computed one."""
    p0, grads = make_inputs(np.float32, 3, seed=6)
    off = run_fastopt("lamb", {"max_grad_norm": None}, p0, grads, "c")
    assert_runs_equal(run_fastopt("lamb", {"max_grad_norm": 0.0}, p0, grads, "c"), off, "max_grad_norm=0")
    for backend in HOST:
        params = [p.copy() for p in p0]
        params2 = [p.copy() for p in p0]
        st = {n: [np.zeros_like(p) for p in p0] for n in ("exp_avg", "exp_avg_sq")}
        st2 = {n: [np.zeros_like(p) for p in p0] for n in ("exp_avg", "exp_avg_sq")}
        for t, gs in enumerate(grads, start=1):
            norm = 0.5 * fastopt.total_norm(gs)
            assert norm > 1.5
            fastopt.lamb_(params, gs, st["exp_avg"], st["exp_avg_sq"], step=t, max_grad_norm=1.5,
                          grad_multiplier=0.5, backend=backend)
            fastopt.lamb_(params2, gs, st2["exp_avg"], st2["exp_avg_sq"], step=t, max_grad_norm=None,
                          grad_multiplier=0.5 / (norm / 1.5), backend=backend)
        assert_runs_equal((params, st), (params2, st2), f"clipping as a multiplier, {backend}")
        again = [p.copy() for p in p0]
        st3 = {n: [np.zeros_like(p) for p in p0] for n in ("exp_avg", "exp_avg_sq")}
        for t, gs in enumerate(grads, start=1):
            fastopt.lamb_(again, gs, st3["exp_avg"], st3["exp_avg_sq"], step=t, max_grad_norm=1.5,
                          grad_multiplier=0.5, grad_norm=0.5 * fastopt.total_norm(gs), backend=backend)
        assert_runs_equal((again, st3), (params, st), f"grad_norm given, {backend}")


def test_empty_lists_and_tensors():
    for backend in HOST:
        fastopt.lamb_([], [], [], [], step=1, backend=backend)
        fastopt.lars_([], [], [], lr=0.1, backend=backend)
        e = np.zeros(0, np.float32)
        fastopt.lamb_(e, e.copy(), e.copy(), e.copy(), step=1, backend=backend)
        fastopt.lars_([e], [e.copy()], [e.copy()], lr=0.1, backend=backend)


# ---- bad input: named, and nothing written ----------------------------------------------

def _lamb_buffers(n=3, dtype=np.float32):
    rng = np.random.default_rng(0)
    return {k: [rng.standard_normal(5 + i).astype(dtype) for i in range(n)] for k in ("p", "g", "m", "v")}


BAD_LAMB = [
    (dict(g=lambda b: [b["g"][0].astype(np.float64), *b["g"][1:]]), TypeError, r"grad\[0\] has dtype float64"),
    (dict(m=lambda b: b["m"][:2]), ValueError, r"exp_avg has 2 arrays, expected 3"),
    (dict(v=lambda b: [b["v"][0], np.zeros(9, np.float32), b["v"][2]]), ValueError, r"exp_avg_sq\[1\] has shape"),
    (dict(m=lambda b: [b["m"][0], b["m"][1], _read_only(b["m"][2])]), ValueError, r"exp_avg\[2\] is read-only"),
    (dict(v=lambda b: [b["m"][0], *b["v"][1:]]), ValueError, r"overlaps"),
    (dict(p=lambda b: [b["p"][0], np.zeros((6, 2), np.float32)[:, 0], b["p"][2]]), ValueError, "C-contiguous"),
    (dict(m=lambda b: None), ValueError, r"exp_avg is required by lamb_, got None"),
    ({"lr": -1.0}, ValueError, r"lr must be >= 0, got -1.0"),
    ({"betas": (1.0, 0.9)}, ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
    ({"eps": math.nan}, ValueError, r"eps must be finite"),
    ({"weight_decay": "0.1"}, TypeError, r"weight_decay must be a real number"),
    ({"bias_correction": 2}, TypeError, r"bias_correction must be a bool"),
    ({"use_nvlamb": None}, TypeError, r"use_nvlamb must be a bool"),
    ({"step": 0}, ValueError, r"step must be >= 1"),
    ({"step": 1.0}, TypeError, r"step must be an int"),
    ({"max_grad_norm": -1.0}, ValueError, r"max_grad_norm must be >= 0, got -1.0"),
    ({"max_grad_norm": "big"}, TypeError, r"max_grad_norm must be a real number"),
    ({"grad_norm": -2.0}, ValueError, r"grad_norm must be >= 0 \(a norm\), got -2.0"),
    ({"grad_norm": [1.0, 2.0]}, TypeError, r"grad_norm must be a real number"),
    ({"grad_multiplier": math.inf}, ValueError, r"grad_multiplier must be finite"),
    ({"backend": "nope"}, ValueError, r"backend must be one of"),
]


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("change,error,message", BAD_LAMB, ids=[m for _, _, m in BAD_LAMB])
def test_bad_lamb_input_is_named_and_writes_nothing(change, error, message, backend):
    b = _lamb_buffers()
    kwargs = {"step": 1, "backend": backend}
    for key, value in change.items():
        if callable(value):
            b[key] = value(b)
        else:
            kwargs[key] = value
    before = {k: None if v is None else [a.copy() for a in v] for k, v in b.items()}
    with pytest.raises(error, match=message):
        fastopt.lamb_(b["p"], b["g"], b["m"], b["v"], **kwargs)
    for k, v in b.items():
        if v is not None:
            for a, a0 in zip(v, before[k]):
                np.testing.assert_array_equal(a, a0, err_msg=k)


BAD_LARS = [
    ({"momentum_buffer": None}, ValueError, r"momentum_buffer is required by lars_ when momentum != 0, got None"),
    ({"eta": -1.0}, ValueError, r"eta must be >= 0"),
    ({"lr": math.inf}, ValueError, r"lr must be finite"),
    ({"momentum": True}, TypeError, r"momentum must be a real number, got the bool True"),
    ({"lars_adaptation": "yes"}, TypeError, r"lars_adaptation must be a bool"),
    ({"step": -3}, ValueError, r"step must be >= 1"),
    ({"grad": "g"}, TypeError, r"grad must be a list or tuple of arrays"),
]


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("change,error,message", BAD_LARS, ids=[m for _, _, m in BAD_LARS])
def test_bad_lars_input_is_named_and_writes_nothing(change, error, message, backend):
    b = _lamb_buffers()
    args = {"param": b["p"], "grad": b["g"], "momentum_buffer": b["m"]}
    kwargs = {"lr": 0.1, "backend": backend}
    for key, value in change.items():
        (args if key in args else kwargs)[key] = value
    before = [a.copy() for k in ("p", "g", "m") for a in b[k]]
    with pytest.raises(error, match=message):
        fastopt.lars_(args["param"], args["grad"], args["momentum_buffer"], **kwargs)
    for a, a0 in zip([a for k in ("p", "g", "m") for a in b[k]], before):
        np.testing.assert_array_equal(a, a0)


def test_trust_sums_checks_its_arguments():
    b = _lamb_buffers()
    with pytest.raises(ValueError, match=r"rule must be one of \['lamb', 'lars'\], got 'adam'"):
        trust.trust_sums("adam", b["p"], b["g"], b["m"])
    with pytest.raises(TypeError, match=r"lamb has no hyperparameter 'momentum'"):
        trust.trust_sums("lamb", b["p"], b["g"], b["m"], b["v"], step=1, momentum=0.9)
    with pytest.raises(TypeError, match=r"lamb takes the state buffers \['exp_avg', 'exp_avg_sq'\], got 1"):
        trust.trust_sums("lamb", b["p"], b["g"], b["m"], step=1)


# ---- CUDA: the second pass's kernels in the simulator -------------------------------------

_SIM = textwrap.dedent("""
    import sys, types
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from numba import cuda
    import fastopt
    from fastopt.backends import cuda as backend, reference
    from fastopt.kernels import elements
    from fastopt.rules import TWO_PASS_RULES
    elements.math = types.SimpleNamespace(sqrt=np.sqrt, copysign=np.copysign)
    rng = np.random.default_rng(0)
    checked = 0
    for rule, hyper in (("lamb", {}), ("lamb", {"adam_w_mode": False, "weight_decay": 0.1}),
                        ("lars", {"lr": 0.5, "weight_decay": 0.01}), ("lars", {"lr": 0.5, "momentum": 0.0})):
        r = TWO_PASS_RULES[rule]
        h = {**r.defaults, **hyper}
        for dtype in (np.float32, np.float64):
            s, _ = r.prepare(h, 2)
            s = r.trust.tensor_scalars(s, 3.0, 5.0)
            p = rng.standard_normal(37).astype(dtype)
            g = rng.standard_normal(37).astype(dtype)
            g[:3] = [np.nan, np.inf, -0.0]
            need = r.needs(h)
            st = [np.abs(rng.standard_normal(37)).astype(dtype) if n in need else None for n in r.state]
            ref_p, ref_st = p.copy(), [None if x is None else x.copy() for x in st]
            reference.run(r.kernel, ref_p, g, tuple(ref_st), s)
            dp = cuda.to_device(p)
            dst = [None if x is None else cuda.to_device(x) for x in st]
            backend.run(r.kernel, dp, cuda.to_device(g), tuple(dst), s)
            pairs = [(dp.copy_to_host(), ref_p)] + [(d.copy_to_host(), x) for d, x in zip(dst, ref_st) if d is not None]
            for a, b in pairs:
                keep = ~np.isnan(b)
                assert np.array_equal(np.isnan(a), np.isnan(b)), (rule, dtype)
                assert np.array_equal(a[keep].view(np.uint8), b[keep].view(np.uint8)), (rule, dtype)
                checked += 1
        try:
            dp = cuda.to_device(np.zeros(4, np.float32))
            fastopt.lamb_(dp, cuda.to_device(np.ones(4, np.float32)), cuda.to_device(np.zeros(4, np.float32)),
                          cuda.to_device(np.zeros(4, np.float32)), step=1)
        except TypeError as exc:
            assert "runs on host arrays for now" in str(exc), exc
        else:
            raise AssertionError("lamb_ on device arrays did not refuse")
    print("checked", checked)
""")


def test_second_pass_kernels_in_the_cuda_simulator():
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__))))
    proc = subprocess.run([sys.executable, "-c", _SIM, src], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checked 18" in proc.stdout, proc.stdout


def _ptxas():
    try:
        from cuda import pathfinder
        return pathfinder.find_nvidia_binary_utility("ptxas")
    except Exception:
        return None


TWO_PASS_VARIANTS = [(r.kernel, present) for r in TWO_PASS_RULES.values()
                     for present in ({(True,) * len(r.state), (False,) * len(r.state)} if r.kernel == "lars"
                                     else {(True,) * len(r.state)})]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel,present", TWO_PASS_VARIANTS, ids=[f"{k}-{p}" for k, p in TWO_PASS_VARIANTS])
def test_second_pass_ptx_compiles_and_assembles(kernel, present, dtype, tmp_path):
    """The two-pass kernels' CUDA variants, as every rule's (tests/test_cuda_backend.py):
    no float64 in a float32 kernel, IEEE division and sqrt, and ptxas assembles them."""
    cuda = pytest.importorskip("numba.cuda")
    from fastopt.kernels import cuda_kernels
    fn = cuda_kernels.make_kernel(kernel, present)
    sig = cuda_kernels.signature(kernel, dtype, present)
    try:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    except Exception as exc:  # no NVVM here
        pytest.skip(f"compile_ptx unavailable: {exc}")
    ops = [line.split()[0] for line in ptx.splitlines()
           if line.startswith("\t") and line.split() and line.split()[0][0].isalpha()]
    if dtype == np.float32:
        assert not [op for op in ops if ".f64" in op], set(ops)
    assert not [op for op in ops if ".ftz" in op or ".approx" in op or ".full" in op], set(ops)
    if kernel == "lamb":
        assert "sqrt.rn.f32" in ops or "sqrt.rn.f64" in ops
    ptxas = _ptxas()
    if ptxas:
        src = tmp_path / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-arch=sm_90", str(src), "-o", str(src) + ".cubin"], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
