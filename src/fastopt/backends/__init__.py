"""Backends: modules that run one element kernel over whole buffers.

Each backend module defines ``name``, ``device`` (``"cpu"`` or ``"cuda"``) and

* ``run(kernel, param, grad, state, scalars, stream=None)``: one update of one
  flat buffer per role. ``kernel`` is a key of
  :data:`fastopt.rules.KERNEL_SCALARS`, ``state`` the rule-ordered tuple of
  state buffers (``None`` for unused ones), ``scalars`` the rule's per-step
  scalars;
* ``run_list(kernel, params, grads, states, scalars, stream=None, table=None)``:
  the same update over lists of tensors (``params[i]``, ``grads[i]``,
  ``states[b][i]``; ``states[b]`` is None when buffer ``b`` is unused), in
  one call. ``table``, when not None, is the call's pointer table from
  :func:`fastopt.buffers.check_lists` in the kernel's order: int64 rows of
  data addresses for param, grad and each state buffer (a row whose buffer
  is None is not to be read), then a row of element counts; a backend may
  run from it instead of from the arrays. A backend with ``runs_from_table =
  True`` reads nothing of a call with a table but the table, ``len(params)``,
  ``params[0].itemsize`` and which ``states`` are None (so a caller that
  built and proved its own table, as fastopt.torch does, need not make arrays).

* ``run_checked`` (optional; None or absent: none): ``run_checked(kernel, calls) -> bool``, a host
  backend's compiled fast path for flat updates: ``calls`` is a tuple of
  ``(arrays, scalars)`` pairs, ``arrays`` = ``(param, grad, *state)`` *not yet
  validated*. It returns False having touched nothing unless every array is
  the plain case that :func:`fastopt.buffers.check_buffers` accepts and no
  two arrays of the calls overlap (the caller then checks in Python and
  calls ``run``); else it runs the updates in order and returns True.

The two-pass rules (``fastopt.rules.TWO_PASS_RULES``, run by :mod:`fastopt.trust`)
need, on a host backend, ``trust_sums(kernel, params, grads, states, scalars,
table=None) -> (param_sumsq, update_sumsq)``: pass 1 over lists of tensors
(``scalars`` with ``measure`` on; ``states`` None where the rule's ``trust.reads``
does not read them), one float64 per tensor, in the order of :mod:`fastopt.norms`.
Optional: ``run_list_each(kernel, params, grads, states, scalars, values,
table=None)``, pass 2 in one call with tensor i's ``trust.field`` = ``values[i]``
(else one ``run`` per tensor); ``trust_update(kernel, params, grads, states,
scalars, table=None)``, both passes natively (the ratios too); and
``trust_grad_sumsq(grads, table=None)``, the clipping norm's sum of squares from
the pointer table (else ``sumsq_list``).

Buffers arrive already validated (:mod:`fastopt.buffers`): C-contiguous, of
any shape, one dtype. A backend may define ``unavailable_reason() -> str``
(empty when usable) and ``set_num_threads(n)``; a device backend defines
``all_finite(array, stream=None) -> bool`` (for :func:`fastopt.all_finite`,
which checks host arrays itself). They are imported lazily by
:mod:`fastopt.dispatch`.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable, Sequence


def run_each(run: Callable, kernel: str, params: Sequence[Any], grads: Sequence[Any],
             states: Sequence[Any], scalars: Any, stream: Any = None, table: Any = None) -> None:
    """``run_list`` as one ``run`` per tensor (``table`` unused): for backends where a
    call per tensor costs nothing extra (the NumPy reference, which is not about
    speed), or as the fallback of one that runs from the pointer table."""
    for i, (p, g) in enumerate(zip(params, grads)):
        run(kernel, p, g, tuple(None if s is None else s[i] for s in states), scalars, stream)


class _CallablePackage(types.ModuleType):
    """This package, callable: ``fastopt.backends()`` is the report of
    :func:`fastopt.dispatch.backends` (every backend, whether it loads here and
    why not), while ``import fastopt.backends.c`` still imports a backend
    module. (A function named ``backends`` in ``fastopt`` would hide the
    package, and the package would replace the function at the first lazy
    backend import.)"""

    def __call__(self) -> dict:
        from ..dispatch import backends
        return backends()


sys.modules[__name__].__class__ = _CallablePackage
