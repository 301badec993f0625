"""Checks of environment variables that fastopt's compiled code reads itself.

``FASTOPT_ISA`` is read by the C library (``csrc/src/dispatch.c``), which
silently takes the best CPU path for any value it does not know; the C
backend calls :func:`warn_ignored_isa` at load so that a typo is reported.
(The thread variables are checked in :mod:`fastopt.threads`.)
"""
from __future__ import annotations

import os
import threading
import warnings

__all__ = ["ISA_VALUES", "warn_ignored_isa"]

#: The values of FASTOPT_ISA the C library acts on (compared exactly, as C's strcmp does).
ISA_VALUES = ("avx512", "avx2", "baseline", "scalar")

_warned = False
_lock = threading.Lock()


def warn_ignored_isa() -> bool:
    """Warn (RuntimeWarning, once per process) when FASTOPT_ISA is set to a value
    the C library ignores. Returns whether the current value is ignored."""
    global _warned
    value = os.environ.get("FASTOPT_ISA")
    if not value or value in ISA_VALUES:
        return False
    with _lock:
        if _warned:
            return True
        _warned = True
    warnings.warn(f"fastopt ignores FASTOPT_ISA={value!r}: the accepted values are "
                  f"{', '.join(ISA_VALUES)} (or unset); the C backend uses the best path this CPU supports",
                  RuntimeWarning, stacklevel=2)
    return True
