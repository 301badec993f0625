"""Stateful optimizers over one flat buffer: ``fastopt.AdamW(flat).step()``.

One base class, :class:`Optimizer`, does everything every algorithm shares:
parameter groups, hyperparameter checks, lazy state allocation, the step
count, state dicts. Each algorithm is one class made from its rule in
:mod:`fastopt.rules` (by :class:`fastopt.algorithm.Algorithm`, shared with
the torch adapter); no class is written by hand. The update itself is always
the functional API (``fastopt.adamw_``), so the backend is whatever dispatch
picks.

Parameter groups are contiguous segments of the buffer, each with its own
hyperparameters (e.g. no weight decay on biases and norms), and each updated
by one functional call. Elements outside every group are frozen. Each group
keeps its own state buffers (the size of its segment), allocated on its first
step, and its own step count, like ``torch.optim`` keeps them per parameter.

State dicts use ``torch.optim``'s layout and names, with a group in the role of
a parameter: ``{"state": {i: {"step": t, "exp_avg": array, ...}},
"param_groups": [{"lr": ..., ..., "params": [i]}]}``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from . import dispatch, formats
from .algorithm import Algorithm, one_class_per_rule
from .buffers import SUPPORTED_DTYPES, check_buffers, is_device_array
from .functional import _seed
from .flat import Array, FlatParams, dtype_of, shape_of, copy_into, new_buffer, to_host
from .finite import all_finite
from .norms import total_norm
from .checks import _MAX_STEP, flag, nonneg
from .rule import _cacheable
from .rules import ALL_RULES

__all__ = ["Optimizer"]


class Optimizer:
    """A rule from :mod:`fastopt.rules` applied step after step to a flat buffer.

    Args:
        params: a 1-D buffer (NumPy or ``__cuda_array_interface__``) or a
            :class:`~fastopt.FlatParams`, whose ``grad`` then becomes the
            default gradient of :meth:`step`.
        groups: parameter groups, each a dict with ``"params"``, a ``slice``
            of the buffer (see :meth:`FlatParams.span`), and any
            hyperparameters that differ from the defaults. Default: one group,
            the whole buffer. Groups must not overlap; elements in no group
            are left unchanged.
        skip_nonfinite: when True, a step whose gradient (within the groups)
            holds a NaN or Inf changes nothing; :meth:`step` returns False and
            :attr:`skipped_steps` counts it. Default False: non-finite
            gradients propagate exactly as in ``torch.optim``.
        state_dtype: the dtype of the state buffers (:mod:`fastopt.formats`):
            None (the buffer's dtype; float32 for a bfloat16 or float16
            buffer), ``"float32"`` or ``"bfloat16"`` (stored with stochastic
            rounding: 2 bytes per element instead of 4).
        master_weights: for a bfloat16 or float16 buffer: keep a float32 master
            copy per group (``state[i]["master_param"]``, made from the buffer at
            the group's first step), which the update reads and writes, the
            buffer getting its nearest value in the same pass. Required for
            float16; without it a bfloat16 buffer is rounded stochastically.
        rounding_seed: the seed of stochastic rounding's random bits (which
            also depend on the step, so a run is reproducible bit for bit).
        **hyper: default hyperparameters (those of the functional update).

    Attributes:
        param_groups: one dict per group: its hyperparameters and ``"params"``
            (its slice). Change a group's ``"lr"`` between steps for a
            schedule, or set :attr:`lr` for all groups.
        state: one dict per group: ``"step"`` (updates done), the state
            buffers under the functional API's names once allocated, and any
            carried scalar (NAdam's ``"mu_product"``).
    """

    algorithm: ClassVar[Algorithm]

    def __init_subclass__(cls, rule: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if rule is not None:  # else a subclass of a defined optimizer: inherits its algorithm
            cls.algorithm = Algorithm(ALL_RULES[rule])
            cls.__doc__ = (f"{cls.algorithm.describe()}\n\nConstruct as ``{cls.__name__}(params, groups=None, "
                           "**hyper)``; see :class:`fastopt.optim.Optimizer`.")

    # ---- the flat optimizer -------------------------------------------------

    def __init__(self, params: FlatParams | Array, *, groups: Sequence[Mapping[str, Any]] | None = None,
                 skip_nonfinite: bool = False, state_dtype: Any = None, master_weights: bool = False,
                 rounding_seed: int = 0, **hyper: Any) -> None:
        self.skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps = 0
        # With a FlatParams, step() reads its grad at each step (so assigning
        # flat.grad = other_buffer takes effect).
        self._flat = params if isinstance(params, FlatParams) else None
        self.data = params.data if self._flat is not None else params
        shape = shape_of(self.data)
        if len(shape) != 1:
            raise ValueError(f"params must be a 1-D buffer (see fastopt.FlatParams), got shape {shape}")
        self._formats_of(dtype_of(self.data), state_dtype, master_weights, rounding_seed)
        check_buffers(["params"], [self.data], any_dtype=self._mixed)
        self.defaults = self.algorithm.merge_hyper(self.algorithm.hyper_defaults(), hyper, type(self).__name__)
        self.algorithm.check_hyper(self.defaults)
        self.param_groups: list[dict[str, Any]] = []
        for i, group in enumerate(groups if groups is not None else [{"params": slice(None)}]):
            group = dict(group)
            lo, hi = _span(group.get("params"), shape[0], f"groups[{i}]['params']")
            overrides = {k: v for k, v in group.items() if k != "params"}
            group = {**self.algorithm.merge_hyper(self.defaults, overrides, f"groups[{i}]"), "params": slice(lo, hi)}
            self.algorithm.check_hyper(group)
            self.param_groups.append(group)
        _check_disjoint(self.param_groups, shape[0])
        self.state: list[dict[str, Any]] = [self.algorithm.fresh_state() for _ in self.param_groups]
        self._prepared: _PreparedStep | None = None  # what the next step() can skip checking

    def _formats_of(self, dtype: np.dtype, state_dtype: Any, master_weights: Any, rounding_seed: Any) -> None:
        """Check the storage options against the buffer's dtype and keep them: the
        state's dtype, the master copy, the seed, and whether steps are mixed-format
        calls (:mod:`fastopt.formats`)."""
        name = type(self).__name__
        low = formats.format_of(dtype) in (formats.BFLOAT16, formats.FLOAT16)
        if not (low or dtype in SUPPORTED_DTYPES):
            raise TypeError(f"{name} params must be float32, float64, bfloat16 or float16, got {dtype}")
        self.state_dtype = formats.state_dtype(state_dtype, dtype)
        self.master_weights = flag("master_weights", master_weights)
        self.rounding_seed = _seed(rounding_seed)
        if self.master_weights and not low:
            raise ValueError(f"master_weights=True keeps a float32 copy of a bfloat16 or float16 buffer; "
                             f"params are {dtype}")
        if formats.format_of(dtype) == formats.FLOAT16 and not self.master_weights:
            raise ValueError("float16 params need master_weights=True (float16 cannot accumulate small updates; "
                             "bfloat16 params may go without, with stochastic rounding)")
        self._mixed = low or self.state_dtype != dtype
        self._signed = {b.name: b.signed for b in self.algorithm.rule.buffers}
        if self._mixed and (self.algorithm.rule.trust is not None or is_device_array(self.data)):
            raise TypeError(f"{name} {'on a GPU' if is_device_array(self.data) else ''} takes float32 or float64 "
                            f"buffers only (params {dtype}, state_dtype {self.state_dtype})".replace("  ", " "))

    def _new_state(self, n: int, value: float, name: str) -> Any:
        """A state buffer of ``n`` elements of ``value``, in the state's format."""
        if self.state_dtype == np.int8:  # (8-bit blockwise: the map the rule table gives the buffer)
            return formats.Int8State.from_float(np.full(n, value, np.float32), self._signed[name])
        return new_buffer(self.data, n, value, dtype=self.state_dtype)

    def _formats(self, state: dict) -> dict:
        """The update's format keywords for a group with ``state`` ({} for a plain step)."""
        if not self._mixed:
            return {}
        return {"rounding_seed": self.rounding_seed, **({"master_param": state["master_param"]}
                                                        if self.master_weights else {})}

    @property
    def lr(self) -> float:
        """The learning rate of every group; setting it sets all groups (for schedules)."""
        lrs = {g["lr"] for g in self.param_groups}
        if len(lrs) != 1:
            raise ValueError(f"the groups have different learning rates {sorted(lrs)}; "
                             "read param_groups[i]['lr']")
        return lrs.pop()

    @lr.setter
    def lr(self, value: float) -> None:
        nonneg("lr", value)
        for g in self.param_groups:
            g["lr"] = value

    def step(self, grad: Array | None = None) -> bool:
        """Update every group in place with the gradient ``grad`` (a buffer like ``params``;
        default: the ``FlatParams``' ``grad``). Everything is checked before anything is written.

        Returns True, or False when ``skip_nonfinite`` dropped the step."""
        if grad is None:
            if self._flat is None:
                raise TypeError("step() needs a gradient buffer (or construct the optimizer from a FlatParams)")
            grad = self._flat.grad
        prepared = self._prepared
        if prepared is not None:
            done = prepared.step(self, grad)
            if done is not None:
                return done
            self._prepared = None  # something changed: the checked step below, then prepare again
        check_buffers(["params", "grad"], [self.data, grad], any_dtype=self._mixed)
        # Every group is checked before any is written: its hyperparameters, its
        # span (groups are plain dicts, so it may have been edited), its state's
        # buffer sizes and carried value (a loaded or edited state).
        _check_disjoint(self.param_groups, shape_of(self.data)[0])
        for i, (group, state) in enumerate(zip(self.param_groups, self.state)):
            self.algorithm.check_step(group, state, f"param_groups[{i}]")
            n = group["params"].stop - group["params"].start
            for name in self.algorithm.rule.state:
                if name in state and shape_of(formats.codes_of(state[name])) != (n,):
                    raise ValueError(f"state[{i}][{name!r}] has shape {shape_of(formats.codes_of(state[name]))}, "
                                     f"expected ({n},) (the size of param_groups[{i}]['params'])")
            held = [name for name in self.algorithm.rule.state if name in state]
            seg = group["params"]
            check_buffers(["params", "grad", *(f"state[{i}][{name!r}]" for name in held)],
                          [self.data[seg], grad[seg], *(formats.codes_of(state[name]) for name in held)],
                          any_dtype=self._mixed)
        if self.skip_nonfinite and not all(all_finite(grad[g["params"]]) for g in self.param_groups):
            self.skipped_steps += 1
            return False
        # LAMB clips by the norm of every group's gradients (apex FusedLAMB): one read pass.
        grad_norm = total_norm([grad[g["params"]] for g in self.param_groups]) \
            if self.algorithm.clips(self.param_groups) else None
        for group, state in zip(self.param_groups, self.state):
            seg = group["params"]
            n = seg.stop - seg.start
            if self.master_weights and "master_param" not in state:
                state["master_param"] = new_buffer(self.data, n, dtype=np.float32)
                formats.convert_into(state["master_param"], self.data[seg])
            self.algorithm.step_group(group, self.data[seg], grad[seg], state,
                                      lambda v, name, n=n: self._new_state(n, v, name), grad_norm,
                                      **self._formats(state))
        self._prepared = _PreparedStep.of(self, grad)
        return True

    # ---- state dicts --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A copy of the state in ``torch.optim``'s layout (buffers as host NumPy arrays)."""
        keys = self.algorithm.state_keys()
        state = {i: {k: (_saved(v) if k in keys or k == "master_param" else v) for k, v in s.items()}
                 for i, s in enumerate(self.state)}
        for s, group in zip(state.values(), self.param_groups):
            for name, key in keys.items():
                if name in s:
                    s[key] = s.pop(name)
            s.update(self.algorithm.derived_state(group, s["step"]))
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [i]}
                  for i, g in enumerate(self.param_groups)]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replace the state and hyperparameters with those of ``state_dict``.

        Checked in full first: the top-level keys, the number of groups, each
        group's hyperparameters, each state entry's keys, step, and each
        buffer's size and dtype. A problem raises ValueError/TypeError naming
        the key, and leaves the optimizer unchanged.
        """
        _expect_keys(state_dict, {"state", "param_groups"}, "state_dict")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups'] has {len(saved_groups)} groups, "
                             f"this optimizer has {len(self.param_groups)}")
        groups = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            _expect_keys(saved, {*self.algorithm.hyper_defaults(), "params"}, where)
            hyper = {k: v for k, v in saved.items() if k != "params"}
            self.algorithm.check_hyper(hyper, where)
            groups.append({**hyper, "params": group["params"]})
        unknown = [k for k in saved_state if k not in range(len(groups))]
        if unknown:
            raise ValueError(f"state_dict['state'] has an entry {unknown[0]!r} for no group "
                             f"(expected group indices 0..{len(groups) - 1})")
        dtype = self.state_dtype
        states = []
        for i, group in enumerate(groups):
            seg = group["params"]
            entry = saved_state.get(i, {})
            where = f"state_dict['state'][{i}]"
            buffers = {}
            for name, key in self.algorithm.state_keys().items():
                if key in entry:
                    buffers[name] = _check_buffer(entry[key], seg.stop - seg.start, dtype, f"{where}[{key!r}]",
                                                  signed=self._signed[name])
            extra = ("master_param",) if self.master_weights else ()
            if "master_param" in entry and extra:
                buffers["master_param"] = _check_buffer(entry["master_param"], seg.stop - seg.start,
                                                        np.dtype(np.float32), f"{where}['master_param']", exact=True)
            state = self.algorithm.check_entry(entry, buffers, group, where, extra_keys=extra)
            states.append((state, buffers, seg.stop - seg.start))
        # Everything checked: now apply.
        self.param_groups = groups
        self.state = []
        for state, buffers, n in states:
            for name, value in buffers.items():
                if dtype == np.int8 and name != "master_param":  # (saved 8-bit, or float values quantized)
                    state[name] = _loaded_int8(value, self._signed[name])
                    continue
                state[name] = new_buffer(self.data, n, dtype=np.float32 if name == "master_param" else dtype)
                if is_device_array(value) or is_device_array(state[name]):
                    copy_into(state[name], value)
                else:  # (float32 saved state into bfloat16 state: rounded to nearest)
                    formats.convert_into(state[name], value)
            self.state.append(state)


class _PreparedStep:
    """A step that was checked, kept ready to run again: the fast path of :meth:`Optimizer.step`.

    After a checked step, the next one need not check again what has not
    changed: it holds, per group, the group's hyperparameter values (and their
    types) as they were, their validated flat values, the state dict and its
    buffers, and the views of the buffers, and it checks by identity and
    equality that all of that still stands (the groups and state are plain
    dicts the user may edit or replace). Then each step computes the per-step
    scalars and makes one native call for every group (the backend's
    ``run_checked``, whose compiled checks re-prove the arrays). Anything
    else, or any doubt, returns None and the caller takes the checked path.
    """

    __slots__ = ("backend", "kernel", "rule", "data", "grad", "groups", "carry")

    @classmethod
    def of(cls, opt: "Optimizer", grad: Array) -> "_PreparedStep | None":
        """The prepared next step of ``opt`` after a checked step with ``grad``, or None
        where there is no fast path: no compiled one on this backend, skip_nonfinite,
        or a hyperparameter that may change in place (a tensor lr)."""
        backend = dispatch.select(None, False)
        rule = opt.algorithm.rule
        if getattr(backend, "run_checked", None) is None or not isinstance(opt.data, np.ndarray) \
                or opt.skip_nonfinite or type(grad) is not np.ndarray or rule.trust is not None or opt._mixed:
            return None  # (a two-pass rule is not one kernel call)
        groups = []
        for group, state in zip(opt.param_groups, opt.state):
            values = tuple(group.values())
            if not _cacheable(tuple(v for k, v in group.items() if k != "params")):
                return None
            hyper = {k: group[k] for k in rule.checks if k not in opt.algorithm.carry}
            hyper.update({c: state[c] for c in opt.algorithm.carry})
            flat, needed = rule.prepared(hyper)
            buffers = tuple(state.get(name) if name in needed else None for name in rule.state)
            seg = group["params"]
            groups.append((group, values, tuple(map(type, values)), state, buffers, flat,
                           (opt.data[seg], grad[seg], *buffers)))
        prepared = cls()
        prepared.backend, prepared.kernel, prepared.rule = backend, rule.kernel, rule
        prepared.data, prepared.grad, prepared.groups = opt.data, grad, tuple(groups)
        prepared.carry = rule.carry_name
        return prepared

    def step(self, opt: "Optimizer", grad: Array) -> bool | None:
        """Run the step if nothing it relies on has changed (True); else None, having written nothing."""
        if grad is not self.grad or opt.data is not self.data or dispatch.select(None, False) is not self.backend \
                or len(opt.param_groups) != len(self.groups) or opt.skip_nonfinite:
            return None
        rule, carry, calls, counts = self.rule, self.carry, [], []
        for (group, values, types, state, buffers, flat, arrays), now, now_state in zip(
                self.groups, opt.param_groups, opt.state):
            if now is not group or now_state is not state:
                return None
            current = tuple(group.values())
            if current != values or tuple(map(type, current)) != types:
                return None
            for name, buf in zip(rule.state, buffers):
                if buf is not None and state.get(name) is not buf:
                    return None
            t = state["step"] + 1
            if type(t) is not int or not 0 < t <= _MAX_STEP:
                return None
            if carry is not None:  # (the carried value is the state's, checked as the functional API does)
                flat = rule.with_carry(flat, state[carry])
            scalars, out = rule.scalars_at(flat, t)
            calls.append((arrays, scalars))
            counts.append((state, t, out))
        if not self.backend.run_checked(self.kernel, tuple(calls)):
            return None
        for state, t, out in counts:
            state["step"] = t
            if carry is not None:
                state[carry] = out
        return True


def _span(params: Any, size: int, where: str) -> tuple[int, int]:
    """The [lo, hi) of a group's ``params`` slice, checked against a buffer of ``size``."""
    if not isinstance(params, slice):
        raise TypeError(f"{where} must be a slice of the buffer, got {params!r}")
    lo, hi, stride = params.indices(size)
    if stride != 1 or lo > hi:
        raise ValueError(f"{where} must be a contiguous slice, got {params}")
    return lo, hi


def _check_disjoint(groups: Sequence[Mapping[str, Any]], size: int) -> None:
    spans = sorted(_span(g["params"], size, f"param_groups[{i}]['params']") for i, g in enumerate(groups))
    for (lo, hi), (lo2, hi2) in zip(spans, spans[1:]):
        if lo2 < hi:
            raise ValueError(f"parameter groups overlap: elements [{lo}, {hi}) and [{lo2}, {hi2})")
    for i, g in enumerate(groups):  # normalised, so the step slices exactly what was checked
        g["params"] = slice(*_span(g["params"], size, f"param_groups[{i}]['params']"))


def _expect_keys(d: Any, expected: set, where: str) -> None:
    if not isinstance(d, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    missing = [k for k in expected if k not in d]
    if missing:
        raise ValueError(f"{where} is missing {sorted(missing)[0]!r}")
    unknown = [k for k in d if k not in expected]
    if unknown:
        raise ValueError(f"{where} has an unknown key {unknown[0]!r}")


#: The keys of a saved 8-bit state buffer (Optimizer.state_dict's layout).
INT8_KEYS = {"int8_codes", "absmax", "signed"}


def _saved(buf: Any) -> Any:
    """A state buffer as a state dict holds it: a host copy; an 8-bit one as
    ``{"int8_codes": uint8 array, "absmax": float32 array (one per 256 elements), "signed": bool}``."""
    if type(buf) is formats.Int8State:
        return {"int8_codes": buf.codes.copy(), "absmax": buf.absmax.copy(), "signed": buf.signed}
    return to_host(buf)


def _loaded_int8(value: Any, signed: bool) -> "formats.Int8State":
    if isinstance(value, Mapping):
        return formats.Int8State(np.array(value["int8_codes"], np.uint8), np.array(value["absmax"], np.float32),
                                 bool(value["signed"]))
    return formats.Int8State.from_float(to_host(value), signed)


def _check_buffer(value: Any, n: int, dtype: np.dtype, where: str, exact: bool = False, signed: bool = True) -> Any:
    """A saved buffer of ``n`` elements of ``dtype`` (the state's); a float32 one is taken
    for bfloat16 state, and converted (a torch.optim state dict), unless ``exact``; for 8-bit
    state (``dtype`` int8), a saved 8-bit buffer or float values (quantized at load)."""
    if dtype == np.int8 and isinstance(value, Mapping):
        _expect_keys(value, INT8_KEYS, where)
        codes, absmax = value["int8_codes"], value["absmax"]
        if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.shape != (n,):
            raise TypeError(f"{where}['int8_codes'] must be a uint8 array of shape ({n},), got "
                            f"{getattr(codes, 'dtype', type(codes).__name__)} {getattr(codes, 'shape', '')}")
        if not isinstance(absmax, np.ndarray) or absmax.dtype != np.float32 or absmax.shape != (formats.blocks(n),):
            raise TypeError(f"{where}['absmax'] must be a float32 array of shape ({formats.blocks(n)},) (one per "
                            f"block of {formats.BLOCK}), got {getattr(absmax, 'dtype', type(absmax).__name__)} "
                            f"{getattr(absmax, 'shape', '')}")
        if signed and not value["signed"]:
            raise ValueError(f"{where} uses the unsigned 8-bit map, but this buffer may be negative")
        return value
    if dtype == np.int8:
        dtype = np.dtype(np.float32)  # (float values, quantized at load)
        exact = False
    if not (isinstance(value, np.ndarray) or is_device_array(value)):
        raise TypeError(f"{where} must be an array, got {type(value).__name__}")
    if shape_of(value) != (n,):
        raise ValueError(f"{where} has shape {shape_of(value)}, expected ({n},) (the group's size)")
    saved = dtype_of(value)
    if saved != dtype and (exact or formats.format_of(dtype) != formats.BFLOAT16 or saved != np.float32):
        raise TypeError(f"{where} has dtype {saved}, expected {dtype} (the state's dtype)"
                        + ("" if exact or formats.format_of(dtype) != formats.BFLOAT16 else " or float32"))
    return value


# ---- the algorithms: one class per rule of the table --------------------------

_CLASSES = one_class_per_rule(Optimizer, __name__)
__all__ += list(_CLASSES)
globals().update(_CLASSES)
