"""The thread count of the CPU backends.

One setting for every CPU backend (Numba's thread pool, the C library's
OpenMP loops). It starts from the usual environment variables
(``FASTOPT_NUM_THREADS``, then ``OMP_NUM_THREADS``, then ``NUMBA_NUM_THREADS``)
or the number of usable cores, and is pushed to each backend as it loads.
"""
from __future__ import annotations

import os

__all__ = ["get_num_threads", "set_num_threads"]


def _initial() -> int:
    for var in ("FASTOPT_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_num_threads = _initial()


def get_num_threads() -> int:
    """Threads the CPU backends use for one update."""
    return _num_threads


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (>= 1) in the CPU backends from the next update on."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _num_threads = n
    from . import dispatch
    for module in dispatch.loaded_modules():
        hook = getattr(module, "set_num_threads", None)
        if hook is not None:
            hook(n)
