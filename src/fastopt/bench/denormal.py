"""``python -m fastopt bench --denormal``: what subnormal state costs, and what flushing saves.

State that decays towards zero (embedding rows that stopped getting
gradients) reaches subnormal numbers, which x86 CPUs compute with many times
slower. For each case and CPU backend (and torch, when installed), three
configurations are timed in one run, interleaved: normal state; subnormal
state (every state value 1e-39 in float32, zero gradients) as computed; and
the same with flushing on (``fastopt.set_flush_denormal(True)``; for torch,
``torch.set_flush_denormal(True)``, the CPU's flush-to-zero modes), switched
on around each block of timed calls, never inside one. Flushed state turns
into zeros at the first (warmup) call and stays zeros, as it would in
training: the flushed row is the steady state a user gets. The report gives
ns/element and each configuration's slowdown against normal state (flush
off).

Decay rates are set close to 1 (betas 0.999/0.9999 where the rule has them)
so the subnormal state stays subnormal across every timed call without
flushing (a state at 1e-39 decaying by 0.9 per step underflows to zero in
~130 steps, and would then be fast again).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


from ..rules import RULES
from .cases import Case, format_size, fastopt_call, make_buffers
from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["DenormalRow", "run", "table"]

SUBNORMAL = 1e-39  # float32: below FLT_MIN = 1.18e-38


@dataclass
class DenormalRow:
    case: str
    size: int
    impl: str
    normal: float  # seconds per call
    subnormal: float
    flushed: float

    def to_dict(self) -> dict:
        return dict(case=self.case, size=self.size, impl=self.impl, normal_s=self.normal,
                    subnormal_s=self.subnormal, flushed_s=self.flushed,
                    subnormal_slowdown=self.subnormal / self.normal, flushed_slowdown=self.flushed / self.normal)


def _slow_decay(case: Case) -> Case:
    """The case with its decay rates near 1, so subnormal state stays subnormal while timed."""
    rule = RULES[case.rule]
    options = dict(case.options)
    if "betas" in rule.defaults:
        options["betas"] = (0.999, 0.9999)
    for name in ("alpha", "rho"):
        if name in rule.defaults:
            options[name] = 0.9999
    return Case(case.name, case.rule, options)


def _subnormal_buffers(case: Case, n: int):
    bufs = make_buffers(case, n)
    bufs.grad[...] = 0.0
    for a in bufs.state.values():
        a[...] = SUBNORMAL
    return bufs


@contextlib.contextmanager
def _flushing(set_flush: Callable[[bool], None]):
    """Flushing on for one block of timed calls (never toggled inside a timed call)."""
    set_flush(True)
    try:
        yield
    finally:
        set_flush(False)


def _fastopt_configs(case: Case, n: int, backend: str) -> list[tuple[Callable[[], None], Any]]:
    """(call, context of its blocks) for normal, subnormal and flushed-subnormal state."""
    import fastopt

    normal = fastopt_call(case, make_buffers(case, n), backend)
    subnormal = fastopt_call(case, _subnormal_buffers(case, n), backend)
    flushed = fastopt_call(case, _subnormal_buffers(case, n), backend)
    return [(normal, None), (subnormal, None), (flushed, lambda: _flushing(fastopt.set_flush_denormal))]


def _torch_configs(case: Case, n: int) -> Optional[list[tuple[Callable[[], None], Any]]]:
    from .competitors import torch_call

    import torch

    calls = []
    for bufs in (make_buffers(case, n), _subnormal_buffers(case, n), _subnormal_buffers(case, n)):
        got = torch_call(case, bufs)
        if got is None:
            return None
        calls.append(got[1])
    return [(calls[0], None), (calls[1], None), (calls[2], lambda: _flushing(torch.set_flush_denormal))]


def run(cases: Sequence[Case], size: int, backends: Sequence[str], timer: TimerSettings = DEFAULT,
        progress: Optional[Callable[[str], None]] = None, torch: bool = True) -> list[DenormalRow]:
    """Time normal, subnormal and flushed-subnormal state for each case and implementation."""
    rows = []
    for case in map(_slow_decay, cases):
        impls: list[tuple[str, Any]] = [(b, lambda b=b: _fastopt_configs(case, size, b)) for b in backends]
        if torch:
            impls.append(("torch", lambda: _torch_configs(case, size)))
        for name, make in impls:
            if progress:
                progress(f"denormal {case.name} {format_size(size)} {name}")
            try:
                configs = make()
            except ImportError:
                continue
            if configs is None:
                continue
            normal, subnormal, flushed = measure_interleaved([call for call, _ in configs], timer,
                                                             around=[ctx for _, ctx in configs])
            rows.append(DenormalRow(case.name, size, name, normal.median, subnormal.median, flushed.median))
    return rows


def table(rows: Sequence[DenormalRow], markdown: bool = False) -> str:
    head = ["case", "elements", "impl", "normal ns/elem", "subnormal ns/elem", "x normal",
            "flushed ns/elem", "x normal"]
    body = [[r.case, format_size(r.size), r.impl, f"{r.normal / r.size * 1e9:.3f}",
             f"{r.subnormal / r.size * 1e9:.3f}", f"{r.subnormal / r.normal:.2f}x",
             f"{r.flushed / r.size * 1e9:.3f}", f"{r.flushed / r.normal:.2f}x"] for r in rows]
    return simple_table(head, body, markdown)
