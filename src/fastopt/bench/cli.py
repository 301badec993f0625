"""``python -m fastopt bench``: time every rule against the roofline, NumPy and torch.

Examples::

    python -m fastopt bench                                   # every rule, 2^10..2^24
    python -m fastopt bench --rules adamw --sizes 2^16,2^20,2^24
    python -m fastopt bench --rules adam-amsgrad,sgd --threads 1 --json out.json
    python -m fastopt bench --device cuda --sizes 2^24,2^26   # copy roofline, torch CUDA
    python -m fastopt bench --quick --markdown                # few repeats, paste-able tables
    python -m fastopt bench --rules adamw --plot adamw.svg    # also ns/elem against size as a figure
    python -m fastopt bench --lists                           # adamw_: list of tensors vs one flat buffer
    python -m fastopt bench --lists --rules adamw,lion --layouts gpt,1000x1024 --sizes 2^20,2^24
    python -m fastopt bench --denormal                        # subnormal state, flush off and on
    python -m fastopt bench --overhead                        # one 2^10 AdamW update, layer by layer, in us
    python -m fastopt bench --training-step                   # unscale + clip + AdamW: torch's way vs folded
    python -m fastopt bench --formats                         # bf16 state, bf16 params + fp32 master vs fp32
    python -m fastopt bench --state bfloat16 --sizes 2^24     # only the bf16-state configurations
    python -m fastopt bench --muon                            # Muon steps at matrix shapes vs torch.optim.Muon
    python -m fastopt bench --adafactor                       # Adafactor steps at matrix shapes vs torch's
    python -m fastopt bench --schedulefree                    # schedule-free AdamW/SGD vs the schedulefree package
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .cases import CASES, DEFAULT_SIZES, HUGE_SIZE, format_size, parse_sizes, select_cases
from .timing import DEFAULT, QUICK

__all__ = ["main", "parser"]


def _comma_list(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fastopt bench",
        description="Time fastopt's backends against a roofline kernel, the NumPy reference and torch.optim, "
                    "in one run, on the same buffers. Prints one table per rule configuration.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples::", 1)[1])
    ap.add_argument("--rules", default=None, metavar="LIST",
                    help="rules or cases, comma separated (a rule selects all its cases, e.g. sgd = sgd,sgd-momentum); "
                         "default all: "
                         + ",".join(CASES))
    ap.add_argument("--sizes", default=None, metavar="LIST",
                    help="element counts, comma separated: 2^20, 1M (= 2^20), 64k, 1048576; default "
                         + ",".join(map(format_size, DEFAULT_SIZES)))
    ap.add_argument("--huge", action="store_true",
                    help=f"also run {format_size(HUGE_SIZE)} (AMSGrad fp32: 5 buffers x 256 MB); "
                         "same as FASTOPT_BENCH_HUGE=1")
    ap.add_argument("--backends", default=None, metavar="LIST",
                    help="fastopt backends to time (numpy, numba, c, cuda); default every one available on "
                         "the device. The NumPy reference always runs on the CPU: it is the x-numpy baseline")
    ap.add_argument("--competitors", default="torch", metavar="LIST",
                    help="torch or none (default: %(default)s); the NumPy reference always runs as the numpy row")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="threads for the CPU backends, the roofline and torch (default: fastopt's, from "
                         "FASTOPT_NUM_THREADS / OMP_NUM_THREADS or the usable cores)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every measurement as JSON")
    ap.add_argument("--plot", default=None, metavar="FILE",
                    help="also draw ns/elem against size, a line per implementation and the roofline dashed, "
                         "one panel per case (.svg, .png or .pdf; needs matplotlib: pip install \"fastopt[plot]\")")
    ap.add_argument("--quick", action="store_true", help="few, short repeats (a smoke run, noisier numbers)")
    ap.add_argument("--repeats", type=int, default=None, metavar="N", help="measurements per row (default 7)")
    ap.add_argument("--lists", action="store_true",
                    help="time one call over a list of tensors against one call on a flat buffer of the same total "
                         "(default rule adamw; the gpt layout's total is --sizes, default 2^24), on each CPU backend")
    ap.add_argument("--layouts", default=None, metavar="LIST",
                    help="with --lists: gpt (a small GPT's 76 tensors, scaled to each of --sizes) and NxM "
                         "(N tensors of M elements), comma separated; default gpt,1000x1024")
    ap.add_argument("--denormal", action="store_true",
                    help="time normal state against subnormal state (1e-39, zero gradients) without and with "
                         "fastopt.set_flush_denormal(True) (torch: torch.set_flush_denormal), in one run "
                         "(default rule adamw, size 2^20)")
    ap.add_argument("--overhead", action="store_true",
                    help="time one 2^10 float32 AdamW update through each layer (the C kernel, adamw_, "
                         "AdamW.step(), fastopt.torch, torch fused/foreach) in one run, against the goals")
    ap.add_argument("--muon", action="store_true",
                    help="time fastopt.muon_ against torch.optim.Muon at matrix shapes (--shapes, default "
                         "1024x1024,4096x1024,768x3072), float32, on each CPU backend, with the Newton-Schulz "
                         "iteration alone, in one run")
    ap.add_argument("--schedulefree", action="store_true",
                    help="time fastopt.adamw_schedulefree_/sgd_schedulefree_ against the schedulefree package "
                         "(pip install schedulefree) and the roofline, float32, on each CPU backend (--sizes, "
                         "default 2^20,2^24), in one run")
    ap.add_argument("--adafactor", action="store_true",
                    help="time fastopt.adafactor_ against torch.optim.Adafactor at matrix shapes (--shapes, default "
                         "1024x1024,4096x1024,50257x768), float32, on each CPU backend, in one run")
    ap.add_argument("--shapes", default=None, metavar="LIST",
                    help="with --muon or --adafactor: RxC matrix shapes, comma separated")
    ap.add_argument("--training-step", action="store_true",
                    help="time torch's unscale_ + clip_grad_norm_ + AdamW(fused=True) against fastopt's folded "
                         "step (norm pass + adamw_ with grad_multiplier), on a flat buffer and a small GPT's "
                         "tensors (--sizes, default 2^24 and 50M), on each CPU backend (--backends, default c,numba)")
    ap.add_argument("--formats", action="store_true",
                    help="time the storage formats (fastopt.formats: bf16 state, bf16 params and grads with an fp32 "
                         "master copy, pure bf16, 8-bit state) against fp32, torch fused fp32 and torch's master-weight step, "
                         "in one run (default rule adamw, sizes 2^24,2^26)")
    ap.add_argument("--state", choices=("float32", "bfloat16", "int8"), default=None,
                    help="with --formats (implied): only the configurations with this state dtype, and fp32")
    ap.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                    help="with --formats (implied): only the configurations with this param dtype, and fp32")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return ap


class _Progress:
    """Progress lines on stderr; rewritten in place on a terminal."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        if self.tty and not text.startswith(" "):
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(("\n" if self.tty else "") + text + "\n")
            self.width = 0
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.lists:
            from .lists import DEFAULT_TOTAL
            cases = select_cases(args.rules) if args.rules else [CASES["adamw"]]
            sizes = list(parse_sizes(args.sizes)) if args.sizes else [DEFAULT_TOTAL]
        else:
            cases = select_cases(args.rules)
            sizes = list(parse_sizes(args.sizes))
    except ValueError as exc:
        parser().error(str(exc))
    if args.layouts and not args.lists:
        parser().error("--layouts needs --lists")
    if args.plot:  # before anything is timed: a missing matplotlib must not cost a run
        from . import plot
        if (args.lists or args.denormal or args.training_step or args.overhead or args.muon or args.adafactor
                or args.schedulefree):
            parser().error("--plot draws the size sweep; not with --lists, --denormal, --training-step or --overhead")
        try:
            plot.check(args.plot)
        except plot.PlotError as exc:
            parser().error(str(exc))
    if (args.huge or os.environ.get("FASTOPT_BENCH_HUGE") == "1") and HUGE_SIZE not in sizes:
        sizes.append(HUGE_SIZE)
    timer = QUICK if args.quick else DEFAULT
    if args.repeats:
        timer = type(timer)(**{**vars(timer), "repeats": args.repeats, "min_repeats": min(timer.min_repeats,
                                                                                           args.repeats)})
    competitors = [] if args.competitors.strip() == "none" else _comma_list(args.competitors)
    if args.threads is not None and args.threads < 1:
        parser().error(f"--threads must be >= 1, got {args.threads}")

    if args.device == "cuda":
        from ..dispatch import backends
        cuda = backends()["cuda"]
        if not cuda.available:
            parser().error(f"--device cuda needs the cuda backend, which is unavailable here: {cuda.reason}")

    # Imported here so that --help does not pay for numba and torch.
    from . import report, runner

    progress = None if args.quiet else _Progress()
    if args.formats or args.state or args.param_dtype:
        return _main_formats(args, timer, progress, competitors)
    if args.lists:
        return _main_lists(args, cases, sizes, timer, progress)
    if args.denormal:
        return _main_denormal(args, timer, progress, competitors)
    if args.muon or args.adafactor:
        return _main_muon(args, timer, progress, competitors)
    if args.schedulefree:
        return _main_schedulefree(args, timer, progress, competitors)
    if args.training_step:
        return _main_training_step(args, timer, progress)
    if args.overhead:
        return _main_overhead(args, timer, progress)
    config = runner.Config(cases=cases, sizes=sizes, dtype=args.dtype, device=args.device,
                           backends=_comma_list(args.backends) if args.backends else None,
                           competitors=competitors, threads=args.threads, timer=timer, progress=progress)
    try:
        results, meta = runner.run(config)
    except ValueError as exc:
        parser().error(str(exc))
    finally:
        if progress:
            progress.close()
    status = _report(args, results, meta, report.tables)
    if args.plot:
        plot.write(results, meta, args.plot)
        if not args.quiet:
            print(f"wrote {args.plot}", file=sys.stderr)
    return status


def _report(args, results, meta, tables) -> int:
    """Print the header and ``tables(results, meta, markdown)``, write ``--json``;
    the exit status says whether any row failed."""
    from . import report

    print(report.header(meta, args.markdown))
    print(tables(results, meta, args.markdown), end="")
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json(results, meta) + "\n")
        if not args.quiet:
            print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def _compiled_cpu_backends(args) -> list[str]:
    """``--backends``, or the compiled CPU backends that load here (c, numba): what the
    ``--denormal`` and ``--training-step`` modes time."""
    import fastopt

    if args.backends:
        return _comma_list(args.backends)
    available = [n for n, i in fastopt.backends().items() if i.available and i.device == "cpu"]
    return [b for b in ("c", "numba") if b in available]


def _main_formats(args, timer, progress, competitors) -> int:
    """``--formats``: the storage formats against fp32 and the peers (:mod:`.formats`)."""
    import json

    from . import formats, runner

    if args.device != "cpu" or args.dtype != "float32":
        parser().error("--formats runs on the CPU backends (its fp32 baseline is --dtype float32)")
    case = select_cases(args.rules)[0] if args.rules else CASES["adamw"]
    sizes = list(parse_sizes(args.sizes)) if args.sizes else [1 << 24, 1 << 26]
    threads = runner.apply_threads(args.threads)
    try:
        rows = formats.run(case, sizes, _compiled_cpu_backends(args), timer, progress,
                           torch="torch" in competitors, configs=formats.select(args.state, args.param_dtype))
    finally:
        if progress:
            progress.close()
    print(f"threads: {threads}; {case.describe()}; stochastic rounding for bf16 state and master-less bf16 params")
    print(formats.table(rows, args.markdown), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    return 0


def _cpu_float32(args, mode: str) -> None:
    if args.device != "cpu" or args.dtype != "float32":
        parser().error(f"--{mode} runs float32 on the CPU backends")


def _report_rows(args, progress, run, header, table) -> int:
    """The end of each CPU mode: ``run()``'s rows, then ``header()`` and ``table(rows)``
    printed, and the rows as JSON (``--json``)."""
    import json

    try:
        rows = run()
    finally:
        if progress:
            progress.close()
    print(header())
    print(table(rows), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    return 0


def _main_muon(args, timer, progress, competitors) -> int:
    """``--muon``, ``--adafactor``: a matrix rule's steps at matrix shapes against torch's (:mod:`.matrix`)."""
    import fastopt
    from . import matrix

    rule = "muon" if args.muon else "adafactor"
    _cpu_float32(args, rule)
    shapes = matrix.SHAPES if rule == "muon" else matrix.ADAFACTOR_SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(x) for x in s.lower().split("x")) for s in _comma_list(args.shapes)]
        except ValueError:
            parser().error(f"--shapes: expected RxC shapes such as 1024x1024, got {args.shapes!r}")
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            parser().error(f"--shapes: expected RxC shapes of positive sizes, got {args.shapes!r}")
    if args.threads is not None:
        fastopt.set_num_threads(args.threads)
        if "torch" in competitors:
            import torch
            torch.set_num_threads(args.threads)
    anchor = "torch.optim.Muon's defaults, lr 0.02" if rule == "muon" else \
        "torch.optim.Adafactor's defaults (foreach=False)"
    return _report_rows(args, progress,
                   lambda: matrix.run(_compiled_cpu_backends(args), shapes, timer, progress,
                                      torch="torch" in competitors, rule=rule),
                   lambda: f"threads: fastopt {fastopt.get_num_threads()}; {rule} float32, {anchor}",
                   lambda rows: matrix.table(rows, args.markdown, "iteration" if rule == "muon" else "statistics"))


def _main_schedulefree(args, timer, progress, competitors) -> int:
    """``--schedulefree``: the schedule-free rules against the schedulefree package (:mod:`.schedule_free`)."""
    import fastopt
    from . import roofline, schedule_free

    _cpu_float32(args, "schedulefree")
    sizes = parse_sizes(args.sizes) if args.sizes else [1 << 20, 1 << 24]
    if args.threads is not None:
        fastopt.set_num_threads(args.threads)
    roofline.set_threads(fastopt.get_num_threads())
    if "torch" in competitors:
        import torch
        torch.set_num_threads(fastopt.get_num_threads())
    return _report_rows(args, progress,
                   lambda: schedule_free.run(_compiled_cpu_backends(args), sizes, timer, progress,
                                             peers="torch" in competitors),
                   lambda: f"threads: fastopt, roofline and torch {fastopt.get_num_threads()}; float32; package: "
                           "the faster of foreach=True/False",
                   lambda rows: schedule_free.table(rows, args.markdown))


def _main_denormal(args, timer, progress, competitors) -> int:
    """``--denormal``: subnormal state with and without flushing (:mod:`.denormal`)."""
    import fastopt
    from . import denormal

    _cpu_float32(args, "denormal")
    cases = select_cases(args.rules) if args.rules else [CASES["adamw"]]
    size = parse_sizes(args.sizes)[0] if args.sizes else 1 << 20
    backends = _compiled_cpu_backends(args)
    if args.threads is not None:
        fastopt.set_num_threads(args.threads)
    return _report_rows(args, progress,
                   lambda: denormal.run(cases, size, backends, timer, progress, torch="torch" in competitors),
                   lambda: f"threads: {fastopt.get_num_threads()}; subnormal state = {denormal.SUBNORMAL:g}, "
                           "zero gradients",
                   lambda rows: denormal.table(rows, args.markdown))


def _main_training_step(args, timer, progress) -> int:
    """``--training-step``: unscale + clip + AdamW, torch's way and folded (:mod:`.training_step`)."""
    import json

    import fastopt
    from . import training_step

    if args.device != "cpu" or args.dtype != "float32":
        parser().error("--training-step runs float32 on the CPU backends")
    sizes = parse_sizes(args.sizes) if args.sizes else [1 << 24, 50_000_000]
    backends = _compiled_cpu_backends(args)
    if args.threads is not None:
        fastopt.set_num_threads(args.threads)
        import torch
        torch.set_num_threads(args.threads)
    try:
        rows = training_step.run(["flat", "gpt"], sizes, backends, timer, progress)
    finally:
        if progress:
            progress.close()
    print(f"threads: {fastopt.get_num_threads()}; torch: unscale_ + clip_grad_norm_ + AdamW(fused=True) "
          f"({training_step.TORCH_BYTES} B/elem); fastopt: total_norm + adamw_(grad_multiplier=) "
          f"({training_step.FASTOPT_BYTES} B/elem)")
    print(training_step.table(rows, args.markdown), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    return 0


def _main_lists(args, cases, sizes, timer, progress) -> int:
    """``--lists``: the list-of-tensors case (:mod:`.lists`)."""
    from . import lists, report

    if args.device != "cpu":
        parser().error("--lists runs on the CPU backends; drop --device cuda")
    try:
        layouts = lists.parse_layouts(args.layouts, sizes)
        config = lists.ListConfig(cases=cases, layouts=layouts, dtype=args.dtype,
                                  backends=_comma_list(args.backends) if args.backends else None,
                                  threads=args.threads, timer=timer, progress=progress)
        results, meta = lists.run(config)
    except ValueError as exc:
        parser().error(str(exc))
    finally:
        if progress:
            progress.close()
    return _report(args, results, meta, report.list_tables)


def _main_overhead(args, timer, progress) -> int:
    """``--overhead``: one small update through every layer (:mod:`.overhead`)."""
    import json

    import fastopt
    from . import overhead

    if args.device != "cpu" or args.dtype != "float32":
        parser().error("--overhead runs float32 on the CPU")
    if args.threads is not None:
        fastopt.set_num_threads(args.threads)
    try:
        rows = overhead.run(timer, progress)
    finally:
        if progress:
            progress.close()
    print(f"threads: {fastopt.get_num_threads()}; backend: {fastopt.dispatch.select(None, False).name}; "
          f"{overhead.SIZE} float32 elements, median us per call")
    print(overhead.table(rows, args.markdown), end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1)
    return 0
