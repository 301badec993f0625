"""Two-pass updates: LAMB and LARS, whose step is scaled per tensor by a trust ratio.

    fastopt.lamb_(params, grads, exp_avgs, exp_avg_sqs, step=t)          # one ratio per tensor
    fastopt.lars_(params, grads, momentum_buffers, lr=0.1, weight_decay=1e-6)

A trust ratio is a ratio of two norms of one tensor, ``||p||`` and ``||u||``,
``u`` being the update the rule would apply, so a step is two passes over
memory (docs/design.md, "Two-pass rules"):

1. a read-only pass that reduces, per tensor, ``sum(p*p)`` and ``sum(u*u)`` in
   double, in the fixed order of :mod:`fastopt.norms` (blocks of 4096
   elements, 8 lanes, a fixed tree, blocks added in order): bitwise the same
   on every host backend and thread count. ``u`` comes from the rule's
   element function itself (``measure`` on: it returns ``u`` and stores
   nothing), so it is the ``u`` of pass 2 bit for bit;
2. the ordinary element update, with the tensor's ratio folded into that
   tensor's scalars (:class:`fastopt.rule.Trust`: LAMB's ``step_size``,
   LARS's ``trust_ratio``).

Buffers are flat arrays (one tensor, one ratio) or lists of arrays (a ratio
per tensor), checked as every update's are (:mod:`fastopt.buffers`), together
with every hyperparameter, before anything is read for the first pass or
written. The ``c`` backend runs both passes in one native call
(``fastopt_<rule>_trust_list_*``: the ratios are computed in C, from C
generated from the same rule table); the ``numba`` and ``numpy`` backends
run pass 1 (:func:`trust_sums`), the ratios are computed here for all the
tensors at once (:meth:`fastopt.rule.Trust.values`, NumPy, no Python per
tensor), and pass 2 runs with them (Numba: one list call; the reference: one
call per tensor). The backend contract is in :mod:`fastopt.backends`.

``max_grad_norm`` (LAMB) adds a read pass over the gradients for their global
norm (from the call's pointer table on ``c`` and ``numba``), unless the caller
passes it as ``grad_norm``.

The rules themselves (hyperparameters, scalars, the ratio) are in
:data:`fastopt.rules.TWO_PASS_RULES`; the element math in
:mod:`fastopt.kernels.elements` (``lamb``, ``lars``); the array-level
reference in :mod:`fastopt.backends.reference`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from . import dispatch
from .buffers import check_buffers, check_lists
from .checks import _show, nonneg, real, step_count
from .functional import given_buffers
from .rule import Rule
from .rules import TWO_PASS_RULES

__all__ = ["lamb_", "lars_", "trust_sums"]

Array = Any
Buffers = Union[Array, Sequence[Array]]
Betas = Tuple[float, float]


def _multiplier(value: Any) -> float:
    """grad_multiplier: any finite real number (``real`` refuses the rest, naming it)."""
    return real("grad_multiplier", value)


def _max_norm(value: Any) -> Optional[float]:
    """max_grad_norm: None or 0 turn the pre-clipping off (None returned)."""
    if value is None:
        return None
    x = nonneg("max_grad_norm", value)
    return x if x > 0.0 else None


def _norm_value(name: str, value: Any) -> Optional[float]:
    """A norm the caller computed: a real number >= 0, +Inf or NaN (a gradient that
    overflowed has one), or None."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number >= 0 (a norm) or None, got the bool {value!r}")
    try:
        x = float(value)
    except Exception as exc:
        raise TypeError(f"{name} must be a real number >= 0 (a norm) or None, got {_show(value)} "
                        f"({type(value).__name__}; {type(exc).__name__}: {exc})") from None
    if x < 0.0:
        raise ValueError(f"{name} must be >= 0 (a norm), got {_show(value)}")
    return x


def _prepared(rule: Rule, param: Buffers, grad: Buffers, state: tuple, hyper: dict, step: Any,
              grad_multiplier: Any, backend: Optional[str]):
    """Everything of a two-pass call checked: (scalars, multiplier, params, grads, states,
    table, backend module), or None for an empty list call."""
    t = step_count(step) if rule.takes_step or step is not None else 1
    flat, needed = rule.prepared(hyper)
    scalars, _ = rule.scalars_at(flat, t)
    multiplier = _multiplier(grad_multiplier)
    names, arrays, used, rows = given_buffers(rule, param, grad, state, needed)
    if isinstance(param, (list, tuple)):
        on_device, table = check_lists(names, arrays)
        if not len(param):
            return None
        if table is not None and rows != list(range(len(rows))):
            table = table[rows + [-1]]  # in the kernel's order: param, grad, each state, then the sizes
        params, grads, states = param, grad, tuple(used)
    else:
        on_device = check_buffers(names, arrays)
        params, grads, table = [param], [grad], None
        states = tuple([None if buf is None else [buf] for buf in used])
    return scalars, multiplier, params, grads, states, table, dispatch.select(backend, on_device)


def _run(rule: Rule, param: Buffers, grad: Buffers, state: tuple, hyper: dict, step: Any, grad_multiplier: Any,
         backend: Optional[str], stream: Any, max_grad_norm: Any = None, grad_norm: Any = None) -> None:
    """Check everything, then run the two passes (or one, when the ratio does not apply)."""
    clip_to = _max_norm(max_grad_norm)
    given = _norm_value("grad_norm", grad_norm)
    prepared = _prepared(rule, param, grad, state, hyper, step, grad_multiplier, backend)
    if prepared is None:
        return
    scalars, multiplier, params, grads, states, table, module = prepared
    if module.device != "cpu":
        raise TypeError(f"{rule.name}_ runs on host arrays for now (its first pass, the per-tensor norms, has no "
                        "device kernel yet); got device arrays")
    if clip_to is not None:
        # apex FusedLAMB: the gradient is divided by global_norm/max_grad_norm when the
        # global norm (of every gradient, as the update reads it) exceeds max_grad_norm.
        norm = given if given is not None else abs(multiplier) * math.sqrt(_grad_sumsq(module, grads, table))
        if norm > clip_to:
            multiplier = multiplier / (norm / clip_to)
    if multiplier != 1.0:
        scalars = scalars._replace(grad_sign=scalars.grad_sign * multiplier)
    trust = rule.trust
    kernel = rule.kernel
    if not trust.applies(scalars):  # no ratio this step: the one pass of pass 2
        if not isinstance(param, (list, tuple)):
            module.run(kernel, params[0], grads[0], tuple(None if s is None else s[0] for s in states), scalars,
                       stream)
        else:
            module.run_list(kernel, params, grads, states, scalars, stream, table)
        return
    fused = getattr(module, "trust_update", None)
    if fused is not None:  # both passes in one native call
        fused(kernel, params, grads, states, scalars, table)
        return
    param_sumsq, update_sumsq = trust_sums_of(module, rule, params, grads, states, scalars, table)
    values = trust.values(scalars, param_sumsq, update_sumsq)  # each tensor's value of trust.field
    each = getattr(module, "run_list_each", None)
    if each is not None:  # pass 2 in one call, the field per tensor
        each(kernel, params, grads, states, scalars, values, table)
        return
    for i, (p, g, v) in enumerate(zip(params, grads, values.tolist())):
        module.run(kernel, p, g, tuple(None if s is None else s[i] for s in states),
                   scalars._replace(**{trust.field: v}), stream)


def _grad_sumsq(module: Any, grads, table) -> float:
    """The sum of squares of every gradient of the call (fastopt.norms' order), from the
    call's pointer table when the backend can read one (no array touched per tensor)."""
    from_table = getattr(module, "trust_grad_sumsq", None)
    if from_table is not None:
        return from_table(grads, table)
    return module.sumsq_list(list(grads))


def trust_sums_of(module: Any, rule: Rule, params, grads, states, scalars, table=None):
    """Pass 1 on a backend module: (param_sumsq, update_sumsq), one float64 per tensor.
    ``scalars``: the update's (pass 1 turns ``measure`` on); ``states``: the update's
    (pass 1 reads only the rule's ``trust.reads``)."""
    trust = rule.trust
    reads = tuple(s if name in trust.reads else None for name, s in zip(rule.state, states))
    return module.trust_sums(rule.kernel, params, grads, reads, trust.first_pass(scalars), table)


def trust_sums(rule: str, param: Buffers, grad: Buffers, *state: Optional[Buffers], step: Optional[int] = None,
               grad_multiplier: Any = 1.0, backend: Optional[str] = None,
               **hyper: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 of a two-pass rule alone, read-only: ``(sum(p*p), sum(u*u))`` per tensor
    (float64 arrays, one value per tensor), ``u`` being the update ``rule`` (``"lamb"``,
    ``"lars"``) would apply with these hyperparameters (defaults filled in) and
    ``grad_multiplier`` (no clipping), in the reproducible order of
    :func:`fastopt.sums_of_squares` (``sum(p*p)`` is bitwise its per-tensor sum).
    The trust ratios' inputs: for logging, and for the tests."""
    if rule not in TWO_PASS_RULES:
        raise ValueError(f"rule must be one of {sorted(TWO_PASS_RULES)}, got {rule!r}")
    r = TWO_PASS_RULES[rule]
    unknown = sorted(set(hyper) - set(r.defaults))
    if unknown:
        raise TypeError(f"{rule} has no hyperparameter {unknown[0]!r}; expected some of {list(r.defaults)}")
    if len(state) != len(r.state):
        raise TypeError(f"{rule} takes the state buffers {list(r.state)}, got {len(state)}")
    prepared = _prepared(r, param, grad, state, {**r.defaults, **hyper}, step if r.takes_step else None,
                         grad_multiplier, backend)
    if prepared is None:
        return np.zeros(0), np.zeros(0)
    scalars, multiplier, params, grads, states, table, module = prepared
    if module.device != "cpu":
        raise TypeError("trust_sums runs on host arrays for now; got device arrays")
    if multiplier != 1.0:
        scalars = scalars._replace(grad_sign=scalars.grad_sign * multiplier)
    return trust_sums_of(module, r, params, grads, states, scalars, table)


def lamb_(param: Buffers, grad: Buffers, exp_avg: Buffers, exp_avg_sq: Buffers, *, step: int, lr: float = 1e-3,
          betas: Betas = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
          adam_w_mode: bool = True, grad_averaging: bool = True, max_grad_norm: Optional[float] = 1.0,
          use_nvlamb: bool = False, maximize: bool = False, grad_norm: Optional[float] = None,
          grad_multiplier: Any = 1.0, backend: Optional[str] = None, stream: Any = None) -> None:
    """LAMB (You et al., 2020, "Large Batch Optimization for Deep Learning: Training BERT
    in 76 minutes", Algorithm 2), with the rule and defaults of NVIDIA apex's
    ``FusedLAMB`` (apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu).

    Per step, with ``g`` the gradient (negated for ``maximize``, times
    ``grad_multiplier``, divided by ``global_norm/max_grad_norm`` when the global
    norm exceeds ``max_grad_norm``)::

        g = g + wd*p                                 (adam_w_mode=False: L2)
        m = b1*m + b3*g                              (b3 = 1-b1 with grad_averaging, else 1)
        v = b2*v + (1-b2)*g*g
        u = (m/bc1) / (sqrt(v/bc2) + eps)            (bc = 1-b**t with bias_correction, else 1)
        u = u + wd*p                                 (adam_w_mode=True: decoupled)
        p = p - ratio*u,  ratio = lr*||p||/||u||     (per tensor; lr when a norm is 0)

    As apex does, the trust ratio applies only when ``weight_decay != 0`` or
    ``use_nvlamb`` (else ``ratio = lr``, and the update is one pass); a NaN norm
    makes a NaN ratio (apex's ``!= 0`` guards), ``||p||`` is the norm before the
    update. Buffers: one flat array each (one tensor, one ratio) or lists of
    arrays (a ratio per tensor); ``exp_avg`` and ``exp_avg_sq`` start at zeros.

    ``max_grad_norm``: the global gradient norm is ``|grad_multiplier|*||grad||``
    over every gradient of the call (``fastopt.total_norm``'s reproducible sum:
    one more read of the gradients), or ``grad_norm`` when given (apex takes the
    norm over every group's gradients: compute it once, pass it to each call).
    ``None`` or ``0`` turns the pre-clipping off (apex would divide every gradient
    by an infinite ``global_norm/0``); ``grad_norm`` is then ignored.
    Differences from apex, all within float32 round-off: the clipping is a
    multiplier folded into the gradient (``g*(max_norm/global_norm)``, not
    ``g/(global_norm/max_norm)``), the bias corrections are multiplied by their
    reciprocals (``m*(1/bc1)``, not ``m/bc1``: two divisions fewer per element), the
    norms are reduced in double, the ratio is computed in double (apex: float32).
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                 adam_w_mode=adam_w_mode, grad_averaging=grad_averaging, use_nvlamb=use_nvlamb, maximize=maximize)
    _run(TWO_PASS_RULES["lamb"], param, grad, (exp_avg, exp_avg_sq), hyper, step, grad_multiplier, backend, stream,
         max_grad_norm, grad_norm)


def lars_(param: Buffers, grad: Buffers, momentum_buffer: Optional[Buffers] = None, *, lr: float,
          momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3, lars_adaptation: bool = True,
          maximize: bool = False, step: Optional[int] = None, grad_multiplier: Any = 1.0,
          backend: Optional[str] = None, stream: Any = None) -> None:
    """LARS (You, Gitman & Ginsburg, 2017, "Large Batch Training of Convolutional
    Networks"), as the LARS of facebookresearch/vicreg and barlowtwins computes it
    (the trust coefficient ``eta`` of NVIDIA apex's LARC, without LARC's clipping).

    Per tensor, with ``g`` the gradient (negated for ``maximize``, times
    ``grad_multiplier``)::

        u  = g + wd*p
        q  = eta*||p||/||u||      when lars_adaptation and both norms are > 0, else 1
        mu = momentum*mu + q*u    (momentum != 0; mu starts at zeros)
        p  = p - lr*mu            (momentum == 0: p - lr*q*u, and no buffer is needed)

    A NaN norm fails ``> 0``, so ``q = 1`` there (vicreg's ``torch.where`` guards).
    ``lars_adaptation=False`` is plain momentum SGD with L2 decay in one pass: what
    vicreg's ``lars_adaptation_filter`` (with ``weight_decay_filter``: pass
    ``weight_decay=0``) does for biases and norm layers; call once per group.
    Buffers: one flat array each (one tensor, one ratio) or lists of arrays (a
    ratio per tensor). The update does not depend on the step count: ``step``
    is optional (checked when given).
    """
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adaptation=lars_adaptation,
                 maximize=maximize)
    _run(TWO_PASS_RULES["lars"], param, grad, (momentum_buffer,), hyper, step, grad_multiplier, backend, stream)
