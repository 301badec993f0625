"""Schedule-Free AdamW and SGD (Defazio et al., 2024): no learning-rate schedule, an average instead.

    lr_max, weight_sum = fastopt.adamw_schedulefree_(y, g, z, v, step=t, lr=2.5e-3,
                                                     lr_max=lr_max, weight_sum=weight_sum)
    fastopt.schedulefree_eval_(y, z, beta1)   # the parameters to x, for evaluation
    fastopt.schedulefree_train_(x, z, beta1)  # and back to y

The rules of the ``schedulefree`` package (1.4: ``AdamWScheduleFree``,
``SGDScheduleFree``, their hyperparameters and defaults). A step k (0-based,
``step = k + 1``) first advances the group's schedule, in double precision, as
the package does: ``lr_t = lr*min(1, (k+1)/warmup_steps)``, ``lr_max =
max(lr_max, lr_t)``, ``weight = (k+1)**r * lr_max**weight_lr_power``,
``weight_sum += weight``, ``ckp1 = weight/weight_sum`` (0 when the sum is 0);
then one fused pass of the rule's kernel (:data:`fastopt.rules.SCHEDULE_FREE_RULES`)
updates y (the parameters while training), z and, for AdamW, the second
moment. The schedule's state (``lr_max``, ``weight_sum``) goes in and comes
back (the package keeps it in the group, with ``k``); it starts at ``lr_max =
-1``, ``weight_sum = 0``, and z at a copy of the parameters.

Evaluation uses x, the average: ``schedulefree_eval_`` moves the parameters
from y to x (``lerp(y, z, 1 - 1/beta1)``) and ``schedulefree_train_`` back
(``lerp(x, z, 1 - beta1)``), each one pass of the same kernel (its swap
phase); ``beta1`` is SGD's ``momentum``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

from . import functional
from .checks import _show, closed_unit, nonneg, real, step_count, unit
from .rules import SCHEDULE_FREE_RULES

__all__ = ["adamw_schedulefree_", "sgd_schedulefree_", "schedulefree_eval_", "schedulefree_train_", "schedule"]

Array = Any
Buffers = Union[Array, Sequence[Array]]

_ADAMW, _SGD = SCHEDULE_FREE_RULES["adamw_schedulefree"], SCHEDULE_FREE_RULES["sgd_schedulefree"]


def _warmup(value: Any) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"warmup_steps must be an int >= 0, got {_show(value)} ({type(value).__name__})")
    steps = int(value.__index__())
    if steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {steps}")
    return steps


def schedule(step: Any, lr: Any, warmup_steps: Any, r: Any, weight_lr_power: Any, lr_max: Any,
             weight_sum: Any) -> Tuple[float, float, float, float]:
    """One step of the schedule, checked: (this step's lr, the new lr_max, the new
    weight_sum, ckp1), in double, as the schedulefree package computes them."""
    k = step_count(step) - 1
    lr, r, power = nonneg("lr", lr), real("r", r), real("weight_lr_power", weight_lr_power)
    warmup, lr_max, weight_sum = _warmup(warmup_steps), real("lr_max", lr_max), nonneg("weight_sum", weight_sum)
    if lr_max < -1.0:
        raise ValueError(f"lr_max must be -1 (before the first step) or an lr >= 0, got {_show(lr_max)}")
    scheduled = lr * ((k + 1) / warmup) if k < warmup else lr * 1.0
    lr_max = max(scheduled, lr_max)
    try:
        weight = ((k + 1) ** r) * (lr_max ** power)
    except (OverflowError, ZeroDivisionError):
        raise ValueError(f"the averaging weight (step {k + 1})**r * lr_max**weight_lr_power is not a finite "
                         f"number for r={r!r}, lr_max={lr_max!r}, weight_lr_power={power!r}") from None
    if isinstance(weight, complex) or weight != weight or weight in (float("inf"), float("-inf")):
        raise ValueError(f"the averaging weight (step {k + 1})**r * lr_max**weight_lr_power is not a finite "
                         f"number for r={r!r}, lr_max={lr_max!r}, weight_lr_power={power!r}")
    weight_sum = weight_sum + weight
    ckp1 = weight / weight_sum if weight_sum != 0 else 0.0
    return scheduled, lr_max, weight_sum, ckp1


def adamw_schedulefree_(param: Buffers, grad: Buffers, z: Buffers, exp_avg_sq: Buffers, *, step: int,
                        lr: float = 0.0025, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                        weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                        weight_lr_power: float = 2.0, lr_max: float = -1.0, weight_sum: float = 0.0,
                        backend: Optional[str] = None, stream: Any = None) -> Tuple[float, float]:
    """Schedule-Free AdamW (the schedulefree package's ``AdamWScheduleFree``), one training step.

    ``param`` holds y; ``z`` starts as a copy of the parameters, ``exp_avg_sq`` at
    zeros. With the schedule's ``ckp1`` and ``lr_t`` (module docstring):
    ``v = b2*v + (1-b2)*g*g``; ``gn = g/(sqrt(v/(1-b2**step)) + eps)`` plus
    ``weight_decay*y``; ``y = lerp(y, z, ckp1) + lr_t*(b1*(1-ckp1) - 1)*gn``;
    ``z -= lr_t*gn``. Returns the schedule's new ``(lr_max, weight_sum)``.
    """
    scheduled, lr_max, weight_sum, ckp1 = schedule(step, lr, warmup_steps, r, weight_lr_power, lr_max, weight_sum)
    functional._update(_ADAMW, param, grad, (z, exp_avg_sq), (scheduled, betas, eps, weight_decay, ckp1, 0.0, False),
                       step, backend, stream)
    return lr_max, weight_sum


def sgd_schedulefree_(param: Buffers, grad: Buffers, z: Buffers, *, step: int, lr: float = 1.0,
                      momentum: float = 0.9, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                      weight_lr_power: float = 2.0, lr_max: float = -1.0, weight_sum: float = 0.0,
                      backend: Optional[str] = None, stream: Any = None) -> Tuple[float, float]:
    """Schedule-Free SGD (the schedulefree package's ``SGDScheduleFree``), one training step.

    ``param`` holds y, ``z`` starts as a copy of the parameters. ``g`` the gradient
    plus ``weight_decay*y``; ``y = lerp(y, z, ckp1) + lr_t*(momentum*(1-ckp1) - 1)*g``;
    ``z -= lr_t*g``. ``momentum`` in (0, 1), as the package requires. Returns the
    schedule's new ``(lr_max, weight_sum)``.
    """
    if not 0.0 < unit("momentum", momentum):
        raise ValueError(f"momentum must be in (0, 1) (as SGDScheduleFree), got {_show(momentum)}")
    scheduled, lr_max, weight_sum, ckp1 = schedule(step, lr, warmup_steps, r, weight_lr_power, lr_max, weight_sum)
    functional._update(_SGD, param, grad, (z,), (scheduled, momentum, weight_decay, ckp1, 0.0, False), None,
                       backend, stream)
    return lr_max, weight_sum


def _swap(param: Buffers, z: Buffers, beta1: Any, to_eval: bool, backend: Optional[str], stream: Any) -> None:
    b = closed_unit("beta1", beta1)
    if not 0.0 < b < 1.0:
        raise ValueError(f"beta1 must be in (0, 1) (the interpolation 1 - 1/beta1 needs it), got {_show(beta1)}")
    weight = 1.0 - 1.0 / b if to_eval else 1.0 - b
    # The kernel's swap phase: z in the grad slot (read), no state buffer.
    functional._update(_SGD, param, z, (None,), (0.0, b, 0.0, 1.0, weight, True), None, backend, stream)


def schedulefree_eval_(param: Buffers, z: Buffers, beta1: float = 0.9, *, backend: Optional[str] = None,
                       stream: Any = None) -> None:
    """The parameters from y (training) to x (evaluation): ``p = lerp(p, z, 1 - 1/beta1)``,
    one fused pass (the package's ``optimizer.eval()``). ``beta1``: AdamW's, or SGD's momentum."""
    _swap(param, z, beta1, True, backend, stream)


def schedulefree_train_(param: Buffers, z: Buffers, beta1: float = 0.9, *, backend: Optional[str] = None,
                        stream: Any = None) -> None:
    """The parameters from x back to y: ``p = lerp(p, z, 1 - beta1)`` (the package's ``optimizer.train()``)."""
    _swap(param, z, beta1, False, backend, stream)
