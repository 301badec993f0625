"""Mixed-format updates (fastopt.formats): bfloat16/float16 params and grads, a float32
master copy, bfloat16 state with stochastic rounding, 8-bit blockwise state.

Three layers of checks:

* the conversions of fastopt.formats, against ml_dtypes and NumPy (round to nearest
  even) and against their definition (stochastic rounding is unbiased, and its bits
  depend on the seed, step, tensor, role and index only);
* the reference's mixed call against plain float32 calls: a master copy is exactly
  the float32 update of the master, a bfloat16 grad exactly the float32 update with
  the upcast gradient, a bfloat16 state exactly the float32 update's value rounded
  with the call's bits;
* every host backend against the reference, bit for bit: every rule with every state
  buffer in use, every combination of formats, flat and list calls, several steps,
  1 and 2 threads, flushing on and off.
"""
import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import formats as F
from fastopt.rules import RULES
from oracle import FULL, fastopt_step, gpt_shapes, initial_state, needed_state

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
CASES = list(FULL.items())

#: name -> (param dtype, grad dtype, state dtype, master copy)
COMBOS = {
    "state-bf16": (F32, F32, BF16, False),
    "param-bf16-sr": (BF16, F32, F32, False),
    "all-bf16": (BF16, BF16, BF16, False),
    "master-bf16": (BF16, BF16, F32, True),
    "master-bf16-state-bf16": (BF16, BF16, BF16, True),
    "master-f16": (F16, F16, F32, True),
    "grad-f16": (F32, F16, F32, False),
    "state-int8": (F32, F32, "int8", False),
    "master-bf16-state-int8": (BF16, BF16, "int8", True),
}


def _bits(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def _special_f32(n=20000, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-90, 90, n))).astype(np.float32)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-40, -1e-45,
                         65504.0, 65519.0, 65520.0, 6e-8, 3e-8, 2.9e-8, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8],
                        dtype=np.float32)
    x[:specials.size] = specials
    payload = np.array([0x7F800001, 0xFFC12345, 0x7FFFFFFF], dtype=np.uint32).view(np.float32)
    x[specials.size:specials.size + 3] = payload
    return x


# ---- the conversions -----------------------------------------------------------------

def test_bf16_round_to_nearest_is_ml_dtypes():
    x = _special_f32()
    assert np.array_equal(F.bf16_nearest(x), x.astype(BF16).view(np.uint16))


def test_f16_round_to_nearest_is_numpy_with_one_nan():
    x = _special_f32()
    with np.errstate(all="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    got = F.f16_nearest(x)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], expected[~nan])
    sign = (x[nan].view(np.uint32) >> 16) & 0x8000
    assert np.array_equal(got[nan], (sign | 0x7E00).astype(np.uint16))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_load_is_exact(dtype):
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    x = F.load(every)
    assert x.dtype == np.float32
    finite = np.isfinite(x)
    with np.errstate(all="ignore"):
        assert np.array_equal(x[finite].astype(dtype).view(np.uint16), every.view(np.uint16)[finite])
    nan = np.isnan(every.astype(np.float32))
    if dtype == F16:  # every float16 NaN loads as the quiet NaN of its sign
        sign = (every.view(np.uint16)[nan].astype(np.uint32) & 0x8000) << 16
        assert np.array_equal(x[nan].view(np.uint32), sign | 0x7FC00000)
    else:
        assert np.array_equal(x.view(np.uint32), every.view(np.uint16).astype(np.uint32) << 16)


def test_stochastic_rounding_is_unbiased_and_between_neighbours():
    n = 400_000
    for value in (1.0 + 2 ** -10, -3.0 - 2 ** -12, 1e-30 * (1 + 2 ** -9)):
        x = np.full(n, value, np.float32)
        rounded = F.load(F.bf16_stochastic(x, F.rounding_bits(F.rounding_key(7, 3), 0, 1, n)).view(BF16))
        lo, hi = np.sort(np.unique(rounded.astype(np.float64)))[[0, -1]]
        assert lo <= value <= hi and len(np.unique(rounded)) == 2
        # the mean of n Bernoulli draws: within 5 standard deviations of the value
        spread = (hi - lo) * 0.5 / np.sqrt(n)
        assert abs(rounded.astype(np.float64).mean() - value) < 5 * spread


def test_stochastic_rounding_keeps_exact_values_and_non_finite_ones():
    x = np.array([1.0, -2.5, 0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan], np.float32)
    bits = np.full(x.size, 0xFFFFFFFF, np.uint32)
    out = F.bf16_stochastic(x, bits)
    assert np.array_equal(out, np.array([0x3F80, 0xC020, 0, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0], np.uint16))


def test_random_bits_depend_on_every_part_of_the_counter():
    key = F.rounding_key(0, 1)
    base = F.rounding_bits(key, 0, 1, 4096)
    assert np.array_equal(base, F.rounding_bits(F.rounding_key(0, 1), 0, 1, 4096))  # deterministic
    for other in (F.rounding_bits(F.rounding_key(1, 1), 0, 1, 4096), F.rounding_bits(F.rounding_key(0, 2), 0, 1, 4096),
                  F.rounding_bits(F.rounding_key(2 ** 40, 1), 0, 1, 4096),
                  F.rounding_bits(F.rounding_key(0, 2 ** 40 + 1), 0, 1, 4096),
                  F.rounding_bits(key, 1, 1, 4096), F.rounding_bits(key, 0, 2, 4096)):
        assert np.mean(other == base) < 0.01
    assert len(np.unique(base)) > 4000  # (no short period)
    assert abs(np.mean(base & 1) - 0.5) < 0.05


# ---- the reference against plain float32 calls --------------------------------------

def _rng_arrays(n, k, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(k)]


def test_master_copy_is_the_float32_update_of_the_master():
    p, g = _rng_arrays(3000, 2, 1)
    m, v = np.zeros_like(p), np.zeros_like(p)
    master = p.copy()
    low = p.astype(BF16)
    mm, vv = m.copy(), v.copy()
    for t in range(1, 4):
        fastopt.adamw_(low, g, m, v, step=t, lr=0.01, master_param=master, backend="numpy")
        fastopt.adamw_(p, g, mm, vv, step=t, lr=0.01, backend="numpy")
        assert _bits(master) == _bits(p) and _bits(m) == _bits(mm) and _bits(v) == _bits(vv)
        assert np.array_equal(low.view(np.uint16), F.bf16_nearest(p))


def test_low_precision_grad_is_the_update_with_the_upcast_grad():
    p, g = _rng_arrays(3000, 2, 2)
    for dtype in (BF16, F16):
        low = g.astype(dtype)
        a, b = p.copy(), p.copy()
        sa, sb = np.zeros_like(p), np.zeros_like(p)
        fastopt.sgd_(a, low, sa, step=1, lr=0.1, momentum=0.9, backend="numpy")
        fastopt.sgd_(b, low.astype(np.float32), sb, step=1, lr=0.1, momentum=0.9, backend="numpy")
        assert _bits(a) == _bits(b) and _bits(sa) == _bits(sb)


def test_bf16_state_is_the_float32_state_rounded_with_the_calls_bits():
    p, g, m0 = _rng_arrays(3000, 3, 3)
    m = m0.astype(BF16)
    a = p.copy()
    fastopt.lion_(a, g, m, step=5, lr=0.1, rounding_seed=11, backend="numpy")
    b, m32 = p.copy(), F.load(m0.astype(BF16)).copy()
    fastopt.lion_(b, g, m32, step=5, lr=0.1, backend="numpy")
    assert _bits(a) == _bits(b)
    bits = F.rounding_bits(F.rounding_key(11, 5), 0, 1, m.size)
    assert np.array_equal(m.view(np.uint16), F.bf16_stochastic(m32, bits))


def test_bf16_param_without_master_is_rounded_stochastically():
    p = np.clip(_rng_arrays(200_000, 1, 4)[0] + 4.0, 1.5, 7.5)  # a bfloat16 step of 2**-7 to 2**-5
    g = np.ones_like(p)  # every element moves by -1e-3, below half a step (2**-8 and up)
    low = p.astype(BF16)
    start = F.load(low).copy()
    fastopt.sgd_(low, g, step=2, lr=1e-3, rounding_seed=5, backend="numpy")
    exact = start.copy()
    fastopt.sgd_(exact, g, step=2, lr=1e-3, backend="numpy")
    bits = F.rounding_bits(F.rounding_key(5, 2), 0, 0, p.size)
    assert np.array_equal(low.view(np.uint16), F.bf16_stochastic(exact, bits))
    # round to nearest would lose every one of these updates; stochastic rounding keeps
    # them in expectation: the mean move is the update's (its standard error here: ~1%)
    assert np.array_equal(F.bf16_nearest(exact), start.astype(BF16).view(np.uint16))
    moved = F.load(low).astype(np.float64) - start
    assert abs(moved.mean() / -1e-3 - 1) < 0.05


# ---- every backend against the reference ----------------------------------------------

BACKENDS = ["numba", "c"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    info = fastopt.backends()[request.param]
    assert info.available, f"backend {request.param} did not load: {info.reason}"
    return request.param


def _mixed_run(rule, options, shapes, combo, backend, steps=3, listed=True, seed=0):
    """``steps`` updates of tensors of ``shapes`` in the formats of ``combo``;
    returns every written buffer's bytes."""
    pdt, gdt, sdt, master = COMBOS[combo]
    rng = np.random.default_rng(seed)
    p32 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [p.astype(pdt) for p in p32]
    masters = [p.copy() for p in p32] if master else None
    signed = {b.name: b.signed for b in RULES[rule].buffers}

    def state_buffer(values, name):
        if sdt != "int8":
            return values.astype(sdt)
        # (away from zero, so that the first steps' quantization is not all of one code)
        return F.Int8State.from_float(values + 0.01 * (not signed[name]), signed[name])
    state = {name: [state_buffer(st[name], name) for st in (initial_state(rule, options, p) for p in p32)]
             for name in needed_state(rule, options)}
    extra: dict = {}
    for t in range(1, steps + 1):
        grads = [(rng.standard_normal(s) * 0.5).astype(gdt) for s in shapes]
        kw = dict(options, rounding_seed=3, **({"master_param": masters if listed else masters[0]} if master else {}))
        if not RULES[rule].takes_step:  # (Lion, Rprop: stochastic rounding still needs the step)
            kw["step"] = t
        if listed:
            fastopt_step(rule, kw, params, grads, state, t, extra, backend)
        else:
            fastopt_step(rule, kw, params[0], grads[0], {k: v[0] for k, v in state.items()}, t, extra, backend)
    out = {"param": [_bits(p) for p in params]}
    if masters:
        out["master_param"] = [_bits(m) for m in masters]
    out.update({k: [_bits(a.codes) + _bits(a.absmax) if sdt == "int8" else _bits(a) for a in v]
                for k, v in state.items()})
    return out


def _assert_same(got, ref, what):
    assert got.keys() == ref.keys()
    for name in ref:
        for i, (a, b) in enumerate(zip(got[name], ref[name])):
            assert a == b, f"{what}: {name}[{i}] differs from the reference"


SHAPES = gpt_shapes()[:14] + [(0,), (1,), (1500,), (37, 41)]


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_list_call_matches_the_reference(backend, rule, options, combo):
    got = _mixed_run(rule, options, SHAPES, combo, backend)
    _assert_same(got, _mixed_run(rule, options, SHAPES, combo, "numpy"), f"{backend} {combo}")


@pytest.mark.parametrize("combo", ["all-bf16", "master-f16"])
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_flat_call_matches_the_reference(backend, rule, options, combo):
    got = _mixed_run(rule, options, [(3, 333)], combo, backend, listed=False)
    _assert_same(got, _mixed_run(rule, options, [(3, 333)], combo, "numpy", listed=False), f"{backend} {combo}")


@pytest.mark.parametrize("combo", ["all-bf16", "master-bf16-state-bf16", "master-f16", "master-bf16-state-int8"])
def test_independent_of_the_thread_count_and_matches_the_reference(backend, combo):
    shapes = [(300_001,), (1000,), (70_000, 3), (5,)]
    rule, options = "adamw", FULL["adamw"]
    before = fastopt.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            fastopt.set_num_threads(threads)
            runs.append(_mixed_run(rule, options, shapes, combo, backend, steps=2))
    finally:
        fastopt.set_num_threads(before)
    _assert_same(runs[1], runs[0], f"{backend} 2 threads vs 1")
    _assert_same(runs[0], _mixed_run(rule, options, shapes, combo, "numpy", steps=2), f"{backend} vs reference")


def test_int8_blocks_with_nan_and_inf_match_the_reference(backend):
    def run(name):
        rng = np.random.default_rng(8)
        sizes = [300, 1000, 256]
        ps = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        ms, vs = [F.Int8State.zeros((n,)) for n in sizes], [F.Int8State.zeros((n,), signed=False) for n in sizes]
        for t in range(1, 4):
            gs = [rng.standard_normal(n).astype(np.float32) for n in sizes]
            if t == 2:  # a NaN spoils its block; an infinity makes its block's absmax infinite
                gs[0][3], gs[1][600], gs[1][900] = np.nan, np.inf, np.uint32(0xFFC12345).view(np.float32)
            fastopt.adamw_(ps, gs, ms, vs, step=t, lr=1e-2, weight_decay=0.1, backend=name)
        return {"param": [_bits(p) for p in ps], "state": [_bits(s.codes) + _bits(s.absmax) for s in ms + vs]}
    _assert_same(run(backend), run("numpy"), f"{backend} 8-bit non-finite")


@pytest.mark.parametrize("rule", ["adam", "lion", "sgd"])
def test_flushing_matches_the_reference(backend, rule):
    options = FULL[rule]
    before = fastopt.get_flush_denormal()
    try:
        fastopt.set_flush_denormal(True)
        got = _mixed_run(rule, options, [(2000,)], "all-bf16", backend, seed=5)
        ref = _mixed_run(rule, options, [(2000,)], "all-bf16", "numpy", seed=5)
    finally:
        fastopt.set_flush_denormal(before)
    _assert_same(got, ref, f"{backend} flushing")


# ---- bad input: a clear error naming the argument, nothing written ---------------------

def _adamw_buffers(n=64):
    p, g = _rng_arrays(n, 2, 9)
    return p.astype(BF16), g.astype(BF16), np.zeros(n, BF16), np.zeros(n, BF16)


@pytest.mark.parametrize("backend_name", ["numpy", "numba", "c"])
@pytest.mark.parametrize("case,error,match", [
    ("float64 state", TypeError, r"exp_avg_sq has dtype float64.*float32 or bfloat16"),
    ("float16 state", TypeError, r"exp_avg has dtype float16.*float32 or bfloat16"),
    ("float16 param without master", ValueError, r"float16 param needs a float32 master copy"),
    ("master for a float32 param", ValueError, r"master_param is the float32 master copy"),
    ("bfloat16 master", TypeError, r"master_param has dtype bfloat16.*must be float32"),
    ("master of another shape", ValueError, r"master_param has shape \(63,\), expected \(64,\)"),
    ("master overlapping the state", ValueError, r"overlaps"),
    ("no step with stochastic rounding", ValueError, r"rounds param and exp_avg \(bfloat16\) stochastically.*step="),
    ("negative seed", ValueError, r"rounding_seed must be an int in \[0, 2\*\*64\), got -1"),
    ("float seed", TypeError, r"rounding_seed must be an int.*float"),
    ("two dtypes in one role", TypeError, r"exp_avg\[1\] has dtype float32, expected bfloat16 \(the format of exp_avg\[0\]\)"),
])
def test_bad_input_is_refused_before_anything_is_written(backend_name, case, error, match):
    p, g, m, v = _adamw_buffers()
    kw = dict(step=1, lr=0.1, backend=backend_name)
    fn = fastopt.adamw_
    args = [p, g, m, v]
    if case == "float64 state":
        args[3] = np.zeros(64)
    elif case == "float16 state":
        args[2] = np.zeros(64, F16)
    elif case == "float16 param without master":
        args[0] = p.astype(F16)
    elif case == "master for a float32 param":
        args[0] = p.astype(np.float32)
        kw["master_param"] = np.zeros(64, np.float32)
    elif case == "bfloat16 master":
        kw["master_param"] = np.zeros(64, BF16)
    elif case == "master of another shape":
        kw["master_param"] = np.zeros(63, np.float32)
    elif case == "master overlapping the state":
        state = np.zeros(128, np.float32)
        args[3] = state[:64]
        kw["master_param"] = state[32:96]
    elif case == "no step with stochastic rounding":
        fn, args, kw = fastopt.lion_, [p, g, m], dict(lr=0.1, backend=backend_name)
    elif case == "negative seed":
        kw["rounding_seed"] = -1
    elif case == "float seed":
        kw["rounding_seed"] = 1.0
    elif case == "two dtypes in one role":
        q, h = _adamw_buffers(8)[:2]
        args = [[p, q], [g, h], [m, np.zeros(8, np.float32)], [v, np.zeros(8, BF16)]]
    before = [_bits(a) for arg in args for a in (arg if isinstance(arg, list) else [arg])]
    with pytest.raises(error, match=match):
        fn(*args, **kw)
    after = [_bits(a) for arg in args for a in (arg if isinstance(arg, list) else [arg])]
    assert before == after


def test_skipped_update_writes_nothing():
    p, g, m, v = _adamw_buffers()
    master = F.load(p).copy()
    before = [_bits(a) for a in (p, m, v, master)]
    fastopt.adamw_(p, g, m, v, step=1, master_param=master, found_inf=1.0, backend="numpy")
    assert before == [_bits(a) for a in (p, m, v, master)]


def test_every_rule_takes_the_formats_through_its_function():
    # (the functions pass master_param and rounding_seed on: a rule whose function dropped
    # them would update the master-less bf16 param with a different stream or not at all)
    for name, rule in RULES.items():
        assert "master_param" in getattr(fastopt, name + "_").__code__.co_varnames
        assert "rounding_seed" in getattr(fastopt, name + "_").__code__.co_varnames


# ---- 8-bit blockwise state ----------------------------------------------------------------

from fastopt.formats import Int8State  # noqa: E402


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_maps(signed):
    m = F.dynamic_map(signed)
    assert m.dtype == np.float32 and m.size == 256 and np.all(np.diff(m) > 0)
    assert m[-1] == 1.0 and 0.0 in m
    assert (m[0] < -0.99) if signed else (m[0] == 0.0)
    # per decade 10^-6..10^0, the midpoints of an even split of [0.1, 1]: 2^i (signed: per sign) values
    positive = m[m > 0][:-1]
    decades = np.floor(np.log10(positive.astype(np.float64)) + 1e-9)
    counts = [int(np.sum(decades == d)) for d in range(-7, 0)]
    assert counts == [2 ** i * (1 if signed else 2) for i in range(7)]
    mids = F.map_midpoints(signed)
    assert np.all((m[:-1] < mids) & (mids < m[1:]))


def test_quantize_picks_the_nearest_code_per_block():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * np.repeat([1e-3, 1.0, 30.0, 1e-6], 250)).astype(np.float32)
    for signed in (True, False):
        v = np.abs(x) if not signed else x
        codes, absmax = F.quantize(v, signed)
        blocks = np.concatenate([v, np.zeros(24, np.float32)]).reshape(-1, 256)
        assert np.array_equal(absmax, np.max(np.abs(blocks), axis=1))
        norm = (blocks / absmax[:, None]).reshape(-1)[:1000]
        m = F.dynamic_map(signed).astype(np.float64)
        nearest = np.abs(norm[:, None].astype(np.float64) - m[None, :])
        best = nearest.min(axis=1)
        assert np.allclose(nearest[np.arange(1000), codes], best, rtol=0, atol=1e-7)  # (midpoints rounded to f32)
        back = F.dequantize(codes, absmax, signed)
        assert np.array_equal(back, F.dynamic_map(signed)[codes] * np.repeat(absmax, 256)[:1000])


def test_non_finite_state_spoils_its_block_only():
    x = np.ones(600, np.float32)
    x[300] = np.nan
    x[301] = np.uint32(0xFFC12345).view(np.float32)  # (another NaN: the block's absmax is still the quiet NaN)
    codes, absmax = F.quantize(x, True)
    back = F.dequantize(codes, absmax, True)
    assert absmax[1:2].view(np.uint32)[0] == 0x7FC00000 and np.all(np.isnan(back[256:512]))
    assert np.array_equal(back[:256], np.ones(256, np.float32)) and np.array_equal(back[512:], np.ones(88, np.float32))
    zeros = F.quantize(np.zeros(300, np.float32), True)
    assert np.array_equal(F.dequantize(*zeros, True), np.zeros(300, np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_lookup_of_the_compiled_backends_is_the_search(signed):
    # fast_codes (one table lookup and one compare) against #{mid < v}, on every float32
    # near a midpoint or a bucket's edge, and on spread random values
    mids = F.map_midpoints(signed)
    near = (mids.view(np.uint32).astype(np.int64)[:, None] + np.arange(-3, 4)).reshape(-1).astype(np.uint32)
    tops = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    rng = np.random.default_rng(21)
    spread = rng.uniform(-1, 1, 200_000) ** rng.choice([1, 3, 9, 27], 200_000)
    v = np.concatenate([near.view(np.float32), tops.view(np.float32), (tops | np.uint32(0xFFFF)).view(np.float32),
                        spread.astype(np.float32), np.float32([0.0, -0.0, 1.0, -1.0, 1e-38, -1e-45])])
    v = v[np.abs(v) <= 1]  # (NaN out too: quantize gives it 0.0's code before any lookup)
    assert np.array_equal(F.fast_codes(v, signed), np.searchsorted(mids, v, side="left"))
    assert np.array_equal(F.fused_codes(v, signed), np.searchsorted(mids, v, side="left"))
    assert np.array_equal(F.fused_bucket_codes(v, signed), np.searchsorted(mids, v, side="left"))


def test_int8_state_update_is_dequantize_update_quantize():
    p, g, m0 = _rng_arrays(1000, 3, 12)
    m = Int8State.from_float(m0 * 0.01)
    v = Int8State.from_float(np.abs(m0) * 1e-3, signed=False)
    m32, v32 = m.dequantize(), v.dequantize()
    a, b = p.copy(), p.copy()
    fastopt.adam_(a, g, m, v, step=3, lr=0.01, backend="numpy")
    fastopt.adam_(b, g, m32, v32, step=3, lr=0.01, backend="numpy")
    assert _bits(a) == _bits(b)
    for st, ref in ((m, m32), (v, v32)):
        codes, absmax = F.quantize(ref, st.signed)
        assert np.array_equal(st.codes, codes) and np.array_equal(st.absmax, absmax)


def test_int8_state_tracks_float32_over_many_steps():
    p, = _rng_arrays(4096, 1, 13)
    rng = np.random.default_rng(14)
    a, b = p.copy(), p.copy()
    m8, v8 = Int8State.zeros(p.shape), Int8State.zeros(p.shape, signed=False)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in range(1, 61):
        g = rng.standard_normal(p.size).astype(np.float32)
        fastopt.adamw_(a, g, m8, v8, step=t, lr=1e-3, backend="numpy")
        fastopt.adamw_(b, g, m, v, step=t, lr=1e-3, backend="numpy")
    # each step moves a parameter by about lr; 8-bit moments change its size by a few percent
    moved = np.abs(b - p)
    assert np.median(np.abs(a - b) / moved) < 0.05
    # a step's quantization error is at most half a map step (0.7% of its block's absmax
    # at the top of the map); the first moment's decay (0.9) adds up about ten of them
    assert np.max(np.abs(m8.dequantize() - m)) < 0.05 * np.max(np.abs(m))


@pytest.mark.parametrize("case,error,match", [
    ("unsigned map for a signed buffer", ValueError, r"exp_avg uses the unsigned 8-bit map, but exp_avg may be negative"),
    ("short absmax", ValueError, r"exp_avg\.absmax has 3 values, expected 4 \(one per block of 256 of its 1000"),
    ("float64 absmax", TypeError, r"exp_avg_sq\.absmax must be a 1-D float32 array"),
    ("shared absmax", ValueError, r"absmax overlaps"),
    ("codes of another shape", ValueError, r"exp_avg has shape \(999,\), expected \(1000,\)"),
    ("two maps in one argument", ValueError, r"exp_avg_sq\[1\] uses the signed 8-bit map, exp_avg_sq\[0\] the "
                                             r"unsigned one; every Int8State of one state argument uses one map"),
])
@pytest.mark.parametrize("backend_name", ["numpy", "numba", "c"])
def test_bad_int8_state_is_refused_before_anything_is_written(case, error, match, backend_name):
    p, g = _rng_arrays(1000, 2, 15)
    m, v = Int8State.zeros(p.shape), Int8State.zeros(p.shape, signed=False)
    if case == "unsigned map for a signed buffer":
        m = Int8State.zeros(p.shape, signed=False)
    elif case == "short absmax":
        m.absmax = np.zeros(3, np.float32)
    elif case == "float64 absmax":
        v.absmax = np.zeros(4)
    elif case == "shared absmax":
        v.absmax = m.absmax
    elif case == "codes of another shape":
        m = Int8State.zeros((999,))
    before = [_bits(a) for a in (p, m.codes, m.absmax, v.codes, v.absmax)]
    with pytest.raises(error, match=match):
        if case == "two maps in one argument":
            fastopt.adamw_([p, p.copy()], [g, g.copy()], [m, Int8State.zeros(p.shape)], [v, Int8State.zeros(p.shape)],
                           step=1, backend=backend_name)
        else:
            fastopt.adamw_(p, g, m, v, step=1, backend=backend_name)
    assert before == [_bits(a) for a in (p, m.codes, m.absmax, v.codes, v.absmax)]
