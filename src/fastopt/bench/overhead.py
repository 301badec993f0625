"""``python -m fastopt bench --overhead``: the cost of one small update, layer by layer.

At 2^10 float32 elements an AdamW update moves 28 KiB, a fraction of a
microsecond of memory traffic; what a call costs there is the layers above the
kernel. Timed in one run, interleaved, on the same 2^10-element buffers:

* ``kernel``: the C entry point alone, called with prepared pointers and
  scalars (the floor every Python layer adds to);
* ``fastopt.adamw_``: the functional update, hyperparameters and buffers checked;
* ``fastopt.AdamW.step()``: the stateful optimizer over one flat buffer;
* ``fastopt.torch.AdamW.step()``: the torch drop-in over one parameter;
* torch's ``AdamW(fused=True)`` and ``AdamW(foreach=True)`` over one parameter.

Each row is checked against its goal (:data:`GOALS`, the whole-step issue's:
``adamw_`` <= 3 us, ``AdamW.step()`` <= 4 us, ``fastopt.torch`` <= 8 us), since
the point of the fast paths (compiled checks, prepared steps, replayed plans)
is to keep these small. torch is optional: without it its rows are left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["OverheadRow", "GOALS", "SIZE", "run", "table"]

SIZE = 1 << 10
#: implementation -> the most microseconds per call it should take
GOALS = {"fastopt.adamw_": 3.0, "fastopt.AdamW.step()": 4.0, "fastopt.torch.AdamW.step()": 8.0}


@dataclass
class OverheadRow:
    name: str
    seconds: float  # per call, median

    @property
    def goal_us(self) -> Optional[float]:
        return GOALS.get(self.name)

    def to_dict(self) -> dict:
        return dict(name=self.name, size=SIZE, seconds=self.seconds, goal_us=self.goal_us)


def _kernel(p, g, m, v) -> Optional[Callable[[], None]]:
    """The C kernel called directly through cffi, or None when the C backend is unavailable."""
    from ..backends import c
    from ..rules import RULES

    if c.unavailable_reason():
        return None
    ffi, lib = c._ext.ffi, c._ext.lib
    scalars, _ = RULES["adamw"].prepare(dict(RULES["adamw"].defaults), 1000)
    s = ffi.new("fastopt_adam_scalars *", tuple(scalars))
    pointers = [ffi.cast("float *", a.ctypes.data) for a in (p, g, m, v)]
    fn = lib.fastopt_adam_f32

    def call() -> None:
        fn(*pointers, ffi.NULL, SIZE, s)
    return call


def _callables() -> dict[str, Callable[[], None]]:
    import fastopt

    rng = np.random.default_rng(0)
    p, g = (rng.standard_normal(SIZE).astype(np.float32) for _ in range(2))
    m, v = np.zeros(SIZE, np.float32), np.zeros(SIZE, np.float32)
    fns: dict[str, Callable[[], None]] = {}
    kernel = _kernel(p, g, m, v)
    if kernel is not None:
        fns["kernel (C, direct)"] = kernel
    fns["fastopt.adamw_"] = lambda: fastopt.adamw_(p, g, m, v, step=1000, lr=1e-6)
    flat = fastopt.FlatParams([p.copy()])
    flat.grad[:] = g
    fns["fastopt.AdamW.step()"] = fastopt.AdamW(flat, lr=1e-6).step
    try:
        import torch
    except ImportError:
        return fns
    import fastopt.torch as fastopt_torch

    def parameter() -> torch.nn.Parameter:
        t = torch.nn.Parameter(torch.from_numpy(p.copy()))
        t.grad = torch.from_numpy(g.copy())
        return t
    fns["fastopt.torch.AdamW.step()"] = fastopt_torch.AdamW([parameter()], lr=1e-6).step
    fns["torch AdamW(fused=True)"] = torch.optim.AdamW([parameter()], lr=1e-6, fused=True).step
    fns["torch AdamW(foreach=True)"] = torch.optim.AdamW([parameter()], lr=1e-6, foreach=True).step
    return fns


def run(timer: TimerSettings = DEFAULT, progress: Optional[Callable[[str], None]] = None) -> list[OverheadRow]:
    fns = _callables()
    if progress:
        progress(f"overhead at {SIZE} elements: {', '.join(fns)}")
    times = measure_interleaved(list(fns.values()), timer)
    return [OverheadRow(name, t.median) for name, t in zip(fns, times)]


def table(rows: list[OverheadRow], markdown: bool = False) -> str:
    head = ["2^10 float32 AdamW", "us per call", "goal", "vs torch fused"]
    fused = next((r.seconds for r in rows if r.name == "torch AdamW(fused=True)"), None)
    body = []
    for r in rows:
        goal = "" if r.goal_us is None else (f"<= {r.goal_us:g} us " + ("met" if r.seconds * 1e6 <= r.goal_us
                                                                          else "MISSED"))
        body.append([r.name, f"{r.seconds * 1e6:.2f}", goal, "" if fused is None else f"{fused / r.seconds:.1f}x"])
    return simple_table(head, body, markdown)
