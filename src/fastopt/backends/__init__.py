"""Backends: modules that run one element kernel over whole buffers.

Each backend module defines ``name``, ``device`` (``"cpu"`` or ``"cuda"``) and

* ``run(kernel, param, grad, state, scalars, stream=None)``: one update of one
  flat buffer per role. ``kernel`` is a key of
  :data:`fastopt.rules.KERNEL_SCALARS`, ``state`` the rule-ordered tuple of
  state buffers (``None`` for unused ones), ``scalars`` the rule's per-step
  scalars;
* ``run_list(kernel, params, grads, states, scalars, stream=None)``: the same
  update over lists of tensors (``params[i]``, ``grads[i]``,
  ``states[b][i]``; ``states[b]`` is None when buffer ``b`` is unused), in
  one call.

Buffers arrive already validated (:mod:`fastopt.buffers`): C-contiguous, of
any shape, one dtype. A backend may define ``unavailable_reason() -> str``
(empty when usable) and ``set_num_threads(n)``. They are imported lazily by
:mod:`fastopt.dispatch`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def run_each(run: Callable, kernel: str, params: Sequence[Any], grads: Sequence[Any],
             states: Sequence[Any], scalars: Any, stream: Any = None) -> None:
    """``run_list`` as one ``run`` per tensor: for backends where a call per
    tensor costs nothing extra (the NumPy reference, which is not about speed)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        run(kernel, p, g, tuple(None if s is None else s[i] for s in states), scalars, stream)
