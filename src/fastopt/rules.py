"""The rule table: one entry per algorithm, the only place that defines one.

Each entry (a :class:`fastopt.rule.Rule`) gives the hyperparameters with
defaults and checks, the state buffers with the options that need them, the
per-step scalars and their formulas, and the element function's name
(:mod:`fastopt.kernels.elements` holds the element math, and
:mod:`fastopt.backends.reference` the NumPy oracle). Everything else, the C
library included, is derived from here: see docs/design.md, "Adding a rule".

Every backend receives the *same* per-step scalars, computed here once per
call in double precision (bias corrections, decayed learning rates, NAdam's mu
terms), so no backend re-derives them. The ``compute`` functions are
restricted Python (see :mod:`fastopt.rule`): the C library's
``fastopt_<rule>_prepare`` is generated from them.

Conventions used by every rule:

* ``grad_sign`` is ``-1.0`` when ``maximize`` else ``1.0``: multiplying by it
  is exact, NaN-preserving, and keeps the loop branch-free.
* ``weight_decay`` is the L2 coefficient added to the gradient (``g += wd*p``);
  kernels skip the term when it is 0 so that ``0*inf`` never makes a NaN
  PyTorch would not make.
* ``param_decay`` is the decoupled multiplier ``1 - lr*wd`` (AdamW, Lion,
  decoupled NAdam and RAdam), exactly 1.0 when unused.
* Scalars NamedTuples list their float fields first, then the bool flags.
* Running averages follow torch's ``lerp(a, b, w)``, which switches formula at
  ``w = 0.5`` (the two agree in exact arithmetic, not at infinities):
  ``a + w*(b - a)`` for ``w < 0.5``, else ``b - (b - a)*(1 - w)``. Both are
  ``base + weight*(b - a)`` with ``base = a, weight = w`` or ``base = b,
  weight = w - 1``: the scalars carry the weight and a ``*_from_end`` flag
  (``exp_avg_weight``/``exp_avg_from_end`` for ``lerp(exp_avg, g, 1-beta1)``).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .checks import closed_unit, fixed_tuple, flag, nonneg, optional, pair, real, unit, warmup_steps
from .rule import Hyper, Rule, State, Trust

__all__ = ["RULES", "TWO_PASS_RULES", "ALL_RULES", "MATRIX_RULES", "SCHEDULE_FREE_RULES", "KERNEL_RULES", "KERNEL_SCALARS"]

_LR = Hyper("lr", 1e-3, nonneg)
_BETAS = Hyper("betas", (0.9, 0.999), pair(unit), ("beta1", "beta2"))
_EPS = Hyper("eps", 1e-8, nonneg)
_WD = Hyper("weight_decay", 0.0, nonneg)
_MAXIMIZE = Hyper("maximize", False, flag)


# ---- SGD -----------------------------------------------------------------

class SGDScalars(NamedTuple):
    lr: float
    momentum: float
    one_minus_dampening: float
    weight_decay: float
    grad_sign: float
    nesterov: bool
    first_step: bool  # torch starts the buffer from the first gradient, undamped
    use_momentum: bool  # momentum != 0, decided in double (a tiny momentum that is 0 in float32 still damps)


def _sgd(lr, momentum, dampening, weight_decay, nesterov, maximize, step):
    return SGDScalars(lr=lr, momentum=momentum, one_minus_dampening=1.0 - dampening, weight_decay=weight_decay,
                      grad_sign=-1.0 if maximize else 1.0, nesterov=nesterov, first_step=step == 1,
                      use_momentum=momentum != 0.0)


def _nesterov_ok(momentum, dampening, nesterov):
    return not nesterov or (momentum > 0.0 and dampening == 0.0)


SGD = Rule(
    "sgd", "SGD", "SGD with optional momentum, dampening and Nesterov momentum (torch.optim.SGD).",
    "g = grad*grad_sign (+ weight_decay*p);\n"
    "with momentum: buf = g at the first step, else buf = momentum*buf + (1-dampening)*g;\n"
    "               g = g + momentum*buf (nesterov) or g = buf;\n"
    "p -= lr*g.",
    (Hyper("lr", None, nonneg), Hyper("momentum", 0.0, nonneg), Hyper("dampening", 0.0, real), _WD,
     Hyper("nesterov", False, flag), _MAXIMIZE),
    (State("momentum_buffer", when="use_momentum", why="momentum != 0"),),
    SGDScalars, _sgd, saves_step=False,
    relation=(_nesterov_ok, "nesterov=True requires momentum > 0 and dampening == 0, "
                            "got momentum={momentum}, dampening={dampening}"))


# ---- AdaGrad -------------------------------------------------------------

class AdagradScalars(NamedTuple):
    clr: float  # lr / (1 + (step-1)*lr_decay)
    eps: float
    weight_decay: float
    grad_sign: float


def _adagrad(lr, lr_decay, weight_decay, eps, maximize, step):
    return AdagradScalars(clr=lr / (1.0 + (step - 1) * lr_decay), eps=eps, weight_decay=weight_decay,
                          grad_sign=-1.0 if maximize else 1.0)


ADAGRAD = Rule(
    "adagrad", "Adagrad", "AdaGrad (Duchi et al., 2011; torch.optim.Adagrad).",
    "g = grad*grad_sign (+ weight_decay*p); clr = lr/(1 + (step-1)*lr_decay);\n"
    "state_sum += g*g; p -= clr*g/(sqrt(state_sum) + eps).",
    (Hyper("lr", 1e-2, nonneg), Hyper("lr_decay", 0.0, nonneg), _WD, Hyper("eps", 1e-10, nonneg), _MAXIMIZE),
    (State("state_sum", saved_as="sum", init="initial_accumulator_value", signed=False),),
    AdagradScalars, _adagrad,
    optimizer_hyper=(Hyper("initial_accumulator_value", 0.0, nonneg),))


# ---- RMSProp -------------------------------------------------------------

class RMSpropScalars(NamedTuple):
    lr: float
    alpha: float
    one_minus_alpha: float
    eps: float
    weight_decay: float
    momentum: float
    grad_sign: float
    grad_avg_weight: float  # torch's lerp(grad_avg, g, 1-alpha), see _lerp
    centered: bool
    use_momentum: bool  # momentum > 0
    grad_avg_from_end: bool  # 1-alpha >= 0.5


def _rmsprop(lr, alpha, eps, weight_decay, momentum, centered, maximize, step):
    return RMSpropScalars(lr=lr, alpha=alpha, one_minus_alpha=1.0 - alpha, eps=eps, weight_decay=weight_decay,
                          momentum=momentum, grad_sign=-1.0 if maximize else 1.0,
                          grad_avg_weight=1.0 - alpha if alpha > 0.5 else -alpha, centered=centered,
                          use_momentum=momentum > 0.0, grad_avg_from_end=alpha <= 0.5)


RMSPROP = Rule(
    "rmsprop", "RMSprop", "RMSProp (Hinton's lecture 6e; centered variant of Graves 2013; torch.optim.RMSprop).",
    "g = grad*grad_sign (+ weight_decay*p); sq = alpha*sq + (1-alpha)*g*g;\n"
    "centered: ga = ga + (1-alpha)*(g-ga), avg = sqrt(sq - ga*ga) + eps, else avg = sqrt(sq) + eps;\n"
    "momentum: buf = momentum*buf + g/avg, p -= lr*buf; else p -= lr*g/avg.",
    (Hyper("lr", 1e-2, nonneg), Hyper("alpha", 0.99, closed_unit), _EPS, _WD, Hyper("momentum", 0.0, nonneg),
     Hyper("centered", False, flag), _MAXIMIZE),
    (State("square_avg", signed=False), State("momentum_buffer", when="use_momentum", why="momentum > 0"),
     State("grad_avg", when="centered", why="centered=True")),
    RMSpropScalars, _rmsprop)


# ---- Adadelta ------------------------------------------------------------

class AdadeltaScalars(NamedTuple):
    lr: float
    rho: float
    one_minus_rho: float
    eps: float
    weight_decay: float
    grad_sign: float


def _adadelta(lr, rho, eps, weight_decay, maximize, step):
    return AdadeltaScalars(lr=lr, rho=rho, one_minus_rho=1.0 - rho, eps=eps, weight_decay=weight_decay,
                           grad_sign=-1.0 if maximize else 1.0)


ADADELTA = Rule(
    "adadelta", "Adadelta", "Adadelta (Zeiler, 2012; torch.optim.Adadelta).",
    "g = grad*grad_sign (+ weight_decay*p); sq = rho*sq + (1-rho)*g*g;\n"
    "d = sqrt(acc + eps)/sqrt(sq + eps)*g; acc = rho*acc + (1-rho)*d*d; p -= lr*d.",
    (Hyper("lr", 1.0, nonneg), Hyper("rho", 0.9, closed_unit), Hyper("eps", 1e-6, nonneg), _WD, _MAXIMIZE),
    (State("square_avg", signed=False), State("acc_delta", signed=False)),
    AdadeltaScalars, _adadelta)


# ---- Adam / AdamW ----------------------------------------------------------

class AdamScalars(NamedTuple):
    beta1: float
    beta2: float
    exp_avg_weight: float  # torch's lerp(exp_avg, g, 1-beta1), see _lerp
    one_minus_beta2: float
    step_size: float  # lr / (1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)
    eps: float
    weight_decay: float  # L2 term added to the gradient (Adam); 0 for AdamW
    param_decay: float  # decoupled 1 - lr*wd (AdamW), else 1
    grad_sign: float
    amsgrad: bool
    exp_avg_from_end: bool  # 1-beta1 >= 0.5: torch's lerp starts from g


def _adam(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, step, decoupled):
    return AdamScalars(beta1=beta1, beta2=beta2, exp_avg_weight=1.0 - beta1 if beta1 > 0.5 else -beta1,
                       one_minus_beta2=1.0 - beta2,
                       step_size=lr / (1.0 - beta1 ** step), bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step),
                       eps=eps, weight_decay=0.0 if decoupled else weight_decay,
                       param_decay=1.0 - lr * weight_decay if decoupled else 1.0,
                       grad_sign=-1.0 if maximize else 1.0, amsgrad=amsgrad, exp_avg_from_end=beta1 <= 0.5)


_ADAM_HYPER = (_LR, _BETAS, _EPS, _WD, Hyper("amsgrad", False, flag), _MAXIMIZE)
_ADAM_STATE = (State("exp_avg"), State("exp_avg_sq", signed=False),
               State("max_exp_avg_sq", when="amsgrad", why="amsgrad=True", signed=False))
_ADAM_MATH = ("g = grad*grad_sign (+ weight_decay*p); m = m + (1-beta1)*(g-m); v = beta2*v + (1-beta2)*g*g;\n"
              "amsgrad: vmax = max(vmax, v) (NaN propagates), and vmax replaces v below;\n"
              "p -= step_size*m/(sqrt(v)/bias_correction2_sqrt + eps).")

ADAM = Rule(
    "adam", "Adam", "Adam (Kingma & Ba, 2015) with optional AMSGrad (Reddi et al., 2018); torch.optim.Adam.",
    _ADAM_MATH, _ADAM_HYPER, _ADAM_STATE, AdamScalars, _adam, constants={"decoupled": False}, decoupled="adamw")

ADAMW = Rule(
    "adamw", "AdamW", "AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019); torch.optim.AdamW.",
    "p *= 1 - lr*weight_decay first, then Adam with no L2 term:\n" + _ADAM_MATH,
    (_LR, _BETAS, _EPS, Hyper("weight_decay", 1e-2, nonneg), *_ADAM_HYPER[4:]), _ADAM_STATE, AdamScalars, _adam,
    element="adam", constants={"decoupled": True})


# ---- AdEMAMix -------------------------------------------------------------

class AdEMAMixScalars(NamedTuple):
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    beta3: float  # this step's: beta3, or its warmup schedule's value
    one_minus_beta3: float
    alpha: float  # this step's: alpha, or its warmup schedule's value
    bias_correction1: float  # 1 - beta1**step (the fast average only: the slow one is not corrected)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)
    eps: float
    lr: float
    param_decay: float  # decoupled 1 - lr*wd
    grad_sign: float


def _ademamix(lr, beta1, beta2, beta3, alpha, eps, weight_decay, beta3_warmup, alpha_warmup, maximize, step):
    # The paper's schedulers (Pagliardini et al. 2024, section 3 and Algorithm 1), for step < T
    # (a warmup of None arrives as 0.0: never), the final values from step T on:
    #   alpha_t = min(t*alpha/T, alpha)
    #   beta3_t = min(exp(ln(beta1)*ln(beta3) / ((1 - t/T)*ln(beta3) + (t/T)*ln(beta1))), beta3)
    # beta3_t moves from beta1 to beta3 linearly in the half-life 1/ln(beta). Where a log would be
    # of 0 (Python raises, C gives -inf), the formula's limit: beta3 = 0 stays 0 (min(.., 0)), and
    # beta1 = 0 gives exp(ln(beta3)/(t/T)) = beta3**(T/t), the half-life ramp from 0.
    # (Written out in one guarded expression each: without a warmup, a compare or two.)
    ramp_alpha = step * alpha / alpha_warmup if step < alpha_warmup else alpha
    alpha_t = ramp_alpha if ramp_alpha < alpha else alpha
    ramp3 = (math.exp(math.log(beta1) * math.log(beta3)
                      / ((1.0 - step / beta3_warmup) * math.log(beta3) + step / beta3_warmup * math.log(beta1)))
             if beta1 > 0.0 else math.exp(math.log(beta3) / (step / beta3_warmup))) \
        if step < beta3_warmup and beta3 > 0.0 else beta3
    beta3_t = ramp3 if ramp3 < beta3 else beta3
    return AdEMAMixScalars(beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
                           beta3=beta3_t, one_minus_beta3=1.0 - beta3_t, alpha=alpha_t,
                           bias_correction1=1.0 - beta1 ** step, bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step),
                           eps=eps, lr=lr, param_decay=1.0 - lr * weight_decay, grad_sign=-1.0 if maximize else 1.0)


ADEMAMIX = Rule(
    "ademamix", "AdEMAMix",
    "AdEMAMix: Adam with a second, slow average of the gradient mixed in (Pagliardini, Ablin & Grangier, 2024; "
    "apple/ml-ademamix), with the paper's optional warmups of alpha and beta3.",
    "p *= 1 - lr*weight_decay; g = grad*grad_sign; m1 = beta1*m1 + (1-beta1)*g; m2 = beta3*m2 + (1-beta3)*g;\n"
    "nu = beta2*nu + (1-beta2)*g*g; p -= lr*(m1/(1-beta1**t) + alpha*m2)/(sqrt(nu)/sqrt(1-beta2**t) + eps);\n"
    "for t < alpha_warmup (T): alpha_t = min(t*alpha/T, alpha) in place of alpha; for t < beta3_warmup (T):\n"
    "beta3_t = min(exp(ln(beta1)*ln(beta3)/((1-t/T)*ln(beta3) + (t/T)*ln(beta1))), beta3) in place of beta3.",
    (_LR, Hyper("betas", (0.9, 0.999, 0.9999), fixed_tuple(unit, 3), ("beta1", "beta2", "beta3")),
     Hyper("alpha", 2.0, nonneg), _EPS, _WD, Hyper("beta3_warmup", None, warmup_steps),
     Hyper("alpha_warmup", None, warmup_steps), _MAXIMIZE),
    (State("exp_avg_fast"), State("exp_avg_slow"), State("exp_avg_sq", signed=False)),
    AdEMAMixScalars, _ademamix)


# ---- Adamax --------------------------------------------------------------

class AdamaxScalars(NamedTuple):
    beta1: float
    beta2: float
    exp_avg_weight: float
    clr: float  # lr / (1 - beta1**step)
    eps: float
    weight_decay: float
    grad_sign: float
    exp_avg_from_end: bool


def _adamax(lr, beta1, beta2, eps, weight_decay, maximize, step):
    return AdamaxScalars(beta1=beta1, beta2=beta2, exp_avg_weight=1.0 - beta1 if beta1 > 0.5 else -beta1,
                         clr=lr / (1.0 - beta1 ** step), eps=eps, weight_decay=weight_decay,
                         grad_sign=-1.0 if maximize else 1.0, exp_avg_from_end=beta1 <= 0.5)


ADAMAX = Rule(
    "adamax", "Adamax", "Adamax, Adam's infinity-norm variant (Kingma & Ba, 2015, sec. 7); torch.optim.Adamax.",
    "g = grad*grad_sign (+ weight_decay*p); m = m + (1-beta1)*(g-m);\n"
    "u = max(beta2*u, |g| + eps) (NaN propagates); p -= clr*m/u.",
    (Hyper("lr", 2e-3, nonneg), _BETAS, _EPS, _WD, _MAXIMIZE), (State("exp_avg"), State("exp_inf", signed=False)),
    AdamaxScalars, _adamax)


# ---- NAdam ---------------------------------------------------------------

class NAdamScalars(NamedTuple):
    beta1: float
    beta2: float
    exp_avg_weight: float
    one_minus_beta2: float
    bias_correction2: float  # 1 - beta2**step
    eps: float
    grad_coef: float  # lr*(1-mu_t)/(1-mu_product)
    exp_avg_coef: float  # lr*mu_next/(1-mu_product*mu_next)
    weight_decay: float
    param_decay: float
    grad_sign: float
    exp_avg_from_end: bool


def _nadam(mu_product, lr, beta1, beta2, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize,
           step):
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * momentum_decay))
    product = mu_product * mu
    return NAdamScalars(beta1=beta1, beta2=beta2, exp_avg_weight=1.0 - beta1 if beta1 > 0.5 else -beta1,
                        one_minus_beta2=1.0 - beta2,
                        bias_correction2=1.0 - beta2 ** step, eps=eps,
                        grad_coef=lr * (1.0 - mu) / (1.0 - product),
                        exp_avg_coef=lr * mu_next / (1.0 - product * mu_next),
                        weight_decay=0.0 if decoupled_weight_decay else weight_decay,
                        param_decay=1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
                        grad_sign=-1.0 if maximize else 1.0, exp_avg_from_end=beta1 <= 0.5), product


NADAM = Rule(
    "nadam", "NAdam", "NAdam: Adam with Nesterov momentum (Dozat, 2016); torch.optim.NAdam.",
    "mu_t = beta1*(1 - 0.5*0.96**(t*momentum_decay)), mu_next likewise at t+1, mu_product *= mu_t;\n"
    "p *= param_decay (decoupled); g = grad*grad_sign (+ weight_decay*p); m, v as Adam;\n"
    "denom = sqrt(v/(1-beta2**t)) + eps;\n"
    "p -= lr*(1-mu_t)/(1-mu_product)*g/denom + lr*mu_next/(1-mu_product*mu_next)*m/denom.",
    (Hyper("mu_product", None, closed_unit), Hyper("lr", 2e-3, nonneg), _BETAS, _EPS, _WD,
     Hyper("momentum_decay", 4e-3, nonneg), Hyper("decoupled_weight_decay", False, flag), _MAXIMIZE),
    (State("exp_avg"), State("exp_avg_sq", signed=False)),
    NAdamScalars, _nadam, carry=("mu_product", 1.0))


# ---- RAdam ---------------------------------------------------------------

class RAdamScalars(NamedTuple):
    beta1: float
    beta2: float
    exp_avg_weight: float
    one_minus_beta2: float
    step_size: float  # lr*rect/(1 - beta1**step) when rectified, else lr/(1 - beta1**step)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**step)
    eps: float
    weight_decay: float
    param_decay: float
    grad_sign: float
    rectified: bool  # rho_t > 5: the variance is tractable, use the adaptive step
    exp_avg_from_end: bool


def _radam(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, step):
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2 ** step / bias_correction2
    rectified = rho_t > 5.0
    rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)) \
        if rectified else 1.0
    return RAdamScalars(beta1=beta1, beta2=beta2, exp_avg_weight=1.0 - beta1 if beta1 > 0.5 else -beta1,
                        one_minus_beta2=1.0 - beta2,
                        step_size=lr * rect / bias_correction1, bias_correction2_sqrt=math.sqrt(bias_correction2),
                        eps=eps, weight_decay=0.0 if decoupled_weight_decay else weight_decay,
                        param_decay=1.0 - lr * weight_decay if decoupled_weight_decay else 1.0,
                        grad_sign=-1.0 if maximize else 1.0, rectified=rectified, exp_avg_from_end=beta1 <= 0.5)


RADAM = Rule(
    "radam", "RAdam", "RAdam: Adam with the variance rectified (Liu et al., 2020); torch.optim.RAdam.",
    "p *= param_decay (decoupled); g = grad*grad_sign (+ weight_decay*p); m, v as Adam;\n"
    "rho_inf = 2/(1-beta2) - 1, rho_t = rho_inf - 2*t*beta2**t/(1-beta2**t);\n"
    "rho_t > 5: rect = sqrt((rho_t-4)(rho_t-2)rho_inf/((rho_inf-4)(rho_inf-2)rho_t)),\n"
    "           p -= lr*rect/(1-beta1**t) * m*sqrt(1-beta2**t)/(sqrt(v) + eps);\n"
    "else:      p -= lr/(1-beta1**t) * m.",
    (_LR, _BETAS, _EPS, _WD, Hyper("decoupled_weight_decay", False, flag), _MAXIMIZE),
    (State("exp_avg"), State("exp_avg_sq", signed=False)),
    RAdamScalars, _radam)


# ---- ASGD ----------------------------------------------------------------

class ASGDScalars(NamedTuple):
    eta: float  # lr/(1 + lambd*lr*(step-1))**alpha
    param_decay: float  # 1 - lambd*eta
    mu: float  # 1/max(1, step-1-t0), 1 at the first step
    weight_decay: float
    grad_sign: float
    copy_average: bool  # mu == 1: ax = p (torch copies p rather than averaging with weight 1)


def _asgd(lr, lambd, alpha, t0, weight_decay, maximize, step):
    # torch.optim.ASGD updates eta and mu at the end of each step, for the next one: at
    # step t they are the formulas at t-1 (lr and 1 at the first step). torch keeps them
    # as state; here they are recomputed from the group's lr and the step count, which is
    # the same whenever lr has not changed during training.
    # (base**alpha past the largest double: eta is 0, as lr/inf is in C, where
    # Python's ** would raise OverflowError)
    base = 1.0 + lambd * lr * (step - 1)
    eta = lr / base ** alpha if not alpha * math.log(base) >= 709.0 else 0.0
    since = step - 1 - t0
    averaging = step > 1 and since > 1.0  # (torch's mu starts at 1, whatever t0)
    return ASGDScalars(eta=eta, param_decay=1.0 - lambd * eta, mu=1.0 / since if averaging else 1.0,
                       weight_decay=weight_decay, grad_sign=-1.0 if maximize else 1.0,
                       copy_average=not averaging)


ASGD = Rule(
    "asgd", "ASGD", "Averaged SGD (Polyak & Juditsky, 1992; the decay of Bottou, 2012); torch.optim.ASGD.",
    "g = grad*grad_sign (+ weight_decay*p); eta = lr/(1 + lambd*lr*(t-1))**alpha;\n"
    "p = p*(1 - lambd*eta) - eta*g; mu = 1/max(1, t-1-t0) (1 at t = 1):\n"
    "ax = p when mu == 1, else ax += (p - ax)*mu.",
    (Hyper("lr", 1e-2, nonneg), Hyper("lambd", 1e-4, nonneg), Hyper("alpha", 0.75, nonneg),
     Hyper("t0", 1e6, real), _WD, _MAXIMIZE),
    (State("ax"),),
    ASGDScalars, _asgd, derived=("eta", "mu"))


# ---- Lion ----------------------------------------------------------------

class LionScalars(NamedTuple):
    lr: float  # >= 0 (the kernels compute lr*sign(c) as copysign(lr, c))
    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    param_decay: float  # 1 - lr*wd
    grad_sign: float


def _lion(lr, beta1, beta2, weight_decay, maximize):
    return LionScalars(lr=lr, beta1=beta1, beta2=beta2, one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
                       param_decay=1.0 - lr * weight_decay, grad_sign=-1.0 if maximize else 1.0)


LION = Rule(
    "lion", "Lion", "Lion, evolved sign momentum (Chen et al., 2023, Algorithm 2).",
    "c = beta1*m + (1-beta1)*g; p = p*(1 - lr*weight_decay) - lr*sign(c) (sign(+-0) = +0, NaN propagates);\n"
    "m = beta2*m + (1-beta2)*g.",
    (Hyper("lr", 1e-4, nonneg), Hyper("betas", (0.9, 0.99), pair(unit), ("beta1", "beta2")), _WD, _MAXIMIZE),
    (State("exp_avg"),),
    LionScalars, _lion, takes_step=False)


# ---- Rprop ---------------------------------------------------------------

class RpropScalars(NamedTuple):
    etaminus: float
    etaplus: float
    step_size_min: float
    step_size_max: float
    grad_sign: float
    zero: float  # 0.0: the gradient where its sign flipped (no float literals in the element math)
    one: float  # 1.0: sign(g)


def _rprop(etaminus, etaplus, step_size_min, step_size_max, maximize):
    return RpropScalars(etaminus=etaminus, etaplus=etaplus, step_size_min=step_size_min,
                        step_size_max=step_size_max, grad_sign=-1.0 if maximize else 1.0, zero=0.0, one=1.0)


def _rprop_ok(etaminus, etaplus, step_size_min, step_size_max):
    return 0.0 < etaminus and etaminus < 1.0 and 1.0 < etaplus and step_size_min <= step_size_max


RPROP = Rule(
    "rprop", "Rprop", "Rprop, resilient backpropagation (Riedmiller & Braun, 1993; torch.optim.Rprop).",
    "g = grad*grad_sign; where g*prev > 0: step_size *= etaplus; where < 0: step_size *= etaminus\n"
    "and g = 0; step_size = clamp(step_size, step_size_min, step_size_max); p -= sign(g)*step_size;\n"
    "prev = g. step_size starts at lr (the stateful optimizers' lr; the update itself takes none).",
    (Hyper("etas", (0.5, 1.2), pair(nonneg), ("etaminus", "etaplus")),
     Hyper("step_sizes", (1e-6, 50.0), pair(nonneg), ("step_size_min", "step_size_max")), _MAXIMIZE),
    (State("prev"), State("step_size", init="lr", signed=False)),
    RpropScalars, _rprop, takes_step=False,
    relation=(_rprop_ok, "Rprop needs 0 < etaminus < 1 < etaplus and step_size_min <= step_size_max, got "
                         "etas=({etaminus}, {etaplus}), step_sizes=({step_size_min}, {step_size_max})"),
    optimizer_hyper=(Hyper("lr", 1e-2, nonneg),))


# ---- two-pass rules: a trust ratio per tensor ----------------------------------
#
# Each step is two passes over memory (fastopt.trust runs them): pass 1 reads
# the tensor and reduces sum(p*p) and sum(u*u), u the update the element
# function gives with `measure` on; pass 2 is the element update with the
# tensor's ratio in the Trust record's field. The element functions are
# ordinary ones (one kernel per rule, in every backend and the C library).

class LAMBScalars(NamedTuple):
    beta1: float
    beta2: float
    beta3: float  # 1 - beta1 with grad_averaging, else 1 (apex's beta3)
    one_minus_beta2: float
    inv_bias_correction1: float  # 1/(1 - beta1**step) with bias_correction, else 1
    inv_bias_correction2: float  # 1/(1 - beta2**step) with bias_correction, else 1
    eps: float
    weight_decay: float  # L2 term added to the gradient (adam_w_mode=False), else 0
    decay: float  # decoupled: weight_decay*p added to the update (adam_w_mode=True), else 0
    step_size: float  # lr; in pass 2 lr*||p||/||u|| of the tensor (see _lamb_ratio)
    grad_sign: float
    trust: bool  # the trust ratio applies: weight_decay != 0 or use_nvlamb (apex)
    measure: bool  # pass 1: the element gives the update u itself, and nothing is stored


def _lamb(lr, beta1, beta2, eps, weight_decay, bias_correction, adam_w_mode, grad_averaging, use_nvlamb, maximize,
          step):
    return LAMBScalars(beta1=beta1, beta2=beta2, beta3=1.0 - beta1 if grad_averaging else 1.0,
                       one_minus_beta2=1.0 - beta2,
                       inv_bias_correction1=1.0 / (1.0 - beta1 ** step) if bias_correction else 1.0,
                       inv_bias_correction2=1.0 / (1.0 - beta2 ** step) if bias_correction else 1.0,
                       eps=eps, weight_decay=0.0 if adam_w_mode else weight_decay,
                       decay=weight_decay if adam_w_mode else 0.0, step_size=lr,
                       grad_sign=-1.0 if maximize else 1.0, trust=use_nvlamb or weight_decay != 0.0, measure=False)


def _lamb_ratio(step_size, param_sumsq, update_sumsq):
    # apex's LAMBStage2Functor: lr*(||p||/||u||) when both norms are nonzero, else lr
    # (a NaN norm passes `!= 0`, so it propagates into the step).
    param_norm = math.sqrt(param_sumsq)
    update_norm = math.sqrt(update_sumsq)
    return step_size * (param_norm / update_norm) if param_norm != 0.0 and update_norm != 0.0 else step_size


LAMB = Rule(
    "lamb", "LAMB",
    "LAMB, layer-wise adaptive moments (You et al., 2020, \"Large Batch Optimization for Deep Learning: "
    "Training BERT in 76 minutes\"), as NVIDIA apex's FusedLAMB computes it.",
    "g = grad*grad_sign (+ weight_decay*p, adam_w_mode=False); m = beta1*m + beta3*g;\n"
    "v = beta2*v + (1-beta2)*g*g; u = m*inv_bc1/(sqrt(v*inv_bc2) + eps) (+ decay*p), inv_bc = 1/(1-beta**t);\n"
    "pass 1: ||p|| and ||u|| per tensor; pass 2: p -= step_size*u with step_size = lr*||p||/||u||\n"
    "when trust (weight_decay != 0 or use_nvlamb) and both norms are nonzero, else lr.\n"
    "apex's max_grad_norm clipping (fastopt.lamb_ does it): grad_sign *= max_grad_norm/global_norm\n"
    "when the global gradient norm (sqrt of fastopt_sumsq_list over every gradient) exceeds it.",
    (_LR, _BETAS, Hyper("eps", 1e-6, nonneg), Hyper("weight_decay", 0.01, nonneg),
     Hyper("bias_correction", True, flag), Hyper("adam_w_mode", True, flag), Hyper("grad_averaging", True, flag),
     Hyper("use_nvlamb", False, flag), _MAXIMIZE),
    (State("exp_avg"), State("exp_avg_sq", signed=False)),
    LAMBScalars, _lamb,
    trust=Trust("step_size", _lamb_ratio, "trust", reads=("exp_avg", "exp_avg_sq")),
    # (a keyword of fastopt.lamb_ but no per-step hyperparameter: the stateful optimizers
    # take it per group and clip with the norm of every group's gradients, as apex does)
    optimizer_hyper=(Hyper("max_grad_norm", 1.0, optional(nonneg)),))


class LARSScalars(NamedTuple):
    lr: float
    momentum: float
    weight_decay: float
    eta: float  # the trust coefficient (read by _lars_ratio, not by the element)
    trust_ratio: float  # 1; in pass 2 eta*||p||/||u|| of the tensor (see _lars_ratio)
    grad_sign: float
    use_momentum: bool  # momentum != 0
    adapt: bool  # lars_adaptation: the trust ratio applies
    measure: bool  # pass 1: the element gives the update u itself, and nothing is stored


def _lars(lr, momentum, weight_decay, eta, lars_adaptation, maximize):
    return LARSScalars(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, trust_ratio=1.0,
                       grad_sign=-1.0 if maximize else 1.0, use_momentum=momentum != 0.0, adapt=lars_adaptation,
                       measure=False)


def _lars_ratio(eta, param_sumsq, update_sumsq):
    # The LARS of facebookresearch/vicreg and barlowtwins: eta*||p||/||u|| when both norms
    # are > 0, else 1 (a NaN norm fails `> 0`: the ratio is then 1).
    param_norm = math.sqrt(param_sumsq)
    update_norm = math.sqrt(update_sumsq)
    return eta * param_norm / update_norm if param_norm > 0.0 and update_norm > 0.0 else 1.0


LARS = Rule(
    "lars", "LARS",
    "LARS, layer-wise adaptive rate scaling (You, Gitman & Ginsburg, 2017, \"Large Batch Training of "
    "Convolutional Networks\"), as facebookresearch/vicreg's and barlowtwins' LARS computes it.",
    "u = grad*grad_sign (+ weight_decay*p); pass 1: ||p|| and ||u|| per tensor;\n"
    "pass 2: q = eta*||p||/||u|| when adapt and both norms are > 0, else 1;\n"
    "with momentum: mu = momentum*mu + q*u, p -= lr*mu; else p -= lr*q*u.",
    (Hyper("lr", None, nonneg), Hyper("momentum", 0.9, nonneg), _WD, Hyper("eta", 1e-3, nonneg),
     Hyper("lars_adaptation", True, flag), _MAXIMIZE),
    (State("momentum_buffer", when="use_momentum", why="momentum != 0"),),
    LARSScalars, _lars, takes_step=False, saves_step=False,
    trust=Trust("trust_ratio", _lars_ratio, "adapt"))


# ---- matrix rules: elementwise passes around a matrix computation -----------------
#
# Muon's step orthogonalizes the momentum-blended gradient of each 2-D
# parameter with a Newton-Schulz iteration (matrix products: the platform's
# BLAS, fastopt.muon). Everything elementwise around it is one kernel in two
# phases: the momentum pass (the param slot receives the update U to
# orthogonalize, the buffer its new value), then the apply pass (the grad slot
# holds the orthogonalized O; the buffer is not touched).

class MuonScalars(NamedTuple):
    buf_weight: float  # torch's lerp(buf, g, 1-momentum), see the module docstring
    update_weight: float  # torch's lerp(g, buf, momentum) (nesterov)
    lr: float  # the tensor's adjusted lr (apply pass)
    param_decay: float  # 1 - lr*weight_decay, with the unadjusted lr (as torch)
    buf_from_end: bool  # 1-momentum >= 0.5
    update_from_end: bool  # momentum >= 0.5
    nesterov: bool
    orthogonalized: bool  # the apply pass: p = p*param_decay - lr*O


def _muon(lr, weight_decay, momentum, nesterov, lr_ratio, orthogonalized):
    return MuonScalars(buf_weight=1.0 - momentum if momentum > 0.5 else -momentum,
                       update_weight=momentum if momentum < 0.5 else momentum - 1.0,
                       lr=lr * lr_ratio, param_decay=1.0 - lr * weight_decay,
                       buf_from_end=momentum <= 0.5, update_from_end=momentum >= 0.5, nesterov=nesterov,
                       orthogonalized=orthogonalized)


MUON = Rule(
    "muon", "Muon",
    "Muon, momentum orthogonalized by Newton-Schulz (Jordan et al., 2024, \"Muon: An optimizer for hidden "
    "layers in neural networks\"); torch.optim.Muon.",
    "momentum pass: buf = buf + (1-momentum)*(g - buf); U = g + momentum*(buf - g) (nesterov) or buf;\n"
    "O = Newton-Schulz(U) (fastopt.muon: matrix products, not this kernel);\n"
    "apply pass: p = p*(1 - lr*weight_decay) - lr*lr_ratio*O.",
    (Hyper("lr", 1e-3, nonneg), Hyper("weight_decay", 0.1, nonneg), Hyper("momentum", 0.95, closed_unit),
     Hyper("nesterov", True, flag), Hyper("lr_ratio", 1.0, nonneg), Hyper("orthogonalized", False, flag)),
    (State("momentum_buffer", when="not orthogonalized", why="the momentum pass"),),
    MuonScalars, _muon, takes_step=False, saves_step=False)


# ---- schedule-free rules: the optimizer's schedule, then one kernel pass -----------
#
# Schedule-Free AdamW and SGD (Defazio et al., 2024, "The Road Less Scheduled";
# the `schedulefree` package 1.4) keep, per group, a schedule (step count k,
# the largest lr so far, the sum of the averaging weights) that
# fastopt.schedulefree advances once per step in double precision, and give
# the kernel this step's lr and averaging weight ckp1. The parameters hold y
# while training and x for evaluation: the switch is the same kernel in its
# swap phase (`swap`: p = lerp(p, z, swap_weight), the grad slot holding z, no
# state buffer touched).

class AdamWScheduleFreeScalars(NamedTuple):
    beta2: float
    one_minus_beta2: float
    bias_correction2: float  # 1 - beta2**step
    eps: float
    weight_decay: float
    ckp1_weight: float  # torch's lerp(y, z, ckp1), rules.py's form
    y_coef: float  # lr*(beta1*(1 - ckp1) - 1)
    lr: float
    swap_weight: float  # torch's lerp(p, z, w) of the swap
    ckp1_from_end: bool
    swap_from_end: bool
    swap: bool


class SGDScheduleFreeScalars(NamedTuple):
    weight_decay: float
    ckp1_weight: float
    y_coef: float  # lr*(momentum*(1 - ckp1) - 1)
    lr: float
    swap_weight: float
    ckp1_from_end: bool
    swap_from_end: bool
    swap: bool


def _adamw_schedulefree(lr, beta1, beta2, eps, weight_decay, ckp1, swap_weight, swap, step):
    return AdamWScheduleFreeScalars(
        beta2=beta2, one_minus_beta2=1.0 - beta2, bias_correction2=1.0 - beta2 ** step, eps=eps,
        weight_decay=weight_decay, ckp1_weight=ckp1 if ckp1 < 0.5 else ckp1 - 1.0,
        y_coef=lr * (beta1 * (1.0 - ckp1) - 1.0), lr=lr,
        swap_weight=swap_weight if swap_weight < 0.5 else swap_weight - 1.0,
        ckp1_from_end=ckp1 >= 0.5, swap_from_end=swap_weight >= 0.5, swap=swap)


def _sgd_schedulefree(lr, momentum, weight_decay, ckp1, swap_weight, swap):
    return SGDScheduleFreeScalars(
        weight_decay=weight_decay, ckp1_weight=ckp1 if ckp1 < 0.5 else ckp1 - 1.0,
        y_coef=lr * (momentum * (1.0 - ckp1) - 1.0), lr=lr,
        swap_weight=swap_weight if swap_weight < 0.5 else swap_weight - 1.0,
        ckp1_from_end=ckp1 >= 0.5, swap_from_end=swap_weight >= 0.5, swap=swap)


_SWAP_MATH = "swap phase (train/eval): p = lerp(p, z, swap_weight), the grad slot holding z, no state touched."
_SWAP_HYPER = (Hyper("ckp1", 1.0, closed_unit), Hyper("swap_weight", 0.0, real), Hyper("swap", False, flag))

ADAMW_SCHEDULEFREE = Rule(
    "adamw_schedulefree", "AdamWScheduleFree",
    "Schedule-Free AdamW (Defazio et al., 2024; the schedulefree package's AdamWScheduleFree): the kernel, "
    "with this step's lr and averaging weight ckp1 (fastopt.schedulefree keeps the schedule).",
    "v = beta2*v + (1-beta2)*g*g; gn = g/(sqrt(v/(1-beta2**t)) + eps) (+ weight_decay*y);\n"
    "y = lerp(y, z, ckp1) + lr*(beta1*(1-ckp1) - 1)*gn; z = z - lr*gn;\n" + _SWAP_MATH,
    (Hyper("lr", 0.0025, nonneg), Hyper("betas", (0.9, 0.999), pair(unit), ("beta1", "beta2")), _EPS, _WD,
     *_SWAP_HYPER),
    (State("z", when="not swap", why="a step"), State("exp_avg_sq", when="not swap", why="a step", signed=False)),
    AdamWScheduleFreeScalars, _adamw_schedulefree, saves_step=False)

SGD_SCHEDULEFREE = Rule(
    "sgd_schedulefree", "SGDScheduleFree",
    "Schedule-Free SGD (Defazio et al., 2024; the schedulefree package's SGDScheduleFree): the kernel, with "
    "this step's lr and averaging weight ckp1 (fastopt.schedulefree keeps the schedule).",
    "g = grad (+ weight_decay*y); y = lerp(y, z, ckp1) + lr*(momentum*(1-ckp1) - 1)*g; z = z - lr*g;\n"
    + _SWAP_MATH,
    (Hyper("lr", 1.0, nonneg), Hyper("momentum", 0.9, unit), _WD, *_SWAP_HYPER),
    (State("z", when="not swap", why="a step"),),
    SGDScheduleFreeScalars, _sgd_schedulefree, takes_step=False, saves_step=False)


#: Every rule, by name, in the order of the docs.
RULES: dict[str, Rule] = {r.name: r for r in (SGD, ADAGRAD, RMSPROP, ADADELTA, ADAM, ADAMW, ADAMAX, NADAM, RADAM,
                                               ASGD, LION, RPROP, ADEMAMIX)}

#: The two-pass rules (a trust ratio per tensor: ``Rule.trust``), kept apart from
#: :data:`RULES` because their update is not one kernel call (``fastopt.lamb_``,
#: ``fastopt.lars_`` in :mod:`fastopt.trust`); their kernels are ordinary ones.
TWO_PASS_RULES: dict[str, Rule] = {r.name: r for r in (LAMB, LARS)}

#: Both: what the stateful optimizers and the torch adapter make a class of.
ALL_RULES: dict[str, Rule] = {**RULES, **TWO_PASS_RULES}

#: Rules whose step is elementwise passes around a matrix computation (Muon,
#: :mod:`fastopt.muon`): their kernels are ordinary ones; their optimizers are
#: their own (2-D parameters only).
MATRIX_RULES: dict[str, Rule] = {r.name: r for r in (MUON,)}

#: Schedule-free rules (fastopt.schedulefree keeps their schedule and the train/eval
#: switch); their kernels are ordinary ones.
SCHEDULE_FREE_RULES: dict[str, Rule] = {r.name: r for r in (ADAMW_SCHEDULEFREE, SGD_SCHEDULEFREE)}

#: Every rule with a kernel: what the backends and the C library implement.
KERNEL_RULES: dict[str, Rule] = {**ALL_RULES, **MATRIX_RULES, **SCHEDULE_FREE_RULES}

#: The element kernels backends implement, with the scalars type each takes.
KERNEL_SCALARS: dict[str, type] = {r.kernel: r.scalars for r in KERNEL_RULES.values()}
