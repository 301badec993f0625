"""Flushing subnormal results to zero: ``fastopt.set_flush_denormal(True)``.

State that decays towards zero (embedding rows that stopped getting
gradients, moments after a long run of zero gradients) reaches subnormal
numbers, and x86 CPUs compute with those many times slower (measured: AdamW
at 2^20 with m, v ~ 1e-39 and zero gradients, 2x slower on every backend,
torch fused included). With flushing on, every value an update stores (the
parameter and each state buffer) that is subnormal is stored as a zero of its
sign, so decayed state becomes exact zeros after one step and stays fast.
Only stored values are flushed, never intermediates: the result is exactly
defined, equal across backends, CPU paths and thread counts, and the NumPy
reference reproduces it bit for bit.

Off by default: with it off, updates round as ``torch.optim`` does (torch
keeps subnormals too, unless ``torch.set_flush_denormal(True)``, which sets
the CPU's own flush-to-zero modes).
"""
from __future__ import annotations

from typing import Any

__all__ = ["get_flush_denormal", "set_flush_denormal"]

_flush = False


def get_flush_denormal() -> bool:
    """Whether updates store subnormal results as zeros."""
    return _flush


def set_flush_denormal(on: Any) -> None:
    """Store subnormal results as zeros of their sign (``True``) or as computed
    (``False``, the default), from the next update on, in every backend."""
    global _flush
    from .checks import flag
    value = flag("on", on)
    _flush = value
    from . import dispatch
    dispatch.push_setting("set_flush_denormal", value)
