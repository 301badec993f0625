"""AdEMAMix's optional warmups of alpha and beta3 (``alpha_warmup``, ``beta3_warmup``).

The paper (Pagliardini, Ablin & Grangier 2024, "The AdEMAMix Optimizer: Better,
Faster, Older", section 3 and Algorithm 1) ramps, at steps t < T (1-based),

    alpha_t = min(t*alpha/T, alpha)
    beta3_t = min(exp(ln(beta1)*ln(beta3) / ((1 - t/T)*ln(beta3) + (t/T)*ln(beta1))), beta3)

and uses alpha and beta3 from step T on; the names are those of the authors'
PyTorch reference (apple/ml-ademamix), whose default None means no warmup.
Checked here: the rule's schedule values against a direct evaluation of the
paper's formulas (t = 1, T-1, T, T+5), the C prepare against the rule bit for
bit over whole warmups and at the formula's edges (beta1 = 0, beta3 = 0,
beta1 > beta3, T = 1, T = 2**53), None leaving today's scalars bitwise as they
were, 60 steps against a NumPy reference written from the paper (T within the
run, float32 and float64), the numpy, numba and c backends bit for bit, and the
stateful and torch optimizers with the new hyperparameters (their state dicts
round-trip across T).
"""
from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest

import fastopt
from fastopt.flat import FlatParams
from fastopt.rules import RULES
from oracle import inputs, paper_alpha, paper_beta3

RULE = RULES["ademamix"]
HOST = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]


def scalars(step: int, **options):
    return RULE.prepare({**RULE.defaults, **options}, step)[0]


def direct_alpha(t, alpha, T):
    """The paper's f_alpha, as printed (no case split)."""
    return min(t * alpha / T, alpha)


def direct_beta3(t, beta1, beta3, T):
    """The paper's f_beta3 from beta_start = beta1, as printed (no case split; logs of numbers > 0)."""
    return min(math.exp(math.log(beta1) * math.log(beta3) / ((1 - t / T) * math.log(beta3) + (t / T) * math.log(beta1))),
               beta3)


def bits(x: float) -> bytes:
    return np.float64(x).tobytes()


# ---- the schedules ----------------------------------------------------------------

SCHEDULES = [(0.9, 0.999, 0.9999, 2.0, 100), (0.8, 0.99, 0.999, 8.0, 37), (0.5, 0.999, 0.99999, 5.0, 256_000),
             (0.9, 0.999, 0.9999, 2.0, 2), (0.95, 0.95, 0.9999, 3.0, 1000)]


@pytest.mark.parametrize("b1,b2,b3,alpha,T", SCHEDULES, ids=[f"T={c[-1]}" for c in SCHEDULES])
def test_schedule_values_are_the_papers(b1, b2, b3, alpha, T):
    opts = dict(betas=(b1, b2, b3), alpha=alpha, beta3_warmup=T, alpha_warmup=T)
    for t in sorted({1, T - 1}):
        s = scalars(t, **opts)
        # during the warmup: the paper's formulas, in their operation order, to the bit
        assert bits(s.alpha) == bits(direct_alpha(t, alpha, T)), t
        assert bits(s.beta3) == bits(direct_beta3(t, b1, b3, T)), t
        assert bits(s.one_minus_beta3) == bits(1.0 - s.beta3)
        assert bits(s.beta3) == bits(paper_beta3(t, b1, b3, T)) and bits(s.alpha) == bits(paper_alpha(t, alpha, T))
        assert b1 * (1 - 1e-12) < s.beta3 <= b3 and 0.0 < s.alpha <= alpha
    for t in (T, T + 5):
        s = scalars(t, **opts)
        # from T on: the final values themselves; the paper's formula (continuous at T, and
        # held at the final value by its min past T) within an ulp or two of them
        assert bits(s.alpha) == bits(alpha) and bits(s.beta3) == bits(b3), t
        assert abs(direct_beta3(t, b1, b3, T) - b3) <= 2 * math.ulp(b3), t
        assert abs(direct_alpha(t, alpha, T) - alpha) <= 2 * math.ulp(alpha), t
    # the ramps rise from beta1 (half-lives linear in t) and from 0 (linear)
    b3s = [scalars(t, **opts).beta3 for t in range(1, min(T, 50) + 1)]
    assert b3s == sorted(b3s)
    if T > 2:
        s = scalars(1, **opts)
        assert math.isclose(s.alpha, alpha / T, rel_tol=1e-15)
        half_life = lambda b: math.log(0.5) / math.log(b)  # noqa: E731
        want = half_life(b1) + (half_life(b3) - half_life(b1)) / T
        assert math.isclose(half_life(s.beta3), want, rel_tol=1e-9)


def test_warmups_are_independent():
    s = scalars(3, alpha_warmup=10)
    assert s.beta3 == 0.9999 and s.alpha == 3 * 2.0 / 10
    s = scalars(3, beta3_warmup=10)
    assert s.alpha == 2.0 and s.beta3 == direct_beta3(3, 0.9, 0.9999, 10)


def test_schedule_edges():
    # beta1 = 0 (ln 0 = -inf): the formula's limit, beta3**(T/t), the half-life ramp from 0
    for t in (1, 3, 9):
        s = scalars(t, betas=(0.0, 0.999, 0.9999), beta3_warmup=10)
        assert math.isclose(s.beta3, 0.9999 ** (10 / t), rel_tol=1e-13), t
        assert math.isclose(s.beta3, paper_beta3(t, 0.0, 0.9999, 10), rel_tol=1e-13)
    assert scalars(10, betas=(0.0, 0.999, 0.9999), beta3_warmup=10).beta3 == 0.9999
    # beta3 = 0: 0 throughout (the min with beta3); beta1 > beta3: beta3 throughout (min again)
    for t in (1, 5, 20):
        assert scalars(t, betas=(0.9, 0.999, 0.0), beta3_warmup=10).beta3 == 0.0
        assert scalars(t, betas=(0.0, 0.999, 0.0), beta3_warmup=10).beta3 == 0.0
        assert scalars(t, betas=(0.99, 0.999, 0.9), beta3_warmup=10).beta3 == 0.9
    # T = 1: no step is before it, so no warmup; the longest warmup, 2**53, still ramps
    for t in (1, 2, 1000):
        assert scalars(t, beta3_warmup=1, alpha_warmup=1) == scalars(t)
    s = scalars(2**52, beta3_warmup=2**53, alpha_warmup=2**53)
    assert s.alpha == 1.0 and 0.9 < s.beta3 < 0.9999
    assert scalars(2**53, beta3_warmup=2**53, alpha_warmup=2**53) == scalars(2**53)


def _old_scalars(lr, beta1, beta2, beta3, alpha, eps, weight_decay, maximize, step):
    """The rule's scalars before the warmups existed (its compute function, verbatim)."""
    return RULE.scalars(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
                        beta3=beta3, one_minus_beta3=1.0 - beta3, alpha=alpha,
                        bias_correction1=1.0 - beta1 ** step, bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step),
                        eps=eps, lr=lr, param_decay=1.0 - lr * weight_decay, grad_sign=-1.0 if maximize else 1.0)


@pytest.mark.parametrize("options", [{}, dict(lr=3e-3, betas=(0.0, 0.5, 0.0), alpha=0.0, weight_decay=0.1),
                                     dict(betas=(0.99, 0.95, 0.5), alpha=7.5, eps=1e-6, maximize=True)],
                         ids=["defaults", "zeros", "other"])
def test_no_warmup_leaves_the_scalars_bitwise_unchanged(options):
    h = {**RULE.defaults, **options}
    b1, b2, b3 = h["betas"]
    for t in (1, 2, 3, 10, 1000, 2**40):
        old = _old_scalars(h["lr"], b1, b2, b3, h["alpha"], h["eps"], h["weight_decay"], h["maximize"], t)
        for warmups in ({}, dict(beta3_warmup=None, alpha_warmup=None), dict(beta3_warmup=1, alpha_warmup=1)):
            new = scalars(t, **options, **warmups)
            assert [bits(x) for x in new] == [bits(x) for x in old], (t, warmups)


# ---- the C prepare ----------------------------------------------------------------

C_CASES = [dict(beta3_warmup=40, alpha_warmup=25), dict(beta3_warmup=7), dict(alpha_warmup=3),
           dict(betas=(0.0, 0.999, 0.9999), beta3_warmup=12, alpha_warmup=12),
           dict(betas=(0.9, 0.999, 0.0), beta3_warmup=12), dict(betas=(0.99, 0.999, 0.9), beta3_warmup=12),
           dict(betas=(0.8, 0.99, 0.999), alpha=1e300, beta3_warmup=1, alpha_warmup=2),
           dict(beta3_warmup=2**53, alpha_warmup=2**53 - 1)]


@pytest.mark.parametrize("options", C_CASES, ids=[str(o) for o in C_CASES])
def test_c_prepare_equals_the_rule_through_the_warmup(options):
    if "c" not in HOST:
        pytest.skip("the c backend did not load")
    from fastopt.backends import c
    ffi, lib = c._ext.ffi, c._ext.lib
    valid, _ = RULE.checked({**RULE.defaults, **options})
    flat = RULE.flat(valid)
    names = [n for h in RULE.hyper for n in h.names]
    T = max(int(flat["beta3_warmup"]), int(flat["alpha_warmup"]), 1)
    for t in [*range(1, min(T, 60) + 6), T - 1, T, T + 1, 2**62]:
        if t < 1:
            continue
        want = RULE.prepare({**RULE.defaults, **options}, t)[0]
        out = ffi.new("fastopt_ademamix_scalars *")
        assert lib.fastopt_ademamix_prepare(out, *[flat[n] for n in names], t) == lib.FASTOPT_OK
        got = [getattr(out, f) for f in want._fields]
        assert [bits(x) for x in got] == [bits(x) for x in want], t


def test_c_prepare_refuses_what_python_refuses():
    if "c" not in HOST:
        pytest.skip("the c backend did not load")
    from fastopt.backends import c
    ffi, lib = c._ext.ffi, c._ext.lib
    out = ffi.new("fastopt_ademamix_scalars *")
    good = [1e-3, 0.9, 0.999, 0.9999, 2.0, 1e-8, 0.0]
    for warmup, ok in [(0.0, True), (-0.0, True), (1.0, True), (7.0, True), (2.0**53, True), (0.5, False),
                       (-1.0, False), (2.0**53 + 2, False), (math.inf, False), (math.nan, False)]:
        for args in ((warmup, 0.0), (0.0, warmup)):
            rc = lib.fastopt_ademamix_prepare(out, *good, *args, 0, 3)
            assert (rc == lib.FASTOPT_OK) == ok, (warmup, args)


# ---- bad values ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["beta3_warmup", "alpha_warmup"])
@pytest.mark.parametrize("value,exc,words", [
    (0, ValueError, [">= 1", "got 0"]), (-1, ValueError, [">= 1", "got -1"]), (1.5, TypeError, ["int", "1.5"]),
    (True, TypeError, ["int", "True"]), (np.True_, TypeError, ["int"]), (3.0, TypeError, ["int", "3.0"]),
    (np.float64(3.0), TypeError, ["int"]), ("5", TypeError, ["int"]), ([5], TypeError, ["int"]),
    (2**53 + 1, ValueError, ["2**53"]), (10**400, ValueError, ["2**53"])])
def test_bad_warmups_name_the_argument(name, value, exc, words):
    p0, (g,) = inputs(16, 1, np.float32)
    p, m1, m2, nu = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
    with pytest.raises(exc) as info:
        fastopt.ademamix_(p, g, m1, m2, nu, step=1, **{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must"), message
    for word in words:
        assert word in message, message
    assert np.array_equal(p, p0) and not m1.any() and not m2.any() and not nu.any()
    with pytest.raises(exc, match=name):
        fastopt.AdEMAMix(FlatParams([p0.copy()]), **{name: value})


@pytest.mark.parametrize("value", [1, 7, np.int64(7), np.int32(7), np.array(7), 2**53])
def test_integer_likes_are_warmups(value):
    assert scalars(3, beta3_warmup=value, alpha_warmup=value) == scalars(3, beta3_warmup=int(value),
                                                                         alpha_warmup=int(value))


# ---- 60 steps against the paper ---------------------------------------------------

STEPS = 60
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}
#: T within the run (40 and 25 of 60 steps); a fast slow average (beta3 0.99) and a large alpha,
#: so that the warmups change the run by far more than the tolerance.
RUN = dict(lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=8.0, weight_decay=0.01, beta3_warmup=40, alpha_warmup=25)
RUNS = [RUN, {**RUN, "alpha_warmup": None}, {**RUN, "beta3_warmup": None, "alpha_warmup": 60},
        {**RUN, "betas": (0.0, 0.999, 0.99)}, {**RUN, "maximize": True}]


def paper_run(options: dict, p0, grads):
    """AdEMAMix as the paper's Algorithm 1 writes it, with its schedulers (oracle.paper_alpha,
    oracle.paper_beta3), in NumPy arrays of the inputs' dtype; decoupled weight decay as the
    authors' reference adds it (``u + wd*p``)."""
    h = {**RULE.defaults, **options}
    lr, (b1, b2, b3), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
    p = p0.copy()
    m1, m2, nu = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = -g if h["maximize"] else g
        beta3_t = paper_beta3(t, b1, b3, h["beta3_warmup"])
        alpha_t = paper_alpha(t, h["alpha"], h["alpha_warmup"])
        m1 = b1 * m1 + (1 - b1) * g
        m2 = beta3_t * m2 + (1 - beta3_t) * g
        nu = b2 * nu + (1 - b2) * g * g
        update = (m1 / (1 - b1 ** t) + alpha_t * m2) / (np.sqrt(nu) / math.sqrt(1 - b2 ** t) + eps) + wd * p
        p = p - lr * update
    return p, {"exp_avg_fast": m1, "exp_avg_slow": m2, "exp_avg_sq": nu}


def fastopt_run(options: dict, p0, grads, backend: str, lists: bool = False):
    p = [p0[:100].copy(), p0[100:].copy()] if lists else p0.copy()
    state = [[np.zeros_like(a) for a in p] if lists else np.zeros_like(p) for _ in range(3)]
    for t, g in enumerate(grads, start=1):
        fastopt.ademamix_(p, [g[:100], g[100:]] if lists else g, *state, step=t, backend=backend, **options)
    join = np.concatenate if lists else (lambda a: a)
    return join(p), dict(zip(RULE.state, map(join, state)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", RUNS, ids=[str(o) for o in RUNS])
def test_sixty_steps_follow_the_paper(options, dtype):
    p0, grads = inputs(257, STEPS, dtype, seed=11)
    p, state = fastopt_run(options, p0, grads, "numpy")
    p_ref, state_ref = paper_run(options, p0, grads)
    assert p.dtype == p_ref.dtype == dtype
    np.testing.assert_allclose(p, p_ref, **TOL[dtype])
    for name in RULE.state:
        np.testing.assert_allclose(state[name], state_ref[name], **TOL[dtype], err_msg=name)
    # the warmups mattered: without them the run ends far outside the tolerance
    p_plain, _ = paper_run({**options, "beta3_warmup": None, "alpha_warmup": None}, p0, grads)
    assert np.max(np.abs(p_plain - p_ref)) > 100 * TOL[dtype]["atol"]


@pytest.mark.parametrize("lists", [False, True], ids=["flat", "lists"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", RUNS[:2] + RUNS[3:4], ids=[str(o) for o in RUNS[:2] + RUNS[3:4]])
def test_backends_agree_bitwise_through_the_warmup(options, dtype, lists):
    p0, grads = inputs(1031, STEPS, dtype, seed=5)
    results = {b: fastopt_run(options, p0, grads, b, lists) for b in HOST}
    p_ref, s_ref = results.pop("numpy")
    assert results, "no compiled host backend to compare"
    for backend, (p, state) in results.items():
        assert p.tobytes() == p_ref.tobytes(), backend
        for name in RULE.state:
            assert state[name].tobytes() == s_ref[name].tobytes(), (backend, name)


# ---- the stateful optimizers --------------------------------------------------------

def test_flat_optimizer_takes_the_warmups_and_its_state_dict_round_trips_across_T():
    p0, grads = inputs(304, 20, np.float64, seed=2)  # (a whole number of 64-byte lines: no padding)
    opts = dict(lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=8.0, beta3_warmup=9, alpha_warmup=12)
    straight = FlatParams([p0.copy()])
    opt = fastopt.AdEMAMix(straight, **opts)
    for g in grads:
        opt.step(g)
    p_ref, _ = fastopt_run(opts, p0, grads, "numpy")
    assert straight.data.tobytes() == p_ref.tobytes()  # (the same functional calls on the same backend)

    first_flat = FlatParams([p0.copy()])
    first = fastopt.AdEMAMix(first_flat, **opts)
    for g in grads[:5]:
        first.step(g)
    saved = first.state_dict()
    assert saved["param_groups"][0]["beta3_warmup"] == 9 and saved["param_groups"][0]["alpha_warmup"] == 12
    resumed_flat = FlatParams([first_flat.params[0].copy()])
    resumed = fastopt.AdEMAMix(resumed_flat)  # the warmups come from the state dict
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["beta3_warmup"] == 9
    for g in grads[5:]:  # steps 6..20 cross both T
        resumed.step(g)
    assert resumed_flat.data.tobytes() == straight.data.tobytes()
    # None (no warmup) round-trips as None
    plain = fastopt.AdEMAMix(FlatParams([p0.copy()]))
    plain.step(grads[0])
    assert plain.state_dict()["param_groups"][0]["beta3_warmup"] is None


def test_flat_optimizer_refuses_a_bad_saved_warmup_and_changes_nothing():
    p0, grads = inputs(32, 2, np.float32, seed=2)
    opt = fastopt.AdEMAMix(FlatParams([p0.copy()]), beta3_warmup=5)
    opt.step(grads[0])
    saved = opt.state_dict()
    saved["param_groups"][0]["beta3_warmup"] = 0
    with pytest.raises(ValueError, match="beta3_warmup"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["beta3_warmup"] == 5


# ---- fastopt.torch ----------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _paper_torch_class(torch):
    class PaperAdEMAMix(torch.optim.Optimizer):
        """The authors' PyTorch reference's update and names (apple/ml-ademamix), with the
        paper's schedulers (oracle.paper_alpha, oracle.paper_beta3) for the warmups."""

        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                     alpha_warmup=None, eps=1e-8, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                                          alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                lr, (b1, b2, b3), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
                for p in group["params"]:
                    st = self.state[p]
                    if not st:
                        st.update(step=0, exp_avg_fast=torch.zeros_like(p), exp_avg_slow=torch.zeros_like(p),
                                  exp_avg_sq=torch.zeros_like(p))
                    st["step"] += 1
                    t, g = st["step"], p.grad
                    m1, m2, nu = st["exp_avg_fast"], st["exp_avg_slow"], st["exp_avg_sq"]
                    beta3 = paper_beta3(t, b1, b3, group["beta3_warmup"])
                    alpha = paper_alpha(t, group["alpha"], group["alpha_warmup"])
                    m1.mul_(b1).add_(g, alpha=1 - b1)
                    m2.mul_(beta3).add_(g, alpha=1 - beta3)
                    nu.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (nu.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
                    update = (m1.div(1 - b1 ** t) + alpha * m2) / denom
                    update.add_(p, alpha=wd)
                    p.add_(-lr * update)
    return PaperAdEMAMix


TORCH_OPTS = dict(lr=3e-3, betas=(0.9, 0.999, 0.99), alpha=5.0, weight_decay=0.01, beta3_warmup=60, alpha_warmup=40)


def _mlp(torch):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _train(torch, model, opt, steps, start=0):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 8, generator=gen), torch.randn(256, 4, generator=gen)
    batches = torch.randint(0, 256, (200, 32), generator=gen)
    for t in range(start, start + steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[batches[t]]), y[batches[t]]).backward()
        opt.step()


def test_torch_optimizer_trains_like_the_paper_with_warmups():
    torch = _torch()
    import fastopt.torch as ft
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours, theirs = _mlp(torch), _mlp(torch)
        start = [p.detach().clone() for p in theirs.parameters()]
        _train(torch, theirs, _paper_torch_class(torch)(theirs.parameters(), **TORCH_OPTS), 100)
        opt = ft.AdEMAMix(ours.parameters(), **TORCH_OPTS)
        _train(torch, ours, opt, 100)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), atol=2e-5, rtol=1e-5)
        assert max((p.detach() - p0).abs().max().item() for p, p0 in zip(ours.parameters(), start)) > 0.01
        plain = _mlp(torch)
        _train(torch, plain, ft.AdEMAMix(plain.parameters(), **{**TORCH_OPTS, "beta3_warmup": None,
                                                                "alpha_warmup": None}), 100)
        assert max((a - b).abs().max().item() for a, b in zip(plain.parameters(), ours.parameters())) > 1e-3
        assert opt.param_groups[0]["beta3_warmup"] == 60 and opt.param_groups[0]["alpha_warmup"] == 40
    finally:
        torch.set_num_threads(before)


def test_torch_state_dict_round_trips_across_T_and_loads_the_authors_groups():
    torch = _torch()
    import fastopt.torch as ft
    straight = _mlp(torch)
    _train(torch, straight, ft.AdEMAMix(straight.parameters(), **TORCH_OPTS), 100)

    model = _mlp(torch)
    first = ft.AdEMAMix(model.parameters(), **TORCH_OPTS)
    _train(torch, model, first, 30)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ft.AdEMAMix(model.parameters())  # the warmups come from the state dict
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.param_groups[0]["beta3_warmup"] == 60 and resumed.param_groups[0]["alpha_warmup"] == 40
    _train(torch, model, resumed, 70, start=30)  # steps 31..100 cross both T
    for a, b in zip(model.parameters(), straight.parameters()):
        assert torch.equal(a, b)

    # a state dict of the authors' class (their group and state keys, an int step) loads, and continues alike
    theirs_model, ours_model = _mlp(torch), _mlp(torch)
    theirs = _paper_torch_class(torch)(theirs_model.parameters(), **TORCH_OPTS)
    _train(torch, theirs_model, theirs, 30)
    ours_model.load_state_dict(theirs_model.state_dict())
    saved = copy.deepcopy(theirs.state_dict())
    for group in saved["param_groups"]:  # (their class has no maximize; fastopt.torch wants every key)
        group["maximize"] = False
    ours = ft.AdEMAMix(ours_model.parameters())
    ours.load_state_dict(saved)
    assert {k for k in ours.param_groups[0] if k != "params"} >= {"beta3_warmup", "alpha_warmup"}
    _train(torch, theirs_model, theirs, 40, start=30)
    _train(torch, ours_model, ours, 40, start=30)
    for a, b in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), atol=2e-5, rtol=1e-5)
