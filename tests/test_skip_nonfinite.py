"""The opt-in non-finite policy: ``skip_nonfinite=True`` drops a step whose
gradient holds NaN/Inf, leaving parameters, state and step count untouched and
reporting the skip; the default propagates NaN exactly as torch.optim does."""
import numpy as np
import pytest

import fastopt
from fastopt.rules import RULES
from oracle import CASES

RULES_WITH_OPTIONS = [(rule, CASES[rule][0]) for rule in CASES]


def snapshot(opt, flat):
    return flat.data.tobytes(), [{k: (v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                                 for s in opt.state]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("rule,options", RULES_WITH_OPTIONS, ids=[r for r, _ in RULES_WITH_OPTIONS])
def test_flat_optimizer_skips_and_reports(rule, options, bad):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 5), (7,)]]
    flat = fastopt.FlatParams(arrays)
    twin = fastopt.FlatParams([a.copy() for a in arrays])
    cls = getattr(fastopt, RULES[rule].title)
    opt, ref = cls(flat, skip_nonfinite=True, **options), cls(twin, **options)
    grads = [rng.standard_normal(flat.grad.shape).astype(np.float32) for _ in range(3)]
    flat.grad[:] = grads[0]
    twin.grad[:] = grads[0]
    assert opt.step() is True and ref.step() is True
    before = snapshot(opt, flat)
    flat.grad[:] = grads[1]
    flat.grad[4] = bad
    assert opt.step() is False
    assert opt.skipped_steps == 1
    assert snapshot(opt, flat) == before
    # The skipped step left no trace: the run continues as if it never happened.
    flat.grad[:] = grads[2]
    twin.grad[:] = grads[2]
    assert opt.step() is True and ref.step() is True
    assert flat.data.tobytes() == twin.data.tobytes()


def test_default_propagates_nan_like_torch():
    flat = fastopt.FlatParams([np.ones(8, np.float32)])
    opt = fastopt.Adam(flat)
    flat.grad[:] = 1.0
    flat.grad[2] = np.nan
    assert opt.step() is True
    assert np.isnan(flat.data[2]) and np.isfinite(np.delete(flat.data, 2)).all()


def test_only_group_segments_are_checked():
    flat = fastopt.FlatParams([np.ones(16, np.float32), np.ones(16, np.float32)])
    opt = fastopt.SGD(flat, lr=0.1, skip_nonfinite=True, groups=[{"params": flat.span(0, 1)}])
    flat.grad[:] = 1.0
    flat.grad[flat.span(1, 2)] = np.nan  # outside every group: frozen, not read
    assert opt.step() is True


def test_torch_adapter_skips():
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    model = torch.nn.Linear(4, 3)
    opt = ft.AdamW(model.parameters(), lr=0.1, skip_nonfinite=True)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(torch.tensor([[float("nan"), 1.0, 1.0, 1.0]])).sum().backward()
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not opt.last_step_skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_skip_flag_is_checked():
    with pytest.raises(TypeError, match="skip_nonfinite"):
        fastopt.Adam(np.zeros(4, np.float32), skip_nonfinite="yes")
