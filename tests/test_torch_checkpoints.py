"""Checkpoints of models trained with fastopt.torch, through the libraries users save with.

fastopt.torch keeps the model's own parameters (nothing is re-homed into a
shared buffer), so safetensors and accelerate see an ordinary model. Each test
runs the same thing with torch.optim.AdamW and compares: the resumed run must
land exactly where the uninterrupted one lands (bitwise: both runs do the same
float operations in the same order, and a checkpoint is an exact copy).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as ft  # noqa: E402

STEPS = 12


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


_gen = torch.Generator().manual_seed(3)
X = torch.randn(STEPS, 16, 8, generator=_gen)
Y = torch.randn(STEPS, 16, 4, generator=_gen)


def train(m, opt, steps):
    for t in steps:
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(X[t]), Y[t]).backward()
        opt.step()


def straight_run(make_opt):
    m = model()
    train(m, make_opt(m), range(STEPS))
    return m


OPTIMIZERS = {"fastopt": lambda m: ft.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
              "torch": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)}


def assert_equal_models(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_safetensors_save_model_and_load_model(which, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    make = OPTIMIZERS[which]
    m = model()
    opt = make(m)
    train(m, opt, range(5))
    safetensors_torch.save_model(m, str(tmp_path / "model.safetensors"))  # raised on shared storage before
    torch.save(opt.state_dict(), tmp_path / "opt.pt")

    resumed = model()
    missing, unexpected = safetensors_torch.load_model(resumed, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    opt2 = make(resumed)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    train(resumed, opt2, range(5, STEPS))
    assert_equal_models(resumed, straight_run(make))
    if which == "fastopt":  # and it is the same training as torch's, to round-off
        for a, b in zip(resumed.parameters(), straight_run(OPTIMIZERS["torch"]).parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("which", list(OPTIMIZERS))
def test_accelerate_save_state_and_load_state_with_defaults(which, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    make = OPTIMIZERS[which]

    def prepared():
        acc = accelerate.Accelerator(cpu=True)
        m = model()
        m, opt = acc.prepare(m, make(m))
        return acc, m, opt

    acc, m, opt = prepared()
    train(m, opt, range(5))
    acc.save_state(str(tmp_path / "ckpt"))  # defaults: safetensors for the model
    acc2, resumed, opt2 = prepared()
    acc2.load_state(str(tmp_path / "ckpt"))
    first = next(iter(opt2.optimizer.state.values()))
    assert int(first["step"]) == 5
    train(resumed, opt2, range(5, STEPS))
    assert_equal_models(resumed, straight_run(make))


def test_a_submodule_checkpoint_holds_only_the_submodule(tmp_path):
    """A partial save of one LayerNorm, after training: its two tensors, not the model's."""
    import os

    big = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.LayerNorm(1000))
    opt = ft.AdamW(big.parameters())
    big(torch.randn(2, 1000)).sum().backward()
    opt.step()
    torch.save(big[1].state_dict(), tmp_path / "norm.pt")
    torch.save(big.state_dict(), tmp_path / "all.pt")
    assert os.path.getsize(tmp_path / "norm.pt") < 2 * 1000 * 4 + 4096  # 2 x 1000 floats and pickle overhead
    assert os.path.getsize(tmp_path / "all.pt") > 1000 * 1000 * 4
