"""``python -m fastopt bench --plot out.svg``: the run's ns/element against size, as a figure.

The tables give one number per size and implementation; the figure shows the
shape of the curve, which is what the bench is about: an optimizer update is
memory bound, so at large sizes every good implementation should sit on the
roofline, and the gaps that remain are in cache (mid sizes: math is the limit)
and on small calls (per-call overhead, which ns/element makes visible as a
rise on the left).

What it draws, from the rows the runner already measured (nothing is timed
here): one panel per case of the run (``adamw``, ``adamw-amsgrad``, ...; a run
has one dtype, ``--dtype``, named in every title), x the element count on a
log2 axis, y the median ns per element on a log axis (lower is faster), one
line with markers per implementation that has measurements (fastopt's
backends, the NumPy reference, torch fused or foreach, any other competitor),
in the order they ran, and the roofline as a black dashed line labelled
``roofline``. A row that failed leaves its point out. The check rows (CPU
``memcpy``, CUDA ``kernel``) are not drawn: they move other bytes and only
vouch for the roofline. The roofline is drawn as the time the case's own bytes
take at the roofline's GB/s, which on the CPU is its measured ns/element and on
CUDA (where the roofline is a device-to-device copy, fewer bytes) converts the
copy's bandwidth into the update's bound, as the ``% roofline`` column does.

matplotlib is an optional dependency (``pip install "fastopt[plot]"``): it is
imported only when a figure is made, never by ``import fastopt`` or a bench
run without ``--plot``. The figure is built with the object API (``Figure``,
no pyplot, no GUI backend) and saved in the format its suffix names; SVG text
stays text (``svg.fonttype = none``) and the file carries no date, so the same
results give the same file.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .cases import format_size
from .runner import Result

if TYPE_CHECKING:  # only for the annotations: importing this module never imports matplotlib
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "MIN_MATPLOTLIB", "INSTALL_HINT", "PlotError", "check", "figure", "save", "write"]

#: Suffixes :func:`write` accepts (the format follows from the suffix).
FORMATS = (".svg", ".png", ".pdf")
MIN_MATPLOTLIB = (3, 8)
INSTALL_HINT = 'pip install "fastopt[plot]"'

#: Row kinds drawn as lines (``check`` rows, memcpy and the CUDA trivial kernel, are not).
_DRAWN = ("roofline", "backend", "competitor")
_ROOFLINE_STYLE = dict(color="black", linestyle="--", marker=".", linewidth=1.5, zorder=3)


class PlotError(RuntimeError):
    """``--plot`` cannot work here (matplotlib missing or too old, unknown format); the message says why."""


def check(path: Optional[str] = None) -> None:
    """Raise :class:`PlotError` unless a figure can be written (to ``path``, when given).

    Called by the CLI before anything is timed, so that a missing matplotlib
    costs no benchmark run.
    """
    if path is not None:
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in FORMATS:
            raise PlotError(f"--plot {path}: the format comes from the suffix, expected one of "
                            f"{', '.join(FORMATS)}, got {suffix or 'none'!r}")
    try:
        import matplotlib
    except Exception as exc:  # not installed (ImportError), or broken
        raise PlotError(f"--plot needs matplotlib, which is not importable here ({type(exc).__name__}: {exc}); "
                        f"install it with: {INSTALL_HINT}") from None
    version = getattr(matplotlib, "__version__", "0")
    try:
        got = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        got = MIN_MATPLOTLIB  # a development build: let it try
    if got < MIN_MATPLOTLIB:
        want = ".".join(map(str, MIN_MATPLOTLIB))
        raise PlotError(f"--plot needs matplotlib>={want}, found {version}; install it with: {INSTALL_HINT}")


def _size_label(n: int) -> str:
    return f"$2^{{{n.bit_length() - 1}}}$" if format_size(n).startswith("2^") else str(n)


def _line_label(impl: str, rows: Sequence[Result]) -> str:
    """The legend entry: ``roofline``; else the name with its variant when it is one for all
    sizes and says more than the name (``torch (fused)``)."""
    if impl == "roofline":
        return "roofline"
    variants = {r.variant for r in rows}
    variant = variants.pop() if len(variants) == 1 else ""
    return impl if not variant or variant == impl else f"{impl} ({variant})"


def _ns(r: Result, case_bytes: int) -> float:
    """ns per element of ``r``; the roofline's as the case's bytes at its bandwidth."""
    if r.kind == "roofline":
        return case_bytes / r.gbps
    return r.ns_per_elem


def series(results: Sequence[Result], meta: dict[str, Any]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{case: {implementation: (sizes, ns per element)}}``: what :func:`figure` draws,
    cases and implementations in run order, sizes ascending, failed rows left out."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for r in results:
        if r.kind not in _DRAWN or r.measurement is None:
            continue
        case_bytes = meta["cases"][r.case.name]["bytes_per_elem"]
        sizes, ns = out.setdefault(r.case.name, {}).setdefault(r.impl, ([], []))
        sizes.append(r.size)
        ns.append(_ns(r, case_bytes))
    for lines in out.values():
        for impl, (sizes, ns) in lines.items():
            order = sorted(range(len(sizes)), key=sizes.__getitem__)
            lines[impl] = ([sizes[i] for i in order], [ns[i] for i in order])
    return out


def figure(results: Sequence[Result], meta: dict[str, Any]) -> "Figure":
    """The figure for a run's ``results`` and ``meta`` (what :func:`fastopt.bench.runner.run` returns)."""
    check()
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, NullLocator

    data = series(results, meta)
    if not data:
        raise PlotError("nothing to plot: no row of this run has a measurement")
    rows_of: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        rows_of.setdefault((r.case.name, r.impl), []).append(r)
    impls = [i for lines in data.values() for i in lines if i != "roofline"]
    palette = ["C%d" % k for k in range(10)]
    color = {impl: palette[k % len(palette)] for k, impl in enumerate(dict.fromkeys(impls))}

    n = len(data)
    ncols = 1 if n == 1 else 2 if n <= 4 else 3
    nrows = -(-n // ncols)
    fig = Figure(figsize=(6.4 * ncols if ncols == 1 else 5.4 * ncols, 4.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    threads = meta.get("threads", {}).get("fastopt", "?")
    for ax, (name, lines) in zip(axes, data.items()):
        case = rows_of[name, next(iter(lines))][0].case
        for impl, (sizes, ns) in lines.items():
            style = _ROOFLINE_STYLE if impl == "roofline" else dict(color=color[impl], marker="o", markersize=4,
                                                                    linewidth=1.5, zorder=2)
            (line,) = ax.plot(sizes, ns, label=_line_label(impl, rows_of[name, impl]), **style)
            line.set_gid(f"line-{name}-{impl}")  # the SVG group's id: names each line in the file
        sizes = sorted({s for xs, _ in lines.values() for s in xs})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [_size_label(s) for s in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(sizes) > 1:
            ax.set_xlim(sizes[0] / 2 ** 0.4, sizes[-1] * 2 ** 0.4)
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", axis="y", alpha=0.1)
        ax.set_title(f"{name}: fastopt.{case.describe()}, {meta['cases'][name]['bytes_per_elem']} B/elem",
                     fontsize="medium")
        ax.set_xlabel("elements (log2 scale)")
        ax.set_ylabel("ns per element (median; lower is faster)")
        ax.legend(fontsize="small")
    for ax in axes[n:]:
        ax.set_visible(False)
    v = meta.get("versions", {})
    fig.suptitle(f"fastopt {v.get('fastopt', '')} bench: {meta.get('machine', '')}, {meta.get('cores', '?')} cores, "
                 f"{meta.get('device', 'cpu')}, {meta.get('dtype', '')}, {threads} thread{'s' * (threads != 1)}, "
                 f"{str(meta.get('date', ''))[:10]}", fontsize="medium")
    return fig


def save(fig: "Figure", path: str) -> None:
    """Write ``fig`` to ``path`` in the format of its suffix (:data:`FORMATS`)."""
    check(path)
    import matplotlib

    suffix = os.path.splitext(path)[1].lower()
    metadata = {".svg": {"Date": None}, ".pdf": {"CreationDate": None}}.get(suffix)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fastopt"}):
        fig.savefig(path, format=suffix[1:], metadata=metadata, dpi=150 if suffix == ".png" else "figure")


def write(results: Sequence[Result], meta: dict[str, Any], path: str) -> None:
    """:func:`figure` of the run, saved to ``path``."""
    check(path)
    save(figure(results, meta), path)
