"""``torch.optim`` drop-ins that run fastopt's fused list kernels.

    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    loss.backward(); opt.step(); opt.zero_grad()

The optimizer keeps the model's own parameters, gradients and storage, as
``torch.optim`` does. A step makes one fused list call (``fastopt.adamw_([p1,
p2, ...], [g1, g2, ...], ...)``) per parameter group and dtype, device and
step count, over the parameters that have a gradient, the way torch's
``fused=True`` path groups them: on CPU tensors through NumPy views of their
memory, on CUDA tensors through ``__cuda_array_interface__``.

The classes subclass ``torch.optim.Optimizer`` and keep its semantics:

* ``param_groups`` are torch's (``lr_scheduler`` edits ``group["lr"]``, a
  tensor ``lr`` filled in place is read at every step), ``add_param_group``
  works (progressive unfreezing), duplicate parameters are handled by torch's
  base class;
* a parameter whose ``grad`` is None (frozen, or unused in this step) is
  skipped: no weight decay, no momentum, its step is not counted;
* ``state[p]`` is the real state, one dict per parameter with torch's keys
  (``step`` as a 0-d tensor, ``exp_avg``, ...): replacing, deleting or
  clearing an entry takes effect at the next step;
* ``state_dict``/``load_state_dict`` are torch's, hooks included, and load
  both ways with the matching ``torch.optim`` class; ``zero_grad`` is torch's;
  the optimizer can be deep-copied or pickled;
* moving or casting the model after making the optimizer works: the state
  follows the parameter (cast as ``load_state_dict`` casts it) at the next step;
* DTensor parameters (FSDP2 ``fully_shard``) are stepped on each rank's local
  shard; the state is made of DTensors like the parameters, as torch's is;
* ``torch.amp.GradScaler`` hands the step its scale and Inf flag, as for
  torch's fused optimizers (no unscaling pass), and ``opt.clip_grad_norm_``
  (optionally with ``grad_scaler=``) folds clipping into the next step.

Mixed precision (keyword arguments of the constructor, for the whole optimizer):

* ``state_dtype``: None (default: the parameter's dtype, except that a
  bfloat16 or float16 parameter gets float32 state, where ``torch.optim``
  keeps bfloat16 state that rounds Adam's small increments away), ``"float32"``,
  ``"bfloat16"`` (or ``torch.float32``/``torch.bfloat16``): bfloat16 state
  is stored with stochastic rounding, 2 bytes per element; or ``"int8"`` (or
  ``torch.int8``): 8-bit blockwise state as bitsandbytes' 8-bit optimizers keep
  it, one byte per element and a float32 absmax per block of 256
  (``state[p]["exp_avg"]`` the uint8 codes, ``state[p]["exp_avg_absmax"]`` the
  scales; see ``.precision``), for every one-pass rule (not LAMB or LARS) on
  float32, bfloat16 and float16 parameters (not float64);
* ``min_8bit_size`` (an int >= 0, default 4096: bitsandbytes' name and
  default): with ``state_dtype="int8"``, a parameter of fewer elements keeps
  float32 state (biases and norms: few bytes, and they quantize worst);
* ``master_weights=True``: each bfloat16 or float16 parameter keeps a float32
  master copy (``state[p]["master_param"]``, made from the parameter at its
  first step), which the update reads and writes, the parameter getting its
  nearest value in the same pass. Required for float16 parameters; without it
  a bfloat16 parameter is rounded stochastically. float32 and float64
  parameters have nothing to keep (no error: a model may mix them). The master
  copy is the weight: write a parameter (loading a model checkpoint) before its
  first step, or load the optimizer's state dict with it;
* ``rounding_seed`` (an int in [0, 2**64), default 0): the seed of stochastic
  rounding's random bits, which also depend on the step, the tensor's position
  in its call and the element, so a run (and a resumed one, made with the same
  seed) is reproducible bit for bit.

A model may mix dtypes: each step is one call per group and dtype, as above.
Gradients have the parameter's dtype (a 16-bit parameter's may be float32).
bfloat16 state and ``master_param`` are saved as such by ``state_dict()`` and
loaded exactly; a float32 (``torch.optim``) state dict loads into bfloat16
state rounded to nearest even; 8-bit state is saved as its codes and absmax
tensors and loaded exactly, a float32 or bfloat16 buffer loads into 8-bit state
quantized (``fastopt.Int8State.from_float``), and an 8-bit one into float state
dequantized; :meth:`Optimizer.state_dict_fp32` gives the state in
``torch.optim``'s layout with float32 buffers. See ``.precision``.

Differences: parameters must be float32 or float64 on the CPU or a CUDA
device, or bfloat16 or float16 on the CPU, dense and contiguous (bfloat16
and 8-bit state, too, are for CPU tensors, and 8-bit state for plain ones, not
DTensors; the two-pass LAMB and LARS take float32 and float64 only);
``capturable=True`` and ``differentiable=True`` are refused (``foreach`` and
``fused`` pick torch's implementation and are accepted and ignored).

This module imports torch; ``import fastopt`` does not import it.
"""
from __future__ import annotations

import inspect
import math
from itertools import chain
from typing import Any, Callable, ClassVar, Iterable, Mapping, Optional

import numpy as np
import torch

from .. import dispatch
from ..algorithm import Algorithm, one_class_per_rule
from ..checks import flag
from ..formats import INT8 as INT8_FORMAT, Int8State, blocks
from ..functional import _seed, table_backend
from ..norms import sum_of_squares, total_norm
from ..rules import ALL_RULES
from .hooks import hooked_step
from .host import scalar_dtype
from .precision import (INT8, LOW, Formats, absmax_key, finite, formats_of, min_8bit_size_option, option_text,
                        state_dtype_option)
from .steps import PLAIN, Call, GroupPlan, MixedPlan, Plan, Record, checked, grad_view, local, pointer, run, view

__all__ = ["Optimizer"]

#: torch options that choose torch's own implementation: accepted, kept in the
#: groups (so state dicts round-trip) and ignored, since fastopt is the implementation.
IGNORED_TORCH_OPTIONS = ("foreach", "fused")
_DTYPES = (torch.float32, torch.float64, *LOW)


_scalar_dtype = scalar_dtype  # torch.optim keeps per-parameter scalars (step, mu_product) in this dtype


def _torch_group_keys(cls: type) -> dict[str, Any]:
    """Every key of a ``torch.optim.<X>`` group, with its default: the constructor's
    arguments, and keys it sets itself (AdamW's ``decoupled_weight_decay=True``), which
    torch.distributed.checkpoint requires in a state dict it loads into that class."""
    keys = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "params")}
    try:
        keys.update(cls([torch.nn.Parameter(torch.zeros(1))]).defaults)
    except Exception:  # noqa: BLE001 (a class that needs arguments: its signature is all we know)
        pass
    return keys


def _where(group: int, index: int) -> str:
    return f"param_groups[{group}]['params'][{index}]"


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that steps a fastopt rule over the model's own tensors.

    One subclass per rule of :mod:`fastopt.rules`, made at import (see the end
    of this module). Constructed as the matching ``torch.optim`` class:
    ``(params, lr, **hyper)``, where ``params`` is an iterable of tensors, of
    ``(name, tensor)`` pairs or of group dicts. ``skip_nonfinite=True`` drops a
    step whose gradients hold a NaN or Inf (counted in ``skipped_steps``,
    flagged by ``last_step_skipped``); by default they propagate as in torch.
    ``state_dtype`` (None, ``"float32"``, ``"bfloat16"`` or ``"int8"``: 8-bit
    blockwise state), ``min_8bit_size`` (default 4096: smaller parameters keep
    float32 state under ``"int8"``), ``master_weights`` and ``rounding_seed``:
    the storage of bfloat16 and float16 models and of the state (see
    :mod:`fastopt.torch` and :mod:`fastopt.torch.precision`).
    """

    core: ClassVar[Algorithm]
    #: torch options fastopt does not take (``foreach``, ``capturable``...), with torch's defaults.
    torch_options: ClassVar[dict[str, Any]]
    #: whether torch's state has a ``step`` (``torch.optim.SGD`` keeps none).
    saves_step: ClassVar[bool]
    #: the algorithm of a group with ``decoupled_weight_decay=True`` (Adam's: AdamW), if the rule has one.
    decoupled_core: ClassVar[Algorithm | None]
    #: functional state buffer name -> whether its 8-bit map is the signed one (the rule table's).
    _signed: ClassVar[dict[str, bool]]

    def __init_subclass__(cls, rule: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if rule is None:
            return
        core = cls.core = Algorithm(ALL_RULES[rule])
        theirs = getattr(torch.optim, core.name, None)
        cls.saves_step = ALL_RULES[rule].saves_step
        cls._signed = {b.name: b.signed for b in core.rule.buffers}  # (each buffer's 8-bit map: the rule's)
        cls.decoupled_core = Algorithm(ALL_RULES[core.rule.decoupled]) if core.rule.decoupled else None
        cls.torch_options = {}
        if theirs is not None:  # read torch's own group keys, so a newer torch's options are known
            for name, default in _torch_group_keys(theirs).items():
                if name not in core.hyper_defaults():
                    cls.torch_options[name] = default
        like = f"Drop-in for ``torch.optim.{core.name}``" if theirs else "A ``torch.optim.Optimizer``"
        if core.rule.trust is None:
            storage = ("``state_dtype``: None, ``\"float32\"``, ``\"bfloat16\"`` or ``\"int8\"`` (8-bit "
                       "blockwise state, bitsandbytes' scheme, for parameters of at least ``min_8bit_size`` "
                       "elements, default 4096); ``master_weights``, ``rounding_seed``: see "
                       ":mod:`fastopt.torch.precision`.")
        else:
            storage = ("Two-pass: float32 and float64 parameters and state only (``state_dtype`` None or "
                       "``\"float32\"``).")
        cls.__doc__ = (f"{like} running fastopt's fused list kernels (see :mod:`fastopt.torch`).\n\n"
                       f"{core.describe()}\n\n{storage}")

    def __init__(self, params: Iterable[Any], lr: float | None = None, *, skip_nonfinite: bool = False,
                 state_dtype: Any = None, master_weights: bool = False, rounding_seed: int = 0,
                 min_8bit_size: int = 4096, **hyper: Any) -> None:
        self.skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        self.state_dtype: Optional[torch.dtype] = state_dtype_option(state_dtype)
        self.master_weights = flag("master_weights", master_weights)
        self.rounding_seed = _seed(rounding_seed)
        self.min_8bit_size = min_8bit_size_option(min_8bit_size)
        # per (parameter dtype, whether it has 8-bit state), under these options
        self._formats: dict[tuple[torch.dtype, bool], Formats] = {}
        self.skipped_steps, self.last_step_skipped = 0, False
        self._records: dict[int, Record] = {}
        self._plans: dict[int, Plan] = {}
        if lr is not None:
            hyper["lr"] = lr
        options = {k: hyper.pop(k) for k in list(hyper) if k in self.torch_options}
        defaults = {**self.core.merge_hyper(self.core.hyper_defaults(), hyper, type(self).__name__),
                    **self.torch_options, **options}
        self._check_group(defaults, type(self).__name__)
        super().__init__(params, defaults)  # each group goes through add_param_group

    def _core_of(self, group: Mapping[str, Any]) -> Algorithm:
        """The algorithm stepping ``group``: the class's, or its decoupled variant."""
        if self.decoupled_core is not None and group.get("decoupled_weight_decay"):
            return self.decoupled_core
        return self.core

    def _check_group(self, group: Mapping[str, Any], where: str) -> None:
        self._core_of(group).check_hyper(group)
        for name, default in self.torch_options.items():
            if name == "decoupled_weight_decay" and self.decoupled_core is not None:
                flag(f"{where}: decoupled_weight_decay", group.get(name, default))
            elif name not in IGNORED_TORCH_OPTIONS and group.get(name, default) != default:
                raise ValueError(f"{where}: {name}={group[name]!r} is not supported by "
                                 f"fastopt.torch.{type(self).__name__} (only {name}={default!r})")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group`` (defaults filled in, duplicates refused), then
        fastopt's checks of the group's hyperparameters and parameters; a group that
        fails them is not added."""
        super().add_param_group(param_group)
        i = len(self.param_groups) - 1
        try:
            group = self.param_groups[i]
            self._check_group(group, f"param_groups[{i}]")
            for j, p in enumerate(group["params"]):
                shard = local(p)
                if shard.dtype not in _DTYPES or shard.device.type not in ("cpu", "cuda") or shard.is_sparse:
                    raise TypeError(f"{_where(i, j)} is a {shard.dtype} tensor on {shard.device} "
                                    f"({shard.layout}); fastopt.torch needs dense float32, float64, bfloat16 "
                                    "or float16 parameters on the CPU or a CUDA device")
                self._format(shard, _where(i, j), shard is not p)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def _format(self, p: torch.Tensor, where: str, sharded: bool = False) -> Formats:
        """How ``p`` (a float32, float64, bfloat16 or float16 tensor: a DTensor's local
        shard when ``sharded``) is stepped under the optimizer's options (:mod:`.precision`),
        or TypeError/ValueError naming it (``where``) and the option that refuses it."""
        eight = self.state_dtype is INT8 and p.numel() >= self.min_8bit_size
        fmt = self._formats.get((p.dtype, eight))
        if fmt is None:
            fmt = formats_of(p.dtype, self.state_dtype, self.master_weights, self.saves_step,
                             self.core.rule.trust is not None, where, type(self).__name__, eight)
            self._formats[p.dtype, eight] = fmt
        if (fmt.mixed or self.state_dtype is INT8) and p.is_cuda:  # (int8: small parameters too)
            raise TypeError(f"{where} is a {p.dtype} CUDA tensor" + (
                f" with state_dtype={option_text(self.state_dtype)}" if p.dtype not in LOW else "")
                + ": fastopt.torch steps bfloat16 and float16 parameters and bfloat16 or 8-bit state on CPU "
                "tensors only (the functional API's bfloat16/float16/8-bit calls take host arrays)")
        if sharded and self.state_dtype is INT8:
            raise TypeError(f"{where} is a DTensor (FSDP2) with state_dtype='int8': fastopt.torch keeps 8-bit "
                            "state for plain tensors only (its absmax blocks are per local shard, which a "
                            "DTensor state could not reshard)")
        return fmt

    # ---- one step ---------------------------------------------------------------

    def _state_of(self, p: torch.Tensor, group: Mapping[str, Any], needs: Mapping[str, str], fmt: Formats,
                  stepped: bool) -> dict:
        """``state[p]`` with every buffer the group's options need (made now, as
        torch makes them at a parameter's first step, on its device, in the state's
        dtype), its master copy if it keeps one, and, if its state counts steps, its
        ``step`` (and carried value)."""
        keys = self.core.state_keys()
        state = self.state.get(p)
        if state is None:  # (not self.state[p]: torch.optim.SGD without momentum saves no empty entries)
            state = {}
            if fmt.counts or needs or fmt.master:
                self.state[p] = state
        if fmt.counts and "step" not in state:
            # (a rule whose torch state counts no steps counts from 1 once it has its buffers,
            # as the kernel's first step initialises them)
            state["step"] = torch.tensor(float(stepped and not self.saves_step), dtype=_scalar_dtype())
            for c, initial in self.core.carry.items():
                state[c] = torch.tensor(initial, dtype=_scalar_dtype())
        for name in needs:
            buf = state.get(keys[name])
            if fmt.int8:  # (8-bit codes, checked by _check_state_formats, and their absmax)
                if buf is None:
                    fill = float(group[self.core.fill[name]]) if name in self.core.fill else 0.0
                    q = Int8State.from_float(np.full(p.shape, fill, np.float32), self._signed[name]) if fill \
                        else Int8State.zeros(tuple(p.shape), self._signed[name])
                    state[keys[name]], state[absmax_key(keys[name])] = torch.from_numpy(q.codes), \
                        torch.from_numpy(q.absmax)
                continue
            if buf is None:
                fill = float(group[self.core.fill[name]]) if name in self.core.fill else 0.0
                state[keys[name]] = torch.full_like(p, fill, dtype=fmt.state,
                                                    memory_format=torch.preserve_format).detach()
            elif buf.dtype != fmt.state or buf.device != p.device:  # the model was moved or cast
                state[keys[name]] = buf.to(dtype=fmt.state, device=p.device)
        master = state.get("master_param")
        if fmt.master:
            if master is None:
                state["master_param"] = p.detach().to(dtype=torch.float32, copy=True)
            elif master.device != p.device:
                state["master_param"] = master.to(device=p.device)
        elif master is not None:  # the model was cast to float32 or float64: it is its own master now
            del state["master_param"]
        return state

    def _record(self, p: torch.Tensor, group: Mapping[str, Any], needs: Mapping[str, str],
                old: dict[int, Record]) -> tuple[Record, bool]:
        """``p``'s record (the last step's while it holds, else a new one, making any
        missing state), and whether ``p`` has stepped before (for rules whose state
        has no count: whether it had its buffers)."""
        rec = old.get(id(p))
        state = self.state.get(p)
        if rec is not None and rec.holds(p, needs, state):
            return rec, True
        keys = self.core.state_keys()
        stepped = state is not None and all(keys[name] in state for name in needs)
        fmt = self._format(local(p), "")  # (made and checked by _checked)
        state = self._state_of(p, group, needs, fmt, stepped)
        rec = Record()
        rec.param, rec.pointer, rec.needs, rec.state, rec.param_view = p, pointer(p), needs, state, view(p)
        rec.key, rec.formats = (p.dtype, p.get_device(), fmt.int8), fmt  # (one format per role in a call)
        if fmt.int8:  # (an Int8State over the memory of the codes and absmax tensors)
            rec.views = tuple(Int8State(view(state[keys[name]]), view(state[absmax_key(keys[name])]),
                                        self._signed[name]) if name in needs else None
                              for name in self.core.rule.state)
        else:
            rec.views = tuple(view(state[keys[name]]) if name in needs else None for name in self.core.rule.state)
        scalars = ("step", *self.core.carry) if fmt.counts else ()
        scales = tuple(absmax_key(keys[name]) for name in needs) if fmt.int8 else ()
        kept = (*scalars, *(keys[name] for name in needs), *scales, *(("master_param",) if fmt.master else ()))
        rec.tensors = tuple((k, state[k]) for k in kept)
        rec.step = view(state["step"]) if fmt.counts else None
        rec.carry = tuple(view(state[c]) for c in self.core.carry)
        rec.master = view(state["master_param"]) if fmt.master else None
        return rec, stepped

    def _checked(self, groups: Iterable[int]) -> list[list[tuple[int, int, torch.Tensor, Any]]]:
        """Check every group and every gradient before anything is written; return the
        parameters that have a gradient as (group, index, param, grad's array), in
        rounds: a parameter listed twice is stepped twice, as torch steps it, the
        second time in the next round."""
        rounds: list[list] = [[]]
        carry = self.core.carry
        for i in groups:
            params = self.param_groups[i]["params"]
            seen: dict[int, int] | None = {} if len(set(map(id, params))) != len(params) else None
            for j, p in enumerate(params):
                g = p.grad
                if g is None:
                    continue
                if p.dtype not in _DTYPES:
                    raise TypeError(f"{_where(i, j)} is {p.dtype} (the model was cast after the optimizer was "
                                    "made?); fastopt.torch needs float32, float64, bfloat16 or float16 parameters")
                shard = local(p)
                fmt = self._format(shard, _where(i, j), shard is not p)  # (the model may have been cast or moved)
                # (torch itself keeps a gradient's shape and device the parameter's)
                if g.layout is not torch.strided or g.dtype is not p.dtype and not (
                        p.dtype in LOW and g.dtype is torch.float32):
                    raise TypeError(f"the gradient of {_where(i, j)} is a {g.dtype} {g.layout} tensor; expected "
                                    f"a dense {p.dtype} one, like the parameter"
                                    + (" (or float32)" if p.dtype in LOW else ""))
                if not (p.is_contiguous() and g.is_contiguous()):
                    raise ValueError(f"{_where(i, j)} or its gradient is not contiguous; fastopt.torch needs "
                                     "contiguous parameters and gradients")
                if fmt.strict:
                    self._check_state_formats(p, fmt, _where(i, j))
                if carry:
                    state = self.state.get(p)
                    if state and state.keys() >= carry.keys():
                        self.core.check_step(self.param_groups[i], {c: float(state[c]) for c in carry},
                                             f"the state of {_where(i, j)}")
                k = 0
                if seen is not None:
                    k = seen[id(p)] = seen.get(id(p), -1) + 1
                    if k == len(rounds):
                        rounds.append([])
                rounds[k].append((i, j, p, grad_view(g)))
        return rounds

    def _check_state_formats(self, p: torch.Tensor, fmt: Formats, where: str) -> None:
        """Check ``p``'s saved state against its formats: with an explicit ``state_dtype``,
        every buffer in that dtype (no cast of the model changes it, so another dtype is
        an edit, refused rather than followed); a master copy float32, of ``p``'s shape."""
        state = self.state.get(p)
        if not state:
            return
        if fmt.int8:
            for key in self.core.state_keys().values():
                _check_int8_state(state, key, p, where)
        elif self.state_dtype is not None:
            for key in self.core.state_keys().values():
                buf = state.get(key)
                if buf is not None and not (isinstance(buf, torch.Tensor) and buf.dtype is fmt.state):
                    raise TypeError(f"state[{key!r}] of {where} is {_kind(buf)}; expected a {fmt.state} tensor "
                                    f"(state_dtype={option_text(self.state_dtype)}"
                                    + (f": it has fewer than min_8bit_size={self.min_8bit_size} elements, so "
                                       "float32 state)" if self.state_dtype is INT8 else ")"))
        master = state.get("master_param") if fmt.master else None
        if master is not None:
            if not (isinstance(master, torch.Tensor) and master.dtype is torch.float32):
                raise TypeError(f"state['master_param'] of {where} is {_kind(master)}; expected a torch.float32 "
                                "tensor (the parameter's master copy)")
            if master.shape != p.shape or not master.is_contiguous():
                raise ValueError(f"state['master_param'] of {where} has shape {tuple(master.shape)}"
                                 f"{'' if master.is_contiguous() else ' (not contiguous)'}; expected a contiguous "
                                 f"{tuple(p.shape)} tensor (the parameter's)")

    def _buckets(self, members: list[tuple[int, int, torch.Tensor, Any]], old: dict[int, Record],
                 new: dict[int, Record]) -> list[tuple[int, dict, list[tuple[Record, Any, int]]]]:
        """Bucket the parameters by (group, dtype, device, the gradient's dtype, step,
        carried value): one kernel call each, with the group's hyperparameters and that
        step and value (a mixed-format call is by step for every rule: its random bits are).
        Returns (group index, hyperparameters, members), each member (record, grad's
        array, its step count after this step)."""
        buckets: dict[tuple, tuple[int, dict, list]] = {}
        carry, by_step = list(self.core.carry), self.core.rule.takes_step
        needs: dict[int, Mapping[str, str]] = {}
        for i, j, p, g in members:
            group = self.param_groups[i]
            if i not in needs:
                needs[i] = self._core_of(group).needs(group)
            rec, stepped = self._record(p, group, needs[i], old)
            new[id(p)] = rec
            # torch.optim.SGD counts no steps: a parameter is at step 1 until it has its buffers
            t = int(rec.step[()]) if rec.step is not None else int(stepped)
            values = tuple(float(v[()]) for v in rec.carry) if carry else ()
            key = (i, rec.key, g.dtype, t if by_step or rec.formats.mixed else 0, values)
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = (i, {**group, "step": t + 1, **dict(zip(carry, values))}, [])
            bucket[2].append((rec, g, t + 1))
        return list(buckets.values())

    @hooked_step  # (torch's hooks and profiler range, without their cost: see .hooks)
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient (re-evaluating the loss first
        when ``closure`` is given). All groups and gradients are checked before anything
        is written."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls, general = [], []
        # (a two-pass rule's call is not one kernel: its plans replay with arrays)
        tables = not self.skip_nonfinite and bool(self._plans) and self.core.rule.trust is None and table_backend()
        for i, group in enumerate(self.param_groups):
            plan = self._plans.get(i)
            known = plan is not None and plan.knows(group)  # (then checked when the plan was made)
            if not known:
                self._check_group(group, f"param_groups[{i}]")
            call = plan.replay(group, self._core_of(group), self.state, tables, known) if plan else None
            if call is None:
                general.append(i)
            elif type(call) is list:  # (a GroupPlan: a call per format of the group)
                calls += call
            else:
                calls.append(call)
        if not general:  # replayed plans only: no torch op runs, so no grad mode to set (~1 us)
            self._run(calls, general)
        else:
            with torch.no_grad():  # (the general path makes and casts state tensors)
                self._run(calls, general)
        return loss

    def _run(self, calls: list[Call], general: list[int]) -> None:
        """The step's kernel calls: the replayed ``calls``, then those of the ``general``
        groups, checked first; or none, when the step is skipped."""
        rounds = self._checked(general) if general else [[]]
        multiplier, skip = self._amp_scaling()
        if self.skip_nonfinite and not skip:
            grads = [g for call in calls for g in call.grads] + [g for r in rounds for _, _, _, g in r]
            skip = not all(map(finite, grads))
        self.last_step_skipped = skip
        if skip:
            self.skipped_steps += 1
            return
        old, new = self._records, {}
        fresh = self._calls(rounds[0], old, new, plan=len(rounds) == 1) if rounds[0] else []
        if self.state_dtype is INT8:  # (refused before any call runs, not after the float32 ones)
            _check_int8_backend(calls + fresh)
        # A lone call checks its buffers before it writes; of several, every one is
        # checked before the first runs (a replayed plan's were, as it replayed).
        calls += list(map(checked, fresh)) if len(calls) + len(fresh) > 1 else fresh
        # LAMB clips by the norm of every gradient of the step (apex FusedLAMB): one read pass.
        grad_norm = abs(multiplier) * _global_norm([g for call in calls for g in call.grads]) \
            if self.core.clips(self.param_groups) else None
        for call in calls:
            run(call, multiplier, grad_norm)
        for members in rounds[1:]:  # a parameter listed twice: its second round sees its first
            for call in self._calls(members, {**old, **new}, new, plan=False):
                run(call, multiplier, grad_norm)
        self._records = new  # (a group on its plan keeps none: it makes them again if it leaves it)

    #: torch.amp.GradScaler sets ``grad_scale`` (the loss scale, None once unscaled) and
    #: ``found_inf`` on the optimizer before calling step(), instead of unscaling the
    #: gradients in a pass of its own (as for torch's fused optimizers).
    _step_supports_amp_scaling = True

    def _amp_scaling(self) -> tuple[float, bool]:
        """(the factor the gradients are read with, whether to skip this step) from
        GradScaler's ``grad_scale`` and ``found_inf`` and a pending
        :func:`clip_grad_norm_`; (1.0, False) without them."""
        clip = self.__dict__.pop("_clip_multiplier", 1.0)  # (consumed by this step, skipped or not)
        found_inf, scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if found_inf is not None and float(found_inf) != 0.0:
            return 1.0, True  # torch's fused step then changes nothing, step counts included
        return (clip, False) if scale is None else (clip / float(scale), False)

    def _calls(self, members: list, old: dict[int, Record], new: dict[int, Record], plan: bool) -> list[Call]:
        """The kernel calls of the general path, one per bucket; with ``plan``, a group
        that makes one call on host tensors keeps it as its plan for the next step."""
        calls, by_group = [], {}
        for i, hyper, bucket in self._buckets(members, old, new):
            core = self._core_of(hyper)
            records = [rec for rec, _, _ in bucket]
            state = [[rec.views[k] for rec in records] if view is not None else None
                     for k, view in enumerate(records[0].views)]
            fmt = records[0].formats
            call = Call(core, hyper, [rec.param_view for rec in records], [g for _, g, _ in bucket], state,
                        [rec.step for rec in records if rec.step is not None], [t for _, _, t in bucket],
                        [v for rec in records for v in rec.carry], None, hyper["step"],
                        masters=[rec.master for rec in records] if fmt.master else None,
                        seed=self.rounding_seed if fmt.mixed else None)
            calls.append(call)
            by_group.setdefault(i, []).append((call, records))
        if plan:
            for i, made in by_group.items():
                self._plans.pop(i, None)
                group = self.param_groups[i]
                # (a plan's gradients have its parameters' dtype: float32 ones of 16-bit parameters
                # take the general path)
                if not all(all(type(rec.param) in PLAIN and rec.param.device.type == "cpu" for rec in records)
                           and call.grads[0].dtype == call.params[0].dtype for call, records in made):
                    continue
                has_grad = [p.grad is not None for p in group["params"]]
                if len(made) == 1:
                    call, records = made[0]
                    kind = Plan if call.seed is None else MixedPlan
                    self._plans[i] = kind(group, has_grad, call._replace(grads=[]), records)
                else:  # (8-bit state beside small float32-state parameters: a plan per call)
                    self._plans[i] = GroupPlan(group, has_grad, [
                        (Plan if call.seed is None else MixedPlan)(
                            {**group, "params": [rec.param for rec in records]}, [True] * len(records),
                            call._replace(grads=[]), records) for call, records in made])
        return calls

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        grad_scaler: Any = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's gradients, folded into the next step.

        Returns the total norm of the gradients of the optimizer's parameters
        (``norm_type`` 2.0, or ``math.inf``/``"inf"`` for the max norm), as torch's
        does, in one read of the gradients (:func:`fastopt.total_norm` on the CPU, in
        double; torch's norm on CUDA), but writes nothing: the next
        ``step()`` reads the gradients multiplied by torch's coefficient
        ``min(1, max_norm / (norm + 1e-6))`` (computed in float32, as torch does).
        So the gradients still hold their unclipped values after this call.

        With ``grad_scaler`` (a ``torch.amp.GradScaler``), the gradients are taken to
        be loss-scaled and not yet unscaled, and no ``scaler.unscale_(opt)`` is
        needed: the norm returned is the unscaled one, the scaler is told what
        ``unscale_`` would tell it (the same found-Inf record and stage; its
        per-optimizer state is private to torch, so this is pinned to the torch
        this release is tested with), and the next step reads the gradients times
        ``coefficient / scale``: unscaling and clipping cost one read pass, where
        ``unscale_`` + ``clip_grad_norm_`` cost three.
        """
        if isinstance(norm_type, str) and norm_type == "inf":  # (torch accepts the string too)
            norm_type = math.inf
        if isinstance(norm_type, bool) or norm_type not in (2.0, math.inf):
            raise ValueError(f"norm_type must be 2.0 or math.inf (the norms fastopt.torch clips with), "
                             f"got {norm_type!r}")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        shards = [local(g) for g in grads]
        if all(not g.is_cuda and g.dtype not in LOW for g in shards):  # (fastopt's norms: float32 and float64)
            norm = total_norm([grad_view(g) for g in shards], norm_type)
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float64)
                                                               for g in shards]), norm_type))
        scale = 1.0
        if grad_scaler is not None:
            from torch.amp.grad_scaler import OptState
            state = grad_scaler._per_optimizer_states[id(self)]
            if state["stage"] is not OptState.READY:
                raise RuntimeError("clip_grad_norm_(..., grad_scaler=) unscales: unscale_() or step() was already "
                                   "called on this optimizer since the last update()")
            scale = float(grad_scaler.get_scale())
            found_inf = torch.tensor(0.0 if math.isfinite(norm) else 1.0)
            state["found_inf_per_device"] = {found_inf.device: found_inf}
            state["stage"] = OptState.UNSCALED
            norm /= scale
        if error_if_nonfinite and not math.isfinite(norm):
            raise RuntimeError(f"The total norm of the gradients is non-finite ({norm}), so it cannot be clipped; "
                               "set error_if_nonfinite=False to skip this check")
        norm32 = np.float32(norm)
        coefficient = min(np.float32(1.0), np.float32(max_norm) / (norm32 + np.float32(1e-6)))
        self._clip_multiplier = float(coefficient) / scale
        return torch.tensor(norm32, dtype=grads[0].dtype)

    # ---- state dicts ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict()``, plus, for a rule whose ``torch.optim`` class keeps
        per-step scalars in its state that fastopt recomputes each step
        (:attr:`fastopt.rule.Rule.derived`: ASGD's ``eta`` and ``mu``), those
        scalars as torch would hold them after each parameter's last step, so that
        ``torch.optim`` loads the dict as its own (loading ignores them)."""
        sd = super().state_dict()
        if not self.core.rule.derived:
            return sd
        state = dict(sd["state"])  # (the entries are the live state's dicts: copied, not changed)
        for group in sd["param_groups"]:
            for k in group["params"]:
                entry = state.get(k)
                if entry and "step" in entry:
                    derived = self._core_of(group).derived_state(group, int(entry["step"]))
                    state[k] = {**entry, **{key: torch.tensor(value, dtype=_scalar_dtype())
                                            for key, value in derived.items()}}
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict of this class or of the matching ``torch.optim`` class.

        Checked in full before anything changes (the number of groups and of
        parameters per group, each group's hyperparameters, each parameter's
        state keys, shapes and step); then torch's ``load_state_dict`` loads it
        (casting floating-point state to the parameters' dtype and device, and
        calling the load hooks). Steps and carried values become 0-d CPU tensors
        (a fused or capturable torch optimizer keeps them on the device).

        The state then takes each parameter's state dtype (``state_dtype``: a float32
        buffer loaded into bfloat16 state is rounded to nearest even, a bfloat16 one
        into float32 state is exact) and ``master_param`` float32, converted from the
        saved tensors themselves, not from torch's cast to the parameter's dtype
        (which would drop a float32 buffer's low bits for a bfloat16 parameter, and
        turn 8-bit codes into floats), before the post-hooks run. 8-bit state (a
        ``<key>`` of uint8 codes and its ``<key>_absmax``) loads as it is into a
        parameter with 8-bit state, and dequantized into one with float state; a
        float buffer into 8-bit state is quantized (``Int8State.from_float`` of its
        float32 values, with the rule's map). A saved master copy of a parameter that
        keeps none (float32, or ``master_weights=False``) is dropped.
        """
        self._check_state_dict(state_dict)
        loaded: list = []
        hooks = (self.register_load_state_dict_pre_hook(lambda _, sd: loaded.append(sd)),  # (last: after the user's)
                 self.register_load_state_dict_post_hook(lambda _: self._restore_formats(loaded[-1]), prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for hook in hooks:
                hook.remove()
        for state in self.state.values():
            for key in self.core.rule.derived:  # (recomputed each step: see state_dict)
                state.pop(key, None)
            for key in ("step", *self.core.carry):
                value = state.get(key)
                if isinstance(value, torch.Tensor) and (value.device.type != "cpu" or value.dtype != _scalar_dtype()):
                    state[key] = value.detach().to(device="cpu", dtype=_scalar_dtype())
                elif value is not None and not isinstance(value, torch.Tensor):
                    state[key] = torch.tensor(float(value), dtype=_scalar_dtype())
        self._records, self._plans = {}, {}

    def _restore_formats(self, saved: Mapping[str, Any]) -> None:
        """After torch's load of ``saved``: each buffer in its parameter's state dtype and
        each master copy float32, from the saved tensors (see :meth:`load_state_dict`)."""
        keys = {key: name for name, key in self.core.state_keys().items()}
        ids = chain.from_iterable(g["params"] for g in saved["param_groups"])
        for k, p in zip(ids, chain.from_iterable(g["params"] for g in self.param_groups)):
            entry = saved["state"].get(k)
            if not entry or p.dtype not in _DTYPES:
                continue
            fmt, state = self._format(local(p), ""), self.state[p]  # (checked by _check_state_dict)
            for key, value in entry.items():
                if key == "master_param":
                    if fmt.master:
                        state[key] = value.detach().to(dtype=torch.float32, device=p.device)
                    else:
                        del state[key]
                    continue
                if key not in keys:
                    continue
                signed, scales = self._signed[keys[key]], entry.get(absmax_key(key))
                if fmt.int8:
                    if scales is not None:  # (8-bit saved: as it is, as torch's load keeps a tensor)
                        codes, absmax = value.detach().cpu().contiguous(), scales.detach().cpu().contiguous()
                    else:  # (float values: quantized)
                        q = Int8State.from_float(value.detach().float().cpu().numpy(), signed)
                        codes, absmax = torch.from_numpy(q.codes), torch.from_numpy(q.absmax)
                    state[key], state[absmax_key(key)] = codes, absmax
                    continue
                if scales is not None:  # (8-bit saved into float state: dequantized)
                    value = _dequantized(value, scales, signed)
                    del state[absmax_key(key)]
                if state[key].dtype is not fmt.state or scales is not None:
                    state[key] = value.detach().to(dtype=fmt.state, device=p.device)

    def state_dict_fp32(self) -> dict[str, Any]:
        """``state_dict()`` in ``torch.optim``'s layout with float32 buffers: what the
        matching ``torch.optim`` class loads as its own (a checkpoint to hand on).

        Every bfloat16 or float16 state buffer widened to float32 (exactly; float32
        and float64 ones as they are, shared with the live state as in
        ``state_dict()``), every 8-bit one dequantized to float32 (its ``_absmax``
        key dropped), no ``master_param`` (the model's weights, not optimizer
        state: read ``state[p]["master_param"]`` for them), and no ``step`` where
        torch's state has none (SGD, which here counts steps for stochastic rounding).
        The optimizer's own state is not changed."""
        sd = self.state_dict()
        buffers = {key: name for name, key in self.core.state_keys().items()}
        kept = set(buffers) | ({"step", *self.core.carry} if self.saves_step else set())

        def fp32(key: str, value: Any, entry: Mapping[str, Any]) -> Any:
            if key not in buffers:
                return value
            scales = entry.get(absmax_key(key))
            if scales is not None and value.dtype is torch.uint8:
                return _dequantized(value, scales, self._signed[buffers[key]])
            return value.float() if value.dtype in LOW else value
        state = {k: {key: fp32(key, value, entry) for key, value in entry.items() if key in kept}
                 for k, entry in sd["state"].items()}
        return {**sd, "state": state}

    def _check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups'] has {len(saved_groups)} groups, "
                             f"this optimizer has {len(self.param_groups)}")
        id_map: dict[Any, tuple[torch.Tensor, dict]] = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"{where} has {len(saved.get('params', ()))} parameters, "
                                 f"the optimizer's group has {len(group['params'])}")
            new = {**self.torch_options, **{k: v for k, v in saved.items() if k not in ("params", "param_names")}}
            self._core_of(new).check_hyper(new, where)
            self._check_group(new, where)
            id_map.update((k, (p, new, _where(i, j))) for j, (k, p) in enumerate(zip(saved["params"], group["params"])))
        keys = self.core.state_keys()
        for k, entry in saved_state.items():
            if k not in id_map:
                raise ValueError(f"state_dict['state'] has an entry {k!r} for no parameter")
            p, hyper, param = id_map[k]
            where = f"state_dict['state'][{k!r}]"
            if not isinstance(entry, Mapping):
                raise TypeError(f"{where} must be a dict, got {type(entry).__name__}")
            buffers = {name: _check_saved_buffer(entry, key, p, where) for name, key in keys.items()
                       if key in entry}
            for key in keys.values():
                if absmax_key(key) in entry and key not in entry:
                    raise ValueError(f"{where} has {absmax_key(key)!r} but no {key!r} (the 8-bit codes it scales)")
            if "master_param" in entry:
                _check_tensor(entry["master_param"], p, f"{where}['master_param']")
            self.core.check_entry(entry, buffers, hyper, where, step_optional=not self.saves_step,
                                  extra_keys=("master_param", *map(absmax_key, keys.values())))
            if p.dtype in _DTYPES:  # (else torch's load casts the state, and the next step names the parameter)
                self._format(local(p), param)  # (the model may have been cast since: checked before loading)

    def __getstate__(self) -> dict[str, Any]:
        # torch's pickles only defaults, state and groups; the views are rebuilt.
        return {**super().__getstate__(), "skip_nonfinite": self.skip_nonfinite,
                "skipped_steps": self.skipped_steps, "last_step_skipped": self.last_step_skipped,
                "state_dtype": self.state_dtype, "master_weights": self.master_weights,
                "rounding_seed": self.rounding_seed, "min_8bit_size": self.min_8bit_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (torch's load_state_dict calls this too, with the state and groups only: the
        # options then stay as they are)
        for key, default in (("skip_nonfinite", False), ("skipped_steps", 0), ("last_step_skipped", False),
                             ("state_dtype", None), ("master_weights", False), ("rounding_seed", 0),
                             ("min_8bit_size", 4096)):
            state.setdefault(key, self.__dict__.get(key, default))
        super().__setstate__(state)
        self._records, self._plans, self._formats = {}, {}, {}


def _kind(value: Any) -> str:
    """``a torch.float64 tensor`` or ``a float`` (what a state entry is, for messages)."""
    return f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _check_tensor(value: Any, p: torch.Tensor, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
    if value.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, expected {tuple(p.shape)} (the parameter's)")
    if not value.is_floating_point():
        raise TypeError(f"{where} has dtype {value.dtype}, expected a floating-point dtype")
    return value


def _check_saved_buffer(entry: Mapping[str, Any], key: str, p: torch.Tensor, where: str) -> torch.Tensor:
    """A saved state buffer ``entry[key]`` of parameter ``p``: a float tensor of ``p``'s
    shape, or 8-bit state: uint8 codes of ``p``'s shape with ``entry[key + "_absmax"]``,
    a float32 tensor of one value per block of 256 elements."""
    value, scales = entry[key], entry.get(absmax_key(key))
    if scales is None:
        if isinstance(value, torch.Tensor) and value.dtype is torch.uint8:
            raise ValueError(f"{where}[{key!r}] is 8-bit codes (torch.uint8), but {where} has no "
                             f"{absmax_key(key)!r} (their scales)")
        return _check_tensor(value, p, f"{where}[{key!r}]")
    if not (isinstance(value, torch.Tensor) and value.dtype is torch.uint8):
        raise TypeError(f"{where}[{key!r}] must be a torch.uint8 tensor (8-bit codes, with "
                        f"{absmax_key(key)!r}), got {_kind(value)}")
    if value.shape != p.shape:
        raise ValueError(f"{where}[{key!r}] has shape {tuple(value.shape)}, expected {tuple(p.shape)} "
                         "(the parameter's: one 8-bit code per element)")
    n = blocks(p.numel())
    if not (isinstance(scales, torch.Tensor) and scales.dtype is torch.float32):
        raise TypeError(f"{where}[{absmax_key(key)!r}] must be a torch.float32 tensor, got {_kind(scales)}")
    if scales.shape != (n,):
        raise ValueError(f"{where}[{absmax_key(key)!r}] has shape {tuple(scales.shape)}, expected ({n},) "
                         f"(one absmax per block of 256 of the parameter's {p.numel()} elements)")
    return value


def _dequantized(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """The float32 CPU tensor of saved 8-bit state: its uint8 ``codes`` and float ``scales``."""
    return torch.from_numpy(Int8State(codes.detach().cpu().contiguous().numpy(),
                                      scales.detach().cpu().float().contiguous().numpy(), signed).dequantize())


def _check_int8_state(state: Mapping[str, Any], key: str, p: torch.Tensor, where: str) -> None:
    """Check 8-bit state before a step: ``state[key]`` (when there) contiguous uint8 codes
    of ``p``'s shape on the CPU, ``state[key + "_absmax"]`` a contiguous float32 CPU
    tensor of one value per block of 256 elements."""
    codes = state.get(key)
    if codes is None:
        return
    if not (isinstance(codes, torch.Tensor) and codes.dtype is torch.uint8):
        raise TypeError(f"state[{key!r}] of {where} is {_kind(codes)}; expected a torch.uint8 tensor "
                        "(8-bit codes: state_dtype='int8')")
    if codes.shape != p.shape or not codes.is_contiguous() or codes.device.type != "cpu":
        raise ValueError(f"state[{key!r}] of {where} has shape {tuple(codes.shape)} on {codes.device}"
                         f"{'' if codes.is_contiguous() else ' (not contiguous)'}; expected a contiguous "
                         f"{tuple(p.shape)} CPU tensor (the parameter's shape: one 8-bit code per element)")
    scales, name, n = state.get(absmax_key(key)), absmax_key(key), blocks(p.numel())
    if scales is None:
        raise ValueError(f"state[{key!r}] of {where} holds 8-bit codes, but state[{name!r}] (their scales) "
                         "is missing")
    if not (isinstance(scales, torch.Tensor) and scales.dtype is torch.float32):
        raise TypeError(f"state[{name!r}] of {where} is {_kind(scales)}; expected a torch.float32 tensor")
    if scales.shape != (n,) or not scales.is_contiguous() or scales.device.type != "cpu":
        raise ValueError(f"state[{name!r}] of {where} has shape {tuple(scales.shape)} on {scales.device}; "
                         f"expected a contiguous ({n},) CPU tensor (one absmax per block of 256 of the "
                         f"parameter's {p.numel()} elements)")


def _check_int8_backend(calls: list) -> None:
    """Refuse, before any call runs, a step whose 8-bit calls the host backend cannot run."""
    if any(call.seed is not None and any(a and type(a[0]) is Int8State for a in call.state) for call in calls):
        backend = dispatch.select(None, False)
        if INT8_FORMAT not in getattr(backend, "mixed_formats", ()):
            raise TypeError(f"the {backend.name} backend does not run updates with 8-bit state yet "
                            "(state_dtype='int8'); FASTOPT_BACKEND=numpy or numba does")


# ---- the algorithms: one class per rule of the table -------------------------------

def _global_norm(grads: list) -> float:
    """The L2 norm of every gradient array of a step (host arrays of any float dtypes,
    through fastopt's reproducible sums; CUDA tensors through torch's norm)."""
    host = [g for g in grads if isinstance(g, np.ndarray)]
    total = sum(sum_of_squares([g for g in host if g.dtype == dtype]) for dtype in {g.dtype for g in host})
    device = [g for g in grads if not isinstance(g, np.ndarray)]
    if device:
        total += float(sum(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2 for g in device))
    return math.sqrt(total)


_CLASSES = one_class_per_rule(Optimizer, __name__)
__all__ += list(_CLASSES)
globals().update(_CLASSES)

from .muon import Muon  # noqa: E402  (a matrix rule: its own class, torch.optim.Muon's layout)
from .schedulefree import AdamWScheduleFree, SGDScheduleFree  # noqa: E402  (the schedulefree package's layout)
from .adafactor import Adafactor  # noqa: E402  (factored second moments: its own class, torch's layout)

__all__ += ["Muon", "AdamWScheduleFree", "SGDScheduleFree", "Adafactor"]
