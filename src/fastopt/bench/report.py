"""The benchmark's output: one table per case (terminal or Markdown) and a JSON document.

Table columns: size, implementation (with the variant that ran: roofline
threads, torch fused/foreach), ns per element, GB/s, % of the roofline's GB/s,
speedup over the NumPy reference and over torch (time ratios; blank for rows
that move other bytes, such as a copy).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Optional, Sequence

from .cases import format_size
from .runner import Result

__all__ = ["tables", "list_tables", "header", "to_json", "COLUMNS", "LIST_COLUMNS"]

COLUMNS = ("size", "impl", "ns/elem", "GB/s", "% roofline", "x numpy", "x torch")
_RIGHT = (False, False, True, True, True, True, True)


def _ns(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _speedup(x: Optional[float]) -> str:
    if x is None:
        return ""
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def _label(r: Result) -> str:
    return r.impl if not r.variant or r.variant == r.impl else f"{r.impl} ({r.variant})"


#: A row whose median is this much slower than its fastest measurement is marked noisy.
NOISY = 1.5


def _noisy(r: Result) -> bool:
    return r.measurement is not None and r.measurement.median > NOISY * r.measurement.best


def _cells(r: Result) -> list[str]:
    if r.measurement is None:
        return [_label(r), "error", "", "", "", ""]  # the message goes below the table
    return [_label(r), _ns(r.ns_per_elem) + ("*" if _noisy(r) else ""), f"{r.gbps:.1f}",
            "" if r.pct_roofline is None else f"{r.pct_roofline:.0f}%",
            _speedup(r.x_numpy), _speedup(r.x_torch)]


def _render(rows: list[list[str]], markdown: bool, columns: Sequence[str] = COLUMNS,
            right_aligned: Sequence[bool] = _RIGHT, always: int = 5) -> list[str]:
    # Columns past the first ``always`` are left out of a table where no row has
    # one (the speedups: no torch for this rule, no NumPy baseline on a GPU).
    keep = [i for i in range(len(columns)) if i < always or any(row and row[i] for row in rows)]
    names = [columns[i] for i in keep]
    right = [right_aligned[i] for i in keep]
    rows = [[row[i] for i in keep] if row else row for row in rows]
    if markdown:
        out = ["| " + " | ".join(names) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in rows if row]
        return out
    widths = [max(len(c), *(len(row[i]) for row in rows if row)) for i, c in enumerate(names)]

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()
    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(row) if row else "" for row in rows]
    return out


def simple_table(head: Sequence[str], body: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """A table of the modes with a fixed set of columns (``--denormal``,
    ``--training-step``): right-aligned text, or Markdown."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in [head, *body]]
    return "\n".join(lines) + "\n"


def tables(results: Sequence[Result], meta: dict[str, Any], markdown: bool = False) -> str:
    """One table per case, rows grouped by size, in the order they ran."""
    out: list[str] = []
    cases: dict[str, list[Result]] = {}
    for r in results:
        cases.setdefault(r.case.name, []).append(r)
    threads = meta.get("threads", {}).get("fastopt", "?")
    for name, rs in cases.items():
        case = rs[0].case
        info = meta["cases"][name]
        title = (f"{name}: fastopt.{case.describe()}, {meta['dtype']}, {info['bytes_per_elem']} B/elem, "
                 f"{meta['device']}, {threads} thread{'s' * (threads != 1)}")
        out += [f"### {title}" if markdown else title, ""]
        rows: list[list[str]] = []
        last_size = None
        for r in rs:
            if r.size != last_size and last_size is not None and not markdown:
                rows.append([])  # a blank line between sizes
            size = format_size(r.size) if r.size != last_size else ""
            rows.append([size, *_cells(r)])
            last_size = r.size
        out += _render(rows, markdown)
        if markdown and (any(r.error for r in rs) or any(map(_noisy, rs))):
            out.append("")  # end the Markdown table before the notes
        out += [f"error: {r.impl} at {format_size(r.size)}: {r.error}" for r in rs if r.error]
        if any(map(_noisy, rs)):
            out.append(f"* noisy: the median measurement is over {NOISY}x the fastest (a busy machine?); "
                       "the JSON has both")
        out.append("")
    return "\n".join(out)


LIST_COLUMNS = ("layout", "tensors", "elements", "backend", "list", "flat", "list/flat", "extra/tensor")
_LIST_RIGHT = (False, True, True, False, True, True, True, True)


def _time(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(seconds) >= scale:
            break
    else:
        unit, scale = "ns", 1e-9
    x = seconds / scale
    return f"{x:.3g} {unit}" if abs(x) < 100 else f"{x:.0f} {unit}"


def list_tables(results: Sequence[Any], meta: dict[str, Any], markdown: bool = False) -> str:
    """The list-of-tensors case (:mod:`.lists`): one table per case, a row per layout x
    backend with the list call's and the flat call's median time, their ratio, and
    the extra time per tensor."""
    out: list[str] = []
    cases: dict[str, list[Any]] = {}
    for r in results:
        cases.setdefault(r.case.name, []).append(r)
    threads = meta.get("threads", {}).get("fastopt", "?")
    for name, rs in cases.items():
        case = rs[0].case
        title = (f"{name} lists: fastopt.{case.describe()} on a list of tensors vs one flat buffer of the same "
                 f"total, {meta['dtype']}, {threads} thread{'s' * (threads != 1)}")
        out += [f"### {title}" if markdown else title, ""]
        rows: list[list[str]] = []
        last = None
        for r in rs:
            if r.layout != last and last is not None and not markdown:
                rows.append([])
            first = r.layout != last
            lay = [r.layout.name, str(r.layout.count), format_size(r.layout.total)] if first else ["", "", ""]
            if r.error:
                rows.append([*lay, r.backend, "error", "", "", ""])
            else:
                noisy = any(m.median > NOISY * m.best for m in (r.list, r.flat))
                rows.append([*lay, r.backend, _time(r.list.median) + ("*" if noisy else ""), _time(r.flat.median),
                             f"{r.ratio:.2f}x", _time(r.per_tensor)])
            last = r.layout
        out += _render(rows, markdown, LIST_COLUMNS, _LIST_RIGHT, always=len(LIST_COLUMNS))
        if markdown and any(r.error for r in rs):
            out.append("")
        out += [f"error: {r.backend} on {r.layout.name}: {r.error}" for r in rs if r.error]
        if any(not r.error and any(m.median > NOISY * m.best for m in (r.list, r.flat)) for r in rs):
            out.append(f"* noisy: a median measurement is over {NOISY}x the fastest; the JSON has both")
        out.append("")
    return "\n".join(out)


def header(meta: dict[str, Any], markdown: bool = False) -> str:
    """What the numbers depend on, in a few lines."""
    v = meta["versions"]
    lines = [f"fastopt {v['fastopt']} bench: {meta['machine']}, {meta['cores']} cores, device {meta['device']}, "
             f"{meta['dtype']}",
             "threads: " + ", ".join(f"{k} {n}" for k, n in meta["threads"].items())
             + "; versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "fastopt"),
             ("list: one call over the layout's tensors; flat: one call on one buffer per role of the same "
              "total; measured in turn, medians; extra/tensor = (list - flat) / tensors" if "lists" in meta else
              ("roofline: a device-to-device copy (2 x itemsize bytes per element)" if meta["device"] == "cuda"
               else "roofline: the same bytes read+written per element with trivial math")
              + ", timed in this run; % roofline = GB/s / roofline GB/s; "
              "x numpy, x torch = time ratios (higher is faster)")]
    for name, text in meta.get("backends", {}).items():
        lines.append(f"backend {name}: {text}")
    if meta.get("env"):
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in meta["env"].items()))
    for name, reason in meta.get("skipped", {}).items():
        lines.append(f"not run: {name}: {reason}")
    if markdown:
        return "\n".join(f"> {line}  " for line in lines) + "\n"
    return "\n".join(lines) + "\n"


def to_json(results: Iterable[Result], meta: dict[str, Any]) -> str:
    return json.dumps({"meta": meta, "results": [r.to_dict() for r in results]}, indent=1)
