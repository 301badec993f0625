"""What the benchmark runs: rule configurations, sizes, buffers, and the fastopt call.

A :class:`Case` is one rule with fixed options (``adam`` and ``adam-amsgrad``
are two cases of one rule). Its buffers are the ones the options need, and its
memory traffic follows from them: every update reads ``param``, ``grad`` and
each state buffer once and writes ``param`` and each state buffer once, so

    bytes per element = itemsize * (3 + 2 * number of state buffers)

which is DESIGN.md's roofline table (fp32: SGD 12, SGD momentum 20, AdamW 28,
AMSGrad 36). The CLI and the ``bench/`` pytest suite both take their cases,
sizes and calls from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..rules import RULES

__all__ = ["Case", "CASES", "Buffers", "DEFAULT_SIZES", "HUGE_SIZE", "select_cases", "parse_size",
           "parse_sizes", "env_selection", "format_size", "make_buffers", "fastopt_call"]


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration: ``fastopt.<rule>_(..., **options)``."""

    name: str
    rule: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def hyper(self) -> dict[str, Any]:
        """Every hyperparameter, defaults filled in (``mu_product`` is per call, not here)."""
        return {k: v for k, v in {**RULES[self.rule].defaults, **self.options}.items() if k != "mu_product"}

    @property
    def state(self) -> tuple[str, ...]:
        """The state buffers these options use, in the rule's signature order."""
        rule = RULES[self.rule]
        needed = rule.needs({**rule.defaults, **self.options})
        return tuple(name for name in rule.state if name in needed)

    def bytes_per_elem(self, itemsize: int = 4) -> int:
        """Bytes read plus bytes written per element by one fused update."""
        return itemsize * (3 + 2 * len(self.state))

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.rule}_({opts})"


#: Every benchmarked configuration, in table order. Options are the usual
#: training values; a rule name on the command line selects all its cases.
CASES: dict[str, Case] = {c.name: c for c in (
    Case("sgd", "sgd", dict(lr=1e-3)),
    Case("sgd-momentum", "sgd", dict(lr=1e-3, momentum=0.9)),
    Case("adagrad", "adagrad"),
    Case("rmsprop", "rmsprop"),
    Case("rmsprop-centered", "rmsprop", dict(centered=True)),
    Case("adadelta", "adadelta"),
    Case("adam", "adam"),
    Case("adam-amsgrad", "adam", dict(amsgrad=True)),
    Case("adamw", "adamw"),
    Case("adamax", "adamax"),
    Case("nadam", "nadam"),
    Case("lion", "lion"),
)}


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
    """(cases, sizes, backends) for the ``bench/`` pytest suite, from environment variables.

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

#: State buffers holding squares or maxima start positive (as after a few
#: steps); the others start as small signed values. Nothing starts at zero,
#: nothing is denormal, and centered RMSProp's ``sq - ga*ga`` stays positive.
_POSITIVE_STATE = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "state_sum", "acc_delta", "exp_inf"}


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
    for name in case.state:
        if name in _POSITIVE_STATE:
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
    path and the timed calls the steady one); NAdam's ``mu_product`` is carried.
    """
    import fastopt

    rule = RULES[case.rule]
    fn = getattr(fastopt, case.rule + "_")
    args = [bufs.param, bufs.grad, *(bufs.state.get(name) for name in rule.state)]
    kwargs = dict(case.options, backend=backend)
    counter = {"step": 0, "mu_product": 1.0}

    if case.rule == "nadam":
        def call():
            counter["step"] += 1
            counter["mu_product"] = fn(*args, step=counter["step"], mu_product=counter["mu_product"], **kwargs)
    elif rule.takes_step:
        def call():
            counter["step"] += 1
            fn(*args, step=counter["step"], **kwargs)
    else:
        def call():
            fn(*args, **kwargs)
    return call
