"""``fastopt.torch.AdamWScheduleFree`` and ``SGDScheduleFree``: drop-ins for the schedulefree package's.

The same constructor arguments and defaults, group keys (``k``, ``lr_max``,
``weight_sum``, ``train_mode``, ``scheduled_lr``, ...) and state (``z``, and
``exp_avg_sq`` for AdamW), so state dicts load both ways with
``schedulefree.AdamWScheduleFree``/``SGDScheduleFree``; ``train()`` and
``eval()`` switch the parameters between y and x as the package's do, and a
step outside train mode raises as the package's. A step checks every group
first (its hyperparameters and schedule, and each parameter: on the CPU,
float32 or float64, a dense gradient), then advances each group's schedule
(:func:`fastopt.schedulefree.schedule`) and runs the rule's fused kernel once
per group and dtype over the parameters that have a gradient.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .. import functional
from ..rules import SCHEDULE_FREE_RULES
from ..schedulefree import _swap, schedule
from .host import HostOptimizer, by_dtype, named

__all__ = ["AdamWScheduleFree", "SGDScheduleFree"]

_NOT_TRAINING = ("Optimizer was not in train mode when step is called. Please insert .train() and .eval() calls on "
                 "the optimizer. See documentation for details.")


class _ScheduleFree(HostOptimizer):
    """What the two classes share: the schedule per group, the state, train/eval."""

    rule: Any  # the kernel's rule (rules.SCHEDULE_FREE_RULES)
    buffers: tuple  # the state keys, in the kernel's order

    def __init__(self, params: Iterable[Any], defaults: dict, backend: Optional[str]) -> None:
        self.backend = backend
        _check_group({**defaults, "k": 0, "lr_max": -1.0, "weight_sum": 0.0}, self, type(self).__name__)
        super().__init__(params, {**defaults, "k": 0, "train_mode": False, "weight_sum": 0.0, "lr_max": -1.0,
                                  "scheduled_lr": 0.0})

    def _beta1(self, group: dict) -> float:
        raise NotImplementedError

    def _kernel_hyper(self, group: dict, lr: float, ckp1: float) -> tuple:
        raise NotImplementedError

    @torch.no_grad()
    def eval(self) -> None:
        """The parameters to x (the average) for evaluation: ``lerp(y, z, 1 - 1/beta1)``."""
        self._switch(True)

    @torch.no_grad()
    def train(self) -> None:
        """The parameters back to y for training: ``lerp(x, z, 1 - beta1)``."""
        self._switch(False)

    def _switch(self, to_eval: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] != to_eval:  # (already there)
                continue
            by_dtype: dict = {}
            for p in group["params"]:
                if p in self.state and "z" in self.state[p]:
                    by_dtype.setdefault(p.dtype, []).append(p)
            for members in by_dtype.values():
                _swap([p.detach().numpy() for p in members], [self.state[p]["z"].numpy() for p in members],
                      self._beta1(group), to_eval, self.backend, None)
            group["train_mode"] = not to_eval

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(_NOT_TRAINING)
        return super().step(closure)

    def _prepare_group(self, i: int, group: dict, new_state: dict) -> list:
        where = f"param_groups[{i}]"
        scheduled, lr_max, weight_sum, ckp1 = _check_group(group, self, where)
        hyper = self._kernel_hyper(group, scheduled, ckp1)
        members = []
        for p, state in self._stepped(i, group):
            if "z" not in state:  # (as the package: z from the parameter, the moment at zeros)
                state = new_state[p] = {"z": p.detach().clone(memory_format=torch.contiguous_format)}
                if "exp_avg_sq" in self.buffers:
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            members.append((p, state))
        calls = []
        for m in by_dtype(members).values():
            args = ([p.detach().numpy() for p, _ in m], [p.grad.numpy() for p, _ in m],
                    tuple([s[key].numpy() for _, s in m] for key in self.buffers))
            named(where, lambda args=args: functional.check_call(self.rule, *args, hyper))
            calls.append(lambda args=args: functional._update(self.rule, *args, hyper, group["k"] + 1,
                                                              self.backend, None))
        # (last: the group's schedule moves on once its calls have run)
        calls.append(lambda: group.update(k=group["k"] + 1, scheduled_lr=scheduled, lr_max=lr_max,
                                          weight_sum=weight_sum))
        return calls


def _check_group(group: dict, opt: _ScheduleFree, where: str) -> tuple:
    """The group's schedule for its next step (checked), and its kernel hyperparameters checked."""
    def check() -> tuple:
        lr = float(group["lr"]) if isinstance(group["lr"], torch.Tensor) else group["lr"]
        out = schedule(group["k"] + 1, lr, group["warmup_steps"], group["r"], group["weight_lr_power"],
                       group["lr_max"], group["weight_sum"])
        opt.rule.checked(dict(zip(opt.rule.defaults, opt._kernel_hyper(group, out[0], out[3]))))
        opt._beta1(group)
        return out
    try:
        return named(where, check)
    except KeyError as exc:
        raise ValueError(f"{where} is missing {exc.args[0]!r}") from None


class AdamWScheduleFree(_ScheduleFree):
    """``schedulefree.AdamWScheduleFree`` run by fastopt's fused kernel (``backend``: fastopt's)."""

    rule = SCHEDULE_FREE_RULES["adamw_schedulefree"]
    buffers = ("z", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float = 0.0025, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 foreach: Optional[bool] = True, *, backend: Optional[str] = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, r=r, warmup_steps=warmup_steps,
                                      weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                                      foreach=foreach), backend)

    def _beta1(self, group: dict) -> float:
        beta1 = group["betas"][0]
        if not 0.0 < beta1 < 1.0:
            raise ValueError(f"betas[0] must be in (0, 1) (eval() interpolates by 1 - 1/beta1), got {beta1!r}")
        return beta1

    def _kernel_hyper(self, group: dict, lr: float, ckp1: float) -> tuple:
        return (lr, group["betas"], group["eps"], group["weight_decay"], ckp1, 0.0, False)


class SGDScheduleFree(_ScheduleFree):
    """``schedulefree.SGDScheduleFree`` run by fastopt's fused kernel (``backend``: fastopt's)."""

    rule = SCHEDULE_FREE_RULES["sgd_schedulefree"]
    buffers = ("z",)

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2, foreach: Optional[bool] = True,
                 *, backend: Optional[str] = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, r=r, warmup_steps=warmup_steps,
                                      weight_lr_power=weight_lr_power, weight_decay=weight_decay,
                                      foreach=foreach), backend)

    def _beta1(self, group: dict) -> float:
        momentum = group["momentum"]
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1) (as SGDScheduleFree), got {momentum!r}")
        return momentum

    def _kernel_hyper(self, group: dict, lr: float, ckp1: float) -> tuple:
        return (lr, group["momentum"], group["weight_decay"], ckp1, 0.0, False)
