"""One definition per optimizer: defaults, validation, state names, per-step scalars.

This module is the only place that knows an algorithm's hyperparameters. Every
backend receives the *same* precomputed per-step scalars (bias corrections,
decayed learning rates, NAdam's mu terms), built here once per call, so no
backend re-derives them and the C struct, the Numba kernel arguments and the
NumPy reference all agree field by field.

A rule's ``scalars`` are a ``NamedTuple`` of Python floats and bools. Their
field order is the order of the matching C struct in ``csrc/include/fastopt.h``
and of the positional scalar arguments of the Numba kernels.

Conventions used by every kernel:

* ``grad_sign`` is ``-1.0`` when ``maximize`` else ``1.0``: multiplying by it
  is exact, NaN-preserving, and keeps the loop branch-free.
* ``weight_decay`` is the L2 coefficient added to the gradient (``g += wd*p``);
  kernels skip the term when it is 0 so that ``0*inf`` never makes a NaN
  PyTorch would not make.
* ``param_decay`` is the decoupled multiplier ``1 - lr*wd`` (AdamW, Lion,
  decoupled NAdam), exactly 1.0 when unused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

__all__ = ["Rule", "RULES", "get_rule"]


# --------------------------------------------------------------------------
# Hyperparameter checks. Each names the argument, the value and the range.
# --------------------------------------------------------------------------

def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return x


def nonneg(name: str, value: Any) -> float:
    x = _real(name, value)
    if x < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return x


def unit_interval(name: str, value: Any, *, closed: bool = False) -> float:
    """Check ``0 <= value < 1`` (or ``<= 1`` when ``closed``)."""
    x = _real(name, value)
    if x < 0.0 or (x > 1.0 if closed else x >= 1.0):
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return x


def betas_pair(value: Any) -> tuple[float, float]:
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {value!r}") from None
    return unit_interval("betas[0]", b1), unit_interval("betas[1]", b2)


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, int)) or isinstance(value, int) and value not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def step_count(value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"step must be an int >= 1 (the 1-based count of this update), got {value!r}")
    t = int(value.__index__())
    if t < 1:
        raise ValueError(f"step must be >= 1 (the 1-based count of this update), got {value!r}")
    return t


def _sign(maximize: bool) -> float:
    return -1.0 if maximize else 1.0


# --------------------------------------------------------------------------
# The rule record
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """Everything fastopt knows about one algorithm.

    name:       public name (``fastopt.<name>_``).
    kernel:     name of the element kernel backends run (AdamW reuses Adam's).
    state:      state buffer names in signature order (PyTorch's state names).
    defaults:   hyperparameter defaults, as in the functional signature.
    needs:      validated hyperparameters -> {state buffer this call requires:
                the option that requires it} (for the error message).
    prepare:    (hyperparameters, step) -> (validated scalars, extra result).
    """

    name: str
    kernel: str
    state: tuple[str, ...]
    defaults: Mapping[str, Any]
    needs: Callable[[Mapping[str, Any]], dict[str, str]]
    prepare: Callable[[Mapping[str, Any], int | None], tuple[NamedTuple, Any]]
    takes_step: bool = True


# ---- SGD -----------------------------------------------------------------

class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    one_minus_dampening: float
    weight_decay: float
    grad_sign: float
    nesterov: bool
    first_step: bool


def _sgd(h, t):
    lr = nonneg("lr", h["lr"])
    mom = nonneg("momentum", h["momentum"])
    damp = _real("dampening", h["dampening"])
    wd = nonneg("weight_decay", h["weight_decay"])
    nesterov = flag("nesterov", h["nesterov"])
    if nesterov and (mom <= 0.0 or damp != 0.0):
        raise ValueError(
            f"nesterov=True requires momentum > 0 and dampening == 0, got momentum={mom!r}, dampening={damp!r}")
    return SGDScalars(lr, mom, 1.0 - damp, wd, _sign(flag("maximize", h["maximize"])), nesterov, t == 1), None


# ---- AdaGrad -------------------------------------------------------------

class AdagradScalars(NamedTuple):
    clr: float  # lr / (1 + (t-1)*lr_decay)
    eps: float
    weight_decay: float
    grad_sign: float


def _adagrad(h, t):
    lr = nonneg("lr", h["lr"])
    lr_decay = nonneg("lr_decay", h["lr_decay"])
    return AdagradScalars(lr / (1.0 + (t - 1) * lr_decay), nonneg("eps", h["eps"]),
                          nonneg("weight_decay", h["weight_decay"]),
                          _sign(flag("maximize", h["maximize"]))), None


# ---- RMSProp -------------------------------------------------------------

class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float
    grad_sign: float
    centered: bool
    use_momentum: bool


def _rmsprop(h, t):
    alpha = unit_interval("alpha", h["alpha"], closed=True)
    mom = nonneg("momentum", h["momentum"])
    return RMSpropScalars(nonneg("lr", h["lr"]), alpha, 1.0 - alpha, nonneg("eps", h["eps"]),
                          nonneg("weight_decay", h["weight_decay"]), mom,
                          _sign(flag("maximize", h["maximize"])),
                          flag("centered", h["centered"]), mom > 0.0), None


def _rmsprop_needs(h):
    need = {"square_avg": "rmsprop"}
    if h["momentum"] > 0:
        need["momentum_buffer"] = "momentum > 0"
    if h["centered"]:
        need["grad_avg"] = "centered=True"
    return need


# ---- Adadelta ------------------------------------------------------------

class AdadeltaScalars(NamedTuple):
    lr: float
    rho: float
    one_minus_rho: float
    eps: float
    weight_decay: float
    grad_sign: float


def _adadelta(h, t):
    rho = unit_interval("rho", h["rho"], closed=True)
    return AdadeltaScalars(nonneg("lr", h["lr"]), rho, 1.0 - rho, nonneg("eps", h["eps"]),
                           nonneg("weight_decay", h["weight_decay"]),
                           _sign(flag("maximize", h["maximize"]))), None


# ---- Adam / AdamW ----------------------------------------------------------

class AdamScalars(NamedTuple):
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    step_size: float  # lr / (1 - beta1**t)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**t)
    eps: float
    weight_decay: float  # L2 term added to the gradient (Adam)
    param_decay: float  # decoupled 1 - lr*wd (AdamW), else 1
    grad_sign: float
    amsgrad: bool


def _adam_family(decoupled: bool):
    def prepare(h, t):
        lr = nonneg("lr", h["lr"])
        b1, b2 = betas_pair(h["betas"])
        eps = nonneg("eps", h["eps"])
        wd = nonneg("weight_decay", h["weight_decay"])
        l2, param_decay = (0.0, 1.0 - lr * wd) if decoupled else (wd, 1.0)
        return AdamScalars(b1, b2, 1.0 - b1, 1.0 - b2, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t),
                           eps, l2, param_decay, _sign(flag("maximize", h["maximize"])),
                           flag("amsgrad", h["amsgrad"])), None
    return prepare


def _adam_needs(h):
    need = {"exp_avg": "adam", "exp_avg_sq": "adam"}
    if h["amsgrad"]:
        need["max_exp_avg_sq"] = "amsgrad=True"
    return need


# ---- Adamax --------------------------------------------------------------

class AdamaxScalars(NamedTuple):
    beta1: float
    beta2: float
    one_minus_beta1: float
    clr: float  # lr / (1 - beta1**t)
    eps: float
    weight_decay: float
    grad_sign: float


def _adamax(h, t):
    lr = nonneg("lr", h["lr"])
    b1, b2 = betas_pair(h["betas"])
    return AdamaxScalars(b1, b2, 1.0 - b1, lr / (1.0 - b1 ** t), nonneg("eps", h["eps"]),
                         nonneg("weight_decay", h["weight_decay"]),
                         _sign(flag("maximize", h["maximize"]))), None


# ---- NAdam ---------------------------------------------------------------

class NAdamScalars(NamedTuple):
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    bias_correction2: float  # 1 - beta2**t
    eps: float
    grad_coef: float  # lr*(1-mu_t)/(1-mu_product)
    exp_avg_coef: float  # lr*mu_next/(1-mu_product*mu_next)
    weight_decay: float
    param_decay: float
    grad_sign: float


def _nadam(h, t):
    lr = nonneg("lr", h["lr"])
    b1, b2 = betas_pair(h["betas"])
    eps = nonneg("eps", h["eps"])
    wd = nonneg("weight_decay", h["weight_decay"])
    md = nonneg("momentum_decay", h["momentum_decay"])
    mu_product = _real("mu_product", h["mu_product"])
    if not 0.0 <= mu_product <= 1.0:
        raise ValueError(f"mu_product must be in [0, 1] (1.0 before the first step), got {mu_product!r}")
    decoupled = flag("decoupled_weight_decay", h["decoupled_weight_decay"])
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * md))
    mu_product *= mu
    l2, param_decay = (0.0, 1.0 - lr * wd) if decoupled else (wd, 1.0)
    return NAdamScalars(b1, b2, 1.0 - b1, 1.0 - b2, 1.0 - b2 ** t, eps,
                        lr * (1.0 - mu) / (1.0 - mu_product),
                        lr * mu_next / (1.0 - mu_product * mu_next),
                        l2, param_decay, _sign(flag("maximize", h["maximize"]))), mu_product


# ---- Lion ----------------------------------------------------------------

class LionScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    param_decay: float  # 1 - lr*wd
    grad_sign: float


def _lion(h, t):
    lr = nonneg("lr", h["lr"])
    b1, b2 = betas_pair(h["betas"])
    wd = nonneg("weight_decay", h["weight_decay"])
    return LionScalars(lr, b1, b2, 1.0 - b1, 1.0 - b2, 1.0 - lr * wd,
                       _sign(flag("maximize", h["maximize"]))), None


def _all(*names):
    return lambda h: dict.fromkeys(names, "this rule")


_ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)

RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("sgd", "sgd", ("momentum_buffer",),
         dict(lr=None, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
         lambda h: {"momentum_buffer": "momentum != 0"} if h["momentum"] != 0 else {}, _sgd),
    Rule("adagrad", "adagrad", ("state_sum",),
         dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False),
         _all("state_sum"), _adagrad),
    Rule("rmsprop", "rmsprop", ("square_avg", "momentum_buffer", "grad_avg"),
         dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False),
         _rmsprop_needs, _rmsprop),
    Rule("adadelta", "adadelta", ("square_avg", "acc_delta"),
         dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
         _all("square_avg", "acc_delta"), _adadelta),
    Rule("adam", "adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         _ADAM_DEFAULTS, _adam_needs, _adam_family(decoupled=False)),
    Rule("adamw", "adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         {**_ADAM_DEFAULTS, "weight_decay": 1e-2}, _adam_needs, _adam_family(decoupled=True)),
    Rule("adamax", "adamax", ("exp_avg", "exp_inf"),
         dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
         _all("exp_avg", "exp_inf"), _adamax),
    Rule("nadam", "nadam", ("exp_avg", "exp_avg_sq"),
         dict(mu_product=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False),
         _all("exp_avg", "exp_avg_sq"), _nadam),
    Rule("lion", "lion", ("exp_avg",),
         dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
         _all("exp_avg"), _lion, takes_step=False),
)}

#: The element kernels backends implement, with the scalars type each takes.
KERNEL_SCALARS: dict[str, type] = {
    "sgd": SGDScalars, "adagrad": AdagradScalars, "rmsprop": RMSpropScalars,
    "adadelta": AdadeltaScalars, "adam": AdamScalars, "adamax": AdamaxScalars,
    "nadam": NAdamScalars, "lion": LionScalars,
}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown optimizer rule {name!r}; expected one of {sorted(RULES)}") from None
