"""Training quality in the compressed formats: examples/train_formats.py, asserted.

The same MLP, data and AdamW run (lr 3e-4, 1000 steps) with float32 state, bfloat16
state (stochastic rounding) and bfloat16 weights with a float32 master copy ends within
2% of the float32 run's loss; bfloat16 weights rounded to nearest with no master copy
stall (most updates are below half a bfloat16 step and vanish), ending far above it.
(8-bit state ends 2.7% below fp32's loss at 1000 steps, outside the 2% band, and runs on
the numpy backend only so far: the example shows it, this test does not assert it yet.)
"""
import os
import sys

import pytest

pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import train_formats  # noqa: E402

STEPS = 1000


@pytest.fixture(scope="module")
def fp32_loss():
    return train_formats.train("fp32", STEPS, every=STEPS)[-1]


@pytest.mark.parametrize("fmt", ["bf16 state", "bf16 weights + master"])
def test_compressed_formats_train_as_well_as_fp32(fmt, fp32_loss):
    loss = train_formats.train(fmt, STEPS, every=STEPS)[-1]
    assert abs(loss / fp32_loss - 1) < 0.02, (fmt, loss, fp32_loss)


def test_bf16_weights_rounded_to_nearest_stall(fp32_loss):
    loss = train_formats.train("bf16 weights, nearest", STEPS, every=STEPS)[-1]
    assert loss > 1.3 * fp32_loss, (loss, fp32_loss)
