"""``fastopt.torch.Adafactor``: a drop-in for ``torch.optim.Adafactor``.

Its hyperparameters, defaults, group keys and state (``step``, and
``row_var``/``col_var`` for a parameter of 2 or more dimensions, else
``variance``) are torch's, so state dicts load both ways. A step checks
every group first (hyperparameters; each parameter on the CPU, float32 or
float64, a dense gradient), then runs :func:`fastopt.adafactor_` once per
group, dtype and step count on NumPy views of the tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .. import adafactor

__all__ = ["Adafactor"]

#: torch.optim.Adafactor's group hyperparameters.
HYPER = ("lr", "beta2_decay", "eps", "d", "weight_decay", "maximize")


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Adafactor(torch.optim.Optimizer):
    """``torch.optim.Adafactor`` run by :func:`fastopt.adafactor_` (``backend``: fastopt's, for the norms)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, beta2_decay: float = -0.8, eps: tuple = (None, 1e-3),
                 d: float = 1.0, weight_decay: float = 0.0, *, foreach: Optional[bool] = None, maximize: bool = False,
                 backend: Optional[str] = None) -> None:
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, foreach=foreach,
                        maximize=maximize)
        _check_hyper(defaults, "Adafactor")
        self.backend = backend
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        new_state: dict = {}
        calls = []
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]"
            hyper = {k: group[k] for k in HYPER}
            if isinstance(hyper["lr"], torch.Tensor):
                hyper["lr"] = float(hyper["lr"])
            _check_hyper(hyper, where)
            buckets: dict = {}
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = f"{where}['params'][{j}]"
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name}: Adafactor does not support sparse gradients")
                if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"{name} is a {p.dtype} tensor on {p.device}; fastopt.torch.Adafactor steps "
                                    "float32 and float64 CPU tensors")
                state = self.state[p] if p in self.state else {}
                if not state:  # (as torch: the factors for 2 or more dimensions, else the full variance)
                    state = new_state[p] = {"step": torch.tensor(0.0, dtype=_scalar_dtype())}
                    if p.dim() > 1:
                        state["row_var"] = p.new_zeros((*p.shape[:-1], 1))
                        state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
                    else:
                        state["variance"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                buckets.setdefault((p.dtype, int(state["step"]) + 1), []).append((p, state))
            for (_, step), members in buckets.items():
                try:
                    prepared = adafactor.prepare(
                        [p.detach().numpy() for p, _ in members], [p.grad.numpy() for p, _ in members],
                        *([s[key].numpy() if key in s else None for _, s in members]
                          for key in ("row_var", "col_var", "variance")),
                        step=step, **hyper, backend=self.backend)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{where}: {exc}") from None
                calls.append((prepared, members))
        for p, state in new_state.items():  # (every group checked: now the state changes)
            self.state[p].update(state)
        for prepared, members in calls:
            prepared.run()
            for _, state in members:
                state["step"] += 1
        return loss


def _check_hyper(hyper: dict, where: str) -> None:
    try:
        adafactor.prepare([], [], [], [], [], step=1, **{k: hyper[k] for k in HYPER})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
