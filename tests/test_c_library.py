"""The C library's contract with the Python package (the C kernels themselves
are also tested by ctest, csrc/tests).

- Each scalars struct in fastopt.h has the fields of the rule's NamedTuple in
  the same order: the binding fills structs positionally, for every rule alike.
- ``fastopt_<rule>_prepare`` (for C users who have no Python) computes the same
  scalars as ``fastopt.rules``, bit for bit, NAdam's mu_product chain included.
- The C kernels are compiled without FMA contraction, so they equal the NumPy
  reference bit for bit (stronger than the tolerance test_backends allows).
"""
import numpy as np
import pytest

import fastopt
from fastopt.rules import KERNEL_SCALARS, RULES
from oracle import MATRIX, MATRIX_IDS, hyper, inputs, run_fastopt


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


# Arguments of fastopt_<rule>_prepare after ``out`` (and NAdam's mu_product), in order.
PREPARE_ARGS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "step"),
    "adagrad": ("lr", "lr_decay", "weight_decay", "eps", "maximize", "step"),
    "rmsprop": ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize", "step"),
    "adadelta": ("lr", "rho", "eps", "weight_decay", "maximize", "step"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "step"),
    "adamw": ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize", "step"),
    "adamax": ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize", "step"),
    "nadam": ("lr", "beta1", "beta2", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay",
              "maximize", "step"),
    "lion": ("lr", "beta1", "beta2", "weight_decay", "maximize"),
}


@pytest.mark.parametrize("rule,options", MATRIX, ids=MATRIX_IDS)
def test_c_prepare_equals_rules(ext, rule, options):
    ffi, lib = ext.ffi, ext.lib
    r = RULES[rule]
    mu_py = 1.0
    mu_c = ffi.new("double *", 1.0)
    for t in (1, 2, 3, 10, 1000):
        h = dict(hyper(rule, options), mu_product=mu_py, step=t)
        if "betas" in h:
            h["beta1"], h["beta2"] = h["betas"]
        expected, extra = r.prepare(h, t)
        out = ffi.new(f"fastopt_{r.kernel}_scalars *")
        args = [h[name] for name in PREPARE_ARGS[rule]]
        prepare = getattr(lib, f"fastopt_{rule}_prepare")
        rc = prepare(out, mu_c, *args) if rule == "nadam" else prepare(out, *args)
        assert rc == lib.FASTOPT_OK
        got = tuple(getattr(out, f) for f in expected._fields)
        assert got == tuple(float(x) if isinstance(x, float) else int(x) for x in expected), t
        if rule == "nadam":
            mu_py = extra
            assert mu_c[0] == mu_py


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
    monkeypatch.setattr(c, "_checkout_build_dir", lambda: tmp_path / "nothing")
    monkeypatch.setenv("FASTOPT_C_BUILD_DIR", str(tmp_path))
    reason = c.unavailable_reason()
    assert "compiled C library is missing" in reason and str(tmp_path) in reason
    with pytest.raises(RuntimeError, match="unavailable"):
        c.run("lion", *(np.zeros(4, np.float32),) * 2, (np.zeros(4, np.float32),), None)
