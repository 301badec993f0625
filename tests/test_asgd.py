"""ASGD (``torch.optim.ASGD``): the averaging past ``t0`` and the state torch keeps.

The table-driven matrix covers ASGD's options, but with its defaults
(``t0 = 1e6``) and their variations the average is either a copy of the
parameters or moves by ~1e-6 a step, and ``lambd``'s decay of ``eta`` stays
below float32's resolution over 60 steps. These cases make both visible: the
average starts after ``t0 = 10`` steps (with ``mu = 1/(t-1-t0)`` from 1/2 down
to 1/49), and ``lambd*lr`` is large enough that ``eta`` falls by a third.
torch keeps ``eta`` and ``mu`` in each parameter's state; fastopt recomputes
them from ``lr`` and the step (``Rule.derived``), and writes them into state
dicts as torch holds them, checked here bit for bit against torch's.
"""
from __future__ import annotations

import numpy as np
import pytest

import fastopt
from oracle import inputs, run_fastopt, run_torch

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402
from anchor_runs import close_to, model, switch_and_resume, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPTIONS = [dict(lr=0.05, lambd=0.2, t0=10.0), dict(lr=0.05, lambd=0.2, alpha=1.0, t0=3.0, weight_decay=0.1),
           dict(t0=-5.0, maximize=True)]
IDS = ["t0=10", "t0=3-wd", "t0=-5-maximize"]
HOST = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]
TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-11, atol=1e-11)}  # (test_reference_vs_torch)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_reference_matches_torch_with_averaging(options, dtype):
    p0, grads = inputs(257, 60, dtype, seed=5)
    p, state = run_fastopt("asgd", options, p0, grads, backend="numpy")
    p_ref, state_ref = run_torch("asgd", options, p0, grads)
    # The average has moved away from the parameters (so averaging, not copying, was compared).
    assert np.max(np.abs(state["ax"] - p)) > 1e-2
    np.testing.assert_allclose(p, p_ref, **TOL[dtype])
    np.testing.assert_allclose(state["ax"], state_ref["ax"], **TOL[dtype])


@pytest.mark.parametrize("backend", HOST)
@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_every_backend_is_bitwise_the_reference(options, backend):
    p0, grads = inputs(1000, 30, np.float32, seed=6)
    p, state = run_fastopt("asgd", options, p0, grads, backend=backend)
    p_ref, state_ref = run_fastopt("asgd", options, p0, grads, backend="numpy")
    assert p.tobytes() == p_ref.tobytes()
    assert state["ax"].tobytes() == state_ref["ax"].tobytes()


def states(net, opt):
    return [opt.state[p] for p in net.parameters()]


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_torch_adapter_trains_and_keeps_torchs_state(options):
    ours, theirs = model(), model()
    o_ours, o_theirs = ft.ASGD(ours.parameters(), **options), torch.optim.ASGD(theirs.parameters(), foreach=False,
                                                                              **options)
    train(ours, o_ours, 40)
    train(theirs, o_theirs, 40)
    close_to(2e-5, 2e-5, ("ax",))(ours, o_ours, theirs, o_theirs)
    # eta and mu as torch holds them after the last step: the same formulas, in double, then float32.
    saved, theirs_saved = o_ours.state_dict()["state"], o_theirs.state_dict()["state"]
    for k in theirs_saved:
        assert set(saved[k]) == set(theirs_saved[k]) == {"step", "eta", "mu", "ax"}
        for key in ("step", "eta", "mu"):
            assert saved[k][key].dtype == theirs_saved[k][key].dtype
            assert saved[k][key].item() == theirs_saved[k][key].item(), key
    assert "eta" not in o_ours.state[next(ours.parameters())]  # (written into state dicts, not kept)


def test_state_dicts_load_both_ways_and_resume_exactly():
    """torch (15 steps) -> fastopt (15) -> torch (10), every average compared with 40 torch steps;
    and fastopt's own dict resumes fastopt bit for bit."""
    options = OPTIONS[0]
    switch_and_resume(model, lambda ps: torch.optim.ASGD(ps, foreach=False, **options),
                      lambda ps: ft.ASGD(ps, **options), close_to(2e-5, 2e-5, ("ax",)))


@pytest.mark.parametrize("bad,message", [("x", "must be a number"), (None, "must be a number")])
def test_a_saved_eta_that_is_no_number_is_refused_before_loading(bad, message):
    net = model()
    opt = torch.optim.ASGD(net.parameters(), foreach=False)
    train(net, opt, 2)
    sd = opt.state_dict()
    sd["state"][0]["eta"] = bad
    ours = ft.ASGD(net.parameters())
    with pytest.raises(TypeError, match=rf"state_dict\['state'\]\[0\]\['eta'\] {message}"):
        ours.load_state_dict(sd)
    assert not ours.state
