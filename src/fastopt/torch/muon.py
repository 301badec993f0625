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

from typing import Any, Iterable, Optional

import torch

from .. import muon
from .host import HostOptimizer, by_dtype, named

__all__ = ["Muon"]

#: torch.optim.Muon's group hyperparameters (its groups hold nothing else of its own).
HYPER = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn")


class Muon(HostOptimizer):
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

    def _prepare_group(self, i: int, group: dict, new_state: dict) -> list:
        where = f"param_groups[{i}]"
        hyper = {k: group[k] for k in HYPER}
        if isinstance(hyper["lr"], torch.Tensor):  # (a tensor lr, as torch allows: read at every step)
            hyper["lr"] = float(hyper["lr"])
        _check_hyper(hyper, where)
        members = []
        for p, state in self._stepped(i, group):
            if "momentum_buffer" not in state:
                state = new_state[p] = {"momentum_buffer": torch.zeros_like(p, memory_format=torch.contiguous_format)}
            members.append((p, state))
        return [named(where, lambda m=m: muon.prepare(
                    [p.detach().numpy() for p, _ in m], [p.grad.numpy() for p, _ in m],
                    [s["momentum_buffer"].numpy() for _, s in m], **hyper, backend=self.backend)).run
                for m in by_dtype(members).values()]


def _check_hyper(hyper: dict, where: str) -> None:
    """The group's hyperparameters as fastopt.muon_ checks them, without buffers."""
    named(where, lambda: muon.prepare([], [], [], **hyper))
