"""The benchmark harness (fastopt.bench): fast checks that it measures what it says.

Bytes per element (DESIGN.md's roofline table), size parsing, the roofline
kernels' arithmetic, that the competitors compute the same update as the
reference on the benchmark's own buffers, the timer, and the CLI end to end on
tiny sizes (table and JSON). Timings themselves are not asserted.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt.bench import cases, cli, competitors, roofline, timing
from fastopt.bench.cases import CASES, Case

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")

# DESIGN.md, "Why it can be fast: the memory roofline" (fp32), with one
# correction: DESIGN lists Adamax at 20 B, but Adamax keeps two state buffers
# (exp_avg and exp_inf, as torch.optim.Adamax), so it reads p, g, m, u and
# writes p, m, u: 28 B, like Adam.
DESIGN_BYTES = {
    "sgd": 12,
    "sgd-momentum": 20, "adagrad": 20, "rmsprop": 20, "lion": 20,
    "adam": 28, "adamw": 28, "nadam": 28, "adadelta": 28, "rmsprop-centered": 28, "adamax": 28,
    "adam-amsgrad": 36,
}


def torch_importable():
    return competitors.torch_available() == ""


# ---- what is measured ---------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_bytes_per_element_match_design(name):
    assert CASES[name].bytes_per_elem(4) == DESIGN_BYTES[name]
    assert CASES[name].bytes_per_elem(8) == 2 * DESIGN_BYTES[name]


def test_every_rule_has_a_case():
    assert {c.rule for c in CASES.values()} == set(fastopt.rules.RULES)
    assert set(DESIGN_BYTES) == set(CASES)


@pytest.mark.parametrize("rule,options,expected", [
    ("adamw", dict(amsgrad=True), 36),
    ("rmsprop", dict(centered=True, momentum=0.9), 36),
    ("rmsprop", dict(momentum=0.9), 28),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True), 20),
])
def test_bytes_follow_the_options(rule, options, expected):
    assert Case("x", rule, options).bytes_per_elem() == expected


@pytest.mark.parametrize("name", list(CASES))
def test_buffers_are_the_needed_state(name):
    case = CASES[name]
    bufs = cases.make_buffers(case, 100, np.float64)
    assert tuple(bufs.state) == case.state
    for a in bufs.arrays():
        assert a.dtype == np.float64 and a.shape == (100,) and np.all(np.isfinite(a)) and np.all(a != 0)


@pytest.mark.parametrize("text,n", [
    ("2^20", 1 << 20), ("2**10", 1024), (" 2^10 ", 1024), ("1M", 1 << 20), ("64k", 1 << 16), ("1G", 1 << 30),
    ("1048576", 1048576), ("1_000", 1000), ("3", 3),
])
def test_parse_size(text, n):
    assert cases.parse_size(text) == n


@pytest.mark.parametrize("text", ["abc", "0", "2^", "-5", "1.5M", "", "2^0x"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        cases.parse_size(text)


def test_parse_sizes_and_defaults():
    assert cases.parse_sizes("2^10,1M") == (1024, 1 << 20)
    assert cases.parse_sizes(None) == cases.DEFAULT_SIZES == tuple(1 << k for k in (10, 12, 14, 16, 18, 20, 22, 24))
    assert cases.format_size(1 << 20) == "2^20" and cases.format_size(1000) == "1000"


def test_select_cases():
    assert [c.name for c in cases.select_cases("adamw,sgd")] == ["adamw", "sgd", "sgd-momentum"]
    assert [c.name for c in cases.select_cases("adam-amsgrad")] == ["adam-amsgrad"]
    assert [c.name for c in cases.select_cases("rmsprop-centered,lion")] == ["rmsprop-centered", "lion"]
    assert [c.name for c in cases.select_cases("adam, adam")] == ["adam", "adam-amsgrad"]
    assert len(cases.select_cases(None)) == len(CASES)
    with pytest.raises(ValueError, match="unknown rule or case 'adamz'"):
        cases.select_cases("adamz")


def test_env_selection():
    chosen, sizes, backends = cases.env_selection(
        {"FASTOPT_BENCH_RULES": "lion", "FASTOPT_BENCH_SIZES": "2^12", "FASTOPT_BENCH_HUGE": "1"})
    assert [c.name for c in chosen] == ["lion"] and sizes == [1 << 12, 1 << 26] and backends is None
    chosen, sizes, backends = cases.env_selection({"FASTOPT_BENCH_BACKENDS": "numpy, c"})
    assert len(chosen) == len(CASES) and sizes == list(cases.DEFAULT_SIZES) and backends == ["numpy", "c"]


# ---- the roofline -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", range(roofline.MAX_STATE + 1))
def test_roofline_adds_the_gradient(k, dtype):
    rng = np.random.default_rng(k)
    arrays = [rng.standard_normal(1001).astype(dtype) for _ in range(k + 2)]
    before = [a.copy() for a in arrays]
    variants = roofline.host_kernels(arrays, scale=1.0)
    assert list(variants)[1] == "serial" and "thread" in list(variants)[0]
    for calls, fn in enumerate(variants.values(), start=1):
        fn()
        g = before[1]
        np.testing.assert_array_equal(arrays[1], g)  # the gradient is only read
        for a, a0 in zip(arrays[:1] + arrays[2:], before[:1] + before[2:]):
            np.testing.assert_array_equal(a, (a0 + g) + g if calls == 2 else a0 + g)
            assert a.dtype == dtype


def test_roofline_at_scale_zero_keeps_the_buffers():
    bufs = cases.make_buffers(CASES["adam-amsgrad"], 4099)
    before = [a.copy() for a in bufs.arrays()]
    for fn in roofline.host_kernels(bufs.arrays()).values():
        fn()
    for a, b in zip(bufs.arrays(), before):
        np.testing.assert_array_equal(a, b)


def test_host_copy():
    p, g = np.zeros(10, np.float32), np.arange(10, dtype=np.float32)
    roofline.host_copy([p, g])()
    np.testing.assert_array_equal(p, g)


# ---- the competitors compute the same update ---------------------------------

def _reference_step(case, bufs, step):
    """fastopt's NumPy reference, one update at ``step``, on copies of ``bufs``."""
    copy = cases.Buffers(bufs.param.copy(), bufs.grad.copy(), {k: v.copy() for k, v in bufs.state.items()})
    kwargs = dict(case.options, backend="numpy")
    rule = fastopt.rules.RULES[case.rule]
    args = [copy.param, copy.grad, *(copy.state.get(n) for n in rule.state)]
    if case.rule == "nadam":
        b1, md = case.hyper["betas"][0], case.hyper["momentum_decay"]
        mu_product = np.prod([b1 * (1 - 0.5 * 0.96 ** (t * md)) for t in range(1, step)])
        fastopt.nadam_(*args, step=step, mu_product=float(mu_product), **kwargs)
    elif rule.takes_step:
        getattr(fastopt, case.rule + "_")(*args, step=step, **kwargs)
    else:
        getattr(fastopt, case.rule + "_")(*args, **kwargs)
    return copy


def _assert_same_buffers(got, want, rtol, what):
    np.testing.assert_allclose(got.param, want.param, rtol=rtol, atol=rtol, err_msg=what + " param")
    for name in want.state:
        np.testing.assert_allclose(got.state[name], want.state[name], rtol=rtol, atol=rtol, err_msg=f"{what} {name}")


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_seed_matches_reference(name):
    # float64: the seed writes the formulas in another order (m_hat, v_hat), so
    # it agrees with the reference to round-off, not bitwise.
    case = CASES[name]
    bufs = cases.make_buffers(case, 257, np.float64, seed=3)
    want = _reference_step(case, bufs, step=1)
    competitors.numpy_seed_call(case, bufs)()
    _assert_same_buffers(bufs, want, 1e-12, name)


@pytest.mark.skipif(not torch_importable(), reason="torch not installed")
@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.rule in competitors.TORCH_CLASS])
def test_torch_runs_on_the_benchmark_buffers(name):
    # torch_call steps once to build torch's state, then points that state at
    # our buffers; the next step must update our memory exactly as step 2 of the
    # reference does from the same values.
    case = CASES[name]
    bufs = cases.make_buffers(case, 257, np.float32, seed=5)
    variant, step = competitors.torch_call(case, bufs)
    assert variant == ("fused" if case.rule in ("sgd", "adagrad", "adam", "adamw") else "foreach")
    want = _reference_step(case, bufs, step=2)
    step()
    _assert_same_buffers(bufs, want, 2e-5, name)


def test_torch_has_no_lion():
    if not torch_importable():
        pytest.skip("torch not installed")
    assert competitors.torch_call(CASES["lion"], cases.make_buffers(CASES["lion"], 8)) is None


# ---- the timer ----------------------------------------------------------------

def test_timer_adapts_the_call_count():
    calls = []
    settings = timing.TimerSettings(repeats=4, min_repeats=2, min_time=2e-3, max_time=1.0, warmup=3)
    m = timing.measure(lambda: calls.append(1), settings)
    assert m.number > 100  # a no-op call is timed in a batch
    assert m.repeats == 4 and 0 < m.best <= m.median < 1e-4
    assert len(calls) >= 3 + m.number * m.repeats


def test_timer_caps_repeats_of_slow_calls():
    import time
    settings = timing.TimerSettings(repeats=50, min_repeats=2, min_time=1e-3, max_time=0.01, warmup=1)
    synced = []
    m = timing.measure(lambda: time.sleep(0.004), settings, sync=lambda: synced.append(1))
    assert m.number == 1 and m.repeats == 2 and m.median >= 0.004 and synced


# ---- the CLI ------------------------------------------------------------------

def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["--sizes", "2^10", "--quick", "--rules", "adamw,sgd", "--json", str(out)])
    assert rc == 0
    text, err = capsys.readouterr()
    assert "[1/" in err and "adamw 2^10 roofline" in err  # progress on stderr
    for title in ("adamw: fastopt.adamw_()", "sgd: fastopt.sgd_(lr=0.001)", "sgd-momentum:"):
        assert title in text
    assert "% roofline" in text and "x numpy" in text and "roofline (" in text
    if torch_importable():
        assert "torch (fused)" in text and "x torch" in text

    doc = json.loads(out.read_text())
    assert set(doc) == {"meta", "results"}
    meta = doc["meta"]
    for key in ("date", "machine", "cores", "device", "dtype", "threads", "versions", "timer", "cases", "sizes",
                "implementations", "skipped"):
        assert key in meta
    assert meta["cases"]["adamw"]["bytes_per_elem"] == 28 and meta["sizes"] == [1024]
    rows = doc["results"]
    assert {r["case"] for r in rows} == {"adamw", "sgd", "sgd-momentum"}
    for r in rows:
        assert {"case", "rule", "size", "impl", "kind", "variant", "bytes_per_elem", "ns_per_elem", "gbps",
                "pct_roofline", "speedup_vs_numpy", "speedup_vs_torch", "median_s", "min_s", "number",
                "repeats"} <= set(r)
        assert r["ns_per_elem"] > 0 and r["gbps"] > 0 and r["pct_roofline"] > 0 and r["min_s"] <= r["median_s"]
        assert "error" not in r
    by = {(r["case"], r["impl"]): r for r in rows}
    assert by["adamw", "roofline"]["pct_roofline"] == pytest.approx(100)
    assert by["adamw", "numpy"]["speedup_vs_numpy"] == pytest.approx(1)
    assert by["adamw", "roofline"]["bytes_per_elem"] == 28 and by["sgd", "numpy"]["bytes_per_elem"] == 12
    assert by["adamw", "memcpy"]["bytes_per_elem"] == 8 and by["adamw", "memcpy"]["speedup_vs_numpy"] is None
    if torch_importable():
        assert by["adamw", "torch"]["variant"] == "fused" and by["adamw", "torch"]["speedup_vs_torch"] == 1
        assert by["adamw", "numpy"]["speedup_vs_torch"] > 0


def test_cli_markdown_and_options(capsys):
    rc = cli.main(["--sizes", "512", "--quick", "--rules", "lion", "--markdown", "--quiet", "--dtype", "float64",
                   "--threads", "1", "--competitors", "none", "--backends", "numpy"])
    assert rc == 0
    text, err = capsys.readouterr()
    assert err == ""
    assert "### lion: fastopt.lion_(), float64, 40 B/elem, cpu, 1 thread" in text
    assert "| size | impl | ns/elem | GB/s | % roofline | x numpy |" in text  # no torch column without torch
    assert "| 2^9 | roofline (" in text and "torch" not in text.split("###", 1)[1]
    fastopt.set_num_threads(fastopt.threads._initial())


def test_cli_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--rules", "nope"])
    with pytest.raises(SystemExit):
        cli.main(["--sizes", "2^x"])
    assert "unknown rule or case" in capsys.readouterr().err


def _run_module(*args, env=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "fastopt", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_python_m_fastopt():
    got = _run_module("bench", "--help")
    assert got.returncode == 0 and "--rules" in got.stdout and "--device" in got.stdout
    got = _run_module("backends")
    assert got.returncode == 0 and "numpy  (cpu) available" in got.stdout
    assert _run_module("frobnicate").returncode == 2


def test_cuda_bench_under_the_simulator(tmp_path):
    # No GPU here: NUMBA_ENABLE_CUDASIM runs the copy roofline and the trivial
    # kernel in the simulator, on tiny sizes, through the real CLI.
    out = tmp_path / "cuda.json"
    got = _run_module("bench", "--device", "cuda", "--sizes", "64", "--quick", "--rules", "sgd-momentum",
                      "--competitors", "none", "--quiet", "--json", str(out), env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert got.returncode == 0, got.stderr
    assert "roofline (d2d copy)" in got.stdout and "kernel (trivial kernel)" in got.stdout
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["roofline"]["bytes_per_elem"] == 8 and rows["kernel"]["bytes_per_elem"] == 20
    assert all(r["gbps"] > 0 for r in rows.values())


def test_cuda_trivial_kernel_under_the_simulator():
    code = """
import numpy as np
from numba import cuda
from fastopt.bench import roofline
a = [np.arange(70, dtype=np.float32) * (i + 1) for i in range(5)]
d = [cuda.to_device(x) for x in a]
roofline.device_kernel(d, scale=1.0)()
out = [x.copy_to_host() for x in d]
assert (out[1] == a[1]).all()
for got, want in zip(out[:1] + out[2:], a[:1] + a[2:]):
    assert (got == want + a[1]).all(), (got, want)
roofline.device_copy(d)()
assert (d[0].copy_to_host() == a[1]).all()
print("ok")
"""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": SRC}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert got.returncode == 0 and got.stdout.strip() == "ok", got.stderr


def test_backends_are_discovered_at_run_time(monkeypatch, capsys):
    # A backend that lands later (here a stand-in for "numba" running the
    # reference kernels) gets its row, its ratios and its describe() line.
    import types

    from fastopt import dispatch
    from fastopt.backends import reference

    fake = types.SimpleNamespace(name="numba", device="cpu", run=reference.run, describe=lambda: "stand-in")
    monkeypatch.setitem(dispatch._loaded, "numba", fake)
    assert cli.main(["--sizes", "2^10", "--quick", "--rules", "adagrad", "--quiet", "--competitors", "none",
                     "--backends", "numba"]) == 0
    text = capsys.readouterr().out
    assert "backend numba: stand-in" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == ["numba"]]
    assert len(rows) == 1 and rows[0][-1].endswith("x")  # ns/elem, GB/s, % roofline, x numpy
    assert "numpy" in text  # the baseline runs even when not asked for


def test_cli_device_cuda_without_gpu_is_a_clear_error():
    if fastopt.backends()["cuda"].available:
        pytest.skip("a CUDA backend is available here")  # only meaningful without a GPU
    out = subprocess.run([sys.executable, "-m", "fastopt", "bench", "--device", "cuda", "--sizes", "2^10",
                          "--rules", "adamw"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "--device cuda needs the cuda backend" in out.stderr and "Traceback" not in out.stderr
