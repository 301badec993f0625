"""What the benchmark runs: rule configurations, sizes, buffers, and the fastopt call.

A :class:`Case` is one rule with fixed options (``adam`` and ``adam-amsgrad``
are two cases of one rule). The cases are derived from the rule table
(:data:`fastopt.rules.RULES`), none is written by hand:

* one case per rule, named as the rule, with its defaults; a hyperparameter
  without a default (SGD's ``lr``) gets :data:`REQUIRED_VALUE`;
* one case per optional state buffer (a :class:`fastopt.rule.State` with a
  ``when``), named ``<rule>-<option>``, with the single option that switches
  the buffer on: a flag set to the other value (``amsgrad=True``,
  ``centered=True``) or a number set to :data:`SWITCH_ON_VALUE`
  (``momentum=0.9``). The option is found by trying the rule's
  hyperparameters one at a time (those named in ``when`` first) and asking the
  rule which buffers the call then needs.

A case's buffers are the ones its options need, and its memory traffic
follows from them: every update reads ``param``, ``grad`` and each state buffer
once and writes ``param`` and each state buffer once, so

    bytes per element = itemsize * (2 * (1 + number of state buffers) + 1)

which is docs/design.md's roofline table (fp32: SGD 12, SGD momentum 20, AdamW
28, AMSGrad 36). The CLI and the ``benchmarks/`` pytest suite both take their
cases, sizes and calls from here. A carried value (NAdam's ``mu_product``,
``rule.carry``) is passed back in on every call, as a training loop does.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..checks import flag
from ..rule import Rule, State
from ..rules import RULES

__all__ = ["Case", "CASES", "Buffers", "DEFAULT_SIZES", "HUGE_SIZE", "REQUIRED_VALUE", "SWITCH_ON_VALUE",
           "derive_cases", "select_cases", "parse_size", "parse_sizes", "env_selection", "format_size",
           "make_buffers", "fastopt_call"]

#: The value of a hyperparameter the rule has no default for (SGD's ``lr``):
#: a usual training learning rate.
REQUIRED_VALUE = 1e-3

#: The value that switches on a state buffer guarded by a numeric
#: hyperparameter (``momentum != 0``, ``momentum > 0``): the usual momentum.
SWITCH_ON_VALUE = 0.9


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: ``fastopt.<rule>_(..., **options)``."""

    name: str
    rule: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hyper(self) -> dict[str, Any]:
        """Every hyperparameter, defaults filled in, less the carried one (passed per call)."""
        rule = RULES[self.rule]
        return {k: v for k, v in {**rule.defaults, **self.options}.items() if k != rule.carry_name}

    @property
    def state(self) -> tuple[str, ...]:
        """The state buffers these options use, in the rule's signature order."""
        rule = RULES[self.rule]
        return tuple(name for name in rule.state if name in _needs(rule, self.options))

    def bytes_per_elem(self, itemsize: int = 4) -> int:
        """Bytes read plus bytes written per element by one fused update: param and
        each state buffer read and written, grad read."""
        return itemsize * (2 * (1 + len(self.state)) + 1)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.rule}_({opts})"


def _needs(rule: Rule, options: Mapping[str, Any]) -> dict[str, str]:
    """The state buffers a call with ``options`` needs (validated; raises ValueError if invalid)."""
    hyper = {**rule.defaults, **options}
    if rule.carry:
        hyper[rule.carry[0]] = rule.carry[1]
    return rule.checked(hyper)[1]


def _required(rule: Rule) -> dict[str, Any]:
    """Values for the hyperparameters without a default, the carried one excluded."""
    return {h.name: REQUIRED_VALUE for h in rule.hyper if h.required and h.name != rule.carry_name}


def _switch_on(rule: Rule, base: Mapping[str, Any], buf: State) -> tuple[str, Any]:
    """(hyperparameter, value): the single option that makes a call use ``buf``.

    Tries the hyperparameters named in ``buf.when`` first (``amsgrad``,
    ``centered``, ``momentum``), then the others in signature order (RMSprop's
    ``use_momentum`` is ``momentum > 0``): a flag is set to the other value, a
    number to :data:`SWITCH_ON_VALUE`.
    """
    named = {n.id for n in ast.walk(ast.parse(buf.when, mode="eval")) if isinstance(n, ast.Name)}
    hypers = sorted((h for h in rule.hyper if not h.required and h.name != rule.carry_name),
                    key=lambda h: h.name not in named)
    for h in hypers:
        if h.check is flag:
            value = not h.default
        elif isinstance(h.default, (int, float)) and h.default != SWITCH_ON_VALUE:
            value = SWITCH_ON_VALUE
        else:
            continue  # pairs (betas) never guard a buffer
        try:
            if buf.name in _needs(rule, {**base, h.name: value}):
                return h.name, value
        except ValueError:  # not a valid value of this hyperparameter
            continue
    raise ValueError(f"no single option of {rule.name} switches on {buf.name} (used when {buf.when})")


def derive_cases(rules: Mapping[str, Rule] = RULES) -> dict[str, Case]:
    """The cases of ``rules`` (see the module docstring), in table order."""
    out: dict[str, Case] = {}
    for rule in rules.values():
        base = _required(rule)
        found = [Case(rule.name, rule.name, base)]
        for buf in rule.buffers:
            if buf.when is None or buf.name in _needs(rule, base):
                continue  # always used, or on by default
            option, value = _switch_on(rule, base, buf)
            case = Case(f"{rule.name}-{option}", rule.name, {**base, option: value})
            if all(c.options != case.options for c in found):  # one option may switch on several buffers
                found.append(case)
        out.update((c.name, c) for c in found)
    return out


#: Every benchmarked configuration, in table order; a rule name on the command
#: line selects all its cases.
CASES: dict[str, Case] = derive_cases()


def select_cases(spec: str | None) -> list[Case]:
    """Cases named by a comma list of rule names (each selects all its cases: ``sgd`` is
    ``sgd`` and ``sgd-momentum``) or case names (``adam-amsgrad`` selects just that one)."""
    if not spec or spec == "all":
        return list(CASES.values())
    chosen: list[Case] = []
    for word in (w.strip().lower() for w in spec.split(",")):
        if not word:
            continue
        found = [c for c in CASES.values() if c.rule == word] or ([CASES[word]] if word in CASES else [])
        if not found:
            raise ValueError(f"unknown rule or case {word!r}; expected rules {sorted(RULES)} "
                             f"or cases {list(CASES)}")
        chosen += [c for c in found if c not in chosen]
    return chosen


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

#: 2^10 .. 2^24 in steps of 4x; 2^26 (5 buffers x 256 MB for AMSGrad fp32) is opt-in.
DEFAULT_SIZES = tuple(1 << k for k in range(10, 25, 2))
HUGE_SIZE = 1 << 26

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``2^20``, ``2**20``, ``1M`` (binary: 2^20), ``64k``, ``1048576`` -> number of elements (>= 1)."""
    s = text.strip().lower().replace("_", "")
    m = re.fullmatch(r"(\d+)\s*(?:\^|\*\*)\s*(\d+)", s)
    if m:
        n = int(m.group(1)) ** int(m.group(2))
    else:
        m = re.fullmatch(r"(\d+)\s*([kmg]?)", s)
        if not m:
            raise ValueError(f"size must look like 2^20, 1M, 64k or 1048576, got {text!r}")
        n = int(m.group(1)) * _SUFFIX[m.group(2)]
    if n < 1:
        raise ValueError(f"size must be >= 1 element, got {text!r}")
    return n


def parse_sizes(spec: str | None) -> tuple[int, ...]:
    """A comma list of sizes (see :func:`parse_size`); ``None``/empty -> :data:`DEFAULT_SIZES`."""
    if not spec:
        return DEFAULT_SIZES
    return tuple(parse_size(w) for w in spec.split(",") if w.strip())


def env_selection(environ=None) -> tuple[list[Case], list[int], list[str] | None]:
    """(cases, sizes, backends) for the ``benchmarks/`` pytest suite, from environment variables.

    ``FASTOPT_BENCH_RULES`` (default all), ``FASTOPT_BENCH_SIZES`` (default
    :data:`DEFAULT_SIZES`), ``FASTOPT_BENCH_HUGE=1`` (adds :data:`HUGE_SIZE`),
    ``FASTOPT_BENCH_BACKENDS`` (default ``None``: every backend).
    """
    import os

    env = os.environ if environ is None else environ
    sizes = list(parse_sizes(env.get("FASTOPT_BENCH_SIZES")))
    if env.get("FASTOPT_BENCH_HUGE") == "1" and HUGE_SIZE not in sizes:
        sizes.append(HUGE_SIZE)
    wanted = env.get("FASTOPT_BENCH_BACKENDS")
    backends = [b.strip() for b in wanted.split(",") if b.strip()] if wanted else None
    return select_cases(env.get("FASTOPT_BENCH_RULES")), sizes, backends


def format_size(n: int) -> str:
    """``2^20`` for powers of two, else the plain number."""
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


# --------------------------------------------------------------------------
# Buffers and the call
# --------------------------------------------------------------------------

# Buffers that hold squares or maxima (State.signed False) start positive (as
# after a few steps); the others start as small signed values. Nothing starts
# at zero, nothing is denormal, and centered RMSProp's sq - ga*ga stays positive.


@dataclass
class Buffers:
    """The arrays of one case at one size, shared by every implementation timed on it."""

    param: Any
    grad: Any
    state: dict[str, Any]

    def arrays(self) -> list[Any]:
        return [self.param, self.grad, *self.state.values()]


def make_buffers(case: Case, n: int, dtype=np.float32, seed: int = 0) -> Buffers:
    """Host buffers for ``case`` with ``n`` elements of ``dtype``, filled with realistic values."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(seed)

    def normal(scale):
        a = rng.standard_normal(n, dtype=dtype)
        a *= scale
        return a

    param, grad = normal(1.0), normal(1.0)
    state = {}
    signed = {b.name: b.signed for b in RULES[case.rule].buffers}
    for name in case.state:
        if not signed[name]:  # sums and averages of squares: positive, and not denormal
            a = rng.random(n, dtype=dtype)
            a += 0.5
            a *= 0.01
        else:
            a = normal(0.01)
        state[name] = a
    if "max_exp_avg_sq" in state:
        np.maximum(state["max_exp_avg_sq"], state["exp_avg_sq"], out=state["max_exp_avg_sq"])
    return Buffers(param, grad, state)


def fastopt_call(case: Case, bufs: Buffers, backend: str) -> Callable[[], None]:
    """A no-argument callable making one public ``fastopt.<rule>_`` call per invocation.

    The whole call is timed (validation, dispatch, kernel), as a user pays it.
    ``step`` counts up from 1 across calls (so the warmup takes SGD's first-step
    path and the timed calls the steady one) when the rule takes one; a carried
    value (``rule.carry``: NAdam's ``mu_product``) starts at its first-step value
    and is passed back in. ``bufs`` holds arrays or, for the list form, lists of
    arrays (:mod:`.lists`): the call is the same.
    """
    import fastopt

    rule = RULES[case.rule]
    fn = getattr(fastopt, rule.name + "_")
    args = [bufs.param, bufs.grad, *(bufs.state.get(name) for name in rule.state)]
    kwargs = dict(case.options, backend=backend)
    counter = {"step": 0}

    if rule.carry:
        carried, value = rule.carry
        counter[carried] = value
        takes_step = rule.takes_step

        def call():
            if takes_step:
                counter["step"] += 1
                kwargs["step"] = counter["step"]
            kwargs[carried] = counter[carried]
            counter[carried] = fn(*args, **kwargs)
    elif rule.takes_step:
        def call():
            counter["step"] += 1
            fn(*args, step=counter["step"], **kwargs)
    else:
        def call():
            fn(*args, **kwargs)
    return call
