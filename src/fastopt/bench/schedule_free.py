"""``python -m fastopt bench --schedulefree``: Schedule-Free AdamW and SGD against the schedulefree package.

For each rule and size (default 2^20 and 2^24, float32), one training step of
``fastopt.adamw_schedulefree_``/``sgd_schedulefree_`` on each CPU backend, the
package's step (``foreach=True``, its default, and ``foreach=False``) and the
roofline kernel of the same traffic (AdamW: y, g, z, v read, y, z, v written, 28
bytes per element; SGD: 20) are timed in one run, interleaved, on buffers of
the same values. The report gives ns per element, % of the roofline and the
speedup against the package's faster step. The package's step also writes the
gradient (it normalizes it in place), which fastopt does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from . import roofline
from .cases import format_size
from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["Row", "RULES", "run", "table"]

RULES = ("adamw", "sgd")


@dataclass
class Row:
    rule: str
    size: int
    impl: str
    seconds: float
    roofline: float  # the roofline kernel of the same traffic, same run
    package: Optional[float]  # the schedulefree package's faster step, same run

    def to_dict(self) -> dict:
        return dict(rule=self.rule, size=self.size, impl=self.impl, step_s=self.seconds, roofline_s=self.roofline,
                    package_s=self.package)


def _arrays(rule: str, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    out = [y, g, y.copy()]
    if rule == "adamw":
        out.append(np.abs(rng.standard_normal(n)).astype(np.float32))
    return out


def _fastopt_step(rule: str, n: int, backend: str) -> Callable[[], None]:
    import fastopt

    arrays = _arrays(rule, n)
    fn = fastopt.adamw_schedulefree_ if rule == "adamw" else fastopt.sgd_schedulefree_
    # (a fixed step of a long run: the schedule's state stays as it is, so every call does the same work)
    return lambda: fn(*arrays, step=1000, lr=1e-3, lr_max=1e-3, weight_sum=1.0, backend=backend)


def _package_step(rule: str, n: int, foreach: bool) -> Optional[Callable[[], None]]:
    try:
        import schedulefree
        import torch
    except ImportError:
        return None
    arrays = _arrays(rule, n)
    p = torch.nn.Parameter(torch.from_numpy(arrays[0]))
    grad = torch.from_numpy(arrays[1])
    cls = schedulefree.AdamWScheduleFree if rule == "adamw" else schedulefree.SGDScheduleFree
    opt = cls([p], lr=1e-3, foreach=foreach)
    opt.train()

    def step() -> None:
        p.grad = grad  # (the package normalizes it in place: a new gradient every step would cost a copy)
        opt.step()
    return step


def _rooflines(rule: str, n: int) -> list[Callable[[], None]]:
    """The roofline loop's variants (threaded, serial): the faster is the 100% mark."""
    return list(roofline.host_kernels(_arrays(rule, n)).values())


def run(backends: Sequence[str], sizes: Sequence[int], timer: TimerSettings = DEFAULT,
        progress: Optional[Callable[[str], None]] = None, peers: bool = True) -> list[Row]:
    rows = []
    for rule in RULES:
        for n in sizes:
            if progress:
                progress(f"schedule-free {rule} {format_size(n)}")
            fns = [_fastopt_step(rule, n, b) for b in backends] + _rooflines(rule, n)
            package = [f for f in (_package_step(rule, n, True), _package_step(rule, n, False))
                       if f is not None] if peers else []
            times = [m.median for m in measure_interleaved(fns + package, timer)]
            best_roofline = min(times[len(backends):len(fns)])
            best_package = min(times[len(fns):]) if package else None
            rows += [Row(rule, n, b, times[i], best_roofline, best_package) for i, b in enumerate(backends)]
    return rows


def table(rows: Sequence[Row], markdown: bool = False) -> str:
    head = ["rule", "elements", "impl", "ns/elem", "% roofline", "package ns/elem", "x package"]
    body = [[f"{r.rule}_schedulefree", format_size(r.size), r.impl, f"{r.seconds / r.size * 1e9:.3f}",
             f"{r.roofline / r.seconds:.0%}", "-" if r.package is None else f"{r.package / r.size * 1e9:.3f}",
             "-" if r.package is None else f"{r.package / r.seconds:.2f}x"] for r in rows]
    return simple_table(head, body, markdown)
