"""The rule record: what one optimizer algorithm is, as data.

A :class:`Rule` (the table entries live in :mod:`fastopt.rules`) holds
everything fastopt knows about an algorithm: its hyperparameters with
defaults and checks, its state buffers (torch's names) and which options need
which buffer, the per-step scalars and how they are computed, any value
carried from step to step (NAdam's ``mu_product``), and the name of its
element function (:mod:`fastopt.kernels.elements`). Every layer is derived
from it: the functional API validates and prepares through it, the stateful
and torch optimizers are made from it, the C library is generated from it
(:mod:`fastopt.codegen`), and the tests and benchmarks iterate over it.

Two parts of a rule are written in *restricted Python*, so that the C
generator can translate them as well as Python can run them:

* ``compute(<flat hyperparameters>, step, <constants>) -> Scalars(...)``
  (or ``(Scalars(...), new carried value)``): straight-line assignments and
  one ``return``; arithmetic, ``**``, ``math.sqrt``, comparisons, ``and``/
  ``or``/``not`` and ``a if c else b``.
* ``relation(<some flat hyperparameters>) -> bool``: one ``return`` of such
  an expression (SGD's Nesterov condition).

A state buffer's ``when`` is an expression over the scalars' fields (e.g.
``"amsgrad"``, ``"momentum != 0"``): the buffer is used, and required, only
when it holds. The kernels in every backend read the same fields.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional

import numpy as np

from .checks import Check

__all__ = ["Hyper", "State", "Rule"]


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its keyword, default (None: required) and check.

    ``flat`` names its values where they are scalars one by one (in
    ``compute`` and in the C prepare function): ``betas`` is ``("beta1",
    "beta2")``; by default the hyperparameter's own name.
    """

    name: str
    default: Any
    check: Check
    flat: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.flat or (self.name,)


@dataclass(frozen=True)
class State:
    """One state buffer, named as torch names it in its functional API.

    when:      expression over the scalars' fields; the buffer is used (and
               required) only when it holds. None: always.
    why:       the option that requires it, for error messages.
    saved_as:  its key in torch.optim state dicts, when that differs.
    init:      the optimizer hyperparameter holding its initial value (else 0).
    signed:    False for a buffer that is never negative (sums and averages of
               squares, the infinity norm): tests start it from non-negative
               values, and compressed formats may store it unsigned.
    """

    name: str
    when: Optional[str] = None
    why: str = ""
    saved_as: Optional[str] = None
    init: Optional[str] = None
    signed: bool = True

    @property
    def key(self) -> str:
        return self.saved_as or self.name


# Values immutable enough to key the cache of validated hyperparameters. A
# tensor (or any other object) can change in place between calls (torch LR
# schedulers fill a tensor lr), so sets holding one are validated every time.
_CACHEABLE = frozenset({int, float, bool, str, type(None), np.float64, np.float32, np.float16, np.int64,
                        np.int32, np.bool_})
_CACHE_LIMIT = 256


def _positional(compute: Callable[..., Any], scalars: type) -> Callable[..., Any]:
    """``compute`` with its ``Scalars(field=value, ...)`` returns rewritten as
    positional calls in the fields' order: the same function, ~1 us faster per
    update (a NamedTuple built from keywords goes through keyword matching).
    The source keeps the keywords, which the reader and the C generator use."""
    source = textwrap.dedent(inspect.getsource(compute))
    tree = ast.parse(source)
    fields = list(scalars._fields)

    class Rewrite(ast.NodeTransformer):
        def visit_Call(self, node: ast.Call) -> ast.AST:
            self.generic_visit(node)
            if isinstance(node.func, ast.Name) and node.func.id == scalars.__name__ and node.keywords \
                    and not node.args:
                by_name = {k.arg: k.value for k in node.keywords}
                if sorted(by_name) != sorted(fields):
                    raise TypeError(f"{compute.__name__} builds {scalars.__name__} with fields {sorted(by_name)}, "
                                    f"expected {fields}")
                return ast.copy_location(ast.Call(node.func, [by_name[f] for f in fields], []), node)
            return node

    tree = ast.fix_missing_locations(Rewrite().visit(tree))
    namespace = dict(compute.__globals__)
    exec(compile(tree, inspect.getsourcefile(compute) or "<rule>", "exec"), namespace)
    return namespace[compute.__name__]


_NO_CARRY = object()  # _key: the rule carries nothing (or the call does not pass it)


def _cacheable(values: tuple) -> bool:
    """Whether every value (and every element of a tuple value) is immutable."""
    for v in values:
        kind = type(v)
        if kind is tuple:
            if not _CACHEABLE.issuperset(map(type, v)):
                return False
        elif kind not in _CACHEABLE:
            return False
    return True


@dataclass(frozen=True)
class Rule:
    """Everything fastopt knows about one algorithm (see the module docstring).

    name:        public name (``fastopt.<name>_``, C ``fastopt_<name>_*``).
    title:       class name (``fastopt.<title>``, ``fastopt.torch.<title>``; torch.optim's).
    summary:     one line: what it is, with its references.
    math:        the update, a few lines (docstrings and the C header).
    hyper:       hyperparameters, in signature order (also the C prepare order).
    buffers:     state buffers, in signature order (also the element function's);
                 ``state`` is their names.
    scalars:     the per-step scalars NamedTuple: float fields, then bool flags;
                 its field order is the C struct's.
    compute:     restricted Python: flat hyperparameters, ``step`` and
                 ``constants`` -> scalars (and the new carried value).
    element:     the element function in kernels/elements.py (default ``name``);
                 rules sharing one share the compiled kernels.
    constants:   extra ``compute`` arguments fixed by this rule (AdamW: decoupled=True).
    carry:       the hyperparameter carried from step to step (``compute``
                 returns its new value), with its value before the first step.
    relation:    restricted predicate across hyperparameters, and the message
                 (formatted with the flat values) when it fails.
    takes_step:  whether the update depends on the step count (Lion's does not).
    optimizer_hyper: hyperparameters of the stateful optimizers only (initial values).
    saves_step:  whether torch.optim keeps ``step`` in this rule's state dicts
                 (its SGD does not: a momentum buffer means it has stepped).
    decoupled:   the rule this one becomes with torch's ``decoupled_weight_decay=True``
                 (``torch.optim.Adam``'s option: AdamW), when torch has that option.
    """

    name: str
    title: str
    summary: str
    math: str
    hyper: tuple[Hyper, ...]
    buffers: tuple[State, ...]
    scalars: type
    compute: Callable[..., Any]
    element: Optional[str] = None
    constants: Mapping[str, Any] = field(default_factory=dict)
    carry: Optional[tuple[str, float]] = None
    relation: Optional[tuple[Callable[..., bool], str]] = None
    takes_step: bool = True
    optimizer_hyper: tuple[Hyper, ...] = ()
    saves_step: bool = True
    decoupled: Optional[str] = None
    _validated: dict = field(default_factory=dict, compare=False, repr=False)
    _when: dict = field(default_factory=dict, compare=False, repr=False)
    _constants: tuple = field(default=(), compare=False, repr=False)
    _kernel: str = field(default="", compare=False, repr=False)
    _state: tuple = field(default=(), compare=False, repr=False)
    _compute: Optional[Callable[..., Any]] = field(default=None, compare=False, repr=False)
    _carry_at: int = field(default=-1, compare=False, repr=False)  # the carried value's flat position
    _carry_check: Optional[Check] = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for buf in self.buffers:
            if buf.when is not None:
                self._when[buf.name] = compile(buf.when, f"<{self.name}: when of {buf.name}>", "eval")
        # compute is called positionally on the hot path: its parameters must be the
        # flat hyperparameters in order, then step (if any), then the constants.
        expected = [n for h in self.hyper for n in h.names] + (["step"] if self.takes_step else []) + \
            list(self.constants)
        got = list(inspect.signature(self.compute).parameters)
        if got != expected:
            raise TypeError(f"rule {self.name!r}: {self.compute.__name__} must take ({', '.join(expected)}), "
                            f"got ({', '.join(got)})")
        object.__setattr__(self, "_constants", tuple(self.constants.values()))
        object.__setattr__(self, "_kernel", self.element or self.name)  # (read on every update)
        object.__setattr__(self, "_state", tuple(s.name for s in self.buffers))
        object.__setattr__(self, "_compute", _positional(self.compute, self.scalars))
        if self.carry:
            object.__setattr__(self, "_carry_at", expected.index(self.carry[0]))
            object.__setattr__(self, "_carry_check", self.checks[self.carry[0]])

    # ---- derived views --------------------------------------------------------

    @property
    def kernel(self) -> str:
        """The element kernel this rule runs (shared by rules with one element function)."""
        return self._kernel

    @property
    def state(self) -> tuple[str, ...]:
        """The state buffers' names, in signature order."""
        return self._state

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter -> default, in signature order (None: required)."""
        return {h.name: h.default for h in self.hyper}

    @property
    def checks(self) -> dict[str, Check]:
        return {h.name: h.check for h in self.hyper}

    @property
    def carry_name(self) -> Optional[str]:
        return self.carry[0] if self.carry else None

    def flat(self, valid: Mapping[str, Any]) -> dict[str, Any]:
        """Validated hyperparameters as flat scalars (``betas`` -> ``beta1``, ``beta2``)."""
        out = {}
        for h in self.hyper:
            if len(h.names) == 1:
                out[h.name if not h.flat else h.flat[0]] = valid[h.name]
            else:
                out.update(zip(h.names, valid[h.name]))
        return out

    # ---- validation and scalars ---------------------------------------------

    def checked(self, hyper: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, str]]:
        """``hyper`` checked and converted (floats, bools), and the state buffers it
        needs (name -> the option that needs it). Raises TypeError/ValueError naming
        the argument."""
        valid, needs, _ = self._validate(hyper)
        if self.carry and self.carry[0] in hyper:  # (the cached entry may hold an older carried value)
            name = self.carry[0]
            valid = {**valid, name: self._carry_check(name, hyper[name])}
        return valid, needs

    def prepared(self, hyper: Mapping[str, Any]) -> tuple[tuple, dict[str, str]]:
        """(the checked flat values, positional for :meth:`scalars_at`; the state
        buffers needed): the hot path of every update."""
        key, carried = self._key(hyper)
        try:
            done = self._validated.get(key)
        except TypeError:
            done = None
        if done is None:
            done = self._validate(hyper)
        if carried is _NO_CARRY:
            return done[2], done[1]
        # The carried value (NAdam's mu_product) changes every step, so it is
        # not part of the key: checked on its own and put in its place.
        at, flat = self._carry_at, done[2]
        return flat[:at] + (self._carry_check(self.carry[0], carried),) + flat[at + 1:], done[1]

    def _key(self, hyper: Mapping[str, Any]) -> tuple[tuple, Any]:
        """(the validation cache key of ``hyper``, the carried value or _NO_CARRY).

        The key holds the names in their order (two callers may order them
        differently), the values and their types (True == 1 must not let
        lr=True pass as lr=1), and not the carried value."""
        names, values = tuple(hyper), tuple(hyper.values())
        carried = _NO_CARRY
        if self.carry and self.carry[0] in hyper:
            i = names.index(self.carry[0])
            carried = values[i]
            values = values[:i] + values[i + 1:]
        return (names, values, tuple(map(type, values))), carried

    def _validate(self, hyper: Mapping[str, Any]) -> tuple[dict, dict[str, str], tuple]:
        # A training loop passes the same values every step, and the checks are
        # most of the cost of a small update: results are cached (_key). Only
        # sets of immutable values are stored (_cacheable), so a tensor lr that
        # an LR scheduler fills in place is checked on every call; a lookup
        # with one never finds a stored set (its type differs, or, inside a
        # tuple, its identity hash).
        key, _ = self._key(hyper)
        try:
            done = self._validated.get(key)
        except TypeError:  # an unhashable value (betas as a list, a 0-d array)
            done = key = None
        if done is None:
            valid = {h.name: h.check(h.name, hyper[h.name]) for h in self.hyper}
            if self.relation is not None:
                self._check_relation(valid)
            done = (valid, self.needs(valid), tuple(self.flat(valid).values()))
            if key is not None and _cacheable(key[1]):
                if len(self._validated) >= _CACHE_LIMIT:
                    self._validated.clear()
                self._validated[key] = done
        return done

    def _check_relation(self, valid: Mapping[str, Any]) -> None:
        predicate, message = self.relation
        flat = self.flat(valid)
        args = {k: flat[k] for k in inspect.signature(predicate).parameters}
        if not predicate(**args):
            raise ValueError(message.format(**{k: repr(v) for k, v in flat.items()}))

    def scalars_at(self, flat: tuple, step: int) -> tuple[NamedTuple, Any]:
        """(scalars of update number ``step``, the new carried value or None) from
        the flat values of :meth:`prepared` (positional: the compute function's
        order, checked when the rule is made)."""
        out = self._compute(*flat, step, *self._constants) if self.takes_step else self._compute(*flat, *self._constants)
        return out if self.carry else (out, None)

    def compute_scalars(self, valid: Mapping[str, Any], step: int) -> tuple[NamedTuple, Any]:
        """(scalars of update number ``step``, the new carried value or None)."""
        return self.scalars_at(tuple(self.flat(valid).values()), step)

    def prepare(self, hyper: Mapping[str, Any], step: int) -> tuple[NamedTuple, Any]:
        """Validate ``hyper`` and build the kernel scalars of update number ``step``."""
        return self.scalars_at(self.prepared(hyper)[0], step)

    def used(self, scalars: NamedTuple) -> tuple[bool, ...]:
        """Per state buffer: whether a call with these scalars uses it."""
        fields = scalars._asdict()
        return tuple(s.name not in self._when or bool(eval(self._when[s.name], {}, fields)) for s in self.buffers)

    def needs(self, valid: Mapping[str, Any]) -> dict[str, str]:
        """State buffer -> the option that needs it, for validated hyperparameters."""
        if self.carry:
            valid = {**valid, self.carry[0]: self.carry[1]}
        scalars, _ = self.compute_scalars(valid, 1)
        return {s.name: s.why or "this rule" for s, use in zip(self.buffers, self.used(scalars)) if use}
