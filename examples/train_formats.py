"""Does training survive fewer bytes? One small MLP trained in five storage formats.

The same model, data, batches and AdamW hyperparameters, with the weights and
the optimizer state stored in:

* ``fp32``:                  float32 weights and moments (the reference);
* ``bf16 state``:            float32 weights, bfloat16 moments (stochastic rounding);
* ``int8 state``:            float32 weights, 8-bit blockwise moments (bitsandbytes' maps)
                             for the tensors of 4096 elements or more, float32 moments for
                             the smaller ones (bitsandbytes' ``min_8bit_size``);
* ``bf16 weights + master``: bfloat16 weights and gradients, a float32 master copy
                             updated in the same pass (``master_param=``);
* ``pure bf16``:             bfloat16 weights (stochastic rounding), gradients and moments;
* ``bf16 weights, nearest``: bfloat16 weights rounded to nearest after each step, with
                             no master copy: what a bf16 model gets from an fp32
                             optimizer step written back with ``.to(bfloat16)``.

The learning rate is small enough (3e-4) that most single updates are below half a
bfloat16 step of the weights: rounded to nearest they are lost and training stalls;
rounded stochastically they survive in expectation. Forward and backward run in
float32 torch on the upcast weights (a bf16 model's gradients are then rounded to
bf16); the updates are ``fastopt.adamw_`` over the list of weight tensors.

    python examples/train_formats.py            # ~15 s on 2 cores
    python examples/train_formats.py --steps 6000 --every 1000
"""
from __future__ import annotations

import argparse

import ml_dtypes
import numpy as np
import torch

import fastopt

BF16 = np.dtype(ml_dtypes.bfloat16)
#: Tensors smaller than this keep float32 moments in "int8 state" (bitsandbytes' default:
#: small tensors, biases and norms, hold few bytes and quantize worst).
MIN_8BIT_SIZE = 4096

#: name -> (weight dtype, state dtype, master copy, round the weights to nearest after the step)
FORMATS = {
    "fp32": (np.float32, np.float32, False, False),
    "bf16 state": (np.float32, BF16, False, False),
    "int8 state": (np.float32, "int8", False, False),
    "bf16 weights + master": (BF16, np.float32, True, False),
    "pure bf16": (BF16, BF16, False, False),
    "bf16 weights, nearest": (BF16, np.float32, True, True),
}


def _data(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 16, generator=gen)
    y = torch.sin(2 * x[:, :4]) + 0.1 * torch.randn(4096, 4, generator=gen)
    return x, y


def _model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 4))


def train(fmt: str, steps: int = 600, lr: float = 3e-4, batch: int = 128, seed: int = 0,
          backend: str | None = None, every: int = 100) -> list[float]:
    """The full-data loss after every ``every`` steps of training in format ``fmt``."""
    weight_dtype, state_dtype, master, nearest = FORMATS[fmt]
    x, y = _data(seed)
    model = _model(seed)
    start = [p.detach().numpy().copy() for p in model.parameters()]
    weights = [w.astype(weight_dtype) for w in start]
    masters = [w.astype(np.float32) for w in weights] if master else None
    # One update call per group of tensors whose buffers share their formats.
    if state_dtype == "int8":  # (the second moment is never negative: the finer unsigned map)
        groups = [[i for i, w in enumerate(start) if w.size >= MIN_8BIT_SIZE],
                  [i for i, w in enumerate(start) if w.size < MIN_8BIT_SIZE]]
        m = [fastopt.Int8State.zeros(w.shape) if w.size >= MIN_8BIT_SIZE else np.zeros(w.shape, np.float32)
             for w in start]
        v = [fastopt.Int8State.zeros(w.shape, signed=False) if w.size >= MIN_8BIT_SIZE
             else np.zeros(w.shape, np.float32) for w in start]
    else:
        groups = [list(range(len(start)))]
        m = [np.zeros(w.shape, state_dtype) for w in start]
        v = [np.zeros(w.shape, state_dtype) for w in start]
    low = weight_dtype is BF16
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(torch.from_numpy(w.astype(np.float32)))
        model.zero_grad()
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        grads = [p.grad.numpy().astype(BF16 if low else np.float32) for p in model.parameters()]
        if nearest:  # no master between steps: the step starts from the bf16 weights again
            for mw, w in zip(masters, weights):
                mw[...] = w.astype(np.float32)
        for group in filter(None, groups):
            pick = lambda buffers: [buffers[i] for i in group]  # noqa: E731
            fastopt.adamw_(pick(weights), pick(grads), pick(m), pick(v), step=t, lr=lr, weight_decay=0.0,
                           backend=backend, **({"master_param": pick(masters)} if master else {}))
        if t % every == 0:
            with torch.no_grad():
                for p, w in zip(model.parameters(), weights):
                    p.copy_(torch.from_numpy(w.astype(np.float32)))
                losses.append(torch.nn.functional.mse_loss(model(x), y).item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    runs = {fmt: train(fmt, args.steps, args.lr, backend=args.backend, every=args.every) for fmt in FORMATS}
    print(f"AdamW lr={args.lr}, full-data MSE every {args.every} steps; last column: final loss vs fp32")
    print(f"{'format':>24} " + " ".join(f"{s:>8}" for s in range(args.every, args.steps + 1, args.every))
          + f" {'vs fp32':>8}")
    for fmt, losses in runs.items():
        row = " ".join(f"{loss:8.4f}" for loss in losses)
        print(f"{fmt:>24} {row} {losses[-1] / runs['fp32'][-1] - 1:+8.1%}")


if __name__ == "__main__":
    main()
