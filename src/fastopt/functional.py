"""Fused in-place update functions: ``fastopt.adamw_(p, g, m, v, step=t)``.

Each function is one update in a single pass over memory, of one flat buffer
(any C-contiguous array) or of lists of tensors: every buffer argument is
either an array or a list/tuple of arrays, one per tensor (``adamw_([p1, p2],
[g1, g2], [m1, m2], [v1, v2], step=t)``), updated in one native call. The
signatures name their state buffers as ``torch.optim`` does (docs/design.md). Every body is the same call to
:func:`_update`: the rule (``fastopt.rules``) validates hyperparameters and
builds the per-step scalars, :mod:`fastopt.buffers` checks the arrays, and
:mod:`fastopt.dispatch` picks the backend. Nothing is written until all of
that has passed.

Arrays: NumPy arrays on the host or ``__cuda_array_interface__`` arrays on
a GPU, float32 or float64, one dtype for the whole call; in list form,
position i of every list has one shape, and every list has one length. ``backend=None`` means
``FASTOPT_BACKEND`` (read at the first update) or ``auto``; ``stream`` is a
CUDA stream for the ``cuda`` backend (ignored on the host).

``grad_multiplier`` (default 1) multiplies the gradient as the kernel reads
it, leaving the gradient buffer untouched: fold a loss scale's ``1/scale``
or a clipping coefficient into the update instead of a separate pass over the
gradients (``adamw_(p, g, m, v, step=t, grad_multiplier=clip / scale)`` is
bitwise ``adamw_(p, g * (clip / scale), m, v, step=t)``, in the arrays' dtype).

``found_inf`` (default None) skips the update when it is nonzero, as
``torch.amp.GradScaler``'s ``found_inf`` makes torch's fused optimizers skip
theirs: everything is validated, then no buffer is written (NAdam returns
its ``mu_product`` unchanged). A number, or a one-element array or tensor;
a device one is read back to the host (one small copy).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import math
import operator

import numpy as np

from . import dispatch, formats
from .buffers import check_buffers, check_disjoint, check_lists
from .checks import _MAX_STEP, real, step_count
from .rule import Rule
from .rules import RULES

#: One update function per elementwise rule, named after it (defined below, in the table's order).
__all__ = [name + "_" for name in RULES]

Array = Any  # numpy.ndarray or an object with __cuda_array_interface__
#: Every buffer argument is one array or a list/tuple of arrays (one per tensor).
Buffers = Union[Array, Sequence[Array]]
Betas = Tuple[float, float]


def _update(rule: Rule, param: Buffers, grad: Buffers, state: tuple, hyper: dict,
            step: Any, backend: Optional[str], stream: Any, grad_multiplier: Any = 1.0,
            found_inf: Any = None, master_param: Any = None, rounding_seed: Any = 0) -> Any:
    """Validate everything, then run ``rule``'s kernel once. Returns the rule's extra result.

    ``hyper``: the values of every hyperparameter in the rule's order (its
    ``hyper`` table: the order of each function's keywords; tests/test_hyper_errors.py
    checks that every function passes them so), or a dict of them."""
    if type(hyper) is tuple:
        flat, needed, used = rule.prepared_values(hyper)
    else:
        flat, needed = rule.prepared(hyper)
        used = None
    scalars, extra = rule.scalars_at(flat, step if type(step) is int and 0 < step <= _MAX_STEP else _step(rule, step))
    if type(grad_multiplier) is not float or grad_multiplier != 1.0:  # (the default: no check, no copy)
        scalars = _multiplied(scalars, grad_multiplier)
    skip = found_inf is not None and _found(found_inf)
    if type(param) is np.ndarray and not skip:
        # The common case first: one host buffer, given exactly the state buffers
        # the call uses. Then the compiled checks of a backend's run_checked are
        # the Python checks below, at a tenth of the cost.
        fast = getattr(dispatch.select(backend, False), "run_checked", None)
        if fast is not None and used == tuple(map(_is_not, state, _NONES)) \
                and fast(rule.kernel, (((param, grad, *state), scalars),)):
            return extra
    if master_param is not None or formats.is_mixed(param, grad, state):
        return _update_mixed(rule, param, grad, state, needed, scalars, extra, step, master_param, rounding_seed,
                             backend, skip, hyper)
    if not (type(rounding_seed) is int and rounding_seed == 0):
        _seed(rounding_seed)  # (checked in every call, used only where a call rounds stochastically)
    names, arrays, used, rows = given_buffers(rule, param, grad, state, needed)
    if isinstance(param, (list, tuple)):
        on_device, table = check_lists(names, arrays)
        if skip:
            return _unchanged(rule, hyper)
        if table is not None and any(row != k for k, row in enumerate(rows) if k < 2 or used[k - 2] is not None):
            table = table[rows + [-1]]  # in the kernel's order: param, grad, each state, then the sizes
        # The lists go on as they are: copying one touches every array (a
        # reference count each), a cache miss per array after a training step.
        dispatch.select(backend, on_device).run_list(rule.kernel, param, grad, tuple(used), scalars, stream, table)
    else:
        on_device = check_buffers(names, arrays)
        if skip:
            return _unchanged(rule, hyper)
        dispatch.select(backend, on_device).run(rule.kernel, param, grad, tuple(used), scalars, stream)
    return extra


def _update_mixed(rule: Rule, param: Buffers, grad: Buffers, state: tuple, needed: dict, scalars: Any, extra: Any,
                  step: Any, master_param: Any, rounding_seed: Any, backend: Optional[str], skip: bool,
                  hyper: Any) -> Any:
    """A mixed-format call (:mod:`fastopt.formats`: bfloat16/float16 buffers, a float32
    master copy): every check of a plain call, each role's format, then the backend's
    ``run_mixed``. Returns the rule's extra result."""
    call, used, run_mixed, seed = _checked_mixed(rule, param, grad, state, needed, step, master_param,
                                                 rounding_seed, backend)
    if skip:
        return _unchanged(rule, hyper)
    wrap = (lambda b: b) if isinstance(param, (list, tuple)) else (lambda b: None if b is None else [b])
    key = formats.rounding_key(seed, _step(rule, step))
    run_mixed(rule.kernel, wrap(param), wrap(grad), tuple(map(wrap, used)), wrap(master_param), call, scalars, key)
    return extra


def _checked_mixed(rule: Rule, param: Buffers, grad: Buffers, state: tuple, needed: dict, step: Any,
                   master_param: Any, rounding_seed: Any, backend: Optional[str]) -> tuple:
    """Every check of a mixed-format call, writing nothing: (its ``CallFormats``, the
    state buffers it uses (None where unused), the chosen backend's ``run_mixed``,
    the checked seed); TypeError/ValueError naming the argument otherwise."""
    seed = _seed(rounding_seed)
    names, arrays, used, _ = given_buffers(rule, param, grad, state, needed)
    if master_param is not None:
        names.append("master_param")
        arrays.append(master_param)
    listed = isinstance(param, (list, tuple))
    # The layout checks see an 8-bit state's codes; master_param is written (it is the
    # param the update reads and writes); only grad is read-only.
    layout = list(map(formats.codes_of, arrays))
    on_device = check_lists(names, layout, any_dtype=True)[0] if listed else \
        check_buffers(names, layout, any_dtype=True)
    call = formats.call_formats(names, arrays, listed, rule.state, used)
    if formats.INT8 in call.state:
        signed = {b.name: b.signed for b in rule.buffers}
        scales = [pair for n, a, b in zip(names, arrays, layout) if a is not b
                  for pair in formats.check_int8(n, a, signed[n])]
        named = [(a, f"{n}[{i}]" if listed else n) for n, b in zip(names, layout)
                 for i, a in enumerate(b if listed else (b,))]
        check_disjoint(named + [(a, n) for n, a in scales])
    if on_device:
        raise TypeError("updates with bfloat16 or float16 buffers run on the host backends (numpy, numba, c) "
                        "for now; these are device arrays")
    rounded = formats.stochastic_roles(call)
    if rounded and step is None:
        which = " and ".join(("param", *rule.state)[r] for r in rounded)
        raise ValueError(f"{rule.name}_ rounds {which} (bfloat16) stochastically, which needs step= (the random "
                         "bits depend on it, so that every step draws new ones)")
    chosen = dispatch.select(backend, False)
    run_mixed = getattr(chosen, "run_mixed", None)
    takes = getattr(chosen, "mixed_formats", (formats.FLOAT32, formats.BFLOAT16, formats.FLOAT16))
    if run_mixed is not None and not all(f in takes for f in (call.param, call.grad, *call.state) if f is not None):
        raise TypeError(f"the {chosen.name} backend does not run updates with 8-bit state "
                        f"({formats.describe(call, rule.state)}) yet; backend='numpy' does")
    if run_mixed is None:
        raise TypeError(f"the {chosen.name} backend does not run updates with bfloat16 or float16 buffers "
                        f"({formats.describe(call, rule.state)}) yet; backend='numpy' does")
    return call, used, run_mixed, seed


def _prepared(rule: Rule, hyper: Any) -> tuple:
    """(the checked flat values, the state buffers needed) of hyperparameters given as
    the functional API's tuple or as a dict (what :func:`_update` does first)."""
    return rule.prepared_values(hyper)[:2] if type(hyper) is tuple else rule.prepared(hyper)


def check_call(rule: Rule, param: Buffers, grad: Buffers, state: tuple, hyper: Any) -> None:
    """Every buffer check of a plain (float32 or float64) call, writing nothing: what
    the update would raise, raised now (fastopt.torch checks a step's calls before it
    runs the first)."""
    names, arrays, _, _ = given_buffers(rule, param, grad, state, _prepared(rule, hyper)[1])
    if isinstance(param, (list, tuple)):
        check_lists(names, arrays)
    else:
        check_buffers(names, arrays)


class PreparedMixed:
    """A mixed-format update over lists of host arrays whose every buffer but the
    gradients stays the same from call to call, checked once (``fastopt.torch``'s
    replayed steps of bfloat16, float16 or 8-bit groups: the same tensors each step,
    new gradients).

    Made with one set of gradients (every check of a call runs then, and raises as the
    call would); then :meth:`takes` checks only what a new gradient can change:
    one array per tensor, of the first's dtype, of its tensor's shape, C-contiguous,
    on the host, and disjoint from every other buffer and from each other. That takes
    a few microseconds per call, where the full checks take ~10 per tensor."""

    __slots__ = ("rule", "params", "used", "masters", "formats", "run_mixed", "seed", "grad_dtype", "shapes",
                 "nbytes", "spans")

    def __init__(self, rule: Rule, params: list, grads: list, state: tuple, master_param: Optional[list],
                 rounding_seed: Any, backend: Optional[str], hyper: Any, step: int) -> None:
        self.formats, self.used, self.run_mixed, self.seed = _checked_mixed(
            rule, params, grads, state, _prepared(rule, hyper)[1], step, master_param, rounding_seed, backend)
        self.rule, self.params, self.masters = rule, list(params), None if master_param is None else list(master_param)
        self.grad_dtype, self.shapes = grads[0].dtype, [g.shape for g in grads]
        self.nbytes = np.array([g.nbytes for g in grads], dtype=np.int64)
        fixed = list(self.params) + (self.masters or [])
        for st in self.used:
            for a in st or ():
                fixed += [a.codes, a.absmax] if type(a) is formats.Int8State else [a]
        spans = np.array([(a.__array_interface__["data"][0], a.nbytes) for a in fixed if a.nbytes], dtype=np.int64)
        self.spans = spans.reshape(-1, 2)

    def takes(self, grads: list, grad_pointers: Sequence[int], step: Any) -> bool:
        """Whether :meth:`run` may update with the gradients ``grads`` (their data
        addresses ``grad_pointers``) at ``step``: arrays as the prepared ones were,
        disjoint from every buffer and from each other. (Else the full path, whose
        checks name the problem.)"""
        if not (type(step) is int and 0 < step <= _MAX_STEP) or len(grads) != len(self.shapes) or not all(
                type(g) is np.ndarray and g.dtype == self.grad_dtype and g.shape == shape and g.flags.c_contiguous
                for g, shape in zip(grads, self.shapes)):
            return False
        starts = np.concatenate([self.spans[:, 0], np.asarray(grad_pointers, dtype=np.int64)])
        ends = starts + np.concatenate([self.spans[:, 1], self.nbytes])
        order = np.argsort(starts, kind="stable")
        keep = order[ends[order] > starts[order]]  # (an empty gradient overlaps nothing)
        return keep.size < 2 or bool(np.all(ends[keep[:-1]] <= starts[keep[1:]]))

    def run(self, grads: list, hyper: Any, step: int, grad_multiplier: Any = 1.0) -> Any:
        """The update with new gradients ``grads`` that :meth:`takes` took; returns the
        rule's extra result (NAdam's mu_product)."""
        rule = self.rule
        scalars, extra = rule.scalars_at(_prepared(rule, hyper)[0], step)
        if type(grad_multiplier) is not float or grad_multiplier != 1.0:
            scalars = _multiplied(scalars, grad_multiplier)
        key = formats.rounding_key(self.seed, step)
        self.run_mixed(rule.kernel, self.params, grads, tuple(self.used), self.masters, self.formats, scalars, key)
        return extra


def _seed(rounding_seed: Any) -> int:
    """The checked ``rounding_seed``: an int in [0, 2**64)."""
    if isinstance(rounding_seed, (bool, np.bool_)) or not isinstance(rounding_seed, (int, np.integer)):
        raise TypeError(f"rounding_seed must be an int in [0, 2**64), got {type(rounding_seed).__name__} "
                        f"{rounding_seed!r:.80}")
    if not 0 <= int(rounding_seed) < 2 ** 64:
        raise ValueError(f"rounding_seed must be an int in [0, 2**64), got {rounding_seed!r}")
    return int(rounding_seed)


_NONES = (None,) * 8  # (more than any rule's state buffers)
_is_not = operator.is_not


def given_buffers(rule: Rule, param: Buffers, grad: Buffers, state: tuple,
                  needed: dict[str, str]) -> tuple[list[str], list, list, list[int]]:
    """The buffers of a call, after its hyperparameters said which state it ``needed``:
    (the names and buffers given, to be checked; per state buffer, the buffer if the
    call uses it, else None; per kernel argument, its row among the given ones, 0 for
    an unused one, whose row is not read). A needed buffer passed as None raises
    ValueError naming it and the option that needs it."""
    names, arrays, used, rows = ["param", "grad"], [param, grad], [], [0, 1]
    for name, buf in zip(rule.state, state):
        if buf is None:
            if name in needed:
                why = needed[name]
                raise ValueError(f"{name} is required by {rule.name}_"
                                 + ("" if why == "this rule" else f" when {why}") + ", got None")
        else:
            names.append(name)
            arrays.append(buf)
        used.append(buf if name in needed else None)
        rows.append(len(arrays) - 1 if name in needed else 0)
    return names, arrays, used, rows


def _found(found_inf: Any) -> bool:
    """Whether ``found_inf`` (a number, or a one-element array or tensor on any device,
    as GradScaler's) says to skip the update: nonzero (NaN included)."""
    if found_inf is None or found_inf is False:
        return False
    # (a Numba device array: a one-element copy, the skip is decided on the host)
    value = found_inf.copy_to_host() if hasattr(found_inf, "copy_to_host") else found_inf
    flag = None
    if not isinstance(value, (str, bytes)):
        try:
            if (value.numel() if hasattr(value, "numel") else np.size(value)) == 1:
                flag = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            pass
    if flag is None:
        raise TypeError("found_inf must be None, a number or a one-element array (nonzero: skip the update), "
                        f"got {found_inf!r:.80}")
    return flag != 0.0


def _unchanged(rule: Rule, hyper: Any) -> Any:
    """The extra result of a skipped update: the carried value as it came (NAdam's mu_product)."""
    if rule.carry is None:
        return None
    return dict(zip(rule._names, hyper))[rule.carry[0]] if type(hyper) is tuple else hyper[rule.carry[0]]


def _step(rule: Rule, step: Any) -> int:
    """The checked step count of an update (1 for a rule that takes none, when none is given)."""
    return step_count(step) if rule.takes_step or step is not None else 1


def _multiplied(scalars: Any, grad_multiplier: Any) -> Any:
    """``scalars`` with the gradient multiplied by ``grad_multiplier`` as it is read:
    every rule reads ``g = grad*grad_sign`` first, so the factor joins ``grad_sign``
    (``grad*(±m)`` is bitwise ``±(grad*m)``: the same as a separate pass that
    multiplied the gradient, without the pass)."""
    m = real("grad_multiplier", grad_multiplier)
    if not math.isfinite(m):
        raise ValueError(f"grad_multiplier must be finite, got {grad_multiplier!r}")
    return scalars._replace(grad_sign=scalars.grad_sign * m)


def _run_table(rule: Rule, hyper: dict, step: Any, params: Sequence[Array], states: tuple, table: Any,
               backend: Optional[str] = None, grad_multiplier: Any = 1.0) -> Any:
    """A host list call from a pointer table the caller built and proved (every
    address, size, dtype and contiguity, and :func:`fastopt.buffers.disjoint_table`),
    on a backend with ``runs_from_table`` (see :func:`table_backend`): what
    fastopt.torch's replayed steps run, with no array per gradient. The
    hyperparameters are validated as in every call. Returns the rule's extra result."""
    # (as _update, lean: this runs on every replayed step of fastopt.torch)
    flat = rule.prepared_values(hyper)[0] if type(hyper) is tuple else rule.prepared(hyper)[0]
    scalars, extra = rule.scalars_at(flat, step if type(step) is int and 0 < step <= _MAX_STEP else _step(rule, step))
    if type(grad_multiplier) is not float or grad_multiplier != 1.0:
        scalars = _multiplied(scalars, grad_multiplier)
    dispatch.select(backend, False).run_list(rule.kernel, params, (), states, scalars, None, table)
    return extra


def table_backend(backend: Optional[str] = None) -> bool:
    """Whether the host backend ``backend`` selects runs list calls from a pointer table alone."""
    return getattr(dispatch.select(backend, False), "runs_from_table", False)


def sgd_(param: Buffers, grad: Buffers, momentum_buffer: Optional[Buffers] = None, *, step: int, lr: float,
         momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
         maximize: bool = False, grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0, backend: Optional[str] = None,
         stream: Any = None) -> None:
    """SGD with optional momentum, dampening and Nesterov momentum (``torch.optim.SGD``).

    ``g = ±grad + wd*p``; with momentum: ``buf = g`` at step 1, else
    ``buf = momentum*buf + (1-dampening)*g``; ``g = g + momentum*buf`` (Nesterov)
    or ``g = buf``; then ``p -= lr*g``. ``momentum_buffer`` is required when
    ``momentum != 0``.
    """
    hyper = (lr, momentum, dampening, weight_decay, nesterov, maximize)
    _update(RULES["sgd"], param, grad, (momentum_buffer,), hyper, step, backend, stream, grad_multiplier, found_inf, master_param, rounding_seed)


def adagrad_(param: Buffers, grad: Buffers, state_sum: Buffers, *, step: int, lr: float = 1e-2,
             lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
             grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
             backend: Optional[str] = None, stream: Any = None) -> None:
    """AdaGrad (Duchi et al., 2011; ``torch.optim.Adagrad``).

    ``clr = lr/(1+(step-1)*lr_decay)``; ``sum += g*g``; ``p -= clr*g/(sqrt(sum)+eps)``.
    """
    hyper = (lr, lr_decay, weight_decay, eps, maximize)
    _update(RULES["adagrad"], param, grad, (state_sum,), hyper, step, backend, stream, grad_multiplier, found_inf, master_param, rounding_seed)


def rmsprop_(param: Buffers, grad: Buffers, square_avg: Buffers, momentum_buffer: Optional[Buffers] = None,
             grad_avg: Optional[Buffers] = None, *, step: int, lr: float = 1e-2, alpha: float = 0.99,
             eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
             maximize: bool = False, grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
             backend: Optional[str] = None, stream: Any = None) -> None:
    """RMSProp (Hinton's lecture 6e; centered variant of Graves 2013; ``torch.optim.RMSprop``).

    ``sq = alpha*sq + (1-alpha)*g*g``; centered: ``ga = lerp(ga, g, 1-alpha)``,
    ``avg = sqrt(sq - ga*ga) + eps``, else ``avg = sqrt(sq) + eps``; with momentum:
    ``buf = momentum*buf + g/avg; p -= lr*buf``, else ``p -= lr*g/avg``.
    ``momentum_buffer`` is required when ``momentum > 0``, ``grad_avg`` when ``centered``.
    """
    hyper = (lr, alpha, eps, weight_decay, momentum, centered, maximize)
    _update(RULES["rmsprop"], param, grad, (square_avg, momentum_buffer, grad_avg), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def adadelta_(param: Buffers, grad: Buffers, square_avg: Buffers, acc_delta: Buffers, *, step: int, lr: float = 1.0,
              rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0, maximize: bool = False,
              grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
              backend: Optional[str] = None, stream: Any = None) -> None:
    """Adadelta (Zeiler, 2012; ``torch.optim.Adadelta``).

    ``sq = rho*sq + (1-rho)*g*g``; ``d = sqrt(acc+eps)/sqrt(sq+eps)*g``;
    ``acc = rho*acc + (1-rho)*d*d``; ``p -= lr*d``.
    """
    hyper = (lr, rho, eps, weight_decay, maximize)
    _update(RULES["adadelta"], param, grad, (square_avg, acc_delta), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def adam_(param: Buffers, grad: Buffers, exp_avg: Buffers, exp_avg_sq: Buffers,
          max_exp_avg_sq: Optional[Buffers] = None, *, step: int, lr: float = 1e-3, betas: Betas = (0.9, 0.999),
          eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, maximize: bool = False,
          grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
          backend: Optional[str] = None, stream: Any = None) -> None:
    """Adam (Kingma & Ba, 2015) with optional AMSGrad (Reddi et al., 2018); ``torch.optim.Adam``.

    ``g = ±grad + wd*p``; ``m = lerp(m, g, 1-b1)``; ``v = b2*v + (1-b2)*g*g``;
    AMSGrad: ``vmax = max(vmax, v)`` replaces ``v`` below;
    ``p -= lr/(1-b1**t) * m / (sqrt(v)/sqrt(1-b2**t) + eps)``.
    ``max_exp_avg_sq`` is required when ``amsgrad``.
    """
    hyper = (lr, betas, eps, weight_decay, amsgrad, maximize)
    _update(RULES["adam"], param, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def adamw_(param: Buffers, grad: Buffers, exp_avg: Buffers, exp_avg_sq: Buffers,
           max_exp_avg_sq: Optional[Buffers] = None, *, step: int, lr: float = 1e-3, betas: Betas = (0.9, 0.999),
           eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, maximize: bool = False,
           grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
           backend: Optional[str] = None, stream: Any = None) -> None:
    """AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019); ``torch.optim.AdamW``.

    First ``p *= 1 - lr*weight_decay``, then the Adam update with no L2 term.
    """
    hyper = (lr, betas, eps, weight_decay, amsgrad, maximize)
    _update(RULES["adamw"], param, grad, (exp_avg, exp_avg_sq, max_exp_avg_sq), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def ademamix_(param: Buffers, grad: Buffers, exp_avg_fast: Buffers, exp_avg_slow: Buffers, exp_avg_sq: Buffers, *,
              step: int, lr: float = 1e-3, betas: Tuple[float, float, float] = (0.9, 0.999, 0.9999),
              alpha: float = 2.0, eps: float = 1e-8, weight_decay: float = 0.0, beta3_warmup: Optional[int] = None,
              alpha_warmup: Optional[int] = None, maximize: bool = False,
              grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
              backend: Optional[str] = None, stream: Any = None) -> None:
    """AdEMAMix: Adam plus a slow average of the gradient (Pagliardini, Ablin & Grangier, 2024,
    "The AdEMAMix Optimizer: Better, Faster, Older"; apple/ml-ademamix).

    ``p *= 1 - lr*wd``; ``m1 = b1*m1 + (1-b1)*g`` (fast, bias-corrected);
    ``m2 = b3*m2 + (1-b3)*g`` (slow, not corrected); ``nu = b2*nu + (1-b2)*g*g``;
    ``p -= lr*(m1/(1-b1**t) + alpha*m2)/(sqrt(nu)/sqrt(1-b2**t) + eps)``.

    The paper's warmups (its schedulers ``f_alpha`` and ``f_beta3``, Algorithm 1), named
    as the authors' PyTorch reference (apple/ml-ademamix) names them: ``alpha_warmup=T``
    (None or an int >= 1) uses ``alpha_t = min(t*alpha/T, alpha)`` at steps ``t < T``;
    ``beta3_warmup=T`` uses ``b3_t = min(exp(ln(b1)*ln(b3)/((1-t/T)*ln(b3) + (t/T)*ln(b1))), b3)``
    at steps ``t < T`` (from ``b1`` towards ``b3``, linearly in the half-life; with ``b1 = 0``
    the formula's limit ``b3**(T/t)``); from step ``T`` on, ``alpha`` and ``b3`` themselves.
    The paper uses one ``T`` for both (usually the run's length). None (the default): no
    warmup, the constant ``alpha`` and ``b3``. The reference code computes ``b3_t`` through
    half-lives of ``b + 1e-8`` and without the ``min``; this is the paper's formula.
    """
    hyper = (lr, betas, alpha, eps, weight_decay, beta3_warmup, alpha_warmup, maximize)
    _update(RULES["ademamix"], param, grad, (exp_avg_fast, exp_avg_slow, exp_avg_sq), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def adamax_(param: Buffers, grad: Buffers, exp_avg: Buffers, exp_inf: Buffers, *, step: int, lr: float = 2e-3,
            betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, maximize: bool = False,
            grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
            backend: Optional[str] = None, stream: Any = None) -> None:
    """Adamax, Adam's infinity-norm variant (Kingma & Ba, 2015, sec. 7); ``torch.optim.Adamax``.

    ``m = lerp(m, g, 1-b1)``; ``u = max(b2*u, |g|+eps)``; ``p -= lr/(1-b1**t) * m/u``.
    """
    hyper = (lr, betas, eps, weight_decay, maximize)
    _update(RULES["adamax"], param, grad, (exp_avg, exp_inf), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def nadam_(param: Buffers, grad: Buffers, exp_avg: Buffers, exp_avg_sq: Buffers, *, step: int, mu_product: float,
           lr: float = 2e-3, betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
           momentum_decay: float = 4e-3, decoupled_weight_decay: bool = False, maximize: bool = False,
           grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
           backend: Optional[str] = None, stream: Any = None) -> float:
    """NAdam: Adam with Nesterov momentum (Dozat, 2016); ``torch.optim.NAdam``.

    ``mu_t = b1*(1-0.5*0.96**(t*md))``, ``mu_next`` likewise at ``t+1``,
    ``mu_product *= mu_t``; ``m``, ``v`` as Adam; ``denom = sqrt(v/(1-b2**t)) + eps``;
    ``p -= lr*(1-mu_t)/(1-mu_product) * g/denom + lr*mu_next/(1-mu_product*mu_next) * m/denom``.
    Pass ``mu_product=1.0`` at step 1 and the returned value afterwards.

    Returns the new ``mu_product``.
    """
    hyper = (mu_product, lr, betas, eps, weight_decay, momentum_decay, decoupled_weight_decay,
             maximize)
    return _update(RULES["nadam"], param, grad, (exp_avg, exp_avg_sq), hyper, step, backend, stream,
                   grad_multiplier, found_inf, master_param, rounding_seed)


def radam_(param: Buffers, grad: Buffers, exp_avg: Buffers, exp_avg_sq: Buffers, *, step: int, lr: float = 1e-3,
           betas: Betas = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
           decoupled_weight_decay: bool = False, maximize: bool = False, grad_multiplier: Any = 1.0,
           found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0, backend: Optional[str] = None, stream: Any = None) -> None:
    """RAdam: Adam with the variance of the adaptive step rectified (Liu et al., 2020); ``torch.optim.RAdam``.

    ``m``, ``v`` as Adam (decoupled decay ``p *= 1 - lr*wd`` first when
    ``decoupled_weight_decay``); ``rho_inf = 2/(1-b2) - 1``,
    ``rho_t = rho_inf - 2*t*b2**t/(1-b2**t)``; when ``rho_t > 5``:
    ``p -= lr*rect/(1-b1**t) * m*sqrt(1-b2**t)/(sqrt(v)+eps)`` with
    ``rect = sqrt((rho_t-4)(rho_t-2)rho_inf/((rho_inf-4)(rho_inf-2)rho_t))``,
    else ``p -= lr/(1-b1**t) * m``.
    """
    hyper = (lr, betas, eps, weight_decay, decoupled_weight_decay, maximize)
    _update(RULES["radam"], param, grad, (exp_avg, exp_avg_sq), hyper, step, backend, stream,
            grad_multiplier, found_inf, master_param, rounding_seed)


def asgd_(param: Buffers, grad: Buffers, ax: Buffers, *, step: int, lr: float = 1e-2, lambd: float = 1e-4,
          alpha: float = 0.75, t0: float = 1e6, weight_decay: float = 0.0, maximize: bool = False,
          grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0, backend: Optional[str] = None, stream: Any = None) -> None:
    """Averaged SGD (Polyak & Juditsky, 1992; the step-size decay of Bottou, 2012); ``torch.optim.ASGD``.

    ``eta = lr/(1 + lambd*lr*(step-1))**alpha`` and ``mu = 1/max(1, step-1-t0)`` (1 at the first step;
    torch's ``eta`` and ``mu`` at this step); ``g`` the gradient (negated for
    ``maximize``, plus ``weight_decay*p``); ``p = p*(1 - lambd*eta) - eta*g``;
    then the average ``ax = p`` while ``mu`` is 1, else ``ax += (p - ax)*mu``
    (``ax`` starts at zeros). torch keeps ``eta`` in its state, computed with
    the ``lr`` of the step before; here it comes from ``lr`` and ``step``, the
    same unless ``lr`` changed during training.
    """
    hyper = (lr, lambd, alpha, t0, weight_decay, maximize)
    _update(RULES["asgd"], param, grad, (ax,), hyper, step, backend, stream, grad_multiplier, found_inf,
            master_param, rounding_seed)


def lion_(param: Buffers, grad: Buffers, exp_avg: Buffers, *, step: Optional[int] = None, lr: float = 1e-4,
          betas: Betas = (0.9, 0.99), weight_decay: float = 0.0, maximize: bool = False, grad_multiplier: Any = 1.0,
          found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0, backend: Optional[str] = None, stream: Any = None) -> None:
    """Lion, evolved sign momentum (Chen et al., 2023, Algorithm 2).

    ``c = b1*m + (1-b1)*g``; ``p = p*(1-lr*wd) - lr*sign(c)``; ``m = b2*m + (1-b2)*g``.
    The update does not depend on the step count: ``step`` is optional (checked
    when given), so every update function takes the same call.
    """
    hyper = (lr, betas, weight_decay, maximize)
    _update(RULES["lion"], param, grad, (exp_avg,), hyper, step, backend, stream, grad_multiplier, found_inf, master_param, rounding_seed)


def rprop_(param: Buffers, grad: Buffers, prev: Buffers, step_size: Buffers, *, step: Optional[int] = None,
           etas: Betas = (0.5, 1.2), step_sizes: Tuple[float, float] = (1e-6, 50.0), maximize: bool = False,
           grad_multiplier: Any = 1.0, found_inf: Any = None, master_param: Optional[Buffers] = None,
          rounding_seed: int = 0,
           backend: Optional[str] = None, stream: Any = None) -> None:
    """Rprop, resilient backpropagation (Riedmiller & Braun, 1993); ``torch.optim.Rprop``.

    Per element, with ``g`` the gradient (negated for ``maximize``): where
    ``g*prev > 0`` the step size grows (``*= etaplus``), where ``< 0`` it shrinks
    (``*= etaminus``) and ``g`` becomes 0; it is clamped to ``step_sizes``; then
    ``p -= sign(g)*step_size`` and ``prev = g``. ``step_size`` starts at the
    learning rate (``torch.optim.Rprop``'s ``lr``: fill it with ``lr`` before the
    first step; ``prev`` starts at zeros). The update does not depend on the
    step count: ``step`` is optional (checked when given).
    """
    hyper = (etas, step_sizes, maximize)
    _update(RULES["rprop"], param, grad, (prev, step_size), hyper, step, backend, stream, grad_multiplier, found_inf, master_param, rounding_seed)
