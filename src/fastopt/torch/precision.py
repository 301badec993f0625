"""How fastopt.torch stores each parameter's state: dtypes, master copies, rounding.

The optimizer-level options (``state_dtype``, ``master_weights``,
``rounding_seed``, ``min_8bit_size``), a parameter's dtype and, for 8-bit
state, its size decide its :class:`Formats`, computed once per (dtype, 8-bit
or not) and kept by the optimizer:

=========  ====================  ==================  ===============  ===================
parameter  state (None/float32)  state ("bfloat16")  state ("int8")   master_weights=True
=========  ====================  ==================  ===============  ===================
float64    float64 (None only)   refused             refused          nothing to do
float32    float32               bfloat16            8-bit blockwise  nothing to do
bfloat16   float32               bfloat16            8-bit blockwise  float32 master copy
float16    float32               bfloat16            8-bit blockwise  required
=========  ====================  ==================  ===============  ===================

``state_dtype=None`` gives a bfloat16 or float16 parameter float32 state, where
``torch.optim`` keeps the state in the parameter's dtype. Adam's second
moment in bfloat16 (8 significant bits) then stalls: with ``beta2=0.999`` both
the decay and the increment ``(1-beta2)*g*g`` are ~1e-3 of ``v``, under half
its ulp (2^-9), so rounding to nearest gives ``v`` back. A bfloat16 buffer
fastopt keeps is stored with stochastic rounding (unbiased: the small changes
survive in expectation), and only when asked for.

**8-bit state** (``state_dtype="int8"``, bitsandbytes' 8-bit optimizers'
scheme: :class:`fastopt.formats.Int8State`): each state buffer is one uint8
code per element and one float32 ``absmax`` per block of 256 elements (C
order), a code standing for a value of the dynamic map times its block's
absmax; the map is the rule's for that buffer (signed for one that may be
negative, ``exp_avg``, ``momentum_buffer``; unsigned, finer, for
``exp_avg_sq``, Adagrad's ``sum`` and other sums of squares). Each step
dequantizes a block, updates it in float32 and quantizes it again, in one
pass. A parameter of fewer than ``min_8bit_size`` elements (default 4096,
bitsandbytes' name and default) keeps float32 state: biases and norms hold
few bytes and quantize worst. In ``state[p]`` (and so in ``state_dict()``)
an 8-bit buffer is two tensors::

    state[p]["exp_avg"]         torch.uint8, the parameter's shape (the codes)
    state[p]["exp_avg_absmax"]  torch.float32, shape (ceil(p.numel() / 256),)

(``<key>_absmax`` beside each buffer ``<key>`` of torch's layout; the map is
implied by the rule and the key), the update's :class:`~fastopt.formats.Int8State`
being a view of their memory. ``state_dict()`` saves them as they are (plain
tensors: ``torch.save`` and DCP take them), ``load_state_dict`` loads them
exactly (not cast to the parameter's dtype, as torch's load casts state),
quantizes a float buffer loaded into 8-bit state (``Int8State.from_float``)
and dequantizes an 8-bit one loaded into float state (a parameter under
``min_8bit_size``, or another ``state_dtype``); ``state_dict_fp32()``
dequantizes them, for ``torch.optim``. 8-bit state is for plain CPU tensors:
CUDA tensors and DTensors are refused with ``state_dtype="int8"``, whatever
their size.

Anything other than float32 or float64 throughout is a *mixed-format call*
(:mod:`fastopt.formats`): host tensors only, one-pass rules only (the two-pass
LAMB and LARS have no such path). A call holds one format per role, so the
8-bit and the float32-state parameters of a group are stepped in a call each.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from ..finite import all_finite

__all__ = ["Formats", "state_dtype_option", "min_8bit_size_option", "option_text", "formats_of", "absmax_key",
           "LOW", "INT8", "bfloat16_array", "finite"]

#: parameter dtypes stored in 16 bits (kept with float32 state, a master copy optional or required)
LOW = (torch.bfloat16, torch.float16)
#: the checked ``state_dtype="int8"`` (8-bit blockwise state: see the module docstring)
INT8 = torch.int8
_OPTIONS = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": INT8,
            torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.int8: INT8}
#: the suffix of the key of an 8-bit buffer's absmax: ``state[p]["exp_avg" + ABSMAX]``
ABSMAX = "_absmax"


def absmax_key(key: str) -> str:
    """The state key of the absmax of the 8-bit buffer ``key``: ``"exp_avg_absmax"``."""
    return key + ABSMAX


class Formats(NamedTuple):
    """How one parameter dtype is stepped under the optimizer's options.

    ``counts``: torch's rules that count steps, and any rule whose step rounds
    stochastically (its random bits are drawn by step), torch.optim.SGD included.
    ``strict``: an explicit ``state_dtype`` (which no cast of the model changes,
    so a buffer of another dtype is an edit, refused, where with None it is a cast
    model's state, cast to follow it), or a master copy: the state is checked
    before a step that is not a replayed plan (which holds the same tensors).
    """

    state: torch.dtype  # the dtype of its state buffers (torch.uint8: the codes of 8-bit state)
    master: bool  # whether it keeps a float32 master copy (state key "master_param")
    mixed: bool  # whether its calls are mixed-format ones (see the module docstring)
    counts: bool  # whether its state keeps a step count
    strict: bool  # whether its state is checked against these formats before a step
    int8: bool = False  # whether its state buffers are 8-bit (codes ``state``, absmax beside them)


def state_dtype_option(value: Any) -> Optional[torch.dtype]:
    """The checked ``state_dtype`` option: None, torch.float32, torch.bfloat16 or
    :data:`INT8` (``"int8"``, or ``torch.int8``: 8-bit blockwise state)."""
    try:
        return _OPTIONS[value]
    except (KeyError, TypeError):  # (TypeError: an unhashable value)
        raise ValueError(f"state_dtype must be None, 'float32', 'bfloat16', 'int8', torch.float32, torch.bfloat16 "
                         f"or torch.int8, got {value!r:.80}") from None


def min_8bit_size_option(value: Any) -> int:
    """The checked ``min_8bit_size`` option: an int >= 0 (bitsandbytes' name and default, 4096)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"min_8bit_size must be an int >= 0 (the fewest elements a parameter has to have "
                        f"8-bit state), got {type(value).__name__} {value!r:.80}")
    if value < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {value!r}")
    return int(value)


def formats_of(dtype: torch.dtype, state_dtype: Optional[torch.dtype], master_weights: bool, saves_step: bool,
               two_pass: bool, where: str, name: str, eight: bool = False) -> Formats:
    """The :class:`Formats` of parameters of ``dtype`` (float32, float64, bfloat16 or
    float16: the caller checked), or TypeError/ValueError naming ``where`` (the
    parameter) and the option that refuses it; ``name``: the optimizer class.
    ``eight``: with ``state_dtype`` :data:`INT8`, whether the parameter is large
    enough (``min_8bit_size``) for 8-bit state; a smaller one keeps float32 state."""
    if dtype is torch.float64 and state_dtype is not None:
        raise ValueError(f"{where} is float64, so its state is float64: state_dtype={option_text(state_dtype)} "
                         "needs float32, bfloat16 or float16 parameters (an update with float32, bfloat16 or "
                         "8-bit state computes in float32); pass state_dtype=None")
    if dtype is torch.float16 and not master_weights:
        raise TypeError(f"{where} is a torch.float16 tensor: fastopt.torch steps float16 parameters only with "
                        "master_weights=True (a float32 master copy: float16's range and precision are too "
                        "small to accumulate updates in; bfloat16 parameters may go without one)")
    low = dtype in LOW
    if state_dtype is INT8:
        if two_pass:  # (whatever the parameter's size: the option itself is refused)
            raise TypeError(f"state_dtype='int8': fastopt.torch.{name} steps float32 or float64 state only "
                            "(a two-pass rule has no 8-bit, bfloat16 or float16 path)")
        state = torch.uint8 if eight else torch.float32
    else:
        state = state_dtype or (torch.float32 if low else dtype)
    int8 = state is torch.uint8
    mixed = low or state is torch.bfloat16 or int8
    if mixed and two_pass:
        what = f"{where} is {dtype}" if low else f"state_dtype={option_text(state_dtype)}"
        raise TypeError(f"{what}: fastopt.torch.{name} steps float32 or float64 parameters and state only "
                        "(a two-pass rule has no bfloat16 or float16 path)")
    stochastic = (dtype is torch.bfloat16 and not master_weights) or state is torch.bfloat16
    return Formats(state, low and master_weights, mixed, saves_step or stochastic,
                   state_dtype is not None or (low and master_weights), int8)


def option_text(state_dtype: Optional[torch.dtype]) -> str:
    """The checked ``state_dtype`` as messages spell it: ``'bfloat16'``, ``'int8'``, ``None``."""
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
