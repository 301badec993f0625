"""The timer: warmup, a call count adapted to the size, repeats, median and min.

One *measurement* is ``number`` back-to-back calls timed together with
``perf_counter``; ``number`` grows until a measurement lasts at least
``min_time`` (so a 1 us call is timed over thousands of calls and a 100 ms call
alone). ``repeats`` measurements are taken, fewer when they would exceed
``max_time`` in total (never fewer than ``min_repeats``). The median per-call
time is the reported number (robust on a shared machine); the minimum is kept
too. Garbage collection is off while timing, as in ``timeit``. The buffers stay
the same between calls, so small buffers are timed warm in cache: the steady
state of calling an update in a loop.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["TimerSettings", "DEFAULT", "QUICK", "Measurement", "measure"]


@dataclass(frozen=True)
class TimerSettings:
    repeats: int = 7  # measurements wanted
    min_repeats: int = 3  # measurements taken even when slow
    min_time: float = 5e-3  # seconds: a measurement lasts at least this long
    max_time: float = 1.0  # seconds: the repeats of one implementation stop around here
    warmup: int = 2  # calls before calibrating (the first compiles and touches memory)


DEFAULT = TimerSettings()
QUICK = TimerSettings(repeats=3, min_repeats=2, min_time=1e-3, max_time=0.2, warmup=1)


@dataclass(frozen=True)
class Measurement:
    median: float  # seconds per call
    best: float  # seconds per call, fastest measurement
    number: int  # calls per measurement
    repeats: int  # measurements

    def to_dict(self) -> dict:
        return dict(median_s=self.median, min_s=self.best, number=self.number, repeats=self.repeats)


def _run(fn: Callable[[], None], number: int, sync: Optional[Callable[[], None]]) -> float:
    """Seconds for ``number`` calls (``sync`` after the last one, for asynchronous devices)."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    if sync is not None:
        sync()
    return time.perf_counter() - start


def measure(fn: Callable[[], None], settings: TimerSettings = DEFAULT,
            sync: Optional[Callable[[], None]] = None) -> Measurement:
    """Time ``fn()`` (see the module docstring); ``sync`` waits for queued device work."""
    for _ in range(max(1, settings.warmup)):
        fn()
    if sync is not None:
        sync()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        number = 1
        while True:
            elapsed = _run(fn, number, sync)
            if elapsed >= settings.min_time or number >= 1 << 24:
                break
            # Aim 20% past min_time, at least doubling.
            grow = settings.min_time * 1.2 / elapsed if elapsed > 0 else 10.0
            number = max(number * 2, math.ceil(number * grow))
        repeats = int(settings.max_time // elapsed) if elapsed > 0 else settings.repeats
        repeats = max(settings.min_repeats, min(settings.repeats, repeats))
        per_call = [_run(fn, number, sync) / number for _ in range(repeats)]
    finally:
        if gc_was_enabled:
            gc.enable()
    return Measurement(statistics.median(per_call), min(per_call), number, repeats)
