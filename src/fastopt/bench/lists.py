"""The list-of-tensors case: one call over many tensors against one flat buffer.

``fastopt.adamw_([p1, p2, ...], [g1, g2, ...], [m1, ...], [v1, ...], step=t)``
updates every tensor of a model in one call; the same update of one flat
buffer holding as many elements is the floor it is measured against. Both are
timed in the same run, on each CPU backend, their measurements interleaved
(:func:`.timing.measure_interleaved`), and reported with their ratio
``list/flat`` and the extra time per tensor.

Layouts (a comma list, ``--layouts``):

* ``gpt``: the parameter tensors of a small GPT (nanoGPT's layout: token and
  position embeddings ``wte`` ``(vocab, d)`` and ``wpe`` ``(ctx, d)``; per
  layer ``ln_1`` weight and bias, attention ``c_attn`` ``(3d, d)`` and bias,
  ``c_proj`` ``(d, d)`` and bias, ``ln_2`` weight and bias, MLP ``c_fc``
  ``(4d, d)`` and bias, ``c_proj`` ``(d, 4d)`` and bias; the final ``ln_f``
  weight and bias; the LM head tied to ``wte``): vocab 512, context 256, 6
  layers, 2 + 6*12 + 2 = 76 tensors. The width ``d`` is chosen so that the
  total is nearest the requested size (``--sizes``, default 2^24: d = 480).
* ``<N>x<M>``: N tensors of M elements (``1000x1024``).

Every tensor is its own allocation (as a model's parameters are), holding the
same values as its slice of the flat buffers, so the two calls compute the
same numbers: the list call's tensors, concatenated, are bitwise the flat
call's buffers (the tests check it).
"""
from __future__ import annotations

import gc
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .. import dispatch
from .cases import Buffers, Case, fastopt_call, format_size, make_buffers
from .timing import DEFAULT, Measurement, TimerSettings, measure_interleaved

__all__ = ["Layout", "gpt_layout", "uniform_layout", "parse_layouts", "DEFAULT_LAYOUTS", "DEFAULT_TOTAL",
           "env_selection", "list_buffers", "concat", "ListResult", "ListConfig", "run"]

#: The layouts ``--lists`` times unless told otherwise.
DEFAULT_LAYOUTS = "gpt,1000x1024"

#: The total of the ``gpt`` layout unless ``--sizes`` says otherwise.
DEFAULT_TOTAL = 1 << 24

#: nanoGPT-style model whose width is scaled: vocabulary, context, layers.
GPT_VOCAB, GPT_CTX, GPT_LAYERS = 512, 256, 6


@dataclass(frozen=True)
class Layout:
    """The tensor shapes of one list call; the flat buffer holds ``total`` elements."""

    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def count(self) -> int:
        return len(self.shapes)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def _gpt_shapes(d: int, vocab: int, ctx: int, layers: int) -> tuple[tuple[int, ...], ...]:
    block = [(d,), (d,),  # ln_1 weight, bias
             (3 * d, d), (3 * d,),  # attn.c_attn
             (d, d), (d,),  # attn.c_proj
             (d,), (d,),  # ln_2
             (4 * d, d), (4 * d,),  # mlp.c_fc
             (d, 4 * d), (d,)]  # mlp.c_proj
    return ((vocab, d), (ctx, d), *(block * layers), (d,), (d,))  # wte (tied LM head), wpe, blocks, ln_f


def gpt_layout(total: int = DEFAULT_TOTAL, vocab: int = GPT_VOCAB, ctx: int = GPT_CTX,
               layers: int = GPT_LAYERS) -> Layout:
    """A small GPT's parameters (module docstring) with the width whose total is nearest
    ``total``: a multiple of 8 when that is at least 8, else any width >= 1."""
    per_width = vocab + ctx + 13 * layers + 2  # elements linear in d
    per_square = 12 * layers  # elements in d^2
    guess = (-per_width + math.sqrt(per_width ** 2 + 4 * per_square * total)) / (2 * per_square)
    if guess >= 8:
        widths = {8 * math.floor(guess / 8), 8 * (math.floor(guess / 8) + 1)}
    else:
        widths = {max(1, math.floor(guess)), math.floor(guess) + 1}

    def count(d):
        return per_square * d * d + per_width * d
    d = min(widths, key=lambda w: (abs(count(w) - total), w))
    shapes = _gpt_shapes(d, vocab, ctx, layers)
    return Layout(f"gpt d={d}", shapes)


def uniform_layout(count: int, size: int) -> Layout:
    """``count`` tensors of ``size`` elements."""
    return Layout(f"{count}x{size}", ((size,),) * count)


def parse_layouts(spec: Optional[str], totals: Sequence[int] = (DEFAULT_TOTAL,)) -> list[Layout]:
    """``gpt`` (one per total in ``totals``) and ``<N>x<M>`` layouts from a comma list."""
    out: list[Layout] = []
    for word in (w.strip().lower() for w in (spec or DEFAULT_LAYOUTS).split(",")):
        if not word:
            continue
        if word == "gpt":
            out += [gpt_layout(n) for n in totals]
            continue
        m = re.fullmatch(r"(\d+)\s*x\s*(\d+)", word)
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise ValueError(f"layout must be 'gpt' or <tensors>x<elements> such as 1000x1024, got {word!r}")
        out.append(uniform_layout(int(m.group(1)), int(m.group(2))))
    if not out:
        raise ValueError(f"no layout in {spec!r}")
    return out


def env_selection(environ=None) -> tuple[list[Case], list[Layout], Optional[list[str]]]:
    """(cases, layouts, backends) for the ``benchmarks/`` pytest suite's list tests.

    ``FASTOPT_BENCH_LIST_RULES`` (rules or cases, default ``adamw``: that case
    alone), ``FASTOPT_BENCH_LAYOUTS`` (default :data:`DEFAULT_LAYOUTS`),
    ``FASTOPT_BENCH_LIST_SIZES`` (the ``gpt`` totals, default 2^24),
    ``FASTOPT_BENCH_BACKENDS`` (shared with the kernel tests).
    """
    import os

    from .cases import CASES, parse_sizes, select_cases

    env = os.environ if environ is None else environ
    rules = env.get("FASTOPT_BENCH_LIST_RULES")
    chosen = select_cases(rules) if rules else [CASES["adamw"]]
    sizes = env.get("FASTOPT_BENCH_LIST_SIZES")
    layouts = parse_layouts(env.get("FASTOPT_BENCH_LAYOUTS"), parse_sizes(sizes) if sizes else (DEFAULT_TOTAL,))
    wanted = env.get("FASTOPT_BENCH_BACKENDS")
    backends = [b.strip() for b in wanted.split(",") if b.strip()] if wanted else None
    return chosen, layouts, backends


# --------------------------------------------------------------------------
# Buffers
# --------------------------------------------------------------------------

def list_buffers(case: Case, layout: Layout, dtype=np.float32, seed: int = 0) -> tuple[Buffers, Buffers]:
    """(lists, flat): the case's buffers as one array per tensor of ``layout``, and as
    one flat array per role of the same total and values."""
    flat = make_buffers(case, layout.total, dtype, seed)
    bounds = np.cumsum([0, *layout.sizes])

    def split(a):
        return [a[lo:hi].reshape(shape).copy() for lo, hi, shape in zip(bounds[:-1], bounds[1:], layout.shapes)]
    lists = Buffers(split(flat.param), split(flat.grad), {k: split(v) for k, v in flat.state.items()})
    return lists, flat


def concat(arrays: Sequence[Any]) -> np.ndarray:
    """The tensors of one role, flattened and concatenated (to compare with the flat buffer)."""
    return np.concatenate([a.reshape(-1) for a in arrays])


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------

@dataclass
class ListResult:
    case: Case
    layout: Layout
    backend: str
    list: Optional[Measurement] = None
    flat: Optional[Measurement] = None
    error: str = ""

    @property
    def ratio(self) -> Optional[float]:
        """list time / flat time (1.0: the list form costs nothing extra)."""
        if self.list is None or self.flat is None:
            return None
        return self.list.median / self.flat.median

    @property
    def per_tensor(self) -> Optional[float]:
        """Seconds the list call takes beyond the flat one, per tensor."""
        if self.list is None or self.flat is None:
            return None
        return (self.list.median - self.flat.median) / self.layout.count

    def to_dict(self) -> dict:
        d = dict(case=self.case.name, rule=self.case.rule, options=dict(self.case.options), layout=self.layout.name,
                 tensors=self.layout.count, size=self.layout.total, impl=self.backend, kind="list-vs-flat",
                 list_median_s=None if self.list is None else self.list.median,
                 list_min_s=None if self.list is None else self.list.best,
                 flat_median_s=None if self.flat is None else self.flat.median,
                 flat_min_s=None if self.flat is None else self.flat.best,
                 list_over_flat=self.ratio, extra_s_per_tensor=self.per_tensor,
                 number=None if self.list is None else [self.list.number, self.flat.number],
                 repeats=None if self.list is None else self.list.repeats)
        if self.error:
            d["error"] = self.error
        return d


@dataclass
class ListConfig:
    cases: Sequence[Case]
    layouts: Sequence[Layout]
    dtype: Any = np.float32
    backends: Optional[Sequence[str]] = None  # None: every available CPU backend
    threads: Optional[int] = None
    timer: TimerSettings = DEFAULT
    progress: Optional[Callable[[str], None]] = None


def plan(config: ListConfig) -> tuple[list[str], dict[str, str]]:
    """The CPU backends to time, and ``{name: reason}`` for those that cannot run here."""
    from .runner import _BACKEND_ORDER

    info = dispatch.backends()
    for name in config.backends or ():
        if name not in info:
            raise ValueError(f"unknown backend {name!r}; expected some of {sorted(info)}")
    wanted = set(config.backends) if config.backends else {n for n, b in info.items() if b.device == "cpu"}
    order = [n for n in _BACKEND_ORDER if n in info] + [n for n in info if n not in _BACKEND_ORDER]
    names, skipped = [], {}
    for name in order:
        if name not in wanted:
            continue
        b = info[name]
        if b.device != "cpu":
            skipped[name] = f"runs on {b.device}; the list case runs on the CPU"
        elif not b.available:
            skipped[name] = b.reason
        elif not callable(getattr(dispatch.get_backend(name), "run_list", None)):
            skipped[name] = "this build of the backend has no run_list (no list calls)"
        else:
            names.append(name)
    return names, skipped


def run(config: ListConfig) -> tuple[list[ListResult], dict[str, Any]]:
    """Time the list call and the flat call of each case x layout x backend."""
    from . import runner

    dtype = np.dtype(config.dtype)
    names, skipped = plan(config)
    threads = runner.apply_threads(config.threads)
    impls = [runner.Impl(n, "backend", lambda c, b: None) for n in names]
    meta = runner.environment(runner.Config(cases=config.cases, sizes=[lay.total for lay in config.layouts],
                                            dtype=dtype, backends=names, competitors=(), threads=config.threads,
                                            timer=config.timer), threads, impls, skipped)
    meta["lists"] = {lay.name: dict(tensors=lay.count, elements=lay.total, shapes=[list(s) for s in lay.shapes])
                     for lay in config.layouts}
    results: list[ListResult] = []
    total, done = len(config.cases) * len(config.layouts) * len(names), 0
    started = time.perf_counter()
    for case in config.cases:
        for layout in config.layouts:
            lists, flat = list_buffers(case, layout, dtype)
            for name in names:
                done += 1
                if config.progress:
                    config.progress(f"[{done}/{total}] {case.name} {layout.name} ({layout.count} tensors, "
                                    f"{format_size(layout.total)}) {name}")
                row = ListResult(case, layout, name)
                try:
                    with np.errstate(all="ignore"):
                        row.list, row.flat = measure_interleaved(
                            [fastopt_call(case, lists, name), fastopt_call(case, flat, name)], config.timer)
                except Exception as exc:  # report and go on (a backend without run_list, say)
                    row.error = f"{type(exc).__name__}: {exc}"
                    if config.progress:
                        config.progress(f"  {name} failed: {row.error}")
                results.append(row)
            del lists, flat
            gc.collect()
    meta["elapsed_s"] = round(time.perf_counter() - started, 3)
    return results, meta
