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
  one ``return``; arithmetic, ``**``, ``math.sqrt``, ``math.log``,
  ``math.exp``, comparisons, ``and``/``or``/``not`` and ``a if c else b``
  (which evaluates only the arm it takes: it keeps ``log`` and ``exp`` in
  their domain, where Python raises and C returns an infinity or NaN).
* ``relation(<some flat hyperparameters>) -> bool``: one ``return`` of such
  an expression (SGD's Nesterov condition).

A state buffer's ``when`` is an expression over the scalars' fields (e.g.
``"amsgrad"``, ``"momentum != 0"``): the buffer is used, and required, only
when it holds. The kernels in every backend read the same fields.
"""
from __future__ import annotations

import ast
import inspect
import operator
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional

import numpy as np

from .checks import Check

__all__ = ["Hyper", "State", "Trust", "Rule"]


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its keyword, default (None: required, unless the check takes
    None as a value: AdEMAMix's ``beta3_warmup=None`` is "no warmup") and check.

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

    @property
    def required(self) -> bool:
        """Whether a value must be given: no default, and None is not a value its check
        accepts (SGD's lr; not AdEMAMix's ``beta3_warmup``, whose None means no warmup)."""
        if self.default is not None:
            return False
        try:
            self.check(self.name, None)
        except (TypeError, ValueError):
            return True
        return False


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


def _elementwise(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A restricted function of floats (a trust ratio) rewritten for NumPy arrays:
    ``a if c else b`` -> ``np.where(c, a, b)``, ``and``/``or``/``not`` -> logical ufuncs,
    ``math.sqrt`` -> ``np.sqrt``; the arithmetic and comparisons are elementwise as they are."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))

    def np_call(name: str, args: list) -> ast.Call:
        return ast.Call(ast.Attribute(ast.Name("_np", ast.Load()), name, ast.Load()), args, [])

    class Rewrite(ast.NodeTransformer):
        def visit_IfExp(self, node):
            self.generic_visit(node)
            return ast.copy_location(np_call("where", [node.test, node.body, node.orelse]), node)

        def visit_BoolOp(self, node):
            self.generic_visit(node)
            name = "logical_and" if isinstance(node.op, ast.And) else "logical_or"
            out = node.values[0]
            for v in node.values[1:]:
                out = np_call(name, [out, v])
            return ast.copy_location(out, node)

        def visit_UnaryOp(self, node):
            self.generic_visit(node)
            if isinstance(node.op, ast.Not):
                return ast.copy_location(np_call("logical_not", [node.operand]), node)
            return node

        def visit_Attribute(self, node):
            self.generic_visit(node)
            if isinstance(node.value, ast.Name) and node.value.id == "math" and node.attr == "sqrt":
                return ast.copy_location(ast.Attribute(ast.Name("_np", ast.Load()), "sqrt", ast.Load()), node)
            return node

    tree = ast.fix_missing_locations(Rewrite().visit(tree))
    namespace = {**fn.__globals__, "_np": np}
    exec(compile(tree, inspect.getsourcefile(fn) or "<trust ratio>", "exec"), namespace)
    return namespace[fn.__name__]


#: The second pass's inputs, after the scalars' fields, in a trust ratio's parameters.
TRUST_SUMS = ("param_sumsq", "update_sumsq")


@dataclass(frozen=True)
class Trust:
    """What makes a rule two-pass: a per-tensor trust ratio (LAMB, LARS).

    Such an update scales each tensor's step by a ratio of two norms of that
    tensor, ``||p||`` and ``||u||``, ``u`` being the update the rule would apply.
    Pass 1 reads ``p``, ``g`` and the buffers in ``reads`` and reduces, per
    tensor, ``sum(p*p)`` and ``sum(u*u)`` in double, in the fixed order of
    :mod:`fastopt.norms` (blocks of 4096, 8 lanes, a fixed tree, blocks in
    order); ``u`` comes from the rule's own element function with the flag
    ``measure`` on (it then returns ``u`` in place of the new parameter, and
    pass 1 stores nothing), so both passes compute the same ``u`` bit for bit.
    Pass 2 is the ordinary element update, with the scalars' field ``field``
    replaced, per tensor, by ``ratio`` of the two sums.

    field:   the scalars field that pass 2 takes per tensor (LAMB's step_size).
    ratio:   restricted Python (as ``compute``; ``math.sqrt``, comparisons and
             ``a if c else b``): parameters named after scalars fields and
             ``param_sumsq``, ``update_sumsq``; returns the tensor's value of
             ``field``. Evaluated in double, in Python and in the generated C.
    when:    an expression over the scalars' fields: whether the ratio applies
             at all (LAMB: weight decay or use_nvlamb, as apex). When it does
             not, the update is the one pass of pass 2 with ``field`` as it is.
    reads:   the state buffers the update ``u`` depends on (pass 1 reads no
             other state: LARS's momentum buffer is pass 2's only).
    measure: the bool field that switches the element function to pass 1.
    """

    field: str
    ratio: Callable[..., float]
    when: str
    reads: tuple[str, ...] = ()
    measure: str = "measure"
    _when: Any = field(default=None, compare=False, repr=False)
    _args: tuple = field(default=(), compare=False, repr=False)  # per ratio parameter: a field index, or -1/-2
    _vector: Any = field(default=None, compare=False, repr=False)  # the ratio over NumPy arrays (values)

    def bind(self, scalars: type, state: tuple[str, ...], where: str) -> None:
        """Check the record against the rule's scalars and state (at table build time)."""
        fields = list(scalars._fields)
        hints = typing.get_type_hints(scalars)
        for name, kind in ((self.field, float), (self.measure, bool)):
            if hints.get(name) is not kind:
                raise TypeError(f"{where}: trust needs a {kind.__name__} scalars field {name!r}")
        missing = [s for s in self.reads if s not in state]
        if missing:
            raise TypeError(f"{where}: trust reads {missing}, which are not state buffers of the rule")
        args = []
        for p in inspect.signature(self.ratio).parameters:
            if p in TRUST_SUMS:
                args.append(-1 - TRUST_SUMS.index(p))
            elif p in fields:
                args.append(fields.index(p))
            else:
                raise TypeError(f"{where}: the trust ratio's parameter {p!r} is neither a scalars field nor one "
                                f"of {TRUST_SUMS}")
        object.__setattr__(self, "_args", tuple(args))
        object.__setattr__(self, "_vector", _elementwise(self.ratio))
        # `when` as a function of the fields, positionally (a scalars tuple is splatted into it)
        when = eval(compile(f"lambda {', '.join(fields)}: bool({self.when})", f"<{where}: trust when>", "eval"), {})
        object.__setattr__(self, "_when", when)

    def applies(self, scalars: NamedTuple) -> bool:
        """Whether this step scales by the ratio (``when``): else it is one pass."""
        return self._when(*scalars)

    def first_pass(self, scalars: NamedTuple) -> NamedTuple:
        """The scalars of pass 1: ``measure`` on."""
        return scalars._replace(**{self.measure: True})

    def value(self, scalars: NamedTuple, param_sumsq: float, update_sumsq: float) -> float:
        """The tensor's value of ``field`` from its two sums of squares."""
        sums = (update_sumsq, param_sumsq)  # index -1 - k: TRUST_SUMS[k]
        return float(self.ratio(*[scalars[i] if i >= 0 else sums[i] for i in self._args]))

    def values(self, scalars: NamedTuple, param_sumsq: np.ndarray, update_sumsq: np.ndarray) -> np.ndarray:
        """:meth:`value` of every tensor at once (float64 arrays of the sums in, one value
        per tensor out), bitwise the same: the ratio with NumPy's elementwise operations
        (``a if c else b`` as ``np.where``, ``and`` as ``&``; IEEE double arithmetic, as
        Python's floats), so a list call costs no Python per tensor."""
        sums = (update_sumsq, param_sumsq)
        with np.errstate(all="ignore"):  # (np.where computes both arms)
            out = self._vector(*[scalars[i] if i >= 0 else sums[i] for i in self._args])
        return np.array(np.broadcast_to(out, param_sumsq.shape), dtype=np.float64)

    def tensor_scalars(self, scalars: NamedTuple, param_sumsq: float, update_sumsq: float) -> NamedTuple:
        """The scalars of pass 2 for one tensor."""
        return scalars._replace(**{self.field: self.value(scalars, param_sumsq, update_sumsq)})


# Values immutable enough to key the cache of validated hyperparameters. A
# tensor (or any other object) can change in place between calls (torch LR
# schedulers fill a tensor lr), so sets holding one are validated every time.
_CACHEABLE = frozenset({int, float, bool, str, type(None), np.float64, np.float32, np.float16, np.int64,
                        np.int32, np.bool_})
_CACHE_LIMIT = 256


def _positional(compute: Callable[..., Any], scalars: type) -> Callable[..., Any]:
    """``compute`` with its ``Scalars(field=value, ...)`` returns rewritten as
    ``tuple.__new__(Scalars, (value, ...))`` in the fields' order: the same
    function, ~1.2 us faster per update (a NamedTuple built from keywords goes
    through keyword matching, and even positionally through a Python-level
    ``__new__``). The source keeps the keywords, which the reader and the C
    generator use."""
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
                values = ast.Tuple([by_name[f] for f in fields], ast.Load())
                return ast.copy_location(ast.Call(ast.Name("_tuple_new", ast.Load()), [node.func, values], []), node)
            return node

    tree = ast.fix_missing_locations(Rewrite().visit(tree))
    namespace = {**compute.__globals__, "_tuple_new": tuple.__new__}
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
    trust:       the per-tensor trust ratio of a two-pass rule (:class:`Trust`: LAMB, LARS);
                 such rules live in ``rules.TWO_PASS_RULES``, run by :mod:`fastopt.trust`.
    derived:     scalars fields that the anchor keeps in each parameter's state for
                 its next step (``torch.optim.ASGD``'s ``eta`` and ``mu``): fastopt
                 recomputes them every step, writes them into state dicts for the
                 anchor to load (:meth:`derived_state`) and ignores them on load.
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
    trust: Optional[Trust] = None
    derived: tuple[str, ...] = ()
    _validated: dict = field(default_factory=dict, compare=False, repr=False)
    _when: dict = field(default_factory=dict, compare=False, repr=False)
    _constants: tuple = field(default=(), compare=False, repr=False)
    _kernel: str = field(default="", compare=False, repr=False)
    _state: tuple = field(default=(), compare=False, repr=False)
    _compute: Optional[Callable[..., Any]] = field(default=None, compare=False, repr=False)
    _carry_at: int = field(default=-1, compare=False, repr=False)  # the carried value's flat position
    _carry_check: Optional[Check] = field(default=None, compare=False, repr=False)
    _by_values: dict = field(default_factory=dict, compare=False, repr=False)  # prepared_values' cache
    _names: tuple = field(default=(), compare=False, repr=False)  # the hyperparameters' names, in order
    _last_values: tuple = field(default=(None, None), compare=False, repr=False)  # prepared_values' last hit

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
        object.__setattr__(self, "_names", tuple(h.name for h in self.hyper))
        object.__setattr__(self, "_compute", _positional(self.compute, self.scalars))
        if self.trust is not None:
            self.trust.bind(self.scalars, self._state, f"rule {self.name!r}")
        unknown = [d for d in self.derived if d not in self.scalars._fields]
        if unknown:
            raise TypeError(f"rule {self.name!r}: derived {unknown[0]!r} is no field of {self.scalars.__name__}")
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
        """Hyperparameter -> default, in signature order (None: required, see :attr:`Hyper.required`)."""
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
        return self.with_carry(done[2], carried), done[1]

    def with_carry(self, flat: tuple, carried: Any) -> tuple:
        """The flat values of :meth:`prepared` with the carried value (checked) put in its place."""
        at = self._carry_at
        return flat[:at] + (self._carry_check(self.carry[0], carried),) + flat[at + 1:]

    def prepared_values(self, values: tuple) -> tuple[tuple, dict[str, str], tuple[bool, ...]]:
        """:meth:`prepared` for the values of every hyperparameter in signature order
        (:attr:`hyper`), what the functional API passes, plus which state buffers
        are used (one bool per buffer, in order). Without names to put in order
        and a dict to build, the cache lookup costs a third as much; and values that
        are the very objects of the last cached call (a training loop passes the
        same ``lr`` object and the defaults every step; a replayed fastopt.torch
        step passes the same tuple) are found by identity alone: immutable, and
        held by the cache, so no id can be reused."""
        last = self._last_values
        if values is last[0] or (last[0] is not None and len(values) == len(last[0])
                                 and all(map(operator.is_, values, last[0]))):
            return last[1]
        key = (values, tuple(map(type, values)))  # (types: True == 1 must not let lr=True pass as lr=1)
        try:
            done = self._by_values.get(key)
        except TypeError:  # an unhashable value
            done = key = None
        if done is not None:
            object.__setattr__(self, "_last_values", (values, done))
            return done
        flat, needed = self.prepared(dict(zip(self._names, values)))
        done = (flat, needed, tuple(name in needed for name in self._state))
        if key is not None and self.carry is None and _cacheable(values):
            if len(self._by_values) >= _CACHE_LIMIT:
                self._by_values.clear()
            self._by_values[key] = done
            object.__setattr__(self, "_last_values", (values, done))
        return done

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

    def derived_state(self, valid: Mapping[str, Any], step: int) -> dict[str, float]:
        """The :attr:`derived` values a parameter's state holds after ``step`` updates
        (those of update ``step + 1``), in double precision."""
        if not self.derived:
            return {}
        scalars = self.compute_scalars(valid, step + 1)[0]
        return {name: getattr(scalars, name) for name in self.derived}

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
