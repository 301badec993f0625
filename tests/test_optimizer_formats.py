"""The stateful optimizers' storage options: ``fastopt.<Rule>(flat, state_dtype=...,
master_weights=..., rounding_seed=...)`` over bfloat16/float16 buffers.

A step of such an optimizer is one mixed-format functional call per group
(fastopt.formats), so every rule is checked against those calls made by hand, bit for
bit, on every host backend; then the state dict (its layout, a round trip, a resumed
run, a float32 dict loaded into bfloat16 state) and the bad options.
"""
import ml_dtypes
import numpy as np
import pytest

import fastopt
from fastopt import formats as F
from fastopt.rules import RULES
from oracle import FULL, fastopt_step, initial_state, needed_state

BF16 = np.dtype(ml_dtypes.bfloat16)
CASES = list(FULL.items())


def _has_mixed(name):
    import importlib
    info = fastopt.backends()[name]
    if not info.available:
        return False
    module = importlib.import_module({"numpy": "fastopt.backends.reference", "numba": "fastopt.backends.numba_cpu",
                                      "c": "fastopt.backends.c"}[name])
    return hasattr(module, "run_mixed")


@pytest.fixture(params=["numpy", "numba", "c"])
def backend(request, monkeypatch):
    assert _has_mixed(request.param), f"backend {request.param} has no mixed-format updates"
    monkeypatch.setenv("FASTOPT_BACKEND", request.param)  # (the stateful optimizers take the default backend)
    fastopt.dispatch.refresh_environment()
    yield request.param
    monkeypatch.undo()
    fastopt.dispatch.refresh_environment()


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in [(100,), (3, 5), (40, 7)]]


def _grads(flat, steps, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(flat.data.size).astype(flat.dtype) for _ in range(steps)]


@pytest.mark.parametrize("master", [False, True], ids=["sr-param", "master"])
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_steps_are_the_mixed_functional_calls(backend, rule, options, master):
    title = RULES[rule].title
    flat = fastopt.FlatParams(_arrays(), dtype=BF16)
    start = flat.data.copy()
    opt = getattr(fastopt, title)(flat, state_dtype="bfloat16", master_weights=master, rounding_seed=9,
                                  **{k: v for k, v in options.items()})
    grads = _grads(flat, 4)
    for g in grads:
        opt.step(g)
    # by hand: the same calls
    p = start.copy()
    master_param = F.load(start).copy() if master else None
    state = {k: v.astype(BF16) for k, v in initial_state(rule, options, F.load(start)).items()}
    extra: dict = {}
    for t, g in enumerate(grads, start=1):
        kw = dict(options, rounding_seed=9, **({"master_param": master_param} if master else {}))
        kw_step = dict(kw)
        if not RULES[rule].takes_step:  # (the optimizer passes the step: stochastic rounding needs it)
            fastopt_step(rule, {**kw_step, "step": t}, p, g, state, t, extra, backend)
        else:
            fastopt_step(rule, kw_step, p, g, state, t, extra, backend)
    assert p.tobytes() == opt.data.tobytes()
    assert not np.array_equal(p.view(np.uint16), start.view(np.uint16))
    for name in needed_state(rule, options):
        assert opt.state[0][name].dtype == BF16
        assert opt.state[0][name].tobytes() == state[name].tobytes(), name
    if master:
        assert opt.state[0]["master_param"].tobytes() == master_param.tobytes()


def test_state_dict_round_trip_and_resume(backend):
    flat = fastopt.FlatParams(_arrays(), dtype=BF16)
    grads = _grads(flat, 6)
    whole = fastopt.AdamW(fastopt.FlatParams(_arrays(), dtype=BF16), lr=1e-2, state_dtype="bfloat16",
                          master_weights=True, rounding_seed=4)
    for g in grads:
        whole.step(g)
    first = fastopt.AdamW(flat, lr=1e-2, state_dtype="bfloat16", master_weights=True, rounding_seed=4)
    for g in grads[:3]:
        first.step(g)
    saved = first.state_dict()
    entry = saved["state"][0]
    assert entry["exp_avg"].dtype == BF16 and entry["master_param"].dtype == np.float32 and entry["step"] == 3
    resumed_flat = fastopt.FlatParams(_arrays(), dtype=BF16)
    resumed_flat.data[...] = flat.data
    resumed = fastopt.AdamW(resumed_flat, lr=1e-2, state_dtype="bfloat16", master_weights=True, rounding_seed=4)
    resumed.load_state_dict(saved)
    for g in grads[3:]:
        resumed.step(g)
    assert resumed.data.tobytes() == whole.data.tobytes()
    for key in ("exp_avg", "exp_avg_sq", "master_param"):
        assert resumed.state[0][key].tobytes() == whole.state[0][key].tobytes()


def test_float32_state_dict_loads_into_bfloat16_state_rounded_to_nearest():
    flat = fastopt.FlatParams(_arrays())
    plain = fastopt.Adam(flat, lr=1e-2)
    plain.step(_grads(flat, 1)[0])
    saved = plain.state_dict()
    low = fastopt.Adam(fastopt.FlatParams(_arrays()), lr=1e-2, state_dtype="bfloat16")
    low.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert low.state[0][key].dtype == BF16
        assert np.array_equal(low.state[0][key].view(np.uint16), F.bf16_nearest(saved["state"][0][key]))


@pytest.mark.parametrize("kwargs,dtype,error,match", [
    (dict(state_dtype="int4"), np.float32, ValueError, r"state_dtype must be None, 'float32', 'bfloat16' or 'int8', got 'int4'"),
    (dict(state_dtype="bfloat16"), np.float64, ValueError, r"state_dtype bfloat16 needs a float32, bfloat16"),
    (dict(master_weights=True), np.float32, ValueError, r"master_weights=True keeps a float32 copy.*float32"),
    (dict(), np.float16, ValueError, r"float16 params need master_weights=True"),
    (dict(rounding_seed=-1), np.float32, ValueError, r"rounding_seed must be an int in \[0, 2\*\*64\), got -1"),
    (dict(master_weights="yes"), BF16, TypeError, r"master_weights"),
])
def test_bad_options_are_refused(kwargs, dtype, error, match):
    with pytest.raises(error, match=match):
        fastopt.AdamW(fastopt.FlatParams(_arrays(), dtype=dtype), **kwargs)


def test_two_pass_rules_refuse_low_precision_buffers():
    with pytest.raises(TypeError, match=r"LAMB takes float32 or float64 buffers only"):
        fastopt.LAMB(fastopt.FlatParams(_arrays(), dtype=BF16))


def test_loading_a_wrong_dtype_names_the_key_and_changes_nothing(backend):
    opt = fastopt.AdamW(fastopt.FlatParams(_arrays(), dtype=BF16), state_dtype="bfloat16", master_weights=True)
    opt.step(np.ones(opt.data.size, BF16))
    saved = opt.state_dict()
    before = {k: v.tobytes() for k, v in opt.state[0].items() if hasattr(v, "tobytes")}
    bad = {"state": {0: {**saved["state"][0], "exp_avg": saved["state"][0]["exp_avg"].astype(np.float64)}},
           "param_groups": saved["param_groups"]}
    with pytest.raises(TypeError, match=r"\['exp_avg'\] has dtype float64, expected bfloat16 \(the state's dtype\) or float32"):
        opt.load_state_dict(bad)
    bad = {"state": {0: {**saved["state"][0], "master_param": saved["state"][0]["exp_avg"]}},
           "param_groups": saved["param_groups"]}
    with pytest.raises(TypeError, match=r"\['master_param'\] has dtype bfloat16, expected float32"):
        opt.load_state_dict(bad)
    assert before == {k: v.tobytes() for k, v in opt.state[0].items() if hasattr(v, "tobytes")}


def test_a_state_buffer_of_another_dtype_is_refused_before_writing(backend):
    opt = fastopt.AdamW(fastopt.FlatParams(_arrays(), dtype=BF16), state_dtype="bfloat16", rounding_seed=1)
    opt.step(np.ones(opt.data.size, BF16))
    opt.state[0]["exp_avg_sq"] = np.zeros(opt.data.size, np.float64)
    before = opt.data.tobytes(), opt.state[0]["exp_avg"].tobytes()
    with pytest.raises(TypeError, match=r"exp_avg_sq has dtype float64"):
        opt.step(np.ones(opt.data.size, BF16))
    assert before == (opt.data.tobytes(), opt.state[0]["exp_avg"].tobytes())


def test_int8_state_dict_round_trip_resume_and_float32_load(monkeypatch):
    monkeypatch.setenv("FASTOPT_BACKEND", "numpy")
    fastopt.dispatch.refresh_environment()
    try:
        flat = fastopt.FlatParams(_arrays())
        grads = _grads(flat, 6)
        whole = fastopt.AdamW(fastopt.FlatParams(_arrays()), lr=1e-2, state_dtype="int8")
        for g in grads:
            whole.step(g)
        first = fastopt.AdamW(flat, lr=1e-2, state_dtype="int8")
        for g in grads[:3]:
            first.step(g)
        saved = first.state_dict()
        entry = saved["state"][0]["exp_avg_sq"]
        assert set(entry) == {"int8_codes", "absmax", "signed"} and entry["signed"] is False
        assert entry["int8_codes"].dtype == np.uint8 and entry["absmax"].size == F.blocks(flat.data.size)
        resumed_flat = fastopt.FlatParams(_arrays())
        resumed_flat.data[...] = flat.data
        resumed = fastopt.AdamW(resumed_flat, lr=1e-2, state_dtype="int8")
        resumed.load_state_dict(saved)
        for g in grads[3:]:
            resumed.step(g)
        assert resumed.data.tobytes() == whole.data.tobytes()
        # a float32 state dict (torch.optim's layout) loads quantized
        plain = fastopt.AdamW(fastopt.FlatParams(_arrays()), lr=1e-2)
        plain.step(grads[0])
        low = fastopt.AdamW(fastopt.FlatParams(_arrays()), lr=1e-2, state_dtype="int8")
        low.load_state_dict(plain.state_dict())
        codes, absmax = F.quantize(plain.state[0]["exp_avg"], True)
        assert np.array_equal(low.state[0]["exp_avg"].codes, codes)
        bad = {"state": {0: {**saved["state"][0], "exp_avg": {**saved["state"][0]["exp_avg"],
                                                              "absmax": np.zeros(3, np.float32)}}},
               "param_groups": saved["param_groups"]}
        with pytest.raises(TypeError, match=r"\['exp_avg'\]\['absmax'\] must be a float32 array of shape"):
            resumed.load_state_dict(bad)
    finally:
        monkeypatch.undo()
        fastopt.dispatch.refresh_environment()
