"""Backends: modules that run one element kernel over whole buffers.

Each backend module defines ``name``, ``device`` (``"cpu"`` or ``"cuda"``) and
``run(kernel, param, grad, state, scalars, stream=None)``, where ``kernel`` is
a key of :data:`fastopt.rules.KERNEL_SCALARS`, ``state`` is the rule-ordered
tuple of state buffers (``None`` for unused ones) and ``scalars`` the rule's
precomputed scalars. Buffers arrive already validated. A backend may define
``unavailable_reason() -> str`` (empty when usable) and
``set_num_threads(n)``. They are imported lazily by :mod:`fastopt.dispatch`.
"""
