"""``python -m fastopt bench --muon``: Muon steps at realistic matrix shapes, against torch's.

For each shape (default 1024x1024, 4096x1024 and GPT-2's 768x3072 MLP matrix),
one step of ``fastopt.muon_`` on each CPU backend and one ``torch.optim.Muon``
step (its own Newton-Schulz iteration, in bfloat16) are timed in one run,
interleaved, on the same float32 values; so is fastopt's iteration alone
(:func:`fastopt.muon.newton_schulz`, NumPy's BLAS), the floor under the
fused passes. The report gives ms per step, the share of the iteration, and
the speedup against torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["MuonRow", "SHAPES", "run", "table"]

#: (rows, cols): a square hidden matrix, a tall projection, GPT-2 small's MLP input.
SHAPES = ((1024, 1024), (4096, 1024), (768, 3072))


@dataclass
class MuonRow:
    shape: tuple[int, int]
    impl: str
    seconds: float  # per step, median
    iteration: float  # fastopt's Newton-Schulz iteration alone, same run
    torch: Optional[float]  # torch.optim.Muon's step, same run

    def to_dict(self) -> dict:
        return dict(shape=list(self.shape), impl=self.impl, step_s=self.seconds, iteration_s=self.iteration,
                    torch_s=self.torch)


def _fastopt_step(shape, backend: str) -> Callable[[], None]:
    import fastopt

    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    buf = np.zeros_like(p)
    return lambda: fastopt.muon_(p, g, buf, lr=0.02, backend=backend)


def _iteration(shape) -> Callable[[], None]:
    from ..muon import newton_schulz

    u = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return lambda: newton_schulz(u)


def _torch_step(shape) -> Optional[Callable[[], None]]:
    try:
        import torch
    except ImportError:
        return None
    if getattr(torch.optim, "Muon", None) is None:
        return None
    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
    p.grad = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    opt = torch.optim.Muon([p], lr=0.02)
    return opt.step


def run(backends: Sequence[str], shapes: Sequence[tuple[int, int]] = SHAPES, timer: TimerSettings = DEFAULT,
        progress: Optional[Callable[[str], None]] = None, torch: bool = True) -> list[MuonRow]:
    rows = []
    for shape in shapes:
        if progress:
            progress(f"muon {shape[0]}x{shape[1]}")
        fns = [_fastopt_step(shape, b) for b in backends] + [_iteration(shape)]
        peer = _torch_step(shape) if torch else None
        if peer is not None:
            fns.append(peer)
        times = [m.median for m in measure_interleaved(fns, timer)]
        peer_time = times[len(backends) + 1] if peer is not None else None
        rows += [MuonRow(tuple(shape), b, times[i], times[len(backends)], peer_time) for i, b in enumerate(backends)]
    return rows


def table(rows: Sequence[MuonRow], markdown: bool = False) -> str:
    head = ["shape", "impl", "ms/step", "iteration share", "torch ms/step", "x torch"]
    body = [[f"{r.shape[0]}x{r.shape[1]}", r.impl, f"{r.seconds * 1e3:.2f}", f"{r.iteration / r.seconds:.0%}",
             "-" if r.torch is None else f"{r.torch * 1e3:.2f}",
             "-" if r.torch is None else f"{r.torch / r.seconds:.2f}x"] for r in rows]
    return simple_table(head, body, markdown)
