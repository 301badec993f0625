"""The thread count of the CPU backends.

One setting for every CPU backend (Numba's thread pool, the C library's
OpenMP loops). It starts from the usual environment variables
(``FASTOPT_NUM_THREADS``, then ``OMP_NUM_THREADS``, then ``NUMBA_NUM_THREADS``)
or the number of usable cores, and is pushed to each backend as it loads.

A count is any integer (anything with ``__index__`` except a bool) >= 1.
Counts above :data:`MAX_THREADS` are clamped to it (``get_num_threads()``
then reports the clamped count), so no backend is ever handed a value that
overflows a C ``int``; a clamped environment value also warns. An environment
value that is not a positive integer is ignored with a RuntimeWarning that
names the variable, its value and the count used instead.
"""
from __future__ import annotations

import operator
import os
import re
import warnings
from typing import Any

import numpy as np

__all__ = ["MAX_THREADS", "get_num_threads", "set_num_threads"]

_ENV_VARS = ("FASTOPT_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: The most threads any backend is asked for. An update is memory-bound: it
#: saturates memory bandwidth with a few dozen threads, so more than 1024 only
#: adds OpenMP/Numba start-up cost and a stack per thread (2-8 MiB each), and a
#: huge request (``2**31``) would overflow the C library's ``int``. Machines
#: with more usable cores than that may still use all of them.
MAX_THREADS: int = max(1024, _usable_cores())


def _clamped(n: int, source: str, warn: bool) -> int:
    if n > MAX_THREADS:
        if warn:
            warnings.warn(f"fastopt clamps {source}={n} to {MAX_THREADS} threads, its maximum "
                          "(fastopt.threads.MAX_THREADS)", RuntimeWarning, stacklevel=3)
        return MAX_THREADS
    return n


def _parse_env(var: str, value: str) -> int | None:
    """The positive count in ``value``, or None. OMP_NUM_THREADS may be a list
    of counts per nesting level ("4,2"); the first one is the outer level's."""
    if var == "OMP_NUM_THREADS":
        value = value.split(",", 1)[0].strip()
    if not re.fullmatch(r"\+?[0-9]+", value):
        return None
    n = int(value)
    return n if n >= 1 else None


def _initial() -> int:
    """The count from the environment (or the usable cores), warning about ignored values."""
    ignored = []
    chosen, source = None, "the usable cores"
    for var in _ENV_VARS:
        raw = os.environ.get(var)
        value = (raw or "").strip()
        if not value:
            continue
        n = _parse_env(var, value)
        if n is None:
            ignored.append((var, raw))
            continue
        chosen, source = _clamped(n, var, warn=True), var
        break
    if chosen is None:
        chosen = min(_usable_cores(), MAX_THREADS)
    for var, raw in ignored:
        warnings.warn(f"fastopt ignores {var}={raw!r}: not a positive integer; "
                      f"using {chosen} threads (from {source})", RuntimeWarning, stacklevel=2)
    return chosen


_num_threads = _initial()


def get_num_threads() -> int:
    """Threads the CPU backends use for one update."""
    return _num_threads


def _count(name: str, value: Any) -> int:
    """``value`` as a thread count (see the module docstring), or TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    try:
        n = operator.index(value)
    except Exception as exc:
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(exc).__name__}: {exc})") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return _clamped(n, name, warn=False)  # asking for 'as many as possible' is fine


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (an int >= 1; at most :data:`MAX_THREADS`) in the CPU
    backends from the next update on."""
    global _num_threads
    count = _count("n", n)  # validate before changing anything
    from . import dispatch
    _num_threads = count
    dispatch.push_setting("set_num_threads", count)
