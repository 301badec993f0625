"""What fastopt is compared with: the NumPy reference and ``torch.optim``.

*NumPy* is fastopt's reference backend (:mod:`fastopt.backends.reference`):
the update written out in plain NumPy expressions, a temporary array per
operation, as people first write it. The runner always times it on the CPU
(the ``numpy`` row, the ``x numpy`` baseline), so it is not listed here.

*torch* is ``torch.optim.<rule.title>`` (``getattr(torch.optim, rule.title)``;
a rule torch lacks, such as Lion, has no torch row) stepping a parameter that
shares memory with the benchmark's buffers (``torch.from_numpy``, or
``torch.as_tensor`` on a GPU). It runs ``fused=True`` where torch has a fused
kernel for the class on the device and ``foreach=True`` otherwise, and says
which: whether ``fused=True`` works is found by stepping it once on a tiny
tensor, and remembered per class and device. After one warm step the
optimizer's state tensors (named by each state's ``saved_as``, e.g.
Adagrad's ``sum``) are replaced by views of the benchmark's state buffers, so
torch reads and writes the same memory as every other implementation and
allocates none of its own.

There are no other peers (DeepSpeed, bitsandbytes): none runs here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from ..rules import RULES
from .cases import Buffers, Case

__all__ = ["torch_available", "torch_class", "torch_variant", "torch_call"]


def torch_available(device: str = "cpu") -> str:
    """'' when torch can run on ``device``, else the reason."""
    try:
        import torch
    except Exception as exc:  # not installed, or broken
        return f"torch not importable: {type(exc).__name__}: {exc}"
    if device == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA device"
    return ""


def torch_class(rule: str) -> Optional[type]:
    """``torch.optim.<title>`` of ``rule``, or None when torch has no such optimizer."""
    import torch

    return getattr(torch.optim, RULES[rule].title, None)


_VARIANT: dict[tuple[Any, str], str] = {}  # (class, device) -> "fused" | "foreach"


def torch_variant(cls: type, hyper: dict, device: str = "cpu") -> str:
    """``"fused"`` when ``cls(..., fused=True)`` steps on ``device``, else ``"foreach"``.

    Found by one step on a 4-element tensor with ``hyper``, the first time a
    class is asked about on a device, and remembered.
    """
    key = (cls, device)
    got = _VARIANT.get(key)
    if got is None:
        import torch

        param = torch.nn.Parameter(torch.ones(4, device=device))
        param.grad = torch.full((4,), 0.5, device=device)
        try:
            cls([param], **hyper, fused=True).step()
            got = "fused"
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            got = "foreach"
        _VARIANT[key] = got
    return got


def torch_call(case: Case, bufs: Buffers, device: str = "cpu") -> Optional[tuple[str, Callable[[], None]]]:
    """``(variant, callable)`` stepping ``torch.optim`` on ``bufs``; ``None`` if torch lacks the rule.

    ``variant`` is ``"fused"`` or ``"foreach"``. Raises if torch is unavailable.
    """
    import torch

    cls = torch_class(case.rule)
    if cls is None:
        return None

    def tensor(a):
        return torch.from_numpy(a) if device == "cpu" else torch.as_tensor(a, device="cuda")

    param = torch.nn.Parameter(tensor(bufs.param))
    param.grad = tensor(bufs.grad)
    variant = torch_variant(cls, case.hyper, device)
    opt = cls([param], **case.hyper, **{variant: True})
    opt.step()  # creates torch's state
    state = opt.state[param]
    keys = {s.name: s.key for s in RULES[case.rule].buffers}
    for ours in case.state:
        theirs = keys[ours]
        if theirs not in state:
            raise KeyError(f"torch.optim.{cls.__name__} has no state {theirs!r} (has {sorted(state)})")
        state[theirs] = tensor(bufs.state[ours])
    return variant, opt.step
