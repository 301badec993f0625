"""The benchmark harness (fastopt.bench): fast checks that it measures what it says.

The cases derived from the rule table (every rule has one; every optional
state buffer has one that uses it; bytes per element follow from the buffers
used), size parsing, the roofline kernels' arithmetic, that torch.optim runs
on the benchmark's own buffers and computes the reference's update, the timer,
the list-of-tensors case (the list call bitwise equal to the flat call), and
the CLI end to end on tiny sizes (table and JSON). Timings themselves are not
asserted.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt.bench import cases, cli, competitors, lists, roofline, timing
from fastopt.bench.cases import CASES, Case
from fastopt.rules import RULES

SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__)))  # the fastopt under test (installed in CI)


def torch_importable():
    return competitors.torch_available() == ""


def _torch_has(rule):
    return torch_importable() and competitors.torch_class(rule) is not None


# ---- what is measured ---------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_bytes_per_element_follow_the_buffers_used(name):
    # param and each used state buffer read and written, grad read
    case = CASES[name]
    k = len(case.state)
    assert case.bytes_per_elem(4) == 4 * (2 * (1 + k) + 1)
    assert case.bytes_per_elem(8) == 8 * (2 * (1 + k) + 1)


def test_known_cases_keep_their_names_and_bytes():
    # docs/design.md's roofline table (fp32); these names are in the docs
    want = {"sgd": 12, "sgd-momentum": 20, "adagrad": 20, "rmsprop": 20, "lion": 20, "rmsprop-centered": 28,
            "adam": 28, "adamw": 28, "nadam": 28, "adadelta": 28, "adamax": 28, "adam-amsgrad": 36}
    assert {n: CASES[n].bytes_per_elem(4) for n in want} == want
    assert CASES["sgd-momentum"].options == {"lr": cases.REQUIRED_VALUE, "momentum": 0.9}
    assert CASES["rmsprop-centered"].options == {"centered": True}
    assert CASES["adam-amsgrad"].options == {"amsgrad": True}
    assert CASES["sgd"].options == {"lr": 1e-3} and CASES["adamw"].options == {}


def test_every_rule_has_a_case_with_its_defaults():
    assert {c.rule for c in CASES.values()} == set(RULES)
    for name, rule in RULES.items():
        base = CASES[name]
        assert base.rule == name
        required = {h.name for h in rule.hyper if h.required and h.name != rule.carry_name}
        assert set(base.options) == required  # nothing but the values the rule has no default for
        assert base.state == tuple(s.name for s in rule.buffers if s.when is None)  # only what is always used


@pytest.mark.parametrize("rule", list(RULES))
def test_each_optional_buffer_has_a_case_that_uses_it(rule):
    r = RULES[rule]
    for buf in r.buffers:
        if buf.when is None:
            continue
        using = [c for c in CASES.values() if c.rule == rule and buf.name in c.state]
        assert using, f"no case of {rule} uses {buf.name}"
        # its own case: the base options plus the one option that switches it on
        own = [c for c in using if len(c.options) == len(CASES[rule].options) + 1]
        assert own and own[0].name == f"{rule}-{next(k for k in own[0].options if k not in CASES[rule].options)}"


def test_cases_are_derived_not_listed():
    # a rule added to the table gets its cases, options found from its ``when``s
    from dataclasses import replace
    from fastopt.rule import State

    rms = RULES["rmsprop"]
    toy = replace(rms, name="toy", buffers=(rms.buffers[0], State("momentum_buffer", when="use_momentum"),
                                            State("grad_avg", when="centered")), _validated={}, _when={})
    derived = cases.derive_cases({"toy": toy})
    assert {n: dict(c.options) for n, c in derived.items()} == {
        "toy": {}, "toy-momentum": {"momentum": cases.SWITCH_ON_VALUE}, "toy-centered": {"centered": True}}


def test_carried_value_is_passed_back():
    # NAdam's mu_product (rule.carry): fastopt_call starts it at the rule's
    # first-step value and feeds each call the previous call's result.
    name = next(n for n, r in RULES.items() if r.carry)
    case, rule = CASES[name], RULES[name]
    bufs = cases.make_buffers(case, 64, np.float64, seed=1)
    want = cases.make_buffers(case, 64, np.float64, seed=1)
    call = cases.fastopt_call(case, bufs, "numpy")
    carried = rule.carry[1]
    fn = getattr(fastopt, name + "_")
    for t in (1, 2, 3):
        call()
        carried = fn(want.param, want.grad, *(want.state.get(s) for s in rule.state), step=t,
                     backend="numpy", **{rule.carry[0]: carried}, **case.options)
    np.testing.assert_array_equal(bufs.param, want.param)


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
    assert [c.name for c in cases.select_cases("adamw,sgd")] == ["adamw", "adamw-amsgrad", "sgd", "sgd-momentum"]
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
    rule = RULES[case.rule]
    args = [copy.param, copy.grad, *(copy.state.get(n) for n in rule.state)]
    if rule.carry:  # the value carried into update ``step``, from the rule's own formulas
        name, carried = rule.carry
        for t in range(1, step):
            _, carried = rule.prepare({**case.hyper, name: carried}, t)
        kwargs[name] = carried
    if rule.takes_step:
        kwargs["step"] = step
    getattr(fastopt, case.rule + "_")(*args, **kwargs)
    return copy


def _assert_same_buffers(got, want, rtol, what):
    np.testing.assert_allclose(got.param, want.param, rtol=rtol, atol=rtol, err_msg=what + " param")
    for name in want.state:
        np.testing.assert_allclose(got.state[name], want.state[name], rtol=rtol, atol=rtol, err_msg=f"{what} {name}")


@pytest.mark.skipif(not torch_importable(), reason="torch not installed")
@pytest.mark.parametrize("name", list(CASES))
def test_torch_runs_on_the_benchmark_buffers(name):
    # torch_call steps once to build torch's state, then points that state at
    # our buffers; the next step must update our memory exactly as step 2 of the
    # reference does from the same values.
    case = CASES[name]
    if not _torch_has(case.rule):
        pytest.skip(f"torch.optim has no {RULES[case.rule].title}")
    bufs = cases.make_buffers(case, 257, np.float32, seed=5)
    variant, step = competitors.torch_call(case, bufs)
    assert variant in ("fused", "foreach")
    want = _reference_step(case, bufs, step=2)
    step()
    _assert_same_buffers(bufs, want, 2e-5, name)


@pytest.mark.skipif(not torch_importable(), reason="torch not installed")
def test_torch_variant_is_detected_and_cached():
    import torch

    # torch 2.x has a fused CPU AdamW; the answer is remembered per class and device
    assert competitors.torch_variant(torch.optim.AdamW, CASES["adamw"].hyper) == "fused"
    assert (torch.optim.AdamW, "cpu") in competitors._VARIANT

    class NoFused(torch.optim.SGD):
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("no fused kernel")
            super().__init__(params, **kw)
    assert competitors.torch_variant(NoFused, CASES["sgd"].hyper) == "foreach"


def test_rules_torch_lacks_have_no_torch_row():
    if not torch_importable():
        pytest.skip("torch not installed")
    import torch

    missing = [n for n, c in CASES.items() if not hasattr(torch.optim, RULES[c.rule].title)]
    for name in missing:  # Lion, as of torch 2.13
        assert competitors.torch_call(CASES[name], cases.make_buffers(CASES[name], 8)) is None


# ---- the list-of-tensors case -----------------------------------------------

def test_gpt_layout():
    big = lists.gpt_layout(1 << 24)
    # wte, wpe, 6 blocks of 12 (2 LayerNorms, 4 Linears, weights and biases), ln_f weight and bias
    assert big.count == 2 + 6 * 12 + 2 == 76
    assert abs(big.total - (1 << 24)) / (1 << 24) < 0.02 and big.name == "gpt d=480"
    assert big.shapes[0] == (512, 480) and big.shapes[4] == (3 * 480, 480)
    small = lists.gpt_layout(1 << 12)
    assert small.count == 76 and small.total < 1 << 13
    assert [lay.name for lay in lists.parse_layouts("gpt,1000x1024", [1 << 12, 1 << 14])] == \
        [small.name, lists.gpt_layout(1 << 14).name, "1000x1024"]
    assert lists.parse_layouts("3x5")[0].shapes == ((5,),) * 3
    with pytest.raises(ValueError, match="layout must be"):
        lists.parse_layouts("gpt2")


def test_env_selection_of_lists():
    chosen, layouts, backends = lists.env_selection({})
    assert [c.name for c in chosen] == ["adamw"] and backends is None
    assert [lay.name for lay in layouts] == ["gpt d=480", "1000x1024"]
    chosen, layouts, _ = lists.env_selection({"FASTOPT_BENCH_LIST_RULES": "lion", "FASTOPT_BENCH_LAYOUTS": "gpt",
                                              "FASTOPT_BENCH_LIST_SIZES": "2^12"})
    assert [c.name for c in chosen] == ["lion"] and [lay.total for lay in layouts] == [lists.gpt_layout(4096).total]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("name", ["adamw", "adam-amsgrad", "nadam", "sgd-momentum", "lion"])
@pytest.mark.parametrize("layout", [lists.gpt_layout(1 << 12), lists.uniform_layout(7, 33)], ids=["gpt", "7x33"])
def test_list_call_is_bitwise_the_flat_call(backend, name, layout):
    if not fastopt.backends()[backend].available:
        pytest.skip(f"{backend}: {fastopt.backends()[backend].reason}")
    case = CASES[name]
    tensors, flat = lists.list_buffers(case, layout, np.float32, seed=2)
    assert len(tensors.param) == layout.count and [a.shape for a in tensors.param] == list(layout.shapes)
    assert all(a.flags.owndata for a in tensors.arrays()[0])  # one allocation per tensor, as a model's
    np.testing.assert_array_equal(lists.concat(tensors.param), flat.param)
    list_call, flat_call = cases.fastopt_call(case, tensors, backend), cases.fastopt_call(case, flat, backend)
    for _ in range(3):  # steps 1..3 (SGD's first step, NAdam's carried mu_product)
        list_call()
        flat_call()
    assert np.array_equal(lists.concat(tensors.param), flat.param)
    assert not np.array_equal(flat.param, lists.list_buffers(case, layout, np.float32, seed=2)[1].param)  # it moved
    for role in flat.state:
        assert np.array_equal(lists.concat(tensors.state[role]), flat.state[role]), role


def test_cli_lists_mode(tmp_path, capsys):
    out = tmp_path / "lists.json"
    rc = cli.main(["--lists", "--quick", "--sizes", "2^12", "--layouts", "gpt,10x64", "--backends", "numpy,numba",
                   "--rules", "adamw,lion", "--json", str(out)])
    assert rc == 0
    text, err = capsys.readouterr()
    assert "[1/" in err
    assert "adamw lists: fastopt.adamw_() on a list of tensors vs one flat buffer" in text
    assert "lion lists: fastopt.lion_()" in text and "adamw-amsgrad lists" in text
    for col in ("layout", "tensors", "elements", "backend", "list", "flat", "list/flat", "extra/tensor"):
        assert col in text
    doc = json.loads(out.read_text())
    rows = doc["results"]
    assert len(rows) == 3 * 2 * 2  # cases x layouts x backends
    assert {r["layout"] for r in rows} == {lists.gpt_layout(4096).name, "10x64"}
    for r in rows:
        assert "error" not in r and r["list_median_s"] > 0 and r["flat_median_s"] > 0
        assert r["list_over_flat"] == pytest.approx(r["list_median_s"] / r["flat_median_s"])
    assert {r["tensors"] for r in rows} == {76, 10}
    assert doc["meta"]["lists"]["10x64"] == {"tensors": 10, "elements": 640, "shapes": [[64]] * 10}


def test_cli_lists_rejects(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--layouts", "gpt"])  # without --lists
    with pytest.raises(SystemExit):
        cli.main(["--lists", "--layouts", "nope"])
    err = capsys.readouterr().err
    assert "--layouts needs --lists" in err and "layout must be" in err


def test_cli_muon_mode(tmp_path, capsys):
    out = tmp_path / "muon.json"
    rc = cli.main(["--muon", "--quick", "--shapes", "16x8,8x24", "--backends", "numpy,c", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for col in ("shape", "impl", "ms/step", "iteration share", "torch ms/step", "x torch"):
        assert col in text
    rows = json.loads(out.read_text())
    assert [(tuple(r["shape"]), r["impl"]) for r in rows] == [((16, 8), "numpy"), ((16, 8), "c"), ((8, 24), "numpy"),
                                                             ((8, 24), "c")]
    for r in rows:
        assert r["step_s"] > 0 and r["iteration_s"] > 0 and (r["torch_s"] is None or r["torch_s"] > 0)
    with pytest.raises(SystemExit):
        cli.main(["--muon", "--shapes", "16by8"])
    assert "--shapes: expected RxC shapes" in capsys.readouterr().err
    rc = cli.main(["--adafactor", "--quick", "--shapes", "16x8", "--backends", "c", "--json", str(out)])
    assert rc == 0 and "statistics share" in capsys.readouterr().out
    assert [r["impl"] for r in json.loads(out.read_text())] == ["c"]


def test_cli_schedulefree_mode(tmp_path, capsys):
    out = tmp_path / "sf.json"
    rc = cli.main(["--schedulefree", "--quick", "--sizes", "2^10", "--backends", "numpy,c", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "adamw_schedulefree" in text and "sgd_schedulefree" in text and "% roofline" in text
    rows = json.loads(out.read_text())
    assert [(r["rule"], r["impl"]) for r in rows] == [("adamw", "numpy"), ("adamw", "c"), ("sgd", "numpy"),
                                                     ("sgd", "c")]
    for r in rows:
        assert r["step_s"] > 0 and r["roofline_s"] > 0 and (r["package_s"] is None or r["package_s"] > 0)


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
    assert {r["case"] for r in rows} == {"adamw", "adamw-amsgrad", "sgd", "sgd-momentum"}
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
    with pytest.raises(SystemExit):
        cli.main(["--competitors", "numpy-seed", "--sizes", "64", "--rules", "sgd"])
    assert "the NumPy competitor is the reference backend" in capsys.readouterr().err


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


def test_denormal_mode_runs_and_reports_three_configurations(capsys):
    from fastopt.bench import cli, denormal

    rc = cli.main(["--denormal", "--quick", "--sizes", "2^12", "--backends", "numpy,numba", "--competitors", "none",
                   "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["adamw"]]
    assert [r[2] for r in rows] == ["numpy", "numba"]
    assert all(len(r) == 8 and r[5].endswith("x") and r[7].endswith("x") for r in rows)
    assert fastopt.get_flush_denormal() is False  # the flushed configuration restores the setting
    # the subnormal configuration really starts subnormal, and the decay is slow enough to stay there
    case = denormal._slow_decay(cases.CASES["adamw"])
    bufs = denormal._subnormal_buffers(case, 64)
    assert all(((a > 0) & (a < np.finfo(np.float32).tiny)).all() for a in bufs.state.values())
    assert case.options["betas"] == (0.999, 0.9999)


def test_training_step_mode_times_both_ways_on_the_same_buffers(capsys, tmp_path):
    pytest.importorskip("torch")
    import json

    from fastopt.bench import cli, training_step

    path = tmp_path / "steps.json"
    rc = cli.main(["--training-step", "--quick", "--sizes", "2^12", "--backends", "c", "--quiet", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0 and "unscale_ + clip_grad_norm_ + AdamW(fused=True)" in out
    rows = json.loads(path.read_text())
    assert [(r["layout"], r["backend"]) for r in rows] == [("flat", "c"), ("gpt", "c")]
    assert rows[1]["tensors"] == 76 and all(r["speedup"] == pytest.approx(r["torch_s"] / r["fastopt_s"]) for r in rows)
    # The two steps share memory: each moves the same parameter arrays.
    torch_step, fastopt_step, params = training_step._steps(((8, 4), (3,)), "c")
    for step in (torch_step, fastopt_step):
        before = [p.copy() for p in params]
        step()
        assert all(not np.array_equal(a, b) for a, b in zip(before, params))


def test_overhead_mode_times_every_layer_against_its_goal(capsys, tmp_path):
    pytest.importorskip("torch")
    import json

    from fastopt.bench import cli, overhead

    path = tmp_path / "overhead.json"
    rc = cli.main(["--overhead", "--quick", "--quiet", "--json", str(path)])
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())
    names = [r["name"] for r in rows]
    assert rc == 0 and names[-2:] == ["torch AdamW(fused=True)", "torch AdamW(foreach=True)"]
    assert {name for name in overhead.GOALS} <= set(names)
    for r in rows:
        assert r["size"] == 1024 and r["seconds"] > 0 and r["goal_us"] == overhead.GOALS.get(r["name"])
        assert r["name"] in out
    assert out.count(" met") + out.count("MISSED") == len(overhead.GOALS)


def test_interleaved_blocks_run_inside_their_context():
    """``around``: each block of timed calls (warmup and calibration included)
    runs inside its callable's context, entered per block, not per call."""
    import contextlib

    from fastopt.bench import timing
    state = {"on": False, "entered": 0}
    seen = {"a": set(), "b": set()}

    @contextlib.contextmanager
    def switched():
        state["on"] = True
        state["entered"] += 1
        try:
            yield
        finally:
            state["on"] = False

    def a():
        seen["a"].add(state["on"])

    def b():
        seen["b"].add(state["on"])
    settings = timing.TimerSettings(repeats=3, min_repeats=3, min_time=1e-4, max_time=1.0, warmup=1)
    timing.measure_interleaved([a, b], settings, around=[None, switched])
    assert seen == {"a": {False}, "b": {True}}
    assert state["entered"] == 1 + 3  # calibration, then one per repeat
    with pytest.raises(ValueError, match="around has 1 entries, expected 2"):
        timing.measure_interleaved([a, b], settings, around=[None])


# ---- --formats: the storage formats against fp32 and torch ---------------------------

def test_formats_bytes_follow_the_formats():
    from fastopt.bench import formats as bf
    by_name = {c.name: c for c in bf.CONFIGS}
    assert [by_name[n].bytes_moved(2) for n in ("fp32", "bf16 state", "bf16 params + master",
                                               "bf16 params + master, bf16 state", "pure bf16")] == [28, 20, 28, 20, 14]
    assert [by_name[n].bytes_kept(2) for n in ("fp32", "bf16 state", "bf16 params + master", "pure bf16")] == \
        [12, 8, 14, 6]
    # 8-bit: a code per element and a float32 absmax per 256 of them
    assert by_name["int8 state"].bytes_moved(2) == 12 + 4 * (1 + 4 / 256)
    assert by_name["int8 state"].bytes_kept(2) == 4 + 2 * (1 + 4 / 256)
    assert [c.name for c in bf.select(state="int8")] == ["fp32", "int8 state"]
    assert [c.name for c in bf.select(state="bfloat16")] == ["fp32", "bf16 state", "bf16 params + master, bf16 state",
                                                              "pure bf16"]


def test_cli_formats_mode(tmp_path, capsys):
    from fastopt.bench import formats as bf
    out = tmp_path / "formats.json"
    rc = cli.main(["--formats", "--quick", "--sizes", "2^12", "--backends", "numpy,c",
                   "--competitors", "torch" if torch_importable() else "none", "--json", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())
    impls = {r["impl"] for r in rows}
    assert {"numpy", "c"} <= impls and len([r for r in rows if r["impl"] == "c"]) == len(bf.CONFIGS)
    if torch_importable():
        assert any(i.startswith("torch master") for i in impls)
        master = next(r for r in rows if r["impl"].startswith("torch master"))
        assert master["bytes_moved"] == 40  # grad upcast 6 + fp32 AdamW 28 + copy to bf16 6
    assert all(r["ns_per_elem"] > 0 for r in rows) and "pure bf16" in text and "x own fp32" in text
