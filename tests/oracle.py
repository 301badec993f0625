"""The test matrix shared by every backend test: rules x options, and the oracles.

``CASES`` lists, per rule, option sets that together exercise every option of
DESIGN.md. ``run_fastopt`` drives the functional API for many steps;
``run_torch`` drives ``torch.optim`` (single-tensor path, ``foreach=False``) on
the same inputs; ``run_lion_published`` is Lion as published (Chen et al.
2023, Algorithm 2; the lucidrains reference implementation), since torch has no Lion.
"""
from __future__ import annotations

import numpy as np

import fastopt
from fastopt.rules import RULES

CASES: dict[str, list[dict]] = {
    "sgd": [
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9),
        dict(lr=0.1, momentum=0.9, dampening=0.3),
        dict(lr=0.1, momentum=0.9, nesterov=True),
        dict(lr=0.1, momentum=0.5, weight_decay=0.1),
        dict(lr=0.05, weight_decay=0.1),
        dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
        dict(lr=0.1, maximize=True),
    ],
    "adagrad": [
        dict(),
        dict(lr=0.1, lr_decay=0.05),
        dict(weight_decay=0.1),
        dict(lr=0.1, eps=1e-6, maximize=True),
        dict(lr_decay=0.01, weight_decay=0.05, maximize=True),
    ],
    "rmsprop": [
        dict(),
        dict(centered=True),
        dict(momentum=0.9),
        dict(centered=True, momentum=0.5),
        dict(weight_decay=0.1, alpha=0.9, eps=1e-6),
        dict(maximize=True, momentum=0.3),
        dict(centered=True, momentum=0.9, weight_decay=0.01, maximize=True),
    ],
    "adadelta": [
        dict(),
        dict(weight_decay=0.1),
        dict(lr=0.5, rho=0.5, eps=1e-4),
        dict(maximize=True, weight_decay=0.01),
    ],
    "adam": [
        dict(),
        dict(amsgrad=True),
        dict(weight_decay=0.1),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
        dict(maximize=True),
        dict(amsgrad=True, weight_decay=0.05, maximize=True, lr=0.01),
    ],
    "adamw": [
        dict(),
        dict(amsgrad=True),
        dict(weight_decay=0.1, lr=0.01),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
        dict(maximize=True),
        dict(amsgrad=True, weight_decay=0.05, maximize=True, lr=0.01),
    ],
    "adamax": [
        dict(),
        dict(weight_decay=0.1),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
        dict(maximize=True),
    ],
    "nadam": [
        dict(),
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, decoupled_weight_decay=True),
        dict(lr=0.01, betas=(0.8, 0.99), momentum_decay=0.01),
        dict(maximize=True, eps=1e-6),
    ],
    "lion": [
        dict(),
        dict(lr=1e-3, weight_decay=0.1),
        dict(betas=(0.95, 0.98)),
        dict(maximize=True, weight_decay=0.01),
    ],
}

#: (rule, options) pairs, flattened for pytest.mark.parametrize, with readable ids.
MATRIX = [(rule, opts) for rule, cases in CASES.items() for opts in cases]
MATRIX_IDS = [f"{rule}-" + ("-".join(f"{k}={v}" for k, v in opts.items()) or "defaults") for rule, opts in MATRIX]

#: ``torch.optim`` state names that differ from fastopt's (DESIGN names them as torch's
#: functional API does).
TORCH_STATE_NAME = {"state_sum": "sum"}


def hyper(rule: str, options: dict) -> dict:
    """The full hyperparameter dict (defaults filled in) of one case."""
    return {**RULES[rule].defaults, **options}


def needed_state(rule: str, options: dict) -> tuple[str, ...]:
    return tuple(RULES[rule].needs(hyper(rule, options)))


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
    if rule == "nadam":
        kwargs["mu_product"] = extra.get("mu_product", 1.0)
        extra["mu_product"] = fn(p, g, *args, **kwargs)
    else:
        fn(p, g, *args, **kwargs)


def run_fastopt(rule: str, options: dict, p0, grads, backend=None):
    """Run ``len(grads)`` updates from zero state; return (param, {state name: buffer})."""
    p = p0.copy()
    state = {name: np.zeros_like(p) for name in needed_state(rule, options)}
    extra: dict = {}
    for t, g in enumerate(grads, start=1):
        fastopt_step(rule, options, p, g, state, t, extra, backend)
    return p, state


def run_torch(rule: str, options: dict, p0, grads):
    """The same run through ``torch.optim`` (single-tensor implementation)."""
    import torch

    if rule == "lion":
        return run_lion_published(options, p0, grads)
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
           "adadelta": torch.optim.Adadelta, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adamax": torch.optim.Adamax, "nadam": torch.optim.NAdam}[rule]
    opts = dict(options)
    if rule == "adamw" and "weight_decay" not in opts:
        opts["weight_decay"] = RULES["adamw"].defaults["weight_decay"]  # torch's default differs (1e-2 both now)
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
