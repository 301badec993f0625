"""``python -m fastopt bench --formats``: fewer bytes per element, timed against float32.

An fp32 update is at the memory roofline (docs/design.md, section 1), so a
step gets faster only by moving fewer bytes. For one rule (default AdamW) and
each size, every storage configuration of :mod:`fastopt.formats` is timed in
one run, interleaved, on each compiled CPU backend, next to the peers:

* ``fp32``: everything float32 (the roofline case; 28 bytes per AdamW element);
* ``bf16 state``: float32 params and grads, bfloat16 moments (stochastic rounding);
* ``bf16 params + master``: bfloat16 params and grads, a float32 master copy and
  float32 moments, in one pass (the master is read and written, the bf16 param
  only written);
* ``bf16 params + master, bf16 state``;
* ``pure bf16``: bfloat16 params (stochastic rounding), grads and moments;
* ``int8 state``: float32 params and grads, 8-bit blockwise moments
  (:class:`fastopt.Int8State`: a code per element and a float32 absmax per 256,
  the rule's map per buffer);
* the peers: ``torch fused fp32`` (``torch.optim.<Rule>(fused=True)`` where torch
  has it, else foreach), and ``torch master`` -- torch's way of keeping master
  weights (apex's, without apex): the bf16 gradient upcast into the master's
  ``.grad``, the fp32 fused step of the master, then a copy of the master into the
  bf16 param: three passes; and, when installed (the ``peers`` extra),
  ``bitsandbytes <Rule>8bit``, bitsandbytes' blockwise 8-bit optimizer on the CPU,
  beside ``int8 state``.

Each row reports ns/element, the bytes the update moves per element, the bytes
per parameter it keeps (param, master and state; the gradient is the model's),
and the speedups over this backend's fp32 row and over torch fused fp32.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..rules import RULES
from .cases import Case, format_size, make_buffers
from .report import simple_table
from .timing import DEFAULT, TimerSettings, measure_interleaved

__all__ = ["CONFIGS", "FormatRow", "run", "table"]


@dataclass(frozen=True)
class Config:
    """One storage configuration: the dtype of param, grad and state, and a master copy."""

    name: str
    param: str
    grad: str
    state: str
    master: bool = False

    def bytes_moved(self, nstate: int) -> float:
        """Bytes read and written per element by one fused update."""
        p, g, s = _BYTES[self.param], _BYTES[self.grad], _BYTES[self.state]
        param = (4 + 4 + p) if self.master else 2 * p  # master read and written, param written
        return param + g + 2 * s * nstate

    def bytes_kept(self, nstate: int) -> float:
        """Bytes per parameter kept between steps: param, master, state."""
        return _BYTES[self.param] + (4 if self.master else 0) + _BYTES[self.state] * nstate


#: Bytes per element of each storage (8-bit: the code and its share of the block's absmax).
_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1 + 4 / 256}


CONFIGS = (
    Config("fp32", "float32", "float32", "float32"),
    Config("bf16 state", "float32", "float32", "bfloat16"),
    Config("bf16 params + master", "bfloat16", "bfloat16", "float32", master=True),
    Config("bf16 params + master, bf16 state", "bfloat16", "bfloat16", "bfloat16", master=True),
    Config("pure bf16", "bfloat16", "bfloat16", "bfloat16"),
    Config("int8 state", "float32", "float32", "int8"),
)


@dataclass
class FormatRow:
    case: str
    size: int
    impl: str  # "c", "numba", "torch fused fp32", "torch master"
    config: str
    seconds: float  # per call (median)
    bytes_moved: float  # per element
    bytes_kept: float  # per parameter

    def to_dict(self) -> dict:
        return dict(case=self.case, size=self.size, impl=self.impl, config=self.config, seconds=self.seconds,
                    ns_per_elem=self.seconds / self.size * 1e9, bytes_moved=self.bytes_moved,
                    bytes_kept=self.bytes_kept)


def _dtype(name: str) -> np.dtype:
    from ..formats import bfloat16
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def _fastopt_call(case: Case, n: int, config: Config, backend: str) -> Callable[[], None]:
    """One ``fastopt.<rule>_`` call per invocation, on buffers in ``config``'s formats."""
    import fastopt

    bufs = make_buffers(case, n)
    rule = RULES[case.rule]
    fn = getattr(fastopt, rule.name + "_")
    param = bufs.param.astype(_dtype(config.param))
    grad = bufs.grad.astype(_dtype(config.grad))
    signed = {b.name: b.signed for b in rule.buffers}

    def stored(name):
        values = bufs.state[name]
        if config.state == "int8":
            return fastopt.Int8State.from_float(values, signed[name])
        return values.astype(_dtype(config.state))
    state = [stored(name) if name in bufs.state else None for name in rule.state]
    kwargs = dict(case.options, backend=backend)
    if config.master:
        kwargs["master_param"] = bufs.param
    counter = [0]

    def call():
        counter[0] += 1
        fn(param, grad, *state, step=counter[0], **kwargs)
    return call


def _torch_calls(case: Case, n: int) -> Optional[list[tuple[str, Config, Callable[[], None]]]]:
    """torch fused fp32, and torch's way of stepping bf16 params with fp32 master weights."""
    import torch

    from .competitors import torch_call, torch_class, torch_variant

    got = torch_call(case, make_buffers(case, n))
    if got is None:
        return None
    variant, fp32_step = got
    bufs = make_buffers(case, n)
    master = torch.nn.Parameter(torch.from_numpy(bufs.param))
    param = master.detach().to(torch.bfloat16)
    grad = torch.from_numpy(bufs.grad).to(torch.bfloat16)
    cls = torch_class(case.rule)
    opt = cls([master], **case.hyper, **{torch_variant(cls, case.hyper): True})

    def master_step():
        master.grad = grad.float()  # (torch's AMP keeps bf16 grads; the fp32 step needs fp32 ones)
        opt.step()
        param.copy_(master)  # the bf16 model's weights from the master
    master_step()  # torch's state
    return [(f"torch {variant} fp32", CONFIGS[0], fp32_step),
            (f"torch master ({variant})", CONFIGS[2], master_step)]


def _bitsandbytes_call(case: Case, n: int) -> Optional[tuple[str, Config, Callable[[], None]]]:
    """bitsandbytes' 8-bit optimizer of the rule (``bnb.optim.<Title>8bit``: blockwise, its
    dynamic maps) on the CPU, stepping a parameter of ``n`` elements; None when
    bitsandbytes is not installed or has no 8-bit class of the rule."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return None
    cls = getattr(bnb.optim, RULES[case.rule].title + "8bit", None)
    if cls is None:
        return None
    bufs = make_buffers(case, n)
    param = torch.nn.Parameter(torch.from_numpy(bufs.param))
    param.grad = torch.from_numpy(bufs.grad)
    takes = inspect.signature(cls).parameters
    opt = cls([param], **{k: v for k, v in case.hyper.items() if k in takes})  # (it has no maximize=, ...)
    opt.step()  # (its state)
    config = next(c for c in CONFIGS if c.state == "int8")
    return f"bitsandbytes {cls.__name__}", config, opt.step


def run(case: Case, sizes: Sequence[int], backends: Sequence[str], timer: TimerSettings = DEFAULT,
        progress: Optional[Callable[[str], None]] = None, torch: bool = True,
        configs: Sequence[Config] = CONFIGS) -> list[FormatRow]:
    """Time every configuration on every backend, and the torch peers, per size
    (``configs``: which of :data:`CONFIGS`; the fp32 one should be among them, as the baseline)."""
    nstate = len(case.state)
    rows = []
    for n in sizes:
        timed: list[tuple[str, Config, Callable[[], None]]] = []
        for backend in backends:
            timed += [(backend, c, _fastopt_call(case, n, c, backend)) for c in configs]
        if torch:
            try:
                timed += _torch_calls(case, n) or []
            except ImportError:
                pass
            if any(c.state == "int8" for c in configs):
                timed += [got for got in (_bitsandbytes_call(case, n),) if got is not None]
        if progress:
            progress(f"formats {case.name} {format_size(n)}: {len(timed)} configurations")
        measured = measure_interleaved([call for _, _, call in timed], timer)
        rows += [FormatRow(case.name, n, impl, c.name, m.median,
                           # torch master: + the grad's upcast (2 read, 4 written) and the copy (4 read, 2 written),
                           # less the bf16 param's write counted in the config (the copy writes it)
                           c.bytes_moved(nstate) + (12 - 2 + 2 if impl.startswith("torch master") else 0),
                           c.bytes_kept(nstate))
                 for (impl, c, _), m in zip(timed, measured)]
    return rows


def table(rows: Sequence[FormatRow], markdown: bool = False) -> str:
    """One line per (size, implementation, configuration): ns/elem, bytes, and the speedups
    over the same implementation's fp32 row, over torch fused fp32 and (8-bit rows, when
    it ran) over bitsandbytes' 8-bit optimizer."""
    head = ["case", "elements", "impl", "formats", "ns/elem", "bytes moved/elem", "bytes kept/param",
            "x own fp32", "x torch fp32", "x bitsandbytes"]
    body = []
    for r in rows:
        same = [o for o in rows if o.size == r.size]
        own = next((o for o in same if o.impl == r.impl and o.config == "fp32"), None)
        peer = next((o for o in same if o.impl.startswith("torch") and o.impl.endswith("fp32")), None)
        bnb = next((o for o in same if o.impl.startswith("bitsandbytes")), None) if r.config == "int8 state" else None
        body.append([r.case, format_size(r.size), r.impl, r.config, f"{r.seconds / r.size * 1e9:.3f}",
                     f"{r.bytes_moved:.4g}", f"{r.bytes_kept:.4g}",
                     f"{own.seconds / r.seconds:.2f}x" if own else "",
                     f"{peer.seconds / r.seconds:.2f}x" if peer else "",
                     f"{bnb.seconds / r.seconds:.2f}x" if bnb else ""])
    return simple_table(head, body, markdown)


def select(state: Optional[str] = None, param_dtype: Optional[str] = None) -> list[Config]:
    """The configurations with this state dtype and param dtype (None: any), and the fp32 baseline."""
    chosen = [c for c in CONFIGS if (state is None or c.state == state) and (param_dtype is None or c.param == param_dtype)]
    return [CONFIGS[0], *(c for c in chosen if c is not CONFIGS[0])]
