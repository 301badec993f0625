"""Muon: the momentum of each 2-D parameter, orthogonalized by a Newton-Schulz iteration.

    fastopt.muon_(weights, grads, momentum_buffers, lr=0.02)   # 2-D arrays, or lists of them

A Muon step (Jordan et al. 2024; ``torch.optim.Muon``) per matrix parameter:

1. ``buf = lerp(buf, g, 1-momentum)``; ``U = lerp(g, buf, momentum)`` with
   Nesterov momentum, else ``U = buf``;
2. ``O = NS(U)``: ``X = U/max(||U||_F, eps)`` (transposed to be wide), then
   ``ns_steps`` times ``A = X X^T``, ``X = a X + (b A + c A A) X``;
3. ``p = p*(1 - lr*weight_decay) - lr*ratio*O``, ``ratio`` from the shape
   (``adjust_lr_fn``: ``sqrt(max(1, rows/cols))``, or ``0.2*sqrt(max(rows, cols))``
   for ``"match_rms_adamw"``).

Steps 1 and 3 are elementwise and each is one pass of the rule table's
``muon`` kernel (:data:`fastopt.rules.MATRIX_RULES`) on the chosen backend,
over every tensor in one list call; step 2 is matrix products, run by NumPy's
BLAS in the parameters' dtype. So the result is bitwise the same on every host
backend, and agrees with torch to float round-off only: BLAS sums in its own
order, and torch runs the iteration in bfloat16 (fastopt in float32 or
float64: docs/design.md, "Muon").

Everything is checked before anything is written: the buffers (2-D, one
dtype, shapes, contiguity, no overlap), every hyperparameter, and the
iteration's own (``ns_coefficients``, ``eps``, ``ns_steps`` < 100,
``adjust_lr_fn``).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import functional
from .buffers import is_device_array
from .checks import _show, fixed_tuple, nonneg, real
from .rules import MATRIX_RULES

__all__ = ["muon_", "prepare", "Prepared", "newton_schulz", "lr_ratio", "NS_COEFFICIENTS"]

Array = Any
Buffers = Union[Array, Sequence[Array]]

#: torch.optim.Muon's quintic coefficients (a, b, c) and its other defaults.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")

_RULE = MATRIX_RULES["muon"]
_coefficients = fixed_tuple(real, 3)


def lr_ratio(adjust_lr_fn: Optional[str], shape: Tuple[int, int]) -> float:
    """The factor on ``lr`` for a matrix of ``shape`` (torch.optim.Muon's ``_adjust_lr``):
    ``sqrt(max(1, rows/cols))`` (None, ``"original"``: Keller Jordan's) or
    ``0.2*sqrt(max(rows, cols))`` (``"match_rms_adamw"``: Moonshot's, an update RMS like AdamW's)."""
    rows, cols = shape
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def newton_schulz(update: np.ndarray, coefficients: Tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = NS_STEPS, eps: float = NS_EPS) -> np.ndarray:
    """The orthogonalized ``update`` (2-D): torch.optim.Muon's quintic Newton-Schulz
    iteration, in ``update``'s dtype, as a new C-contiguous array. Its singular values
    come out near 1 (between ~0.7 and ~1.2 for the default coefficients), not exactly 1:
    the coefficients trade convergence for speed, as in the paper."""
    a, b, c = coefficients
    tall = update.shape[0] > update.shape[1]
    x = update.T if tall else update
    x = x / max(np.linalg.norm(x), x.dtype.type(eps))  # (a NaN norm stays NaN: max keeps its first argument)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x  # (torch: addmm(X, addmm(A, A, A, beta=b, alpha=c), X, beta=a))
    return np.ascontiguousarray(x.T if tall else x)


def _listed(name: str, value: Buffers) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _ns_steps(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not hasattr(type(value), "__index__"):
        raise TypeError(f"ns_steps must be an int (Newton-Schulz iterations), got {_show(value)} "
                        f"({type(value).__name__})")
    steps = operator.index(value)
    if not 0 <= steps < 100:
        raise ValueError(f"ns_steps must be in [0, 100) (as torch.optim.Muon), got {steps}")
    return steps


def _adjust_lr_fn(value: Any) -> Optional[str]:
    if value is not None and (not isinstance(value, str) or value not in ADJUST_LR_FNS):
        raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {_show(value)}")
    return value


class Prepared:
    """One checked Muon call, not yet run (:func:`prepare`): the lists and the checked
    values. fastopt.torch prepares every group's call before it runs the first."""

    __slots__ = ("params", "grads", "buffers", "momentum_pass", "coefficients", "eps", "steps", "adjust", "backend")

    def run(self) -> None:
        rule, hyper = _RULE, self.momentum_pass
        updates = [np.empty_like(p) for p in self.params]
        functional._update(rule, updates, self.grads, (self.buffers,), hyper, None, self.backend, None)
        orthogonalized = [newton_schulz(u, self.coefficients, self.steps, self.eps) for u in updates]
        # The apply pass, one list call per distinct lr ratio (one per matrix shape, at most).
        by_ratio: dict[float, list[int]] = {}
        for i, p in enumerate(self.params):
            by_ratio.setdefault(lr_ratio(self.adjust, p.shape), []).append(i)
        for ratio, members in by_ratio.items():
            functional._update(rule, [self.params[i] for i in members], [orthogonalized[i] for i in members],
                               (None,), hyper[:4] + (ratio, True), None, self.backend, None)


def prepare(param: Buffers, grad: Buffers, momentum_buffer: Buffers, *, lr: float = 1e-3, weight_decay: float = 0.1,
            momentum: float = 0.95, nesterov: bool = True,
            ns_coefficients: Tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS,
            ns_steps: int = NS_STEPS, adjust_lr_fn: Optional[str] = None,
            backend: Optional[str] = None) -> Prepared:
    """Every check of :func:`muon_`'s call, writing nothing; raises what it would raise."""
    listed = isinstance(param, (list, tuple))
    params, grads, buffers = _listed("param", param), _listed("grad", grad), _listed("momentum_buffer",
                                                                                      momentum_buffer)
    for i, p in enumerate(params):
        where = f"param[{i}]" if listed else "param"
        if is_device_array(p):
            raise TypeError(f"{where} is a device array: fastopt.muon_ runs on host (NumPy) arrays "
                            "(its Newton-Schulz iteration is NumPy's matrix product)")
        shape = getattr(p, "shape", None)
        if shape is not None and len(shape) != 2:
            raise ValueError(f"{where} has shape {tuple(shape)}: Muon updates 2-D parameters only (matrices); "
                             "use another rule (adamw_, say) for biases, norms and embeddings")
    out = Prepared()
    out.momentum_pass = (lr, weight_decay, momentum, nesterov, 1.0, False)
    functional.check_call(_RULE, params, grads, (buffers,), out.momentum_pass)  # (buffers and hyperparameters)
    out.coefficients = _coefficients("ns_coefficients", ns_coefficients)
    out.eps, out.steps, out.adjust = nonneg("eps", eps), _ns_steps(ns_steps), _adjust_lr_fn(adjust_lr_fn)
    out.params, out.grads, out.buffers, out.backend = params, grads, buffers, backend
    return out


def muon_(param: Buffers, grad: Buffers, momentum_buffer: Buffers, *, lr: float = 1e-3, weight_decay: float = 0.1,
          momentum: float = 0.95, nesterov: bool = True,
          ns_coefficients: Tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS,
          ns_steps: int = NS_STEPS, adjust_lr_fn: Optional[str] = None, backend: Optional[str] = None) -> None:
    """Muon (Jordan et al., 2024); ``torch.optim.Muon``, its hyperparameters and defaults.

    ``param``, ``grad``, ``momentum_buffer``: one 2-D host array each, or lists of
    them (one per matrix, of one dtype, float32 or float64); the buffer starts at
    zeros. Per matrix: ``buf = lerp(buf, g, 1-momentum)``; ``U = lerp(g, buf,
    momentum)`` (``nesterov``) or ``buf``; ``O`` = :func:`newton_schulz` of ``U``;
    ``p = p*(1 - lr*weight_decay) - lr*lr_ratio(adjust_lr_fn, p.shape)*O``. Muon is
    for the hidden layers' matrices: give embeddings, heads, biases and norms to
    another rule (``adamw_``), as torch's docs say. Muon keeps no step count.
    """
    prepare(param, grad, momentum_buffer, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
            backend=backend).run()
