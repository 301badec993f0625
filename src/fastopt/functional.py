"""Fused in-place update functions: ``fastopt.adamw_(p, g, m, v, step=t)``.

Each function is one update of a flat buffer (or any C-contiguous array) in a
single pass over memory. The signatures follow DESIGN.md and name their state
buffers as ``torch.optim`` does. Every body is the same call to
:func:`_update`: the rule (``fastopt.rules``) validates hyperparameters and
builds the per-step scalars, :mod:`fastopt.buffers` checks the arrays, and
:mod:`fastopt.dispatch` picks the backend. Nothing is written until all of
that has passed.

Arrays: NumPy arrays on the host or ``__cuda_array_interface__`` arrays on
a GPU, float32 or float64, one shape and dtype for all. ``backend=None`` means
``FASTOPT_BACKEND`` (read at the first update) or ``auto``; ``stream`` is a
CUDA stream for the ``cuda`` backend (ignored on the host).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from . import dispatch
from .buffers import check_buffers
from .rules import RULES, Rule, step_count

__all__ = ["sgd_", "adagrad_", "rmsprop_", "adadelta_", "adam_", "adamw_", "adamax_", "nadam_", "lion_"]

Array = Any  # numpy.ndarray or an object with __cuda_array_interface__
Betas = Tuple[float, float]


def _update(rule: Rule, param: Array, grad: Array, state: tuple, hyper: dict,
            step: Any, backend: Optional[str], stream: Any) -> Any:
    """Validate everything, then run ``rule``'s kernel once. Returns the rule's extra result."""
    t = step_count(step) if rule.takes_step else 1
    values, needed = rule.checked(hyper)
    scalars, extra = rule.compute(values, t)
    names, arrays, used = ["param", "grad"], [param, grad], []
    for name, buf in zip(rule.state, state):
        if buf is None:
            if name in needed:
                why = needed[name]
                raise ValueError(f"{name} is required by {rule.name}_"
                                 + ("" if why in (rule.name, "this rule") else f" when {why}") + ", got None")
        else:
            names.append(name)
            arrays.append(buf)
        used.append(buf if name in needed else None)
    on_device = check_buffers(names, arrays)
    dispatch.select(backend, on_device).run(rule.kernel, param, grad, tuple(used), scalars, stream)
    return extra


def sgd_(param: Array, grad: Array, momentum_buffer: Optional[Array] = None, *, step: int, lr: float,
         momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
         maximize: bool = False, backend: Optional[str] = None, stream: Any = None) -> None:
    """SGD with optional momentum, dampening and Nesterov momentum (``torch.optim.SGD``).

    ``g = ±grad + wd*p``; with momentum: ``buf = g`` at step 1, else
    ``buf = momentum*buf + (1-dampening)*g``; ``g = g + momentum*buf`` (Nesterov)
    or ``g = buf``; then ``p -= lr*g``. ``momentum_buffer`` is required when
    ``momentum != 0``.
    """
    hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=nesterov, maximize=maximize)
    _update(RULES["sgd"], param, grad, (momentum_buffer,), hyper, step, backend, stream)


def adagrad_(param: Array, grad: Array, state_sum: Array, *, step: int, lr: float = 1e-2,
             lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
             backend: Optional[str] = None, stream: Any = None) -> None:
    """AdaGrad (Duchi et al., 2011; ``torch.optim.Adagrad``).

    ``clr = lr/(1+(step-1)*lr_decay)``; ``sum += g*g``; ``p -= clr*g/(sqrt(sum)+eps)``.
    """
    hyper = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay, eps=eps, maximize=maximize)
    _update(RULES["adagrad"], param, grad, (state_sum,), hyper, step, backend, stream)


def rmsprop_(param: Array, grad: Array, square_avg: Array, momentum_buffer: Optional[Array] = None,
             grad_avg: Optional[Array] = None, *, step: int, lr: float = 1e-2, alpha: float = 0.99,
             eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
             maximize: bool = False, backend: Optional[str] = None, stream: Any = None) -> None:
    """RMSProp (Hinton's lecture 6e; centered variant of Graves 2013; ``torch.optim.RMSprop``).

    ``sq = alpha*sq + (1-alpha)*g*g``; centered: ``ga = lerp(ga, g, 1-alpha)``,
    ``avg = sqrt(sq - ga*ga) + eps``, else ``avg = sqrt(sq) + eps``; with momentum:
    ``buf = momentum*buf + g/avg; p -= lr*buf``, else ``p -= lr*g/avg``.
    ``momentum_buffer`` is required when ``momentum > 0``, ``grad_avg`` when ``centered``.
    """
    hyper = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                 centered=centered, maximize=maximize)
    _update(RULES["rmsprop"], param, grad, (square_avg, momentum_buffer, grad_avg), hyper, step, backend, stream)


def adadelta_(param: Array, grad: Array, square_avg: Array, acc_delta: Array, *, step: int, lr: float = 1.0,
              rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0, maximize: bool = False,
              backend: Optional[str] = None, stream: Any = None) -> None:
    """Adadelta (Zeiler, 2012; ``torch.optim.Adadelta``).

    ``sq = rho*sq + (1-rho)*g*g``; ``d = sqrt(acc+eps)/sqrt(sq+eps)*g``;
    ``acc = rho*acc + (1-rho)*d*d``; ``p -= lr*d``.
    """
    hyper = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize)
    _update(RULES["adadelta"], param, grad, (square_avg, acc_delta), hyper, step, backend, stream)


def adam_(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, max_exp_avg_sq: Optional[Array] = None,
          *, step: int, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
          backend: Optional[str] = None, stream: Any = None) -> None:
    """Adam (Kingma & Ba, 2015) with optional AMSGrad (Reddi et al., 2018); ``torch.optim.Adam``.

    ``g = ±grad + wd*p``; ``m = lerp(m, g, 1-b1)``; ``v = b2*v + (1-b2)*g*g``;
    AMSGrad: ``vmax = max(vmax, v)`` replaces ``v`` below;
    ``p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``.
    ``max_exp_avg_sq`` is required when ``amsgrad``.
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    _update(RULES["adam"], param, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq), hyper, step, backend, stream)


def adamw_(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, max_exp_avg_sq: Optional[Array] = None,
           *, step: int, lr: float = 1e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
           backend: Optional[str] = None, stream: Any = None) -> None:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019); ``torch.optim.AdamW``.

    First ``p *= 1 - lr*weight_decay``, then the Adam update with no L2 term.
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    _update(RULES["adamw"], param, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq), hyper, step, backend, stream)


def adamax_(param: Array, grad: Array, exp_avg: Array, exp_inf: Array, *, step: int, lr: float = 2e-3,
            betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, maximize: bool = False,
            backend: Optional[str] = None, stream: Any = None) -> None:
    """Adamax, Adam's infinity-norm variant (Kingma & Ba, 2015, sec. 7); ``torch.optim.Adamax``.

    ``m = lerp(m, g, 1-b1)``; ``u = max(b2*u, |g|+eps)``; ``p -= lr/(1-b1**t) * m/u``.
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize)
    _update(RULES["adamax"], param, grad, (exp_avg, exp_inf), hyper, step, backend, stream)


def nadam_(param: Array, grad: Array, exp_avg: Array, exp_avg_sq: Array, *, step: int, mu_product: float,
           lr: float = 2e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
           momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False, maximize: bool = False,
           backend: Optional[str] = None, stream: Any = None) -> float:
    """NAdam: Adam with Nesterov momentum (Dozat, 2016); ``torch.optim.NAdam``.

    ``mu_t = b1*(1-0.5*0.96**(t*md))``, ``mu_next`` likewise at ``t+1``,
    ``mu_product *= mu_t``; ``m``, ``v`` as Adam; ``denom = sqrt(v/(1-b2**t)) + eps``;
    ``p -= lr*(1-mu_t)/(1-mu_product) * g/denom + lr*mu_next/(1-mu_product*mu_next) * m/denom``.
    Pass ``mu_product=1.0`` at step 1 and the returned value afterwards.

    Returns the new ``mu_product``.
    """
    hyper = dict(mu_product=mu_product, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    return _update(RULES["nadam"], param, grad, (exp_avg, exp_avg_sq), hyper, step, backend, stream)


def lion_(param: Array, grad: Array, exp_avg: Array, *, lr: float = 1e-4, betas: Betas = (0.9, 0.99),
          weight_decay: float = 0.0, maximize: bool = False, backend: Optional[str] = None,
          stream: Any = None) -> None:
    """Lion, evolved sign momentum (Chen et al., 2023, Algorithm 2).

    ``c = b1*m + (1-b1)*g``; ``p = p*(1-lr*wd) - lr*sign(c)``; ``m = b2*m + (1-b2)*g``.
    """
    hyper = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
    _update(RULES["lion"], param, grad, (exp_avg,), hyper, None, backend, stream)
