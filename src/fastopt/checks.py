"""Hyperparameter checks: each validates one value and names it when it fails.

A check is ``check(name, value) -> converted value`` and raises TypeError or
ValueError naming the argument, the value and the expected range. Each one
also carries ``check.c``, the C predicate (a function of ``csrc/src``) that
the generated ``fastopt_<rule>_prepare`` applies to the same value, so the
Python and C validations are one definition (see :mod:`fastopt.codegen`).
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np

__all__ = ["Check", "real", "nonneg", "unit", "closed_unit", "flag", "pair", "fixed_tuple", "warmup_steps",
           "step_count"]

Check = Callable[[str, Any], Any]


def _c(predicate: str | None):
    """Attach the C predicate that mirrors a check (None: no check in C, e.g. an int flag)."""
    def mark(fn):
        fn.c = predicate
        return fn
    return mark


@_c("isfinite")
def real(name: str, value: Any) -> float:
    """Any finite real number: an int, a float, a NumPy scalar, a 0-d array or
    tensor, or anything else with ``__float__``. Bools (Python's and NumPy's)
    are refused, as are arrays with dimensions and complex values. -0.0 is
    returned as +0.0."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a real number, got the bool {value!r}")
    if type(value) is not float and type(value) is not int:
        _refuse_non_real(name, value)
    try:
        x = float(value) + 0.0  # + 0.0: -0.0 -> +0.0
    except OverflowError:
        raise ValueError(f"{name} must be finite, got {_show(value)} (too large for a float)") from None
    except (ValueError, ArithmeticError) as exc:  # e.g. Decimal('sNaN')
        raise ValueError(f"{name} must be a finite real number, got {_show(value)} "
                         f"({type(exc).__name__}: {exc})") from None
    except Exception as exc:
        raise TypeError(f"{name} must be a real number, got {_show(value)} ({type(value).__name__}; "
                        f"{type(exc).__name__}: {exc})") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {_show(value)}")
    return x


def _refuse_non_real(name: str, value: Any) -> None:
    """TypeError unless ``value`` may be converted as one real number (the slow path of real)."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(shape, (str, bytes)):
        try:
            dims = tuple(shape)
        except TypeError:
            dims = ()
        if dims:
            raise TypeError(f"{name} must be a real number (a 0-d array or tensor at most), got an array of "
                            f"shape {dims} ({type(value).__name__})")
    dtype = str(getattr(value, "dtype", ""))
    kind = dtype.rsplit(".", 1)[-1]
    if kind == "bool":
        raise TypeError(f"{name} must be a real number, got a bool array {_show(value)}")
    if isinstance(value, complex) or "complex" in kind:
        raise TypeError(f"{name} must be a real number, got the complex {_show(value)}")
    if not isinstance(value, (int, float)) and not hasattr(value, "__float__") and not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be a real number, got {_show(value)} ({type(value).__name__})")


def _show(value: Any) -> str:
    """``repr(value)`` for a message, shortened (an int of 10**400 has 401 digits; str() of
    one above 4300 digits even raises)."""
    try:
        text = repr(value)
    except Exception:
        bits = getattr(value, "bit_length", None)
        text = f"an int of {bits()} bits" if callable(bits) else f"<{type(value).__name__} object>"
    return text if len(text) <= 60 else f"{text[:30]}...{text[-12:]} ({len(text)} characters)"


@_c("fo_nonneg")
def nonneg(name: str, value: Any) -> float:
    """A finite real number >= 0."""
    x = real(name, value)
    if x < 0.0:
        raise ValueError(f"{name} must be >= 0, got {_show(value)}")
    return x


@_c("fo_unit")
def unit(name: str, value: Any) -> float:
    """A real number in [0, 1) (a decay rate that must leave some memory: betas)."""
    x = real(name, value)
    if not 0.0 <= x < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {_show(value)}")
    return x


@_c("fo_unit_closed")
def closed_unit(name: str, value: Any) -> float:
    """A real number in [0, 1] (RMSprop's alpha, Adadelta's rho, NAdam's mu_product)."""
    x = real(name, value)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {_show(value)}")
    return x


@_c(None)
def flag(name: str, value: Any) -> bool:
    """A bool: True/False, NumPy's bools, or an integer 0 or 1 (as torch accepts;
    ``np.int64(1)`` too)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if not isinstance(value, float) and hasattr(type(value), "__index__"):
        try:
            n = operator.index(value)
        except Exception:
            n = None
        if n == 0 or n == 1:
            return bool(n)
    raise TypeError(f"{name} must be a bool (True, False, 0 or 1), got {_show(value)} ({type(value).__name__})")


def fixed_tuple(check: Check, arity: int) -> Check:
    """A check for an ordered tuple of ``arity`` values each passing ``check``
    (betas: a pair, or AdEMAMix's triple).

    Ordered means a tuple, a list or a 1-D array or tensor of that length.
    Sets, dicts, strings and iterators are refused.
    """
    kind = {2: "pair", 3: "triple"}.get(arity, f"{arity}-tuple")

    def items_of(name: str, value: Any) -> tuple:
        slots = ", ".join(f"{name}[{k}]" for k in range(arity))
        if isinstance(value, (tuple, list)):
            items = value
        else:
            shape = getattr(value, "shape", None)
            try:
                dims = None if shape is None or isinstance(value, (str, bytes)) else tuple(shape)
            except TypeError:
                dims = None
            if dims is None or len(dims) != 1:
                what = f"an array of shape {dims}" if dims is not None else f"{_show(value)} ({type(value).__name__})"
                raise TypeError(f"{name} must be a {kind} ({slots}): a tuple, a list or a 1-D array "
                                f"of length {arity}, got {what}")
            items = value
        if len(items) != arity:
            raise TypeError(f"{name} must be a {kind} ({slots}), got {len(items)} values: {_show(value)}")
        return tuple(check(f"{name}[{k}]", x) for k, x in enumerate(items))
    items_of.c = check.c
    items_of.arity = arity
    items_of.element = check
    return items_of


def optional(check: Check) -> Check:
    """``check``, or None (an option that can be off, as LAMB's ``max_grad_norm``)."""
    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)
    checked.c = None  # (no C predicate: only optimizer hyperparameters, which never reach C, take None)
    checked.__name__ = f"optional({getattr(check, '__name__', 'check')})"
    return checked


def pair(check: Check) -> Check:
    """A check for a pair ``(a, b)`` whose two values each pass ``check`` (betas)."""
    return fixed_tuple(check, 2)


#: The longest warmup: 2**53 steps, a count that is exact as a double (the C prepare takes it
#: as one), so that ``step < warmup`` and ``step / warmup`` are exact conversions in C too.
_MAX_WARMUP = 2**53


def _warmup_type_error(name: str, value: Any, why: str = "") -> TypeError:
    return TypeError(f"{name} must be None (no warmup) or an int >= 1 (a number of steps), got {_show(value)} "
                     f"({type(value).__name__}{why})")


@_c("fo_warmup")
def warmup_steps(name: str, value: Any) -> float:
    """None (no warmup) or a number of steps: an int >= 1 (NumPy's ints and 0-d integer
    tensors too; not a bool, not a float, not even 2.0), at most 2**53 (AdEMAMix's
    ``beta3_warmup``, ``alpha_warmup``). Returned as the float the schedules and the C
    prepare compute with: the count, or 0.0 for None (the C library's "no warmup")."""
    if value is None:
        return 0.0
    if type(value) is int and 1 <= value <= _MAX_WARMUP:
        return float(value)
    if isinstance(value, (bool, np.bool_)) or isinstance(value, float) or not hasattr(type(value), "__index__"):
        raise _warmup_type_error(name, value)
    try:
        n = operator.index(value)
    except Exception as exc:
        raise _warmup_type_error(name, value, f"; {type(exc).__name__}: {exc}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1 (a number of steps; None: no warmup), got {_show(value)}")
    if n > _MAX_WARMUP:
        raise ValueError(f"{name} must be at most 2**53 steps, got {_show(value)}")
    return float(n)


def _warmup_from_c(x: float) -> Any:
    """The Python value a C prepare's warmup argument stands for (0: None; a whole number: that int)."""
    return None if x == 0.0 else int(x) if math.isfinite(x) and x == math.floor(x) else x


warmup_steps.from_c = _warmup_from_c  # (for the code generator, which probes each check with C's doubles)


#: The largest step count: the C library's step is an int64_t.
_MAX_STEP = 2**63 - 1


def step_count(value: Any) -> int:
    """The 1-based count of this update."""
    if type(value) is int and 1 <= value <= _MAX_STEP:  # the common case, on every update
        return value
    if isinstance(value, (bool, np.bool_)) or isinstance(value, float) or not hasattr(type(value), "__index__"):
        raise TypeError(f"step must be an int >= 1 (the 1-based count of this update), got {_show(value)} "
                        f"({type(value).__name__})")
    try:
        t = operator.index(value)
    except Exception as exc:
        raise TypeError(f"step must be an int >= 1 (the 1-based count of this update), got {_show(value)} "
                        f"({type(exc).__name__}: {exc})") from None
    if t < 1:
        raise ValueError(f"step must be >= 1 (the 1-based count of this update), got {_show(value)}")
    if t > _MAX_STEP:
        raise ValueError(f"step must be at most 2**63 - 1, got {_show(value)}")
    return t
