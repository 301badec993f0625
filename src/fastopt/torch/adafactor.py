"""``fastopt.torch.Adafactor``: a drop-in for ``torch.optim.Adafactor``.

Its hyperparameters, defaults, group keys and state (``step``, and
``row_var``/``col_var`` for a parameter of 2 or more dimensions, else
``variance``) are torch's, so state dicts load both ways. A step checks
every group first (hyperparameters; each parameter on the CPU, float32 or
float64, a dense gradient), then runs :func:`fastopt.adafactor_` once per
group, dtype and step count on NumPy views of the tensors.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch

from .. import adafactor
from .host import HostOptimizer, by_dtype, named, scalar_dtype

__all__ = ["Adafactor"]

#: torch.optim.Adafactor's group hyperparameters.
HYPER = ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")


class Adafactor(HostOptimizer):
    """``torch.optim.Adafactor`` run by :func:`fastopt.adafactor_` (``backend``: fastopt's, for the norms)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, beta2_decay: float = -0.8, eps: tuple = (None, 1e-3),
                 d: float = 1.0, weight_decay: float = 0.0, *, foreach: Optional[bool] = None, maximize: bool = False,
                 backend: Optional[str] = None) -> None:
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        _check_hyper(defaults, "Adafactor")
        self.backend = backend
        super().__init__(params, defaults)

    def _prepare_group(self, i: int, group: dict, new_state: dict) -> list:
        where = f"param_groups[{i}]"
        hyper = {k: group[k] for k in HYPER}
        if isinstance(hyper["lr"], torch.Tensor):
            hyper["lr"] = float(hyper["lr"])
        _check_hyper(hyper, where)
        members = []
        for p, state in self._stepped(i, group):
            if not state:  # (as torch: the factors for 2 or more dimensions, else the full variance)
                state = new_state[p] = {"step": torch.tensor(0.0, dtype=scalar_dtype())}
                if p.dim() > 1:
                    state["row_var"] = p.new_zeros((*p.shape[:-1], 1))
                    state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
                else:
                    state["variance"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            members.append((p, state))
        calls = []
        for (_, step), m in by_dtype(members, lambda p, state: int(state["step"]) + 1).items():
            prepared = named(where, lambda m=m, step=step: adafactor.prepare(
                [p.detach().numpy() for p, _ in m], [p.grad.numpy() for p, _ in m],
                *([s[key].numpy() if key in s else None for _, s in m] for key in ("row_var", "col_var", "variance")),
                step=step, **hyper, backend=self.backend))
            calls.append(lambda prepared=prepared, m=m: _run(prepared, m))
        return calls


def _run(prepared: adafactor.Prepared, members: list) -> None:
    prepared.run()
    for _, state in members:
        state["step"] += 1


def _check_hyper(hyper: dict, where: str) -> None:
    named(where, lambda: adafactor.prepare([], [], [], [], [], step=1, **{k: hyper[k] for k in HYPER}))
