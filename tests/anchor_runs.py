"""Training runs shared by the tests of the rules whose torch classes are their own
(ASGD's derived state, Muon, Adafactor, the schedule-free rules): a small model,
fixed batches, and the state-dict round trip between fastopt and the anchor."""
from __future__ import annotations

from typing import Callable

import torch

_gen = torch.Generator().manual_seed(3)
XS, YS = torch.randn(40, 32, 6, generator=_gen), torch.randn(40, 32, 3, generator=_gen)


def model(norm: bool = False, bias: bool = True) -> torch.nn.Module:
    """6 -> 12 -> 3: two weight matrices, biases (``bias``), a LayerNorm or a Tanh between."""
    torch.manual_seed(0)
    middle = torch.nn.LayerNorm(12) if norm else torch.nn.Tanh()
    return torch.nn.Sequential(torch.nn.Linear(6, 12, bias=bias), middle, torch.nn.Linear(12, 3, bias=bias))


def train(net: torch.nn.Module, opt, steps: int, start: int = 0) -> None:
    """``steps`` steps on batches ``start``..., in train mode for an optimizer that has one
    (schedule-free: ``opt.train()`` first, ``opt.eval()`` after, as its users do)."""
    switches = hasattr(opt, "eval") and hasattr(opt, "train")
    if switches:
        opt.train()
    for t in range(start, start + steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(XS[t]), YS[t]).backward()
        opt.step()
    if switches:
        opt.eval()


def switch_and_resume(make_model: Callable[[], torch.nn.Module], make_anchor: Callable, make_ours: Callable,
                      close: Callable) -> None:
    """The anchor (15 steps) -> fastopt (15) -> the anchor (10) lands where 40 anchor steps land
    (``close(net, its last optimizer, the straight run's net, its optimizer)``); and fastopt's
    own state dict resumes fastopt bit for bit (15 + 15 steps, each run switching at the same step)."""
    straight = make_model()
    o_straight = make_anchor(straight.parameters())
    train(straight, o_straight, 40)
    net = make_model()
    first = make_anchor(net.parameters())
    train(net, first, 15)
    middle = make_ours(net.parameters())
    middle.load_state_dict(first.state_dict())
    train(net, middle, 15, start=15)
    last = make_anchor(net.parameters())
    last.load_state_dict(middle.state_dict())
    train(net, last, 10, start=30)
    close(net, last, straight, o_straight)

    whole, half = make_model(), make_model()
    o_whole, o_half = make_ours(whole.parameters()), make_ours(half.parameters())
    train(whole, o_whole, 15)
    train(whole, o_whole, 15, start=15)
    train(half, o_half, 15)
    resumed = make_ours(half.parameters())
    resumed.load_state_dict(o_half.state_dict())
    train(half, resumed, 15, start=15)
    for a, b in zip(half.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def close_to(atol: float, rtol: float, state: tuple = ()) -> Callable:
    """A ``close`` for :func:`switch_and_resume`: the parameters, and the ``state`` keys of each."""
    def close(net, opt, other, other_opt) -> None:
        for a, b in zip(net.parameters(), other.parameters()):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
            for key in state:
                torch.testing.assert_close(opt.state[a][key], other_opt.state[b][key], atol=atol, rtol=rtol)
    return close
