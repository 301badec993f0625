"""``python -m fastopt bench --plot``: the figure drawn from a run's rows, and matplotlib staying optional.

The SVG is read back as XML: each line is the SVG group whose id the plot gives
it (``line-<case>-<impl>``), its path has one vertex per measured size, the
roofline is dashed, and each panel's legend names every implementation and
``roofline``. A synthetic run (rows built as the runner builds them) pins what
is drawn: the plotted values, failed rows and check rows left out, the CUDA
roofline converted to the case's bytes. Without matplotlib, ``--plot`` is a
clear usage error before anything is timed, and neither ``import fastopt`` nor
a bench run without ``--plot`` imports matplotlib.
"""
import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import fastopt
from fastopt.bench import cli, plot
from fastopt.bench.cases import CASES
from fastopt.bench.runner import Result
from fastopt.bench.timing import Measurement

SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__)))
SVG = "{http://www.w3.org/2000/svg}"

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason='matplotlib not installed (pip install "fastopt[plot]")')


def _groups(root, prefix):
    return {g.get("id"): g for g in root.iter(SVG + "g") if (g.get("id") or "").startswith(prefix)}


def _vertices(group):
    """The (x, y) vertices of the line's path (``M x y L x y ...``), in SVG coordinates."""
    path = group.find(SVG + "path")
    nums = [float(x) for x in re.findall(r"[-+]?\d*\.?\d+(?:e[-+]?\d+)?", path.get("d"))]
    assert path.get("d").count("M") == 1
    return list(zip(nums[0::2], nums[1::2])), path.get("style")


def _legend_texts(root):
    return [{"".join(t.itertext()).strip() for t in legend.iter(SVG + "text")}
            for legend in _groups(root, "legend_").values()]


# ---- a real run, in process ---------------------------------------------------

@needs_matplotlib
def test_plot_of_a_tiny_bench_run(tmp_path, capsys):
    backends = ["numpy"] + (["c"] if fastopt.backends()["c"].available else [])
    path = tmp_path / "bench.svg"
    rc = cli.main(["--sizes", "2^10,2^12", "--quick", "--rules", "lion", "--competitors", "none",
                   "--backends", ",".join(backends), "--plot", str(path)])
    assert rc == 0
    out, err = capsys.readouterr()
    assert "lion: fastopt.lion_()" in out and f"wrote {path}" in err  # the tables, and the figure
    root = ET.parse(path).getroot()  # well-formed XML
    assert root.tag == SVG + "svg"
    lines = _groups(root, "line-")
    assert set(lines) == {f"line-lion-{b}" for b in backends} | {"line-lion-roofline"}  # no memcpy line
    for gid, group in lines.items():
        points, style = _vertices(group)
        assert len(points) == 2, gid  # one vertex per size
        assert points[0][0] < points[1][0]  # sizes left to right
        assert ("stroke-dasharray" in style) == gid.endswith("roofline")
    (legend,) = _legend_texts(root)
    assert legend == set(backends) | {"roofline"}
    texts = {"".join(t.itertext()) for t in root.iter(SVG + "text")}
    assert "elements (log2 scale)" in texts and any(t.startswith("ns per element") for t in texts)
    assert any(t.startswith("lion: fastopt.lion_()") for t in texts)


# ---- a synthetic run: what is drawn -------------------------------------------

def _row(case, size, impl, kind, ns, variant="", bytes_per_elem=None, error=""):
    bpe = CASES[case].bytes_per_elem(4) if bytes_per_elem is None else bytes_per_elem
    m = None if error else Measurement(median=ns * size * 1e-9, best=ns * size * 1e-9, number=1, repeats=3)
    return Result(CASES[case], size, impl, kind, bpe, variant=variant or impl, measurement=m, error=error,
                  full_traffic=kind != "check" and bytes_per_elem is None)


SIZES = (1 << 10, 1 << 16, 1 << 20)


def _synthetic(device="cpu"):
    """adamw: every kind of row, c failing at 2^16; adamw-amsgrad: no torch row; ns = f(size) known."""
    rows = []
    for case in ("adamw", "adamw-amsgrad"):
        for k, n in enumerate(SIZES):
            if device == "cuda":  # the roofline is a copy: 8 B/elem
                rows.append(_row(case, n, "roofline", "roofline", 0.1 * (k + 1), "d2d copy", bytes_per_elem=8))
            else:
                rows.append(_row(case, n, "roofline", "roofline", 0.1 * (k + 1), "2 threads"))
            rows.append(_row(case, n, "memcpy", "check", 0.05, "np.copyto", bytes_per_elem=8))
            rows.append(_row(case, n, "c", "backend", 1.0 + k, error="RuntimeError: x" if (case, k) == ("adamw", 1)
                             else ""))
            rows.append(_row(case, n, "numpy", "backend", 10.0 * (k + 1)))
            if case == "adamw":
                rows.append(_row(case, n, "torch", "competitor", 3.0 / (k + 1), "fused"))
    meta = dict(machine="test cpu", cores=2, device=device, dtype="float32", date="2026-01-02T03:04:05",
                threads={"fastopt": 2}, versions={"fastopt": "0"},
                cases={c: dict(bytes_per_elem=CASES[c].bytes_per_elem(4)) for c in ("adamw", "adamw-amsgrad")})
    return rows, meta


def test_series_are_the_measured_ns_per_element():
    rows, meta = _synthetic()
    got = plot.series(rows, meta)
    assert list(got) == ["adamw", "adamw-amsgrad"]
    assert list(got["adamw"]) == ["roofline", "c", "numpy", "torch"]  # run order; memcpy (a check) left out
    assert list(got["adamw-amsgrad"]) == ["roofline", "c", "numpy"]
    sizes, ns = got["adamw"]["c"]
    assert sizes == [SIZES[0], SIZES[2]] and ns == pytest.approx([1.0, 3.0])  # the failed 2^16 row is left out
    assert got["adamw"]["torch"][1] == pytest.approx([3.0, 1.5, 1.0])
    assert got["adamw"]["roofline"] == (list(SIZES), pytest.approx([0.1, 0.2, 0.3]))


def test_cuda_roofline_is_the_cases_bytes_at_the_copy_bandwidth():
    rows, meta = _synthetic("cuda")
    ns = plot.series(rows, meta)["adamw"]["roofline"][1]
    assert ns == pytest.approx([0.1 * 28 / 8, 0.2 * 28 / 8, 0.3 * 28 / 8])


@needs_matplotlib
def test_synthetic_svg_has_a_panel_per_case_and_the_right_lines(tmp_path):
    rows, meta = _synthetic()
    path = tmp_path / "synthetic.svg"
    plot.write(rows, meta, str(path))
    root = ET.parse(path).getroot()
    lines = _groups(root, "line-")
    want = {"adamw": {"roofline": 3, "c": 2, "numpy": 3, "torch": 3},
            "adamw-amsgrad": {"roofline": 3, "c": 3, "numpy": 3}}
    assert set(lines) == {f"line-{c}-{i}" for c, impls in want.items() for i in impls}
    for case, impls in want.items():
        for impl, count in impls.items():
            assert len(_vertices(lines[f"line-{case}-{impl}"])[0]) == count, (case, impl)
    # the y axis is ns/elem, lower is drawn lower (SVG y grows downwards): at 2^20,
    # roofline 0.3 < c 3 < numpy 30 in adamw-amsgrad
    at = {i: _vertices(lines[f"line-adamw-amsgrad-{i}"])[0][-1][1] for i in ("roofline", "c", "numpy")}
    assert at["roofline"] > at["c"] > at["numpy"]
    # torch falls with size (3, 1.5, 1 ns): its y grows left to right
    ys = [y for _, y in _vertices(lines["line-adamw-torch"])[0]]
    assert ys == sorted(ys) and ys[0] < ys[-1]
    assert _legend_texts(root) == [{"roofline", "c", "numpy", "torch (fused)"}, {"roofline", "c", "numpy"}]
    assert "2026" not in path.read_text().split("<metadata>", 1)[1].split("</metadata>", 1)[0]  # no date: same results, same file
    path2 = tmp_path / "again.svg"
    plot.write(rows, meta, str(path2))
    assert path2.read_bytes() == path.read_bytes()


@needs_matplotlib
@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-")])
def test_format_follows_the_suffix(tmp_path, suffix, magic):
    rows, meta = _synthetic()
    path = tmp_path / ("fig" + suffix)
    plot.write(rows, meta, str(path))
    assert path.read_bytes().startswith(magic)


def test_bad_suffix_and_other_modes_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--rules", "lion", "--sizes", "2^10", "--plot", str(tmp_path / "fig.txt")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["--lists", "--plot", str(tmp_path / "fig.svg")])
    err = capsys.readouterr().err
    assert "expected one of .svg, .png, .pdf, got '.txt'" in err and "not with --lists" in err
    assert not list(tmp_path.iterdir())


# ---- matplotlib stays optional ----------------------------------------------

def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "fig.svg"
    with pytest.raises(SystemExit) as exc:
        cli.main(["--sizes", "2^10", "--quick", "--rules", "lion", "--competitors", "none", "--backends", "numpy",
                  "--plot", str(path)])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert 'pip install "fastopt[plot]"' in err and "--plot needs matplotlib" in err
    assert out == "" and not path.exists()  # refused before anything was timed
    with pytest.raises(plot.PlotError, match=r'pip install "fastopt\[plot\]"'):
        plot.write(*_synthetic(), str(path))


def _python(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_no_matplotlib_is_a_message_not_a_traceback(tmp_path):
    path = tmp_path / "fig.svg"
    got = _python("import sys; sys.modules['matplotlib'] = None\n"
                  "from fastopt.__main__ import main\n"
                  f"sys.exit(main(['bench', '--rules', 'lion', '--sizes', '2^10', '--plot', {str(path)!r}]))")
    assert got.returncode == 2, got.stderr
    assert 'pip install "fastopt[plot]"' in got.stderr and "Traceback" not in got.stderr
    assert got.stdout == "" and not path.exists()


def test_fastopt_and_a_bench_run_without_plot_do_not_import_matplotlib():
    got = _python("import sys, fastopt, fastopt.bench.cli, fastopt.bench.plot\n"
                  "assert 'matplotlib' not in sys.modules, 'imported by import'\n"
                  "rc = fastopt.bench.cli.main(['--sizes', '2^10', '--quick', '--rules', 'adagrad', '--quiet',\n"
                  "                             '--backends', 'numpy'])\n"
                  "assert rc == 0\n"
                  "assert 'matplotlib' not in sys.modules, 'imported by the run'\n"
                  "print('ok')")
    assert got.returncode == 0 and got.stdout.strip().endswith("ok"), got.stderr
