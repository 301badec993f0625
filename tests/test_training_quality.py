"""Training quality in the compressed formats: examples/train_formats.py, asserted.

The same MLP, data and AdamW run (lr 3e-4, 3000 steps, where the loss has flattened:
at 1000 steps it still falls 60% per 500 steps, and any perturbation of the path moves
it by several percent) with float32 state, bfloat16 state (stochastic rounding),
8-bit state (tensors of 4096 elements and more; bitsandbytes' min_8bit_size), bfloat16
weights with a float32 master copy, and pure bfloat16 (weights, grads and moments)
ends within 2% of the float32 run's loss; bfloat16 weights rounded to nearest with no
master copy stall (most updates are below half a bfloat16 step and vanish), ending far
above it.
"""
import os
import sys

import pytest

pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import train_formats  # noqa: E402

STEPS = 3000


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (see conftest.py)


@pytest.fixture(scope="module")
def fp32_loss(one_torch_thread):
    return train_formats.train("fp32", STEPS, every=STEPS)[-1]


@pytest.mark.parametrize("fmt", ["bf16 state", "int8 state", "bf16 weights + master", "pure bf16"])
def test_compressed_formats_train_as_well_as_fp32(fmt, fp32_loss):
    loss = train_formats.train(fmt, STEPS, every=STEPS)[-1]
    assert abs(loss / fp32_loss - 1) < 0.02, (fmt, loss, fp32_loss)


def test_bf16_weights_rounded_to_nearest_stall(fp32_loss):
    loss = train_formats.train("bf16 weights, nearest", STEPS, every=STEPS)[-1]
    assert loss > 1.3 * fp32_loss, (loss, fp32_loss)
