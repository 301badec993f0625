"""``fastopt.torch.Muon``: a drop-in for ``torch.optim.Muon`` (2-D parameters only).

Its hyperparameters, defaults, group keys and state (``momentum_buffer`` per
parameter, no step) are torch's, so state dicts load both ways with
``torch.optim.Muon`` unchanged. A step checks every group first (each
hyperparameter, and each parameter: 2-D, on the CPU, float32 or float64, a
dense gradient), then runs :func:`fastopt.muon_` once per group and dtype on
NumPy views of the tensors: the momentum and the update in fused passes of
the chosen backend, the Newton-Schulz iteration by NumPy's BLAS in the
parameters' dtype (torch runs it in bfloat16: see :mod:`fastopt.muon`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from .. import muon

__all__ = ["Muon"]

#: torch.optim.Muon's group hyperparameters (its groups hold nothing else of its own).
HYPER = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")


class Muon(torch.optim.Optimizer):
    """``torch.optim.Muon`` run by :func:`fastopt.muon_` (``backend``: fastopt's, None: auto)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple = muon.NS_COEFFICIENTS, eps: float = muon.NS_EPS,
                 ns_steps: int = muon.NS_STEPS, adjust_lr_fn: Optional[str] = None, *,
                 backend: Optional[str] = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        _check_hyper(defaults, "Muon")
        self.backend = backend
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.ndim != 2:
                    raise ValueError(f"param_groups[{i}]['params'][{j}] has shape {tuple(p.shape)}: Muon updates "
                                     "2-D parameters only (as torch.optim.Muon); give biases, norms and "
                                     "embeddings to another optimizer (fastopt.torch.AdamW, say)")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        new_buffers: dict = {}
        calls = []
        for i, group in enumerate(self.param_groups):
            where = f"param_groups[{i}]"
            hyper = {k: group[k] for k in HYPER}
            if isinstance(hyper["lr"], torch.Tensor):  # (a tensor lr, as torch allows: read at every step)
                hyper["lr"] = float(hyper["lr"])
            _check_hyper(hyper, where)
            by_dtype: dict = {}
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                name = f"{where}['params'][{j}]"
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name}: Muon does not support sparse gradients")
                if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"{name} is a {p.dtype} tensor on {p.device}; fastopt.torch.Muon steps "
                                    "float32 and float64 CPU tensors")
                buf = self.state[p].get("momentum_buffer") if p in self.state else None
                if buf is None:
                    buf = new_buffers[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                by_dtype.setdefault(p.dtype, []).append((p, buf))
            for members in by_dtype.values():
                try:
                    calls.append(muon.prepare([p.detach().numpy() for p, _ in members],
                                              [p.grad.numpy() for p, _ in members],
                                              [b.numpy() for _, b in members], **hyper, backend=self.backend))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{where}: {exc}") from None
        for p, buf in new_buffers.items():  # (every call checked: now the state changes)
            self.state[p]["momentum_buffer"] = buf
        for call in calls:
            call.run()
        return loss


def _check_hyper(hyper: dict, where: str) -> None:
    """The group's hyperparameters as fastopt.muon_ checks them, without buffers."""
    try:
        muon.prepare([], [], [], **hyper)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
