"""``python -m fastopt bench --muon`` / ``--adafactor``: the matrix rules at realistic shapes, against torch's.

Muon: for each shape (default 1024x1024, 4096x1024 and GPT-2's 768x3072 MLP
matrix), one step of ``fastopt.muon_`` on each CPU backend and one
``torch.optim.Muon`` step (its own Newton-Schulz iteration, in bfloat16) are
timed in one run, interleaved, on the same float32 values; so is fastopt's
iteration alone (:func:`fastopt.muon.newton_schulz`, NumPy's BLAS), the floor
under the fused passes. Adafactor: ``fastopt.adafactor_`` against
``torch.optim.Adafactor`` (default 1024x1024, 4096x1024 and GPT-2's 50257x768
embedding); its "iteration" column is the row and column statistics alone.
The report gives ms per step, that share, and the speedup against torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["MuonRow", "SHAPES", "ADAFACTOR_SHAPES", "run", "table"]

#: (rows, cols): a square hidden matrix, a tall projection, GPT-2 small's MLP input.
SHAPES = ((1024, 1024), (4096, 1024), (768, 3072))
#: Adafactor's: GPT-2 small's token embedding in place of the MLP matrix.
ADAFACTOR_SHAPES = ((1024, 1024), (4096, 1024), (50257, 768))


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


def _adafactor_step(shape, backend: str) -> Callable[[], None]:
    import fastopt

    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    row, col = np.zeros((shape[0], 1), np.float32), np.zeros((1, shape[1]), np.float32)
    steps = iter(range(1, 1 << 62))
    return lambda: fastopt.adafactor_(p, g, row, col, None, step=next(steps), backend=backend)


def _statistics(shape) -> Callable[[], None]:
    g = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return lambda: (np.add.reduce(g * g, axis=-1), np.add.reduce(g * g, axis=-2))


def _torch_step(rule: str, shape) -> Optional[Callable[[], None]]:
    try:
        import torch
    except ImportError:
        return None
    cls = getattr(torch.optim, "Muon" if rule == "muon" else "Adafactor", None)
    if cls is None:
        return None
    rng = np.random.default_rng(0)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
    p.grad = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    opt = cls([p], lr=0.02) if rule == "muon" else cls([p], foreach=False)
    return opt.step


def run(backends: Sequence[str], shapes: Sequence[tuple[int, int]] = SHAPES, timer: TimerSettings = DEFAULT,
        progress: Optional[Callable[[str], None]] = None, torch: bool = True, rule: str = "muon") -> list[MuonRow]:
    """``rule``: "muon" or "adafactor"."""
    step, floor = (_fastopt_step, _iteration) if rule == "muon" else (_adafactor_step, _statistics)
    rows = []
    for shape in shapes:
        if progress:
            progress(f"{rule} {shape[0]}x{shape[1]}")
        fns = [step(shape, b) for b in backends] + [floor(shape)]
        peer = _torch_step(rule, shape) if torch else None
        if peer is not None:
            fns.append(peer)
        times = [m.median for m in measure_interleaved(fns, timer)]
        peer_time = times[len(backends) + 1] if peer is not None else None
        rows += [MuonRow(tuple(shape), b, times[i], times[len(backends)], peer_time) for i, b in enumerate(backends)]
    return rows


def table(rows: Sequence[MuonRow], markdown: bool = False, floor: str = "iteration") -> str:
    head = ["shape", "impl", "ms/step", f"{floor} share", "torch ms/step", "x torch"]
    body = [[f"{r.shape[0]}x{r.shape[1]}", r.impl, f"{r.seconds * 1e3:.2f}", f"{r.iteration / r.seconds:.0%}",
             "-" if r.torch is None else f"{r.torch * 1e3:.2f}",
             "-" if r.torch is None else f"{r.torch / r.seconds:.2f}x"] for r in rows]
    return simple_table(head, body, markdown)
