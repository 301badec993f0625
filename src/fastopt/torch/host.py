"""What the adapters of the driven rules share (Muon, Adafactor, the schedule-free rules).

Those rules' steps are driver functions (:mod:`fastopt.muon`, :mod:`fastopt.adafactor`,
:mod:`fastopt.schedulefree`) over NumPy views of CPU tensors, and their classes
keep the anchor's own state layout, so each is a plain ``torch.optim.Optimizer``
subclass with one method of its own, :meth:`HostOptimizer._prepare_group`. This
base runs the step as every fastopt update runs: every group is checked and its
calls prepared first (the hyperparameters, each parameter, the buffers), new
state is made but kept aside, and only when everything has passed does the state
change and the first call run. A bad group or parameter raises naming it and
changes nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch

__all__ = ["HostOptimizer", "HOST_DTYPES", "by_dtype", "named", "scalar_dtype"]

HOST_DTYPES = (torch.float32, torch.float64)


def scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps per-parameter scalars in (step, mu_product): the default's."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class HostOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose step is prepared for every group before any runs."""

    backend: Optional[str]  # fastopt's backend (None: auto)

    def _prepare_group(self, i: int, group: dict, new_state: dict) -> list[Callable[[], None]]:
        """Check group ``i`` and return its calls, not yet run; state a parameter lacks
        goes into ``new_state[p]`` (a dict of its new entries), not into ``self.state``."""
        raise NotImplementedError

    def _stepped(self, i: int, group: dict) -> Iterator[tuple[torch.Tensor, dict]]:
        """(parameter, its state: ``self.state[p]`` or {}) for each parameter of group ``i``
        with a gradient, checked: a dense gradient, on the CPU, float32 or float64."""
        name = type(self).__name__
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            where = f"param_groups[{i}]['params'][{j}]"
            if p.grad.is_sparse:
                raise RuntimeError(f"{where}: {name} does not support sparse gradients")
            if p.device.type != "cpu" or p.dtype not in HOST_DTYPES:
                raise TypeError(f"{where} is a {p.dtype} tensor on {p.device}; fastopt.torch.{name} steps float32 "
                                "and float64 CPU tensors")
            yield p, (self.state[p] if p in self.state else {})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        new_state: dict = {}
        calls = [call for i, group in enumerate(self.param_groups) for call in self._prepare_group(i, group, new_state)]
        for p, entries in new_state.items():  # (every group checked: now the state changes)
            self.state[p].update(entries)
        for call in calls:
            call()
        return loss


def by_dtype(members: Iterator[tuple[torch.Tensor, dict]], key: Callable[[torch.Tensor, dict], Any] = None) -> dict:
    """``members`` grouped by the parameter's dtype (and ``key(p, state)`` when given): one call each."""
    out: dict = {}
    for p, state in members:
        out.setdefault((p.dtype,) if key is None else (p.dtype, key(p, state)), []).append((p, state))
    return out


def named(where: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with a TypeError/ValueError it raises prefixed by ``where`` (the group)."""
    try:
        return fn()
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
