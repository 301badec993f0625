"""Running the matrix case x size x implementation, and the ratios between rows.

For each case and size the buffers are allocated once, every implementation
is timed on them in turn (the roofline first), and they are freed before the
next size. Implementations:

* ``roofline`` the roofline kernel (:mod:`.roofline`): the 100% mark.
  CPU: the faster of the threaded and serial trivial loops. CUDA: a
  device-to-device copy.
* ``memcpy`` (CPU: ``np.copyto``) / ``kernel`` (CUDA: the trivial kernel): a check
  that the roofline is at the machine's bandwidth.
* every fastopt backend available on the device (``--backends`` picks); on the
  CPU the NumPy reference ``numpy`` always runs: it is the ``x numpy`` baseline.
* competitors (:mod:`.competitors`): ``torch`` (the ``x torch`` baseline).

``% roofline`` is GB/s over the roofline's GB/s, so rows moving different
bytes (a copy) still compare; ``x numpy`` and ``x torch`` are time ratios,
given only for rows doing the case's full update traffic.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import dispatch
from . import competitors, roofline
from .cases import Buffers, Case, fastopt_call, format_size, make_buffers
from .timing import DEFAULT, Measurement, TimerSettings, measure

__all__ = ["Config", "Impl", "Result", "plan", "run", "apply_threads", "environment"]

Variants = Sequence[tuple[str, Callable[[], None]]]

#: fastopt backends in table order (others follow); ``numpy`` is the baseline.
_BACKEND_ORDER = ("c", "numba", "cuda", "numpy")


@dataclass(frozen=True)
class Impl:
    """One row kind of the table: how to build its callables on a case's buffers."""

    name: str
    kind: str  # "roofline" | "check" | "backend" | "competitor"
    make: Callable[[Case, Buffers], Optional[Variants]]  # None: does not apply to this case
    copy_bytes: bool = False  # moves 2 x itemsize per element (a copy), not the case's traffic


@dataclass
class Result:
    case: Case
    size: int
    impl: str
    kind: str
    bytes_per_elem: int
    variant: str = ""
    measurement: Optional[Measurement] = None
    error: str = ""
    pct_roofline: Optional[float] = None
    x_numpy: Optional[float] = None
    x_torch: Optional[float] = None
    full_traffic: bool = True  # moves the case's bytes (ratios apply)

    @property
    def ns_per_elem(self) -> Optional[float]:
        return None if self.measurement is None else self.measurement.median / self.size * 1e9

    @property
    def gbps(self) -> Optional[float]:
        if self.measurement is None:
            return None
        return self.bytes_per_elem * self.size / self.measurement.median / 1e9

    def to_dict(self) -> dict:
        d = dict(case=self.case.name, rule=self.case.rule, options=dict(self.case.options), size=self.size,
                 impl=self.impl, kind=self.kind, variant=self.variant, bytes_per_elem=self.bytes_per_elem,
                 ns_per_elem=self.ns_per_elem, gbps=self.gbps, pct_roofline=self.pct_roofline,
                 speedup_vs_numpy=self.x_numpy, speedup_vs_torch=self.x_torch)
        if self.measurement is not None:
            d.update(self.measurement.to_dict())
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class Config:
    cases: Sequence[Case]
    sizes: Sequence[int]
    dtype: Any = np.float32
    device: str = "cpu"  # "cpu" or "cuda"
    backends: Optional[Sequence[str]] = None  # fastopt backends; None: every one available on the device
    competitors: Sequence[str] = ("torch",)
    threads: Optional[int] = None  # None: fastopt.get_num_threads()
    timer: TimerSettings = DEFAULT
    progress: Optional[Callable[[str], None]] = None


# --------------------------------------------------------------------------
# The implementations
# --------------------------------------------------------------------------

def _backend_impl(name: str) -> Impl:
    return Impl(name, "backend", lambda case, bufs: [(name, fastopt_call(case, bufs, name))])


def _torch_impl(device: str) -> Impl:
    def make(case, bufs):
        got = competitors.torch_call(case, bufs, device)
        return None if got is None else [got]
    return Impl("torch", "competitor", make)


def _host_roofline(case, bufs):
    return list(roofline.host_kernels(bufs.arrays()).items())


def plan(config: Config) -> tuple[list[Impl], dict[str, str]]:
    """The implementations to time, and ``{name: reason}`` for those that cannot run here."""
    skipped: dict[str, str] = {}
    info = dispatch.backends()
    for name in config.backends or ():
        if name not in info:
            raise ValueError(f"unknown backend {name!r}; expected some of {sorted(info)}")
    wanted = set(config.backends) if config.backends else {n for n, b in info.items() if b.device == config.device}
    if config.device == "cpu":
        wanted.add("numpy")  # the x-numpy baseline
        impls = [Impl("roofline", "roofline", _host_roofline),
                 Impl("memcpy", "check", lambda c, b: [("np.copyto", roofline.host_copy(b.arrays()))],
                      copy_bytes=True)]
    elif config.device == "cuda":
        impls = [Impl("roofline", "roofline", lambda c, b: [("d2d copy", roofline.device_copy(b.arrays()))],
                      copy_bytes=True),
                 Impl("kernel", "check", lambda c, b: [("trivial kernel", roofline.device_kernel(b.arrays()))])]
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {config.device!r}")
    order = [n for n in _BACKEND_ORDER if n in info] + [n for n in info if n not in _BACKEND_ORDER]
    for name in order:
        if name not in wanted:
            continue
        b = info[name]
        if b.device != config.device:
            skipped[name] = f"runs on {b.device}, not {config.device}"
        elif not b.available:
            skipped[name] = b.reason
        else:
            impls.append(_backend_impl(name))
    for name in config.competitors:
        if name == "torch":
            reason = competitors.torch_available(config.device)
            if reason:
                skipped["torch"] = reason
            else:
                impls.append(_torch_impl(config.device))
        elif name == "numpy":
            pass  # the NumPy reference is the numpy backend row, always timed on the CPU
        elif name == "numpy-seed":
            raise ValueError("the numpy-seed competitor is gone: the NumPy competitor is the reference "
                             "backend, the numpy row (always timed on the CPU)")
        else:
            raise ValueError(f"unknown competitor {name!r}; expected 'torch' or 'none'")
    return impls, skipped


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

def apply_threads(threads: Optional[int] = None) -> dict[str, int]:
    """Give fastopt, the roofline and torch ``threads`` threads (default fastopt's); return what each uses."""
    import fastopt

    n = threads or fastopt.get_num_threads()
    fastopt.set_num_threads(n)
    used = {"fastopt": fastopt.get_num_threads(), "roofline": roofline.set_threads(n)}
    if not competitors.torch_available():
        import torch
        torch.set_num_threads(n)
        used["torch"] = torch.get_num_threads()
    return used


def _device_setup(config: Config):
    """(buffer mover, sync) for the device."""
    if config.device == "cuda":
        from numba import cuda

        def to_device(bufs: Buffers) -> Buffers:
            return Buffers(cuda.to_device(bufs.param), cuda.to_device(bufs.grad),
                           {k: cuda.to_device(v) for k, v in bufs.state.items()})
        return to_device, cuda.synchronize
    return (lambda bufs: bufs), None


def _fill_ratios(rows: list[Result]) -> None:
    by = {r.impl: r for r in rows if r.measurement is not None}
    roof, base, torch = by.get("roofline"), by.get("numpy"), by.get("torch")
    for r in rows:
        if r.measurement is None:
            continue
        if roof is not None:
            r.pct_roofline = 100.0 * r.gbps / roof.gbps
        if r.full_traffic:
            if base is not None:
                r.x_numpy = base.measurement.median / r.measurement.median
            if torch is not None:
                r.x_torch = torch.measurement.median / r.measurement.median


def _time_impl(impl: Impl, case: Case, n: int, bufs: Buffers, dtype: np.dtype, timer: TimerSettings,
               sync, progress) -> Optional[Result]:
    """One row: the fastest variant of ``impl`` on ``bufs`` (None when it does not apply)."""
    row = Result(case, n, impl.name, impl.kind,
                 2 * dtype.itemsize if impl.copy_bytes else case.bytes_per_elem(dtype.itemsize),
                 full_traffic=not impl.copy_bytes)
    try:
        variants = impl.make(case, bufs)
        if variants is None:
            return None  # e.g. torch has no Lion
        with np.errstate(all="ignore"):  # values are not checked here; warnings would only clutter stderr
            timed = [(label, measure(fn, timer, sync)) for label, fn in variants]
        row.variant, row.measurement = min(timed, key=lambda lm: lm[1].median)
    except Exception as exc:  # report and go on: one broken row must not lose the run
        row.error = f"{type(exc).__name__}: {exc}"
        if progress:
            progress(f"  {impl.name} failed: {row.error}")
    return row


def run(config: Config) -> tuple[list[Result], dict[str, Any]]:
    """Time everything; return the result rows (ratios filled) and the run's metadata."""
    dtype = np.dtype(config.dtype)
    impls, skipped = plan(config)
    threads = apply_threads(config.threads)
    to_device, sync = _device_setup(config)
    meta = environment(config, threads, impls, skipped)
    total = len(config.cases) * len(config.sizes) * len(impls)
    results: list[Result] = []
    done = 0
    started = time.perf_counter()
    for case in config.cases:
        for n in config.sizes:
            bufs = to_device(make_buffers(case, n, dtype))
            rows = []
            for impl in impls:
                done += 1
                if config.progress:
                    config.progress(f"[{done}/{total}] {case.name} {format_size(n)} {impl.name}")
                row = _time_impl(impl, case, n, bufs, dtype, config.timer, sync, config.progress)
                if row is not None:
                    rows.append(row)
            _fill_ratios(rows)
            results += rows
            del bufs  # free this size before allocating the next
            gc.collect()
    meta["elapsed_s"] = round(time.perf_counter() - started, 3)
    return results, meta


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(config: Config, threads: dict, impls: Sequence[Impl], skipped: dict[str, str]) -> dict[str, Any]:
    """What the numbers depend on: machine, versions, threads, timer, what ran and what did not."""
    import numba

    import fastopt

    versions = {"fastopt": fastopt.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "numba": numba.__version__}
    if "torch" in [i.name for i in impls]:
        import torch
        versions["torch"] = torch.__version__
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    # A backend may say what it runs (ISA, threading) with describe() -> str; an
    # ISA forced through the environment (e.g. the C backend's AVX2 path) then
    # shows in the header next to the FASTOPT_* variables that forced it.
    described = {}
    for impl in impls:
        if impl.kind == "backend":
            describe = getattr(dispatch.get_backend(impl.name), "describe", None)
            if callable(describe):
                described[impl.name] = str(describe())
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("FASTOPT_", "NUMBA_", "OMP_", "KMP_", "GOMP_", "MKL_")) or k == "CUDA_VISIBLE_DEVICES"}
    return dict(
        date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), argv=sys.argv, machine=_cpu_model(), cores=cores,
        backends=described, env=env,
        device=config.device, dtype=np.dtype(config.dtype).name, threads=threads, versions=versions,
        timer=dataclasses.asdict(config.timer),
        implementations=[i.name for i in impls], skipped=skipped,
        cases={c.name: dict(rule=c.rule, options=dict(c.options), state=list(c.state),
                            bytes_per_elem=c.bytes_per_elem(np.dtype(config.dtype).itemsize))
               for c in config.cases},
        sizes=list(config.sizes),
    )
