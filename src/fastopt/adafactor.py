"""Adafactor (Shazeer & Stern, 2018) as ``torch.optim.Adafactor`` computes it.

    fastopt.adafactor_(params, grads, row_vars, col_vars, variances, step=t, lr=1e-2)

Per tensor, at step ``t``: ``beta2_t = 1 - t**beta2_decay`` (so the average's
weight is ``t**beta2_decay``), ``rho = min(lr, 1/sqrt(t))``,
``alpha = max(eps2, ||p||/sqrt(n))*rho``; ``p *= 1 - lr*weight_decay``. A tensor
of two or more dimensions keeps a factored second moment: the mean square of
each row (``row_var``, the shape with its last dimension 1) and of each column
(``col_var``, with its second to last dimension 1), each a running average,
and ``v = row_var @ col_var / max(mean(row_var), eps1)``; a vector (or scalar)
keeps the full ``variance``. Then ``u = g/sqrt(max(v, eps1**2))``,
``p -= alpha/max(1, ||u||/(sqrt(n)*d))*u``. ``eps1`` None means the dtype's
machine epsilon.

The step is reductions (the norms of p and u, the rows' and columns' mean
squares) between elementwise expressions: it runs as NumPy array operations
in the tensors' dtype, not a fused kernel. Every reduction has a fixed order,
independent of thread counts: the norms are :func:`fastopt.sums_of_squares`
(bitwise the same on every host backend, ``backend`` chooses which), the row
and column sums NumPy's own single-threaded ones. Everything is checked
before anything is written.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from .buffers import check_buffers, check_disjoint
from .checks import _show, nonneg, optional, real, step_count
from .norms import sums_of_squares

__all__ = ["adafactor_", "prepare", "Prepared"]

Array = Any
Buffers = Union[Array, Sequence[Array]]


def _listed(value: Any, count: int, name: str) -> list:
    """``value`` as a list of ``count`` entries (None: count Nones)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} entries, param has {count}")
        return list(value)
    if value is None:
        return [None] * count
    if count != 1:
        raise TypeError(f"{name} must be a list of {count} entries (param is a list), got {type(value).__name__}")
    return [value]


def _lerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """torch's lerp(a, b, w) with a Python weight: ``a + w*(b - a)`` for w < 0.5, else
    ``b - (b - a)*(1 - w)``, in ``a``'s dtype."""
    t = a.dtype.type
    return a + t(w) * (b - a) if w < 0.5 else b - (b - a) * t(1.0 - w)


def _check_factor(name: str, value: Any, p: np.ndarray, axis: int, where: str) -> np.ndarray:
    shape = list(p.shape)
    shape[axis] = 1
    if type(value) is not np.ndarray:
        raise TypeError(f"{name}{where} must be a NumPy array of shape {tuple(shape)}, got {type(value).__name__}")
    if value.shape != tuple(shape) or value.dtype != p.dtype:
        raise ValueError(f"{name}{where} has shape {value.shape} and dtype {value.dtype}, expected "
                         f"{tuple(shape)} and {p.dtype} (param{where}'s shape with dimension {axis} of size 1)")
    if not value.flags.c_contiguous or not value.flags.writeable:
        raise ValueError(f"{name}{where} must be C-contiguous and writable")
    return value


class Prepared:
    """One checked Adafactor call, not yet run (:func:`prepare`)."""

    __slots__ = ("params", "grads", "rows", "cols", "variances", "step", "lr", "beta2_decay", "eps1", "eps2", "d",
                 "weight_decay", "maximize", "backend")

    def run(self) -> None:
        t = float(self.step)
        weight = t ** self.beta2_decay  # torch's one_minus_beta2_t: the average's weight of this step
        rho = min(self.lr, 1.0 / (t ** 0.5))
        _, param_sumsq = sums_of_squares(self.params, backend=self.backend)
        updates = []
        for k, (p, g) in enumerate(zip(self.params, self.grads)):
            dtype = p.dtype.type
            if p.size == 0:
                updates.append(p)
                continue
            g = -g if self.maximize else g
            eps1 = np.finfo(p.dtype).eps if self.eps1 is None else self.eps1
            if self.weight_decay != 0:
                p *= dtype(1.0 - self.lr * self.weight_decay)
            if p.ndim > 1:
                row, col = self.rows[k], self.cols[k]
                square = g * g
                # torch: norm(g, dim).square_().div_(size): the root of the sum, squared (not the sum itself)
                row[...] = _lerp(row, np.square(np.sqrt(np.add.reduce(square, axis=-1, keepdims=True)))
                                 / dtype(g.shape[-1]), weight)
                col[...] = _lerp(col, np.square(np.sqrt(np.add.reduce(square, axis=-2, keepdims=True)))
                                 / dtype(g.shape[-2]), weight)
                update = row @ col
                update /= np.maximum(row.mean(axis=-2, keepdims=True), dtype(eps1))
            else:
                var = self.variances[k]
                var[...] = _lerp(var, g * g, weight)
                update = var.copy()
            # torch's var_estimate.clamp_(min=eps1*eps1).rsqrt_().mul_(g), in place (rsqrt as 1/sqrt)
            np.maximum(update, dtype(eps1 * eps1), out=update)
            np.sqrt(update, out=update)
            np.divide(dtype(1.0), update, out=update)
            update *= g
            updates.append(update)  # (a new C-contiguous array, of p's shape)
        _, update_sumsq = sums_of_squares(updates, backend=self.backend)
        for k, (p, u) in enumerate(zip(self.params, updates)):
            if p.size == 0:  # (nothing to update; torch divides by its size, 0, and raises)
                continue
            root = math.sqrt(p.size)
            alpha = max(self.eps2, math.sqrt(param_sumsq[k]) / root) * rho
            denom = max(1.0, math.sqrt(update_sumsq[k]) / (root * self.d))
            p += p.dtype.type(-alpha / denom) * u


def prepare(param: Buffers, grad: Buffers, row_var: Buffers, col_var: Buffers, variance: Buffers, *, step: int,
            lr: float = 1e-2, beta2_decay: float = -0.8, eps: Tuple[Optional[float], float] = (None, 1e-3),
            d: float = 1.0, weight_decay: float = 0.0, maximize: bool = False,
            backend: Optional[str] = None) -> Prepared:
    """Every check of :func:`adafactor_`'s call, writing nothing; raises what it would raise."""
    listed = isinstance(param, (list, tuple))
    params = list(param) if listed else [param]
    grads = _listed(grad, len(params), "grad")
    rows, cols, variances = (_listed(x, len(params), n) for x, n in ((row_var, "row_var"), (col_var, "col_var"),
                                                                    (variance, "variance")))
    out = Prepared()
    out.step, out.lr, out.d = step_count(step), nonneg("lr", lr), real("d", d)
    out.beta2_decay, out.weight_decay = real("beta2_decay", beta2_decay), nonneg("weight_decay", weight_decay)
    if out.beta2_decay > 0:
        raise ValueError(f"beta2_decay must be <= 0 (as torch.optim.Adafactor), got {_show(beta2_decay)}")
    if out.d < 1:
        raise ValueError(f"d must be >= 1 (the clipping threshold, as torch.optim.Adafactor), got {_show(d)}")
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {_show(eps)}")
    out.eps1, out.eps2 = optional(nonneg)("eps[0]", eps[0]), nonneg("eps[1]", eps[1])
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {_show(maximize)}")
    out.maximize = bool(maximize)
    named = []
    for k, p in enumerate(params):
        where = f"[{k}]" if listed else ""
        if p is not None and getattr(p, "ndim", 1) > 1:
            check_buffers([f"param{where}", f"grad{where}"], [p, grads[k]])
            _check_factor("row_var", rows[k], p, -1, where)
            _check_factor("col_var", cols[k], p, -2, where)
            named += [(p, f"param{where}"), (rows[k], f"row_var{where}"), (cols[k], f"col_var{where}")]
        else:
            if variances[k] is None:
                raise ValueError(f"variance{where} is None: a parameter of fewer than 2 dimensions keeps the "
                                 "full second moment (variance, the parameter's shape)")
            check_buffers([f"param{where}", f"grad{where}", f"variance{where}"], [p, grads[k], variances[k]])
            named += [(p, f"param{where}"), (variances[k], f"variance{where}")]
        named.append((grads[k], f"grad{where}"))
    dtypes = {getattr(p, "dtype", None) for p in params}
    if len(dtypes) > 1:
        raise TypeError(f"param holds arrays of {len(dtypes)} dtypes ({', '.join(sorted(map(str, dtypes)))}); "
                        "one call takes one dtype")
    check_disjoint(named)
    out.params, out.grads, out.rows, out.cols, out.variances, out.backend = params, grads, rows, cols, variances, backend
    return out


def adafactor_(param: Buffers, grad: Buffers, row_var: Buffers, col_var: Buffers, variance: Buffers, *, step: int,
               lr: float = 1e-2, beta2_decay: float = -0.8, eps: Tuple[Optional[float], float] = (None, 1e-3),
               d: float = 1.0, weight_decay: float = 0.0, maximize: bool = False,
               backend: Optional[str] = None) -> None:
    """Adafactor; ``torch.optim.Adafactor``'s rule, hyperparameters and defaults (module docstring).

    ``param``, ``grad``: host arrays (or lists of them, any shapes, float32 or float64);
    for a parameter of 2 or more dimensions ``row_var`` and ``col_var`` (its shape with
    the last, respectively second to last, dimension 1; ``variance`` None), else
    ``variance`` (its shape; ``row_var``, ``col_var`` None), all starting at zeros.
    ``step``: 1-based, the same for every tensor of the call. An empty tensor is left as
    it is, state included.
    """
    prepare(param, grad, row_var, col_var, variance, step=step, lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
            weight_decay=weight_decay, maximize=maximize, backend=backend).run()
