"""``python -m fastopt bench --training-step``: unscale + clip + AdamW, torch's way and folded.

A mixed-precision step with gradient clipping, as torch runs it with its
fastest pieces: ``GradScaler.unscale_`` (``torch._amp_foreach_non_finite_check_and_unscale_``:
the gradients read and written), ``torch.nn.utils.clip_grad_norm_`` (read for
the norm, then read and written to scale them), ``AdamW(fused=True).step()``:
4 + 4 + 4 + 4 + 4 + 28 = 48 bytes per float32 element. fastopt's folded step:
``fastopt.sum_of_squares`` (the norm, which also finds an Inf: 4 bytes) and one
``fastopt.adamw_(..., grad_multiplier=clip / scale)`` (28 bytes): 32 bytes. Both
run on the same memory (torch tensors over the benchmark's NumPy buffers), in
one run, interleaved, on a flat buffer and on a model's parameter list
(``gpt``: a small GPT's 76 tensors, scaled to the size).

The loss scale is 1 and ``max_norm`` is large, so that repeated timed calls do
not shrink the gradients (a real step unscales once): every pass still runs,
reading and writing what it would (torch multiplies by the clip coefficient even
when it is 1; fastopt multiplies as it reads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .cases import format_size
from .lists import gpt_layout
from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["StepRow", "run", "table", "TORCH_BYTES", "FASTOPT_BYTES"]

TORCH_BYTES, FASTOPT_BYTES = 48, 32  # per float32 element (module docstring)
MAX_NORM, LR, LOSS_SCALE = 1e30, 1e-6, 1.0  # (module docstring: repeated calls must not shrink the gradients)


@dataclass
class StepRow:
    layout: str
    size: int
    tensors: int
    backend: str
    torch_s: float  # seconds per step, median
    fastopt_s: float

    def to_dict(self) -> dict:
        return dict(layout=self.layout, size=self.size, tensors=self.tensors, backend=self.backend,
                    torch_s=self.torch_s, fastopt_s=self.fastopt_s, speedup=self.torch_s / self.fastopt_s)


def _shapes(layout: str, size: int) -> tuple[tuple[int, ...], ...]:
    return ((size,),) if layout == "flat" else gpt_layout(size).shapes


def _steps(shapes, backend: str) -> tuple[Callable[[], None], Callable[[], None], list]:
    """(torch's step, fastopt's step, the parameter arrays both update)."""
    import torch

    import fastopt

    rng = np.random.default_rng(0)
    arrays = [[(scale * rng.standard_normal(s)).astype(np.float32) for s in shapes] for scale in (1.0, 1e-3)]
    params, grads = arrays
    exp_avg = [np.zeros_like(p) for p in params]
    exp_avg_sq = [np.zeros_like(p) for p in params]
    tparams = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    for tp, g in zip(tparams, grads):
        tp.grad = torch.from_numpy(g)
    opt = torch.optim.AdamW(tparams, lr=LR, fused=True)
    opt.step()  # torch's state, allocated now
    found_inf, inv_scale = torch.zeros(()), torch.full((), 1.0 / LOSS_SCALE)
    tgrads = [tp.grad for tp in tparams]

    def torch_step() -> None:
        torch._amp_foreach_non_finite_check_and_unscale_(tgrads, found_inf, inv_scale)  # GradScaler.unscale_
        torch.nn.utils.clip_grad_norm_(tparams, MAX_NORM)
        opt.step()

    def fastopt_step() -> None:
        norm = fastopt.total_norm(grads, backend=backend)
        coefficient = min(1.0, MAX_NORM / (norm + 1e-6))
        fastopt.adamw_(params, grads, exp_avg, exp_avg_sq, step=1000, lr=LR, grad_multiplier=coefficient / LOSS_SCALE,
                       backend=backend)

    return torch_step, fastopt_step, params


def run(layouts: Sequence[str], sizes: Sequence[int], backends: Sequence[str], timer: TimerSettings = DEFAULT,
        progress: Optional[Callable[[str], None]] = None) -> list[StepRow]:
    rows = []
    for layout in layouts:
        for size in sizes:
            shapes = _shapes(layout, size)
            n = sum(int(np.prod(s)) for s in shapes)
            for backend in backends:
                if progress:
                    progress(f"training step {layout} {format_size(n)} {backend}")
                torch_step, fastopt_step, _ = _steps(shapes, backend)
                theirs, ours = measure_interleaved([torch_step, fastopt_step], timer)
                rows.append(StepRow(layout, n, len(shapes), backend, theirs.median, ours.median))
    return rows


def table(rows: Sequence[StepRow], markdown: bool = False) -> str:
    head = ["layout", "elements", "tensors", "backend", "torch ms", "torch ns/elem", "fastopt ms", "fastopt ns/elem",
            "speedup"]
    body = [[r.layout, format_size(r.size), str(r.tensors), r.backend, f"{r.torch_s * 1e3:.2f}",
             f"{r.torch_s / r.size * 1e9:.3f}", f"{r.fastopt_s * 1e3:.2f}", f"{r.fastopt_s / r.size * 1e9:.3f}",
             f"{r.torch_s / r.fastopt_s:.2f}x"] for r in rows]
    return simple_table(head, body, markdown)
