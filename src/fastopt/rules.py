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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple

__all__ = ["Rule", "RULES", "KERNEL_SCALARS"]


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
    if type(value) is int and value >= 1:  # the common case, on every update
        return value
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

Check = Callable[[str, Any], Any]  # (argument name, value) -> validated value, or raise

_CACHE_LIMIT = 256


@dataclass(frozen=True)
class Rule:
    """Everything fastopt knows about one algorithm.

    name:       public name (``fastopt.<name>_``).
    kernel:     name of the element kernel backends run (AdamW reuses Adam's).
    state:      state buffer names in signature order (PyTorch's state names).
    defaults:   hyperparameter defaults, as in the functional signature.
    checks:     hyperparameter name -> its check (validates and converts).
    compute:    (validated hyperparameters, step) -> (kernel scalars, extra result).
    needs:      validated hyperparameters -> {state buffer this call requires:
                the option that requires it} (for the error message).
    relation:   optional check across hyperparameters (SGD's Nesterov condition).
    """

    name: str
    kernel: str
    state: tuple[str, ...]
    defaults: Mapping[str, Any]
    checks: Mapping[str, Check]
    compute: Callable[[Mapping[str, Any], int], tuple[NamedTuple, Any]]
    needs: Callable[[Mapping[str, Any]], dict[str, str]]
    relation: Callable[[Mapping[str, Any]], None] | None = None
    takes_step: bool = True
    # Validated hyperparameters by the values (and their types) given: a training
    # loop passes the same ones every step, and the checks are most of the cost
    # of a small update.
    _validated: dict = field(default_factory=dict, compare=False, repr=False)

    def checked(self, hyper: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, str]]:
        """``hyper`` checked and converted (floats, bools), and the state buffers it
        needs (see ``needs``). Raises TypeError/ValueError naming the argument."""
        # The key holds the types too: True == 1 must not let lr=True pass as a cached lr=1.
        values = tuple(hyper.values())
        try:
            key = (values, tuple(map(type, values)))
            done = self._validated.get(key)
        except TypeError:  # an unhashable value (betas as a list): check every time
            key = done = None
        if done is None:
            valid = {name: check(name, hyper[name]) for name, check in self.checks.items()}
            if self.relation is not None:
                self.relation(valid)
            done = (valid, self.needs(valid))
            if key is not None:
                if len(self._validated) >= _CACHE_LIMIT:
                    self._validated.clear()
                self._validated[key] = done
        return done

    def prepare(self, hyper: Mapping[str, Any], step: int) -> tuple[NamedTuple, Any]:
        """Validate ``hyper`` and build the kernel scalars of update number ``step``."""
        return self.compute(self.checked(hyper)[0], step)


def _closed_unit(name: str, value: Any) -> float:
    return unit_interval(name, value, closed=True)


def _betas(name: str, value: Any) -> tuple[float, float]:
    return betas_pair(value)


def _mu_product(name: str, value: Any) -> float:
    x = _real(name, value)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1] (1.0 before the first step), got {value!r}")
    return x


# ---- SGD -----------------------------------------------------------------

class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    one_minus_dampening: float
    weight_decay: float
    grad_sign: float
    nesterov: bool
    first_step: bool


def _sgd(v, t):
    return SGDScalars(v["lr"], v["momentum"], 1.0 - v["dampening"], v["weight_decay"], _sign(v["maximize"]),
                      v["nesterov"], t == 1), None


def _nesterov_condition(v):
    if v["nesterov"] and (v["momentum"] <= 0.0 or v["dampening"] != 0.0):
        raise ValueError("nesterov=True requires momentum > 0 and dampening == 0, "
                         f"got momentum={v['momentum']!r}, dampening={v['dampening']!r}")


# ---- AdaGrad -------------------------------------------------------------

class AdagradScalars(NamedTuple):
    clr: float  # lr / (1 + (t-1)*lr_decay)
    eps: float
    weight_decay: float
    grad_sign: float


def _adagrad(v, t):
    return AdagradScalars(v["lr"] / (1.0 + (t - 1) * v["lr_decay"]), v["eps"], v["weight_decay"],
                          _sign(v["maximize"])), None


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


def _rmsprop(v, t):
    return RMSpropScalars(v["lr"], v["alpha"], 1.0 - v["alpha"], v["eps"], v["weight_decay"], v["momentum"],
                          _sign(v["maximize"]), v["centered"], v["momentum"] > 0.0), None


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


def _adadelta(v, t):
    return AdadeltaScalars(v["lr"], v["rho"], 1.0 - v["rho"], v["eps"], v["weight_decay"],
                           _sign(v["maximize"])), None


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
    def compute(v, t):
        lr, wd = v["lr"], v["weight_decay"]
        b1, b2 = v["betas"]
        l2, param_decay = (0.0, 1.0 - lr * wd) if decoupled else (wd, 1.0)
        return AdamScalars(b1, b2, 1.0 - b1, 1.0 - b2, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t),
                           v["eps"], l2, param_decay, _sign(v["maximize"]), v["amsgrad"]), None
    return compute


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


def _adamax(v, t):
    b1, b2 = v["betas"]
    return AdamaxScalars(b1, b2, 1.0 - b1, v["lr"] / (1.0 - b1 ** t), v["eps"], v["weight_decay"],
                         _sign(v["maximize"])), None


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


def _nadam(v, t):
    lr, wd, md = v["lr"], v["weight_decay"], v["momentum_decay"]
    b1, b2 = v["betas"]
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * md))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * md))
    mu_product = v["mu_product"] * mu
    l2, param_decay = (0.0, 1.0 - lr * wd) if v["decoupled_weight_decay"] else (wd, 1.0)
    return NAdamScalars(b1, b2, 1.0 - b1, 1.0 - b2, 1.0 - b2 ** t, v["eps"],
                        lr * (1.0 - mu) / (1.0 - mu_product),
                        lr * mu_next / (1.0 - mu_product * mu_next),
                        l2, param_decay, _sign(v["maximize"])), mu_product


# ---- Lion ----------------------------------------------------------------

class LionScalars(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    param_decay: float  # 1 - lr*wd
    grad_sign: float


def _lion(v, t):
    lr = v["lr"]
    b1, b2 = v["betas"]
    return LionScalars(lr, b1, b2, 1.0 - b1, 1.0 - b2, 1.0 - lr * v["weight_decay"], _sign(v["maximize"])), None


def _all(*names):
    return lambda h: dict.fromkeys(names, "this rule")


_ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
_ADAM_CHECKS = dict(lr=nonneg, betas=_betas, eps=nonneg, weight_decay=nonneg, amsgrad=flag, maximize=flag)

RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("sgd", "sgd", ("momentum_buffer",),
         dict(lr=None, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
         dict(lr=nonneg, momentum=nonneg, dampening=_real, weight_decay=nonneg, nesterov=flag, maximize=flag),
         _sgd, lambda h: {"momentum_buffer": "momentum != 0"} if h["momentum"] != 0 else {},
         relation=_nesterov_condition),
    Rule("adagrad", "adagrad", ("state_sum",),
         dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False),
         dict(lr=nonneg, lr_decay=nonneg, weight_decay=nonneg, eps=nonneg, maximize=flag),
         _adagrad, _all("state_sum")),
    Rule("rmsprop", "rmsprop", ("square_avg", "momentum_buffer", "grad_avg"),
         dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False),
         dict(lr=nonneg, alpha=_closed_unit, eps=nonneg, weight_decay=nonneg, momentum=nonneg, centered=flag,
              maximize=flag),
         _rmsprop, _rmsprop_needs),
    Rule("adadelta", "adadelta", ("square_avg", "acc_delta"),
         dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
         dict(lr=nonneg, rho=_closed_unit, eps=nonneg, weight_decay=nonneg, maximize=flag),
         _adadelta, _all("square_avg", "acc_delta")),
    Rule("adam", "adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         _ADAM_DEFAULTS, _ADAM_CHECKS, _adam_family(decoupled=False), _adam_needs),
    Rule("adamw", "adam", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
         {**_ADAM_DEFAULTS, "weight_decay": 1e-2}, _ADAM_CHECKS, _adam_family(decoupled=True), _adam_needs),
    Rule("adamax", "adamax", ("exp_avg", "exp_inf"),
         dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
         dict(lr=nonneg, betas=_betas, eps=nonneg, weight_decay=nonneg, maximize=flag),
         _adamax, _all("exp_avg", "exp_inf")),
    Rule("nadam", "nadam", ("exp_avg", "exp_avg_sq"),
         dict(mu_product=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
              momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False),
         dict(mu_product=_mu_product, lr=nonneg, betas=_betas, eps=nonneg, weight_decay=nonneg,
              momentum_decay=nonneg, decoupled_weight_decay=flag, maximize=flag),
         _nadam, _all("exp_avg", "exp_avg_sq")),
    Rule("lion", "lion", ("exp_avg",),
         dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
         dict(lr=nonneg, betas=_betas, weight_decay=nonneg, maximize=flag),
         _lion, _all("exp_avg"), takes_step=False),
)}

#: The element kernels backends implement, with the scalars type each takes.
KERNEL_SCALARS: dict[str, type] = {
    "sgd": SGDScalars, "adagrad": AdagradScalars, "rmsprop": RMSpropScalars,
    "adadelta": AdadeltaScalars, "adam": AdamScalars, "adamax": AdamaxScalars,
    "nadam": NAdamScalars, "lion": LionScalars,
}

