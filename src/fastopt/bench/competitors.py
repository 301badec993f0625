"""What fastopt is compared with: NumPy seed-style code and ``torch.optim``.

*NumPy seed* is the update as people first write it in NumPy: one expression
per line of the paper, Python-float scalars, a temporary array per operation
(about ten passes over memory per step). Independent of fastopt; the tests
check it computes the same update as the reference.

*torch* is ``torch.optim.<Rule>`` stepping a parameter that shares memory with
the benchmark's buffers (``torch.from_numpy``, or ``torch.as_tensor`` on a
GPU). It runs ``fused=True`` where torch supports it on the device (CPU: SGD,
Adagrad, Adam, AdamW) and ``foreach=True`` otherwise, and says which. After one
warm step the optimizer's state tensors are replaced by views of the
benchmark's state buffers, so torch reads and writes the same memory as
every other implementation and allocates none of its own. torch has no Lion.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .cases import Buffers, Case

__all__ = ["numpy_seed_call", "torch_available", "torch_call", "TORCH_CLASS"]


# --------------------------------------------------------------------------
# NumPy seed-style updates: (p, g, state dict, hyperparameters, step, carry) -> None
# --------------------------------------------------------------------------

def _sgd(p, g, st, h, t, carry):
    if h["maximize"]:
        g = -g
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    if h["momentum"]:
        buf = st["momentum_buffer"]
        if t == 1:
            buf[...] = g
        else:
            buf[...] = h["momentum"] * buf + (1 - h["dampening"]) * g
        g = g + h["momentum"] * buf if h["nesterov"] else buf
    p -= h["lr"] * g


def _adagrad(p, g, st, h, t, carry):
    if h["maximize"]:
        g = -g
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    s = st["state_sum"]
    s += g * g
    clr = h["lr"] / (1 + (t - 1) * h["lr_decay"])
    p -= clr * g / (np.sqrt(s) + h["eps"])


def _rmsprop(p, g, st, h, t, carry):
    if h["maximize"]:
        g = -g
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    a = h["alpha"]
    sq = st["square_avg"]
    sq[...] = a * sq + (1 - a) * g * g
    if h["centered"]:
        ga = st["grad_avg"]
        ga[...] = a * ga + (1 - a) * g
        avg = np.sqrt(sq - ga * ga) + h["eps"]
    else:
        avg = np.sqrt(sq) + h["eps"]
    if h["momentum"] > 0:
        buf = st["momentum_buffer"]
        buf[...] = h["momentum"] * buf + g / avg
        p -= h["lr"] * buf
    else:
        p -= h["lr"] * g / avg


def _adadelta(p, g, st, h, t, carry):
    if h["maximize"]:
        g = -g
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    rho, eps = h["rho"], h["eps"]
    sq, acc = st["square_avg"], st["acc_delta"]
    sq[...] = rho * sq + (1 - rho) * g * g
    delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
    acc[...] = rho * acc + (1 - rho) * delta * delta
    p -= h["lr"] * delta


def _adam_like(decoupled):
    def update(p, g, st, h, t, carry):
        lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
        if h["maximize"]:
            g = -g
        if decoupled:
            p *= 1 - lr * wd
        elif wd:
            g = g + wd * p
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        if h["amsgrad"]:
            vmax = st["max_exp_avg_sq"]
            np.maximum(vmax, v, out=vmax)
            v = vmax
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return update


def _adamax(p, g, st, h, t, carry):
    lr, (b1, b2), eps = h["lr"], h["betas"], h["eps"]
    if h["maximize"]:
        g = -g
    if h["weight_decay"]:
        g = g + h["weight_decay"] * p
    m, u = st["exp_avg"], st["exp_inf"]
    m[...] = b1 * m + (1 - b1) * g
    u[...] = np.maximum(b2 * u, np.abs(g) + eps)
    p -= lr / (1 - b1 ** t) * m / u


def _nadam(p, g, st, h, t, carry):
    lr, (b1, b2), eps, wd, md = h["lr"], h["betas"], h["eps"], h["weight_decay"], h["momentum_decay"]
    if h["maximize"]:
        g = -g
    if h["decoupled_weight_decay"]:
        p *= 1 - lr * wd
    elif wd:
        g = g + wd * p
    mu = b1 * (1 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * md))
    carry["mu_product"] *= mu
    mu_product = carry["mu_product"]
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v / (1 - b2 ** t)) + eps
    p -= lr * (1 - mu) / (1 - mu_product) * g / denom
    p -= lr * mu_next / (1 - mu_product * mu_next) * m / denom


def _lion(p, g, st, h, t, carry):
    lr, (b1, b2), wd = h["lr"], h["betas"], h["weight_decay"]
    if h["maximize"]:
        g = -g
    m = st["exp_avg"]
    c = b1 * m + (1 - b1) * g
    p *= 1 - lr * wd
    p -= lr * np.sign(c)
    m[...] = b2 * m + (1 - b2) * g


_SEED = {"sgd": _sgd, "adagrad": _adagrad, "rmsprop": _rmsprop, "adadelta": _adadelta,
         "adam": _adam_like(False), "adamw": _adam_like(True), "adamax": _adamax, "nadam": _nadam,
         "lion": _lion}


def numpy_seed_call(case: Case, bufs: Buffers) -> Callable[[], None]:
    """One NumPy seed-style update of ``bufs`` per call; ``step`` counts up from 1."""
    update, h = _SEED[case.rule], case.hyper
    p, g, st = bufs.param, bufs.grad, bufs.state
    carry = {"step": 0, "mu_product": 1.0}

    def call():
        carry["step"] += 1
        update(p, g, st, h, carry["step"], carry)
    return call


# --------------------------------------------------------------------------
# torch.optim
# --------------------------------------------------------------------------

TORCH_CLASS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adadelta": "Adadelta",
               "adam": "Adam", "adamw": "AdamW", "adamax": "Adamax", "nadam": "NAdam"}
_TORCH_STATE_NAME = {"state_sum": "sum"}


def torch_available(device: str = "cpu") -> str:
    """'' when torch can run on ``device``, else the reason."""
    try:
        import torch
    except Exception as exc:  # not installed, or broken
        return f"torch not importable: {type(exc).__name__}: {exc}"
    if device == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA device"
    return ""


def torch_call(case: Case, bufs: Buffers, device: str = "cpu") -> Optional[tuple[str, Callable[[], None]]]:
    """``(variant, callable)`` stepping ``torch.optim`` on ``bufs``; ``None`` if torch lacks the rule.

    ``variant`` is ``"fused"`` or ``"foreach"``. Raises if torch is unavailable.
    """
    import torch

    name = TORCH_CLASS.get(case.rule)
    if name is None:
        return None
    cls = getattr(torch.optim, name)

    def tensor(a):
        return torch.from_numpy(a) if device == "cpu" else torch.as_tensor(a, device="cuda")

    param = torch.nn.Parameter(tensor(bufs.param))
    param.grad = tensor(bufs.grad)
    for variant in ("fused", "foreach"):
        try:
            opt = cls([param], **case.hyper, **{variant: True})
            opt.step()  # creates torch's state (and fails here if this variant is unsupported)
            break
        except (RuntimeError, TypeError, ValueError):
            if variant == "foreach":
                raise
    state = opt.state[param]
    for ours in case.state:
        theirs = _TORCH_STATE_NAME.get(ours, ours)
        if theirs not in state:
            raise KeyError(f"torch.optim.{name} has no state {theirs!r} (has {sorted(state)})")
        state[theirs] = tensor(bufs.state[ours])
    return variant, opt.step
