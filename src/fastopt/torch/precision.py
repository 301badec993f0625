"""How fastopt.torch stores each parameter's state: dtypes, master copies, rounding.

The optimizer-level options (``state_dtype``, ``master_weights``,
``rounding_seed``) and a parameter's dtype decide its :class:`Formats`, one
per parameter dtype, computed once and kept by the optimizer:

=================  ====================  ===================  =====================
parameter          state (None/float32)  state ("bfloat16")   master_weights=True
=================  ====================  ===================  =====================
float64            float64 (None only)   refused              nothing to do
float32            float32               bfloat16             nothing to do
bfloat16           float32               bfloat16             float32 master copy
float16            float32               bfloat16             required
=================  ====================  ===================  =====================

``state_dtype=None`` gives a bfloat16 or float16 parameter float32 state, where
``torch.optim`` keeps the state in the parameter's dtype. Adam's second
moment in bfloat16 (8 significant bits) then stalls: with ``beta2=0.999`` both
the decay and the increment ``(1-beta2)*g*g`` are ~1e-3 of ``v``, under half
its ulp (2^-9), so rounding to nearest gives ``v`` back. A bfloat16 buffer
fastopt keeps is stored with stochastic rounding (unbiased: the small changes
survive in expectation), and only when asked for.

Anything other than float32 or float64 throughout is a *mixed-format call*
(:mod:`fastopt.formats`): host tensors only, one-pass rules only (the two-pass
LAMB and LARS have no such path).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from ..finite import all_finite

__all__ = ["Formats", "state_dtype_option", "option_text", "formats_of", "LOW", "bfloat16_array", "finite"]

#: parameter dtypes stored in 16 bits (kept with float32 state, a master copy optional or required)
LOW = (torch.bfloat16, torch.float16)
_OPTIONS = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16,
            torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}


class Formats(NamedTuple):
    """How one parameter dtype is stepped under the optimizer's options.

    ``counts``: torch's rules that count steps, and any rule whose step rounds
    stochastically (its random bits are drawn by step), torch.optim.SGD included.
    ``strict``: an explicit ``state_dtype`` (which no cast of the model changes,
    so a buffer of another dtype is an edit, refused, where with None it is a cast
    model's state, cast to follow it), or a master copy: the state is checked
    before a step that is not a replayed plan (which holds the same tensors).
    """

    state: torch.dtype  # the dtype of its state buffers
    master: bool  # whether it keeps a float32 master copy (state key "master_param")
    mixed: bool  # whether its calls are mixed-format ones (see the module docstring)
    counts: bool  # whether its state keeps a step count
    strict: bool  # whether its state is checked against these formats before a step


def state_dtype_option(value: Any) -> Optional[torch.dtype]:
    """The checked ``state_dtype`` option: None, torch.float32 or torch.bfloat16."""
    try:
        return _OPTIONS[value]
    except (KeyError, TypeError):  # (TypeError: an unhashable value)
        raise ValueError(f"state_dtype must be None, 'float32', 'bfloat16', torch.float32 or torch.bfloat16, "
                         f"got {value!r:.80}") from None


def formats_of(dtype: torch.dtype, state_dtype: Optional[torch.dtype], master_weights: bool, saves_step: bool,
               two_pass: bool, where: str, name: str) -> Formats:
    """The :class:`Formats` of parameters of ``dtype`` (float32, float64, bfloat16 or
    float16: the caller checked), or TypeError/ValueError naming ``where`` (the
    parameter) and the option that refuses it; ``name``: the optimizer class."""
    if dtype is torch.float64 and state_dtype is not None:
        raise ValueError(f"{where} is float64, so its state is float64: state_dtype={option_text(state_dtype)} "
                         "needs float32, bfloat16 or float16 parameters (an update with float32 or bfloat16 "
                         "state computes in float32); pass state_dtype=None")
    if dtype is torch.float16 and not master_weights:
        raise TypeError(f"{where} is a torch.float16 tensor: fastopt.torch steps float16 parameters only with "
                        "master_weights=True (a float32 master copy: float16's range and precision are too "
                        "small to accumulate updates in; bfloat16 parameters may go without one)")
    state = state_dtype or (torch.float32 if dtype in LOW else dtype)
    low = dtype in LOW
    mixed = low or state is torch.bfloat16
    if mixed and two_pass:
        what = f"{where} is {dtype}" if low else f"state_dtype={option_text(state_dtype)}"
        raise TypeError(f"{what}: fastopt.torch.{name} steps float32 or float64 parameters and state only "
                        "(a two-pass rule has no bfloat16 or float16 path)")
    stochastic = (dtype is torch.bfloat16 and not master_weights) or state is torch.bfloat16
    return Formats(state, low and master_weights, mixed, saves_step or stochastic,
                   state_dtype is not None or (low and master_weights))


def option_text(state_dtype: Optional[torch.dtype]) -> str:
    """The checked ``state_dtype`` as messages spell it: ``'bfloat16'``, ``None``."""
    return repr(str(state_dtype).replace("torch.", "")) if state_dtype is not None else "None"


_BF16: Any = None


def bfloat16_array(t: torch.Tensor) -> np.ndarray:
    """The NumPy array (dtype ``ml_dtypes.bfloat16``) sharing a CPU bfloat16 tensor's
    memory: torch has no ``.numpy()`` for bfloat16, so its bits are viewed as int16."""
    global _BF16
    if _BF16 is None:
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover (a dependency of the bfloat16 path only)
            raise ImportError("bfloat16 tensors need the ml_dtypes package (NumPy's bfloat16): "
                              "pip install ml_dtypes") from None
        _BF16 = np.dtype(ml_dtypes.bfloat16)
    return t.view(torch.int16).numpy().view(_BF16)


def finite(a: Any) -> bool:
    """Whether every element of a gradient's array is finite (bfloat16 arrays too)."""
    if type(a) is np.ndarray and a.dtype.kind == "V":  # ml_dtypes.bfloat16: np.isfinite knows it
        return bool(np.isfinite(a).all())
    return all_finite(a)
