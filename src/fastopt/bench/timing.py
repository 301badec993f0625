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
import contextlib
from typing import Callable, ContextManager, Optional, Sequence

__all__ = ["TimerSettings", "DEFAULT", "QUICK", "Measurement", "measure", "measure_interleaved"]


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


def _calibrate(fn: Callable[[], None], settings: TimerSettings, sync) -> tuple[int, float]:
    """Warm ``fn`` up, then (calls per measurement, seconds of one such measurement)."""
    for _ in range(max(1, settings.warmup)):
        fn()
    if sync is not None:
        sync()
    number = 1
    while True:
        elapsed = _run(fn, number, sync)
        if elapsed >= settings.min_time or number >= 1 << 24:
            return number, elapsed
        # Aim 20% past min_time, at least doubling.
        grow = settings.min_time * 1.2 / elapsed if elapsed > 0 else 10.0
        number = max(number * 2, math.ceil(number * grow))


def _repeats(settings: TimerSettings, elapsed: float) -> int:
    repeats = int(settings.max_time // elapsed) if elapsed > 0 else settings.repeats
    return max(settings.min_repeats, min(settings.repeats, repeats))


def measure(fn: Callable[[], None], settings: TimerSettings = DEFAULT,
            sync: Optional[Callable[[], None]] = None) -> Measurement:
    """Time ``fn()`` (see the module docstring); ``sync`` waits for queued device work."""
    return measure_interleaved([fn], settings, sync)[0]


def measure_interleaved(fns: Sequence[Callable[[], None]], settings: TimerSettings = DEFAULT,
                        sync: Optional[Callable[[], None]] = None,
                        around: Optional[Sequence[Optional[Callable[[], ContextManager]]]] = None,
                        ) -> list[Measurement]:
    """Time several callables with their measurements taken in turn (a, b, a, b, ...).

    Each gets its own call count (as :func:`measure`) and the same number of
    repeats, set by the slowest, so a change in the machine's load during the
    run falls on all of them alike and their ratio stays fair. ``around[i]``,
    when given, makes the context each of ``fns[i]``'s warmups and measurements
    runs in (a process-wide setting, say), entered once per block of calls
    rather than paid inside every timed call.
    """
    contexts = list(around) if around is not None else [None] * len(fns)
    if len(contexts) != len(fns):
        raise ValueError(f"around has {len(contexts)} entries, expected {len(fns)} (one per callable)")

    def block(i: int):
        return contexts[i]() if contexts[i] is not None else contextlib.nullcontext()

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        calibrated = []
        for i, fn in enumerate(fns):
            with block(i):
                calibrated.append(_calibrate(fn, settings, sync))
        repeats = _repeats(settings, max(elapsed for _, elapsed in calibrated))
        per_call: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for i, (fn, (number, _), times) in enumerate(zip(fns, calibrated, per_call)):
                with block(i):
                    times.append(_run(fn, number, sync) / number)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [Measurement(statistics.median(t), min(t), number, repeats) for t, (number, _) in zip(per_call, calibrated)]
