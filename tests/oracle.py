"""The test matrix shared by every backend test: rules x options, and the oracles.

``CASES`` lists, per rule, option sets derived from the rule table that
together exercise every option. ``run_fastopt`` drives the functional API for many steps;
``run_torch`` drives ``torch.optim`` (single-tensor path, ``foreach=False``) on
the same inputs; ``run_lion_published`` is Lion as published (Chen et al.
2023, Algorithm 2; the lucidrains reference implementation), since torch has no Lion.
"""
from __future__ import annotations

import math

import numpy as np

import fastopt
from fastopt.checks import closed_unit, flag, nonneg, real, unit, warmup_steps
from fastopt.rule import Hyper
from fastopt.rules import RULES

#: The varied warmup (AdEMAMix's beta3_warmup, alpha_warmup): within every run of the tests
#: (10 steps and more), and among the steps test_c_library prepares (5 < 6 = T < 7).
WARMUP = 6


def _varied(h: Hyper):
    """A valid value of ``h`` other than its default, or None (no default to vary from)."""
    d, check = h.default, h.check
    if check is flag:
        return not d
    if check is warmup_steps:
        return WARMUP if d is None else None
    if getattr(check, "arity", 1) > 1:
        one = check_of_pair(check)
        if one is nonneg:  # (a gentle change: pairs such as Rprop's etas are ordered around 1)
            return tuple(1.5 * x for x in d)
        return tuple(_varied(Hyper(h.name, x, one)) for x in d)
    if d is None:
        return None
    if check is nonneg:
        return 0.1 if d == 0 else d * 5
    if check in (unit, closed_unit):
        return 0.5 if d == 1 else 1.0 - 2.0 * (1.0 - d)
    if check is real:
        return 0.3 if d == 0 else -d
    raise AssertionError(f"no varied value for {h.name} ({check})")


def check_of_pair(check):
    """The element check of a tuple check (pair(unit), AdEMAMix's triple of betas)."""
    return check.element


def _required(rule) -> dict:
    """Values for hyperparameters without a default (SGD's lr), the carried one excluded."""
    return {h.name: 0.1 for h in rule.hyper if h.required and h.name != rule.carry_name}


def _valid(rule, options: dict) -> bool:
    try:
        rule.checked({**rule.defaults, **options, **({rule.carry[0]: rule.carry[1]} if rule.carry else {})})
    except ValueError:
        return False
    return True


def cases_of(rule) -> list[dict]:
    """Option sets derived from the rule table: the defaults, each hyperparameter
    varied alone, and everything varied at once (less what the rule's relation
    refuses), then that with each flag off. Together they exercise every option
    and state buffer."""
    base = _required(rule)
    single = [{h.name: _varied(h)} for h in rule.hyper
              if h.name != rule.carry_name and not h.required]
    everything = {k: v for one in single for k, v in one.items()}
    for drop in [None, *everything]:  # the all-on case, or the largest valid subset
        candidate = {k: v for k, v in everything.items() if k != drop}
        if _valid(rule, {**base, **candidate}):
            break
    # ... and the all-on case with each flag off in turn (options in combination:
    # SGD's dampening with momentum, RMSprop's momentum without centering).
    flags = [h.name for h in rule.hyper if h.check is flag and h.name in everything]
    without_flag = [{k: v for k, v in everything.items() if k != name} for name in flags]
    out = [base, *({**base, **one} for one in single), {**base, **candidate}, *({**base, **o} for o in without_flag)]
    return [o for i, o in enumerate(out) if _valid(rule, o) and o not in out[:i]]


#: Per rule, the options the backend tests run (derived from the table, no hand-kept list).
CASES: dict[str, list[dict]] = {name: cases_of(rule) for name, rule in RULES.items()}

#: Per rule, the case that uses every state buffer the rule has (for the bad-input tests).
FULL: dict[str, dict] = {name: next(o for o in reversed(CASES[name])
                                    if set(RULES[name].checked({**RULES[name].defaults, **o,
                                                                **dict([RULES[name].carry] if RULES[name].carry else [])}
                                                               )[1]) == set(RULES[name].state))
                         for name in RULES}


#: (rule, options) pairs, flattened for pytest.mark.parametrize, with readable ids.
MATRIX = [(rule, opts) for rule, cases in CASES.items() for opts in cases]
MATRIX_IDS = [f"{rule}-" + ("-".join(f"{k}={v}" for k, v in opts.items()) or "defaults") for rule, opts in MATRIX]

#: ``torch.optim`` state keys that differ from the functional names (torch's functional API's).
TORCH_STATE_NAME = {s.name: s.key for rule in RULES.values() for s in rule.buffers if s.saved_as}


def hyper(rule: str, options: dict) -> dict:
    """The full hyperparameter dict of one case: defaults filled in, the carried
    value (NAdam's mu_product) at its value before the first step."""
    r = RULES[rule]
    return {**r.defaults, **options, **(dict([r.carry]) if r.carry else {})}


def needed_state(rule: str, options: dict) -> tuple[str, ...]:
    return tuple(RULES[rule].checked(hyper(rule, options))[1])  # (checked: a warmup's None is 0.0 in compute)


def initial_state(rule: str, options: dict, like) -> dict:
    """The state buffers a case needs, as the optimizers start them: zeros, or
    the value of the hyperparameter named by the buffer's ``init`` (Rprop's
    step_size starts at lr)."""
    r = RULES[rule]
    values = {**{h.name: h.default for h in r.optimizer_hyper}, **r.defaults, **options}
    init = {s.name: s.init for s in r.buffers if s.init}
    return {name: np.full_like(like, values[init[name]]) if name in init else np.zeros_like(like)
            for name in needed_state(rule, options)}


def inputs(n: int, steps: int, dtype, seed: int = 0):
    """A starting parameter vector and ``steps`` gradients (standard normal)."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(steps)]
    return p0, grads


def fastopt_step(rule: str, options: dict, p, g, state: dict, step: int, extra: dict, backend=None):
    """One functional update of ``p`` and ``state`` in place."""
    fn = getattr(fastopt, rule + "_")
    args = [state.get(name) for name in RULES[rule].state]
    kwargs = dict(options, backend=backend)
    if RULES[rule].takes_step:
        kwargs["step"] = step
    carry = RULES[rule].carry
    if carry:
        kwargs[carry[0]] = extra.get(carry[0], carry[1])
        extra[carry[0]] = fn(p, g, *args, **kwargs)
    else:
        fn(p, g, *args, **kwargs)


def run_fastopt(rule: str, options: dict, p0, grads, backend=None):
    """Run ``len(grads)`` updates from zero state; return (param, {state name: buffer})."""
    p = p0.copy()
    state = initial_state(rule, options, p)
    extra: dict = {}
    for t, g in enumerate(grads, start=1):
        fastopt_step(rule, options, p, g, state, t, extra, backend)
    return p, state


def run_torch(rule: str, options: dict, p0, grads):
    """The same run through ``torch.optim`` (single-tensor implementation)."""
    import torch

    cls = getattr(torch.optim, RULES[rule].title, None)
    if cls is None:
        return PUBLISHED[rule](options, p0, grads)
    opts = dict(options)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = cls([param], foreach=False, **opts)
    # torch keeps step scalars such as NAdam's mu_product in the default dtype;
    # match it to the buffers so float64 runs are float64 throughout.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if p0.dtype == np.float64 else torch.float32)
    try:
        for g in grads:
            param.grad = torch.from_numpy(g.copy())
            opt.step()
    finally:
        torch.set_default_dtype(previous)
    st = opt.state[param]
    state = {name: st[TORCH_STATE_NAME.get(name, name)].detach().numpy()
             for name in needed_state(rule, options)}
    return param.detach().numpy(), state


def run_lion_published(options: dict, p0, grads):
    """Lion as published: update = sign(b1*m + (1-b1)*g); p = p*(1-lr*wd) - lr*update;
    m = b2*m + (1-b2)*g. Written with torch tensor ops, independent of fastopt."""
    import torch

    h = hyper("lion", options)
    lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
    p = torch.from_numpy(p0.copy())
    m = torch.zeros_like(p)
    for g in grads:
        g = torch.from_numpy(g)
        if h["maximize"]:
            g = -g
        p.mul_(1 - lr * wd)
        update = (m * b1).add(g, alpha=1 - b1).sign_()
        p.add_(update, alpha=-lr)
        m.mul_(b2).add_(g, alpha=1 - b2)
    return p.numpy(), {"exp_avg": m.numpy()}


def paper_alpha(t: int, alpha: float, warmup) -> float:
    """AdEMAMix's alpha at step ``t`` (1-based) as the paper writes its scheduler
    (Pagliardini, Ablin & Grangier 2024, section 3, Algorithm 1):
    f_alpha(t) = min(t*alpha/T_alpha, alpha) while t < T_alpha, then alpha; None: no warmup."""
    if warmup is None or t >= warmup:
        return alpha
    return min(t * alpha / warmup, alpha)


def paper_beta3(t: int, beta1: float, beta3: float, warmup) -> float:
    """AdEMAMix's beta3 at step ``t`` as the paper writes its scheduler, from beta_start = beta1:
    f_beta3(t) = min(exp(ln(beta1)*ln(beta3) / ((1 - t/T)*ln(beta3) + (t/T)*ln(beta1))), beta3)
    while t < T_beta3, then beta3; None: no warmup. Where a log is of 0, the formula's limit
    (beta3 = 0: 0; beta1 = 0: beta3**(T/t))."""
    if warmup is None or t >= warmup:
        return beta3
    if beta3 == 0.0:
        return 0.0
    if beta1 == 0.0:
        return min(beta3 ** (warmup / t), beta3)
    a = t / warmup
    return min(math.exp(math.log(beta1) * math.log(beta3) / ((1 - a) * math.log(beta3) + a * math.log(beta1))),
               beta3)


def run_ademamix_published(options: dict, p0, grads):
    """AdEMAMix as its authors' PyTorch reference (apple/ml-ademamix) steps it, with the
    paper's schedulers for the warmups (paper_alpha, paper_beta3; the reference code's
    beta3 schedule goes through half-lives of log(beta + 1e-8), a different rounding):
    m1 = m1*b1 + (1-b1)*g; m2 = m2*b3_t + (1-b3_t)*g; nu = nu*b2 + (1-b2)*g*g;
    u = (m1/(1-b1^t) + alpha_t*m2)/(sqrt(nu)/sqrt(1-b2^t) + eps) + wd*p; p -= lr*u.
    (Their decay adds wd*p to the update, fastopt multiplies p by 1 - lr*wd first: the same
    step to round-off.) ``maximize`` negates the gradient. Written with torch tensor ops."""
    import torch

    h = hyper("ademamix", options)
    lr, (b1, b2, b3_end), alpha_end, eps, wd = h["lr"], h["betas"], h["alpha"], h["eps"], h["weight_decay"]
    p = torch.from_numpy(p0.copy())
    m1, m2, nu = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = torch.from_numpy(g)
        if h["maximize"]:
            g = -g
        b3 = paper_beta3(t, b1, b3_end, h["beta3_warmup"])
        alpha = paper_alpha(t, alpha_end, h["alpha_warmup"])
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b3).add_(g, alpha=1 - b3)
        nu.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (nu.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        update = (m1.div(1 - b1 ** t) + alpha * m2) / denom
        update.add_(p, alpha=wd)
        p.add_(-lr * update)
    return p.numpy(), {"exp_avg_fast": m1.numpy(), "exp_avg_slow": m2.numpy(), "exp_avg_sq": nu.numpy()}


#: Oracles for the rules torch.optim does not have: the published algorithm, written with torch ops.
PUBLISHED = {"lion": run_lion_published, "ademamix": run_ademamix_published}


def gpt_shapes(vocab: int = 16, d: int = 8, layers: int = 6) -> list[tuple[int, ...]]:
    """The 75 parameter shapes of a small GPT-style model: the token embedding
    (tied to the LM head; positions are rotary, so not learned), per layer two
    LayerNorms and the attention (qkv, projection) and MLP Linear weights and
    biases, and the final LayerNorm."""
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn.c_attn, attn.c_proj
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp.c_fc, mlp.c_proj
    return shapes + [(d,), (d,)]


def list_inputs(shapes, steps: int, dtype, seed: int = 0):
    """Starting parameters (one array per shape) and ``steps`` lists of gradients."""
    rng = np.random.default_rng(seed)
    p0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]
    return p0, grads


def run_lists(rule: str, options: dict, p0, grads, backend=None, per_tensor=False, to_device=None, to_host=None):
    """``len(grads)`` updates of the tensors ``p0`` from zero state, as one list call
    per step (or one call per tensor with ``per_tensor``); returns (params, {state: list})."""
    to_device = to_device or (lambda a: a.copy())
    to_host = to_host or (lambda a: a)
    params = [to_device(p) for p in p0]
    starts = [initial_state(rule, options, p) for p in p0]
    state = {name: [to_device(st[name]) for st in starts] for name in needed_state(rule, options)}
    extra: dict = {}
    for t, gs in enumerate(grads, start=1):
        gs = [to_device(g) for g in gs]
        if per_tensor:
            for i, (p, g) in enumerate(zip(params, gs)):
                tensor_extra = dict(extra)
                fastopt_step(rule, options, p, g, {k: v[i] for k, v in state.items()}, t, tensor_extra, backend)
            extra = tensor_extra
        else:
            fastopt_step(rule, options, params, gs, state, t, extra, backend)
    return [to_host(p) for p in params], {k: [to_host(a) for a in v] for k, v in state.items()}


def run_flush_case(rule: str, options: dict, backend=None, to_device=None, to_host=None, dtype=np.float32):
    """Three updates from subnormal state with tiny gradients (where flushing
    subnormal results matters); returns host (param, {state: buffer}). Without
    weight decay, which would couple the parameter into the gradient."""
    options = {k: v for k, v in options.items() if k != "weight_decay"}
    to_device = to_device or (lambda a: a.copy())
    to_host = to_host or (lambda a: a)
    rng = np.random.default_rng(8)
    tiny = np.finfo(dtype).tiny
    n = 41
    p = to_device((rng.standard_normal(n) * tiny * 0.5).astype(dtype))  # subnormal parameters
    signed = {s.name: s.signed for s in RULES[rule].buffers}
    state = {name: to_device((np.abs(rng.standard_normal(n)) * (-1) ** (signed[name] * rng.integers(0, 2, n))
                              * tiny * 0.3).astype(dtype)) for name in needed_state(rule, options)}
    extra: dict = {}
    for t in range(1, 4):
        g = (rng.standard_normal(n) * tiny * 0.1).astype(dtype)
        g[::5] = 0.0
        fastopt_step(rule, options, p, to_device(g), state, t, extra, backend)
    return to_host(p), {k: to_host(v) for k, v in state.items()}


#: Schedule-free runs (fastopt.schedulefree): a warmup, weight decay and an eval/train
#: switch mid-run, so the schedule, both kernels and both phases are exercised.
SCHEDULE_FREE_RUNS = {"adamw": dict(lr=0.01, warmup_steps=2, weight_decay=0.1, r=0.5),
                      "sgd": dict(lr=0.1, momentum=0.8, warmup_steps=2, weight_decay=0.01)}


def run_schedulefree(kind: str, p0, grads, to_device=lambda a: a, to_host=lambda a: a) -> dict:
    """``len(grads)`` schedule-free steps of ``kind`` from z = p0, an eval/train switch
    after the second, then eval: {"y": the trained parameters, "x": the evaluated ones, "z": z}."""
    options = SCHEDULE_FREE_RUNS[kind]
    beta1 = options.get("momentum", 0.9)
    y, z = to_device(p0.copy()), to_device(p0.copy())
    v = to_device(np.zeros_like(p0))
    lr_max, weight_sum = -1.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = to_device(g)
        if kind == "adamw":
            lr_max, weight_sum = fastopt.adamw_schedulefree_(y, g, z, v, step=t, lr_max=lr_max,
                                                             weight_sum=weight_sum, **options)
        else:
            lr_max, weight_sum = fastopt.sgd_schedulefree_(y, g, z, step=t, lr_max=lr_max, weight_sum=weight_sum,
                                                           **options)
        if t == 2:
            fastopt.schedulefree_eval_(y, z, beta1)
            fastopt.schedulefree_train_(y, z, beta1)
    out = {"y": to_host(y).copy()}
    fastopt.schedulefree_eval_(y, z, beta1)
    out.update(x=to_host(y), z=to_host(z))
    return out
