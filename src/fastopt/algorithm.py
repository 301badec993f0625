"""A rule as the stateful optimizers see it: groups of hyperparameters and per-group state.

:class:`Algorithm` wraps one :class:`fastopt.rule.Rule` with what every
stateful optimizer shares, the flat ones (:mod:`fastopt.optim`) and the torch
adapter (:mod:`fastopt.torch`) alike: the group hyperparameters and their
defaults (the functional ones, less the carried value, plus the optimizer-only
ones such as AdaGrad's initial accumulator), their checks, the state of a
group before its first step, one step of one group through the functional
API, and the check of one saved state entry. It holds no buffers itself.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable, Mapping

from . import functional, trust
from .buffers import is_device_array
from .flat import to_host
from .rule import Rule
from .rules import ALL_RULES

__all__ = ["Algorithm", "one_class_per_rule"]

Array = Any


class Algorithm:
    """The stateful view of ``rule``."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.name = rule.title
        # The functional update: fastopt.functional's, or fastopt.trust's for a two-pass rule.
        self.update = getattr(functional, rule.name + "_", None) or getattr(trust, rule.name + "_")
        keywords = inspect.signature(self.update).parameters
        #: optimizer hyperparameters that are also keywords of the update (LAMB's
        #: max_grad_norm), passed to it from the group
        self.passed = tuple(h.name for h in rule.optimizer_hyper if h.name in keywords)
        #: whether the update takes the global gradient norm (``grad_norm``: LAMB's clipping
        #: is by the norm of every group's gradients, as apex's FusedLAMB clips)
        self.takes_grad_norm = "grad_norm" in keywords
        #: group (or any mapping of the hyperparameters) -> the values of the functional
        #: update's hyperparameters, in its order (what fastopt.functional takes as a tuple)
        self.values_of = operator.itemgetter(*rule.defaults) if len(rule.defaults) > 1 else \
            (lambda hyper, _name=next(iter(rule.defaults)): (hyper[_name],))
        #: The value carried from step to step ({} or {name: value before the first step}).
        self.carry = dict([rule.carry]) if rule.carry else {}
        #: state buffer -> the hyperparameter holding its initial value (zeros otherwise).
        self.fill = {s.name: s.init for s in rule.buffers if s.init}

    def __repr__(self) -> str:
        return f"Algorithm({self.rule.name!r})"

    def hyper_defaults(self) -> dict[str, Any]:
        """Every hyperparameter of a group, with its default (``None``: required)."""
        functional_ones = {k: v for k, v in self.rule.defaults.items() if k not in self.carry}
        return {**functional_ones, **{h.name: h.default for h in self.rule.optimizer_hyper}}

    def state_keys(self) -> dict[str, str]:
        """Functional state buffer name -> its key in state dicts (``torch.optim``'s)."""
        return {s.name: s.key for s in self.rule.buffers}

    def describe(self) -> str:
        """The docstring of the optimizer classes made from this rule."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper_defaults().items())
        return (f"Stateful {self.update.__doc__.strip() if self.update.__doc__ else self.rule.summary}\n\n"
                f"Hyperparameters (defaults; None means required): {args}.\n"
                f"State per group: {', '.join(self.state_keys().values())} (as needed by the options), "
                f"step{''.join(', ' + c for c in self.carry)}.")

    def check_hyper(self, hyper: Mapping[str, Any], where: str = "") -> None:
        """Raise TypeError/ValueError naming the first bad hyperparameter of ``hyper``."""
        if where:
            missing = [k for k in self.hyper_defaults() if k not in hyper]
            if missing:
                raise ValueError(f"{where} is missing hyperparameter {missing[0]!r}")
        try:
            self.needs(hyper)
            for h in self.rule.optimizer_hyper:
                h.check(h.name, hyper[h.name])
        except (TypeError, ValueError) as exc:
            if not where:
                raise
            raise type(exc)(f"{where}: {exc}") from None  # which group (of a state dict, say) it was

    def check_step(self, hyper: Mapping[str, Any], state: Mapping[str, Any], where: str) -> None:
        """Check a group and its state before a step writes anything: the
        hyperparameters, and the carried value as the functional call will see it."""
        try:
            self.check_hyper(hyper)
            if self.carry:
                self.rule.checked({**{k: hyper[k] for k in self.rule.checks if k not in self.carry},
                                   **{c: state[c] for c in self.carry}})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    def needs(self, hyper: Mapping[str, Any]) -> dict[str, str]:
        """The state buffers a group with these hyperparameters uses (validating them)."""
        # The rule's own checks, on exactly its hyperparameters: a group also holds
        # its params, which are unhashable and would defeat the rule's cache of
        # validated sets (this runs for every group on every step).
        return self.rule.checked({**{k: hyper[k] for k in self.rule.checks if k not in self.carry},
                                  **self.carry})[1]

    def merge_hyper(self, base: Mapping[str, Any], given: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``base`` overridden by ``given``; unknown names are a TypeError naming them."""
        known = self.hyper_defaults()
        unknown = [k for k in given if k not in known]
        if unknown:
            raise TypeError(f"{where} got an unknown hyperparameter {unknown[0]!r}; "
                            f"{self.name} takes {', '.join(known)}")
        return {**base, **given}

    # ---- one step of one group: shared with the torch adapter ---------------

    def clips(self, groups: Any) -> bool:
        """Whether a step of these groups needs the global gradient norm (:attr:`takes_grad_norm`
        and some group clips)."""
        return self.takes_grad_norm and any(g.get("max_grad_norm") for g in groups)

    def step_group(self, hyper: Mapping[str, Any], param: Array, grad: Array, state: dict,
                   new: Callable[[float], Array], grad_norm: Any = None, **formats: Any) -> None:
        """One step of one group: allocate missing state with ``new(fill value, name)``,
        run the functional update, count the step. ``hyper`` must have passed
        :meth:`check_hyper`; ``grad_norm``: the norm of every group's gradients,
        for an update that clips by it (:meth:`clips`); ``formats``: the update's
        ``master_param`` and ``rounding_seed`` (:mod:`fastopt.formats`), when given."""
        for name in self.needs(hyper):
            if name not in state:
                state[name] = new(float(hyper[self.fill[name]]) if name in self.fill else 0.0, name)
        t = state["step"] + 1
        kwargs = {k: hyper[k] for k in self.rule.defaults if k not in self.carry}
        kwargs.update({c: state[c] for c in self.carry})
        kwargs.update({k: hyper[k] for k in self.passed})
        if grad_norm is not None:
            kwargs["grad_norm"] = grad_norm
        if self.rule.takes_step or formats:  # (stochastic rounding draws its bits by step)
            kwargs["step"] = t
        kwargs.update(formats)
        out = self.update(param, grad, *(state.get(name) for name in self.rule.state), **kwargs)
        for c in self.carry:
            state[c] = out
        state["step"] = t

    def derived_state(self, hyper: Mapping[str, Any], step: int) -> dict[str, float]:
        """The values the anchor keeps in a state entry after ``step`` updates besides
        step and buffers (:attr:`fastopt.rule.Rule.derived`: torch.optim.ASGD's
        ``eta`` and ``mu``), for state dicts; {} for most rules and before a step."""
        if not self.rule.derived or not step:
            return {}
        valid, _ = self.rule.checked({**{k: hyper[k] for k in self.rule.checks if k not in self.carry},
                                      **self.carry})
        return self.rule.derived_state(valid, step)

    def fresh_state(self) -> dict:
        """The state of a group before its first step (buffers come lazily)."""
        return {"step": 0, **self.carry}

    def check_entry(self, entry: Mapping[str, Any], buffers: Mapping[str, Any], hyper: Mapping[str, Any],
                     where: str, step_optional: bool = False, extra_keys: tuple = ()) -> dict:
        """Check one saved state entry's keys and scalars; return its scalar state.
        ``extra_keys``: buffers the optimizer keeps beside the rule's (``master_param``)."""
        allowed = {"step", *self.carry, *self.state_keys().values(), *self.rule.derived, *extra_keys}
        unknown = [k for k in entry if k not in allowed]
        if unknown:
            raise ValueError(f"{where} has an unknown key {unknown[0]!r}; {self.name} state has "
                             f"{', '.join(sorted(allowed))}")
        for key in self.rule.derived:  # (recomputed from the group and step: only checked to be numbers)
            if key in entry:
                _number(entry[key], f"{where}[{key!r}]")
        if not entry:
            return self.fresh_state()
        if "step" in entry:
            step = _count(entry["step"], f"{where}['step']")
        elif step_optional:  # torch.optim.SGD keeps no count: a buffer means it has stepped
            step = 1 if buffers else 0
        else:
            raise ValueError(f"{where} is missing 'step'")
        state = {"step": step}
        for c, initial in self.carry.items():
            if c not in entry:
                if step:
                    raise ValueError(f"{where} is missing {c!r}")
                state[c] = initial
            else:
                # Range-checked like the functional argument, so a bad saved value
                # fails here, at load, not half-way through a later step.
                state[c] = self.rule.checks[c](f"{where}[{c!r}]", _number(entry[c], f"{where}[{c!r}]"))
        if step:
            for name in self.needs(hyper):
                if name not in buffers:
                    raise ValueError(f"{where} is missing {self.state_keys()[name]!r}, "
                                     f"which the group's options need after step {step}")
        return state


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


def one_class_per_rule(base: type, module: str) -> dict[str, type]:
    """``{title: subclass of base}`` for every rule of the table, each made with
    ``rule=<name>`` (``base.__init_subclass__`` binds the rule) and named by the
    rule's title, as the matching torch.optim class is."""
    out = {}
    for name, rule in ALL_RULES.items():
        cls = type(rule.title, (base,), {"__module__": module}, rule=name)
        cls.__qualname__ = rule.title
        out[rule.title] = cls
    return out
