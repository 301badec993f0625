"""The C library's contract with the Python package (the C kernels themselves
are also tested by ctest, csrc/tests).

- Each scalars struct in fastopt.h has the fields of the rule's NamedTuple in
  the same order: the binding fills structs positionally, for every rule alike.
- ``fastopt_<rule>_prepare`` (for C users who have no Python) computes the same
  scalars as ``fastopt.rules``, bit for bit, NAdam's mu_product chain included;
  its argument order is derived from the Rule (both are generated from it).
- The C kernels are compiled without FMA contraction, so they equal the NumPy
  reference bit for bit (stronger than the tolerance test_backends allows).
- ``fastopt_<rule>_list_*`` (``backends.c.run_list``) equals one flat call per
  tensor bit for bit, on 1 and 2 threads.
"""
import numpy as np
import pytest

import fastopt
from fastopt.rules import KERNEL_SCALARS, RULES
import oracle
from oracle import hyper, inputs, run_fastopt

# RAdam's option cases, if the shared matrix does not have them yet.
_RADAM_CASES = [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
                dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6), dict(maximize=True)]
if "radam" in oracle.CASES:
    MATRIX, MATRIX_IDS = oracle.MATRIX, oracle.MATRIX_IDS
else:
    MATRIX = oracle.MATRIX + [("radam", o) for o in _RADAM_CASES]
    MATRIX_IDS = oracle.MATRIX_IDS + ["radam-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "defaults")
                                      for o in _RADAM_CASES]


@pytest.fixture(scope="module")
def ext():
    info = fastopt.backends()["c"]
    assert info.available, f"backend c did not load: {info.reason}"
    from fastopt.backends import c
    return c._ext


@pytest.mark.parametrize("kernel", sorted(KERNEL_SCALARS))
def test_struct_fields_mirror_rule_scalars(ext, kernel):
    fields = [name for name, _ in ext.ffi.typeof(f"fastopt_{kernel}_scalars").fields]
    assert fields == list(KERNEL_SCALARS[kernel]._fields)


def prepare_args(rule) -> list[str]:
    """fastopt_<rule>_prepare's arguments after ``out`` and the carried value, from the Rule:
    its hyperparameters in order (flat names expanded), then step unless the rule has none."""
    names = [n for h in rule.hyper for n in h.names if n != rule.carry_name]
    return names + (["step"] if rule.takes_step else [])


def test_prepare_signatures_follow_the_rule(ext):
    for name, r in RULES.items():
        fn = ext.ffi.typeof(getattr(ext.lib, f"fastopt_{name}_prepare"))
        args = [t.cname for t in fn.args]
        assert args[0] == f"fastopt_{r.kernel}_scalars *"
        rest = args[1:]
        if r.carry_name:
            assert rest[0] == "double *"
            rest = rest[1:]
        flags = {n for h in r.hyper if h.check.c is None for n in h.names}
        want = ["int64_t" if a == "step" else "int" if a in flags else "double" for a in prepare_args(r)]
        assert rest == want, name


@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_c_prepare_equals_rules(ext, rule, options):
    ffi, lib = ext.ffi, ext.lib
    r = RULES[rule]
    carry = r.carry[1] if r.carry else None
    carry_c = ffi.new("double *", carry if r.carry else 0.0)
    for t in (1, 2, 3, 4, 5, 6, 7, 10, 1000):
        h = dict(hyper(rule, options), step=t)
        if r.carry:
            h[r.carry_name] = carry
        flat = r.flat(r.checked({k: v for k, v in h.items() if k in r.defaults})[0])  # (as C takes them: None is 0.0)
        expected, extra = r.prepare({k: v for k, v in h.items() if k in r.defaults}, t)
        out = ffi.new(f"fastopt_{r.kernel}_scalars *")
        args = [t if name == "step" else flat[name] for name in prepare_args(r)]
        prepare = getattr(lib, f"fastopt_{rule}_prepare")
        rc = prepare(out, carry_c, *args) if r.carry else prepare(out, *args)
        assert rc == lib.FASTOPT_OK
        got = tuple(getattr(out, f) for f in expected._fields)
        want = tuple(float(x) if isinstance(x, float) else int(x) for x in expected)
        assert [np.float64(x).tobytes() for x in got] == [np.float64(x).tobytes() for x in want], t
        if r.carry:
            carry = extra
            assert np.float64(carry_c[0]).tobytes() == np.float64(carry).tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_c_equals_reference_bitwise(ext, rule, options, dtype):
    p0, grads = inputs(1031, 10, dtype, seed=3)
    grads[4][::97] = np.nan
    grads[5][::89] = np.inf
    with np.errstate(all="ignore"):
        p, state = run_fastopt(rule, options, p0, grads, backend="c")
        p_ref, state_ref = run_fastopt(rule, options, p0, grads, backend="numpy")
    for name, a, b in [("param", p, p_ref)] + [(k, state[k], state_ref[k]) for k in state]:
        same = (a.view(np.uint8).reshape(a.size, -1) == b.view(np.uint8).reshape(b.size, -1)).all(axis=1)
        same |= np.isnan(a) & np.isnan(b)  # NaN payloads may differ
        assert same.all(), f"{name}: {np.count_nonzero(~same)} elements differ"


def _random_tensors(rule, options, dtype, seed):
    r = RULES[rule]
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 3, 17, 0, 1000, 1, 4099, 64, 7] + list(rng.integers(0, 300, 6)) + [40000, 70001]
    needed = oracle.needed_state(rule, options)
    params, grads = [], []
    states = [[] if name in needed else None for name in r.state_names] if hasattr(r, "state_names") else \
        [[] if name in needed else None for name in r.state]
    for n in lengths:
        params.append(rng.standard_normal(n).astype(dtype))
        grads.append(rng.standard_normal(n).astype(dtype))
        for st in states:
            if st is not None:
                st.append(np.abs(rng.standard_normal(n)).astype(dtype))
    return params, grads, states


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_list_equals_per_tensor_calls(ext, rule, options, dtype, threads):
    from fastopt.backends import c
    r = RULES[rule]
    h = hyper(rule, options)
    if r.carry:
        h[r.carry_name] = 0.5
    scalars, _ = r.prepare(h, 3)
    params, grads, states = _random_tensors(rule, options, dtype, seed=len(MATRIX_IDS[0]) + threads)
    # odd offsets: the tensors start at different places of a 64-byte line
    params = [np.concatenate([np.zeros(k % 5, dtype), p])[k % 5:] for k, p in enumerate(params)]
    flat_p = [p.copy() for p in params]
    flat_s = [None if st is None else [a.copy() for a in st] for st in states]
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(threads)
    try:
        c.run_list(r.kernel, params, grads, tuple(states), scalars)
        for i in range(len(params)):
            c.run(r.kernel, flat_p[i], grads[i], tuple(None if st is None else st[i] for st in flat_s), scalars)
    finally:
        fastopt.set_num_threads(before)
    for i in range(len(params)):
        assert params[i].tobytes() == flat_p[i].tobytes(), f"param {i}"
        for st, fs in zip(states, flat_s):
            if st is not None:
                assert st[i].tobytes() == fs[i].tobytes(), f"state {i}"


def test_list_errors(ext):
    ffi, lib = ext.ffi, ext.lib
    s = ffi.new("fastopt_adam_scalars *")
    assert lib.fastopt_adam_prepare(s, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0, 1) == lib.FASTOPT_OK
    a = np.zeros(4, np.float32)
    fb = ffi.from_buffer
    tab = ffi.new("float *[]", [fb("float[]", a)])
    n = ffi.new("int64_t[]", [4])
    assert lib.fastopt_adam_list_f32(tab, tab, tab, tab, ffi.NULL, n, 1, s) == lib.FASTOPT_ERR_NULL  # amsgrad
    assert lib.fastopt_adam_list_f32(tab, tab, tab, tab, tab, n, -1, s) == lib.FASTOPT_ERR_LENGTH
    assert lib.fastopt_adam_list_f32(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 0, s) == 0
    assert lib.fastopt_adam_list_f32(tab, tab, tab, tab, tab, ffi.NULL, 1, s) == lib.FASTOPT_ERR_NULL
    assert lib.fastopt_adam_list_f32(tab, tab, tab, tab, tab, n, 1, ffi.NULL) == lib.FASTOPT_ERR_NULL
    nulls = ffi.new("float *[]", [ffi.NULL])
    assert lib.fastopt_adam_list_f32(tab, nulls, tab, tab, tab, n, 1, s) == lib.FASTOPT_ERR_NULL
    zero = ffi.new("int64_t[]", [0])
    assert lib.fastopt_adam_list_f32(nulls, nulls, nulls, nulls, nulls, zero, 1, s) == lib.FASTOPT_OK
    # a bad length anywhere: nothing written, even to the tensors before it
    b = np.ones(4, np.float32)
    tab2 = ffi.new("float *[]", [fb("float[]", b), fb("float[]", b)])
    bad = ffi.new("int64_t[]", [4, -1])
    assert lib.fastopt_adam_list_f32(tab2, tab2, tab2, tab2, tab2, bad, 2, s) == lib.FASTOPT_ERR_LENGTH
    assert (b == 1).all()
    # (arrays reach run_list validated by fastopt.buffers.check_lists: see test_bad_input.py)


def _adamw_in_process(n):
    p, g = np.ones(n, np.float32), np.full(n, 0.5, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fastopt.adamw_(p, g, m, v, step=1, backend="c")
    return p.tobytes()


def test_forked_child_does_not_hang(ext):
    """GNU OpenMP's pool does not survive fork; the library runs a forked child serially."""
    import multiprocessing

    n = 1 << 20  # large enough to use threads
    before = fastopt.get_num_threads()
    fastopt.set_num_threads(2)
    try:
        parent = _adamw_in_process(n)  # the parent's pool is now up
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_adamw_in_process, (n,)).get(timeout=120)
    finally:
        fastopt.set_num_threads(before)
    assert child == parent


def test_missing_library_is_reported_not_raised(monkeypatch, tmp_path):
    import sys

    from fastopt.backends import c
    monkeypatch.setattr(c, "_reason", None)
    monkeypatch.setattr(c, "_ext", None)
    monkeypatch.setattr(c, "_table", {})
    monkeypatch.delattr(fastopt, "_c", raising=False)
    monkeypatch.setitem(sys.modules, "fastopt._c", None)  # the packaged extension: absent
    from fastopt import native
    monkeypatch.setattr(native, "_checkout_build_dir", lambda: tmp_path / "nothing")
    monkeypatch.setenv("FASTOPT_C_BUILD_DIR", str(tmp_path))
    reason = c.unavailable_reason()
    assert "fastopt._c is missing" in reason and str(tmp_path) in reason
    with pytest.raises(RuntimeError, match="unavailable"):
        c.run("lion", *(np.zeros(4, np.float32),) * 2, (np.zeros(4, np.float32),), None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_flush_denormal_stores_signed_zeros(ext, dtype):
    """fastopt_set_flush_denormal(1): AdamW with subnormal state and zero gradients
    stores zeros of the stored values' signs; everything else (normal values, NaN)
    is the flush-off result unchanged. Off again: the subnormals are stored."""
    from fastopt.backends import c
    lib = ext.lib
    tiny = np.finfo(dtype).tiny
    sub = dtype(1e-39) if dtype == np.float32 else dtype(1e-309)
    r = RULES["adamw"]
    scalars, _ = r.prepare(hyper("adamw", {}), 1)
    n = 4099  # odd: the vector loop and its tail
    sign = np.where(np.arange(n) % 2 == 0, 1, -1).astype(dtype)
    param = sign * sub
    param[::7] = sign[::7] * dtype(1.5)  # normal values are untouched
    param[::11] = np.nan
    grad = np.zeros(n, dtype)
    exp_avg = -sign * sub
    exp_avg[::3] = 0  # where exp_avg is 0 the parameter stays subnormal (then flushed)
    exp_avg_sq = np.full(n, sub, dtype)

    def update():
        state = (exp_avg.copy(), exp_avg_sq.copy(), None)
        p = param.copy()
        c.run(r.kernel, p, grad, state, scalars)
        return p, state[0], state[1]

    assert lib.fastopt_get_flush_denormal() == 0
    off = update()
    try:
        assert lib.fastopt_set_flush_denormal(1) == lib.FASTOPT_OK
        assert lib.fastopt_get_flush_denormal() == 1
        on = update()
    finally:
        lib.fastopt_set_flush_denormal(0)
    assert lib.fastopt_get_flush_denormal() == 0
    # flush off: the subnormals are stored
    assert (np.abs(off[1][exp_avg != 0]) < tiny).all() and (off[1][exp_avg != 0] != 0).all()
    assert (np.abs(off[2]) < tiny).all() and (off[2] > 0).all()
    # flush on: zeros of the right sign in the state...
    assert (on[1] == 0).all() and (np.signbit(on[1]) == np.signbit(off[1])).all()
    assert (on[1][exp_avg != 0] == 0).all() and (np.signbit(on[1][exp_avg != 0]) == (sign[exp_avg != 0] > 0)).all()
    assert (on[2] == 0).all() and not np.signbit(on[2]).any()
    # ... and in param, where it stayed subnormal; exactly the flush rule applied to the flush-off result
    stays = (exp_avg == 0) & (np.arange(n) % 7 != 0) & (np.arange(n) % 11 != 0)
    assert stays.any() and (np.abs(off[0][stays]) < tiny).all()
    assert (on[0][stays] == 0).all() and (np.signbit(on[0][stays]) == (sign[stays] < 0)).all()
    for a, b in zip(off, on):
        with np.errstate(invalid="ignore"):
            want = np.where(np.isnan(a) | (np.abs(a) >= tiny), a, a * 0)
        same = (want.view(np.uint8).reshape(n, -1) == b.view(np.uint8).reshape(n, -1)).all(axis=1)
        assert (same | (np.isnan(want) & np.isnan(b))).all()
    assert np.isnan(on[0][::11]).all() and (on[0][::7][~np.isnan(on[0][::7])] != 0).all()
