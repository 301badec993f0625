"""Stateful optimizers over one flat buffer: ``fastopt.AdamW(flat).step()``.

One base class, :class:`Optimizer`, does everything every algorithm shares:
parameter groups, hyperparameter checks, lazy state allocation, the step
count, state dicts. Each algorithm is then one class statement naming its
rule in :mod:`fastopt.rules` (plus, for AdaGrad, the initial accumulator and
for NAdam the carried ``mu_product``). The update itself is always the
functional API (``fastopt.adamw_``), so the backend is whatever dispatch picks.

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

from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from . import functional
from .buffers import check_buffers, is_device_array
from .flat import Array, FlatParams, dtype_of, shape_of, copy_into, new_buffer, to_host
from .finite import all_finite
from .rules import RULES, Rule, flag, nonneg

__all__ = ["Optimizer", "SGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax", "NAdam", "Lion"]


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
        **hyper: default hyperparameters (those of the functional update).

    Attributes:
        param_groups: one dict per group: its hyperparameters and ``"params"``
            (its slice). Change a group's ``"lr"`` between steps for a
            schedule, or set :attr:`lr` for all groups.
        state: one dict per group: ``"step"`` (updates done), the state
            buffers under the functional API's names once allocated, and any
            carried scalar (NAdam's ``"mu_product"``).
    """

    rule: ClassVar[Rule]
    #: Optimizer-only hyperparameters and their defaults (AdaGrad's initial accumulator).
    extra_defaults: ClassVar[Mapping[str, Any]] = {}
    #: state buffer -> the hyperparameter holding its initial value (zeros otherwise).
    fill: ClassVar[Mapping[str, str]] = {}
    #: The scalar carried from step to step (at most one: the functional call returns
    #: its new value), with its value before the first step.
    carry: ClassVar[Mapping[str, float]] = {}
    #: functional state name -> ``torch.optim`` state key, where they differ.
    saved_names: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, rule: str | None = None, extra: Mapping[str, Any] = {},
                          fill: Mapping[str, str] = {}, carry: Mapping[str, float] = {},
                          saved_names: Mapping[str, str] = {}, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if rule is None:
            return  # a subclass of a defined optimizer: inherits its definition
        cls.rule = RULES[rule]
        cls.extra_defaults, cls.fill, cls.carry, cls.saved_names = dict(extra), dict(fill), dict(carry), dict(saved_names)
        cls._update_fn = staticmethod(getattr(functional, rule + "_"))
        cls.__doc__ = cls._describe()

    # ---- the definition, as data -------------------------------------------

    @classmethod
    def hyper_defaults(cls) -> dict[str, Any]:
        """Every hyperparameter of a group, with its default (``None``: required)."""
        functional_ones = {k: v for k, v in cls.rule.defaults.items() if k not in cls.carry}
        return {**functional_ones, **cls.extra_defaults}

    @classmethod
    def state_keys(cls) -> dict[str, str]:
        """Functional state buffer name -> its key in state dicts (``torch.optim``'s)."""
        return {name: cls.saved_names.get(name, name) for name in cls.rule.state}

    @classmethod
    def _describe(cls) -> str:
        fn_doc = (cls._update_fn.__doc__ or "").strip()
        args = ", ".join(f"{k}={v!r}" for k, v in cls.hyper_defaults().items())
        return (f"Stateful {fn_doc}\n\n"
                f"Hyperparameters (defaults; None means required): {args}.\n"
                f"State per group: {', '.join(cls.state_keys().values())} (as needed by the options), "
                f"step{''.join(', ' + c for c in cls.carry)}.\n\n"
                f"Construct as ``{cls.__name__}(params, groups=None, **hyper)``; see :class:`fastopt.optim.Optimizer`.")

    @classmethod
    def check_hyper(cls, hyper: Mapping[str, Any], where: str = "") -> None:
        """Raise TypeError/ValueError naming the first bad hyperparameter of ``hyper``."""
        if where:
            missing = [k for k in cls.hyper_defaults() if k not in hyper]
            if missing:
                raise ValueError(f"{where} is missing hyperparameter {missing[0]!r}")
        # The rule's own checks, on exactly its hyperparameters: a group also holds
        # its slice, which is unhashable and would defeat the rule's cache of
        # validated sets (this runs for every group on every step).
        cls.rule.checked({**{k: hyper[k] for k in cls.rule.checks if k not in cls.carry}, **cls.carry})
        for name in cls.extra_defaults:
            nonneg(name, hyper[name])

    @classmethod
    def merge_hyper(cls, base: Mapping[str, Any], given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``base`` overridden by ``given``; unknown names are a TypeError naming them."""
        known = cls.hyper_defaults()
        unknown = [k for k in given if k not in known]
        if unknown:
            raise TypeError(f"{where} got an unknown hyperparameter {unknown[0]!r}; "
                            f"{cls.__name__} takes {', '.join(known)}")
        return {**base, **given}

    # ---- one step of one group: shared with the torch adapter ---------------

    @classmethod
    def step_group(cls, hyper: Mapping[str, Any], param: Array, grad: Array, state: dict,
                   new: Callable[[float], Array]) -> None:
        """One step of one group: allocate missing state with ``new(fill value)``,
        run the functional update, count the step. ``hyper`` must have passed
        :meth:`check_hyper`."""
        for name in cls.rule.needs(hyper):
            if name not in state:
                state[name] = new(float(hyper[cls.fill[name]]) if name in cls.fill else 0.0)
        t = state["step"] + 1
        kwargs = {k: hyper[k] for k in cls.rule.defaults if k not in cls.carry}
        kwargs.update({c: state[c] for c in cls.carry})
        if cls.rule.takes_step:
            kwargs["step"] = t
        out = cls._update_fn(param, grad, *(state.get(name) for name in cls.rule.state), **kwargs)
        for c in cls.carry:
            state[c] = out
        state["step"] = t

    @classmethod
    def fresh_state(cls) -> dict:
        """The state of a group before its first step (buffers come lazily)."""
        return {"step": 0, **cls.carry}

    # ---- the flat optimizer -------------------------------------------------

    def __init__(self, params: FlatParams | Array, *, groups: Sequence[Mapping[str, Any]] | None = None,
                 skip_nonfinite: bool = False, **hyper: Any) -> None:
        self.skip_nonfinite = flag("skip_nonfinite", skip_nonfinite)
        self.skipped_steps = 0
        if isinstance(params, FlatParams):
            self.data, self.grad = params.data, params.grad
        else:
            self.data, self.grad = params, None
        shape = shape_of(self.data)
        if len(shape) != 1:
            raise ValueError(f"params must be a 1-D buffer (see fastopt.FlatParams), got shape {shape}")
        check_buffers(["params"], [self.data])
        self.defaults = self.merge_hyper(self.hyper_defaults(), hyper, type(self).__name__)
        self.check_hyper(self.defaults)
        self.param_groups: list[dict[str, Any]] = []
        spans: list[tuple[int, int]] = []
        for i, group in enumerate(groups if groups is not None else [{"params": slice(None)}]):
            group = dict(group)
            if "params" not in group or not isinstance(group["params"], slice):
                raise TypeError(f"groups[{i}]['params'] must be a slice of the buffer, got {group.get('params')!r}")
            lo, hi, stride = group["params"].indices(shape[0])
            if stride != 1 or lo > hi:
                raise ValueError(f"groups[{i}]['params'] must be a contiguous slice, got {group['params']}")
            overrides = {k: v for k, v in group.items() if k != "params"}
            group = {**self.merge_hyper(self.defaults, overrides, f"groups[{i}]"), "params": slice(lo, hi)}
            self.check_hyper(group)
            self.param_groups.append(group)
            spans.append((lo, hi))
        for (lo, hi), (lo2, hi2) in zip(sorted(spans), sorted(spans)[1:]):
            if lo2 < hi:
                raise ValueError(f"parameter groups overlap: elements [{lo}, {hi}) and [{lo2}, {hi2})")
        self.state: list[dict[str, Any]] = [self.fresh_state() for _ in self.param_groups]

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
            if self.grad is None:
                raise TypeError("step() needs a gradient buffer (or construct the optimizer from a FlatParams)")
            grad = self.grad
        check_buffers(["params", "grad"], [self.data, grad])
        for group in self.param_groups:
            self.check_hyper(group)
        if self.skip_nonfinite and not all(all_finite(grad[g["params"]]) for g in self.param_groups):
            self.skipped_steps += 1
            return False
        for group, state in zip(self.param_groups, self.state):
            seg = group["params"]
            n = seg.stop - seg.start
            self.step_group(group, self.data[seg], grad[seg], state, lambda v, n=n: new_buffer(self.data, n, v))
        return True

    # ---- state dicts --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A copy of the state in ``torch.optim``'s layout (buffers as host NumPy arrays)."""
        keys = self.state_keys()
        state = {i: {k: (to_host(v) if k in keys else v) for k, v in s.items()} for i, s in enumerate(self.state)}
        for s in state.values():
            for name, key in keys.items():
                if name in s:
                    s[key] = s.pop(name)
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
            _expect_keys(saved, {*self.hyper_defaults(), "params"}, where)
            hyper = {k: v for k, v in saved.items() if k != "params"}
            self.check_hyper(hyper, where)
            groups.append({**hyper, "params": group["params"]})
        unknown = [k for k in saved_state if k not in range(len(groups))]
        if unknown:
            raise ValueError(f"state_dict['state'] has an entry {unknown[0]!r} for no group "
                             f"(expected group indices 0..{len(groups) - 1})")
        dtype = dtype_of(self.data)
        states = []
        for i, group in enumerate(groups):
            seg = group["params"]
            entry = saved_state.get(i, {})
            where = f"state_dict['state'][{i}]"
            buffers = {}
            for name, key in self.state_keys().items():
                if key in entry:
                    buffers[name] = _check_buffer(entry[key], seg.stop - seg.start, dtype, f"{where}[{key!r}]")
            state = self.check_entry(entry, buffers, group, where)
            states.append((state, buffers, seg.stop - seg.start))
        # Everything checked: now apply.
        self.param_groups = groups
        self.state = []
        for state, buffers, n in states:
            for name, value in buffers.items():
                state[name] = new_buffer(self.data, n)
                copy_into(state[name], value)
            self.state.append(state)

    @classmethod
    def check_entry(cls, entry: Mapping[str, Any], buffers: Mapping[str, Any], hyper: Mapping[str, Any],
                     where: str, step_optional: bool = False) -> dict:
        """Check one saved state entry's keys and scalars; return its scalar state."""
        allowed = {"step", *cls.carry, *cls.state_keys().values()}
        unknown = [k for k in entry if k not in allowed]
        if unknown:
            raise ValueError(f"{where} has an unknown key {unknown[0]!r}; {cls.__name__} state has "
                             f"{', '.join(sorted(allowed))}")
        if not entry:
            return cls.fresh_state()
        if "step" in entry:
            step = _count(entry["step"], f"{where}['step']")
        elif step_optional:  # torch.optim.SGD keeps no count: a buffer means it has stepped
            step = 1 if buffers else 0
        else:
            raise ValueError(f"{where} is missing 'step'")
        state = {"step": step}
        for c, initial in cls.carry.items():
            if c not in entry:
                if step:
                    raise ValueError(f"{where} is missing {c!r}")
                state[c] = initial
            else:
                state[c] = _number(entry[c], f"{where}[{c!r}]")
        if step:
            for name in cls.rule.needs(hyper):
                if name not in buffers:
                    raise ValueError(f"{where} is missing {cls.state_keys()[name]!r}, "
                                     f"which the group's options need after step {step}")
        return state


def _expect_keys(d: Any, expected: set, where: str) -> None:
    if not isinstance(d, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    missing = [k for k in expected if k not in d]
    if missing:
        raise ValueError(f"{where} is missing {sorted(missing)[0]!r}")
    unknown = [k for k in d if k not in expected]
    if unknown:
        raise ValueError(f"{where} has an unknown key {unknown[0]!r}")


def _number(value: Any, where: str) -> float:
    """A saved scalar (int, float, 0-d array or tensor, host or device) as a float."""
    try:
        return float(value)
    except (TypeError, ValueError):
        if is_device_array(value):
            return float(to_host(value))
        raise TypeError(f"{where} must be a number, got {value!r}") from None


def _count(value: Any, where: str) -> int:
    x = _number(value, where)
    if not x.is_integer() or x < 0:
        raise ValueError(f"{where} must be a whole number >= 0, got {value!r}")
    return int(x)


def _check_buffer(value: Any, n: int, dtype: np.dtype, where: str) -> Any:
    if not (isinstance(value, np.ndarray) or is_device_array(value)):
        raise TypeError(f"{where} must be an array, got {type(value).__name__}")
    if shape_of(value) != (n,):
        raise ValueError(f"{where} has shape {shape_of(value)}, expected ({n},) (the group's size)")
    if dtype_of(value) != dtype:
        raise TypeError(f"{where} has dtype {dtype_of(value)}, expected {dtype} (the buffer's dtype)")
    return value


# ---- the algorithms: one definition each ----------------------------------

class SGD(Optimizer, rule="sgd"):
    pass


class Adagrad(Optimizer, rule="adagrad", extra={"initial_accumulator_value": 0.0},
              fill={"state_sum": "initial_accumulator_value"}, saved_names={"state_sum": "sum"}):
    pass


class RMSprop(Optimizer, rule="rmsprop"):
    pass


class Adadelta(Optimizer, rule="adadelta"):
    pass


class Adam(Optimizer, rule="adam"):
    pass


class AdamW(Optimizer, rule="adamw"):
    pass


class Adamax(Optimizer, rule="adamax"):
    pass


class NAdam(Optimizer, rule="nadam", carry={"mu_product": 1.0}):
    pass


class Lion(Optimizer, rule="lion"):
    pass
