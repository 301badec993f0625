"""Choosing the backend that runs an update.

Order of precedence: the ``backend=`` argument, then the ``FASTOPT_BACKEND``
environment variable (read at the first update; :func:`refresh_environment`
re-reads it), then ``"auto"``. ``auto`` sends device arrays
(``__cuda_array_interface__``) to ``cuda`` and host arrays to the first
available backend of :data:`AUTO_HOST_ORDER` (fastest first, see README).

Backends are imported lazily, on first use. A backend that cannot load (no
compiler output, no CUDA driver, numba missing) is remembered with the reason
and reported by :func:`backends`; it never breaks ``import fastopt``.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

__all__ = ["BackendInfo", "backends", "get_backend", "loaded_modules", "push_setting", "refresh_environment", "select",
           "AUTO_HOST_ORDER"]

#: backend name -> module implementing ``run(kernel, param, grad, state, scalars, stream)``
_MODULES = {
    "numpy": "fastopt.backends.reference",
    "numba": "fastopt.backends.numba_cpu",
    "c": "fastopt.backends.c",
    "cuda": "fastopt.backends.cuda",
}

#: Host backends tried by ``auto``, fastest first (measured by ``python -m fastopt bench``).
AUTO_HOST_ORDER = ("c", "numba", "numpy")

_loaded: dict[str, ModuleType | str] = {}  # name -> module, or the reason it failed


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    device: str  # "cpu" or "cuda"
    reason: str  # why it is unavailable; "" when available

    def __str__(self) -> str:
        state = "available" if self.available else f"unavailable: {self.reason}"
        return f"{self.name:6s} ({self.device}) {state}"


def _load(name: str) -> ModuleType | str:
    got = _loaded.get(name)
    if got is None:
        try:
            got = importlib.import_module(_MODULES[name])
            reason = getattr(got, "unavailable_reason", lambda: "")()
            if reason:
                got = reason
        except Exception as exc:  # any failure to load is a reason, never a crash
            got = f"{type(exc).__name__}: {exc}"
        _loaded[name] = got
    return got


def loaded_modules() -> list[ModuleType]:
    """The backend modules imported so far (for settings pushed to each, like threads)."""
    return [m for m in _loaded.values() if not isinstance(m, str)]


def push_setting(hook: str, value) -> None:
    """Call ``module.<hook>(value)`` on every loaded backend that defines it: a
    process-wide setting (threads, denormal flushing) reaching the backends
    already imported; each reads the current value itself when it loads."""
    for module in loaded_modules():
        fn = getattr(module, hook, None)
        if fn is not None:
            fn(value)


def backends() -> dict[str, BackendInfo]:
    """Every backend fastopt knows, with whether it loads here and why not."""
    out = {}
    for name in _MODULES:
        got = _load(name)
        if isinstance(got, str):
            out[name] = BackendInfo(name, False, "cuda" if name == "cuda" else "cpu", got)
        else:
            out[name] = BackendInfo(name, True, got.device, "")
    return out


def get_backend(name: str) -> ModuleType:
    """The loaded backend module ``name``; raise with the reason if it cannot load."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {['auto', *_MODULES]}, got {name!r}")
    got = _load(name)
    if isinstance(got, str):
        raise RuntimeError(f"backend {name!r} is unavailable: {got}")
    return got


_auto_host: ModuleType | None = None
_env_backend: str | None = None  # FASTOPT_BACKEND as read by refresh_environment ("" when unset)


def refresh_environment() -> None:
    """Read ``FASTOPT_BACKEND`` again.

    It is read once, at the first update, like ``NUMBA_*``/``OMP_*`` settings:
    looking it up on every call costs ~0.45 us, a tenth of a small update.
    Call this after changing it in a running process.
    """
    global _env_backend
    _env_backend = os.environ.get("FASTOPT_BACKEND", "")


def select(backend: str | None, on_device: bool) -> ModuleType:
    """The backend module for buffers on the host (``on_device=False``) or a GPU."""
    global _auto_host
    if _env_backend is None:
        refresh_environment()
    name = backend or _env_backend or "auto"
    if name == "auto":
        if on_device:
            return get_backend("cuda")
        if _auto_host is None:
            _auto_host = next(m for m in map(_load, AUTO_HOST_ORDER) if not isinstance(m, str))
        return _auto_host
    module = get_backend(name)
    if on_device != (module.device == "cuda"):
        side = "device (__cuda_array_interface__) arrays" if on_device else "host NumPy arrays"
        raise TypeError(f"backend {name!r} runs on {module.device} but the buffers are {side}")
    return module
