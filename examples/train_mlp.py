"""Train one MLP twice, with ``torch.optim.<X>`` and ``fastopt.torch.<X>``, side by side.

Both runs start from the same weights and see the same synthetic batches
(a noisy sine regression), so their loss curves should coincide; the table
shows the losses and the time of each optimizer step (median per interval).

    python examples/train_mlp.py                       # AdamW, small and fast
    python examples/train_mlp.py --opt Adam --amsgrad --steps 500
    python examples/train_mlp.py --width 4096 --depth 4 --steps 20 --every 2   # ~50M parameters
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastopt
import fastopt.torch


def make_mlp(d_in: int, width: int, depth: int, d_out: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.Tanh()]
        d = width
    layers.append(torch.nn.Linear(d, d_out))
    return torch.nn.Sequential(*layers)


def train(model, opt, data, steps: int, batch: int, seed: int):
    """Returns the losses and the optimizer step times (seconds)."""
    x_all, y_all = data
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for _ in range(steps):
        idx = torch.randint(0, x_all.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x_all[idx]), y_all[idx])
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return losses, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--opt", default="AdamW", help="SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW, Adamax, NAdam")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=None)
    ap.add_argument("--amsgrad", action="store_true")
    ap.add_argument("--momentum", type=float, default=None, help="SGD/RMSprop momentum")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=20, help="print a row every N steps")
    ap.add_argument("--threads", type=int, default=None, help="torch and fastopt CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        fastopt.set_num_threads(args.threads)

    options = {"lr": args.lr}
    for key, value in (("weight_decay", args.weight_decay), ("momentum", args.momentum)):
        if value is not None:
            options[key] = value
    if args.amsgrad:
        options["amsgrad"] = True

    d_in, d_out = 16, 4
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(4096, d_in, generator=gen)
    y = torch.sin(2 * x[:, :d_out]) + 0.1 * torch.randn(4096, d_out, generator=gen)

    runs = {}
    for label, make in (("torch.optim", lambda m: getattr(torch.optim, args.opt)(m.parameters(), foreach=False,
                                                                                 **options)),
                        ("fastopt", lambda m: getattr(fastopt.torch, args.opt)(m.parameters(), **options))):
        model = make_mlp(d_in, args.width, args.depth, d_out, args.seed)
        runs[label] = train(model, make(model), (x, y), args.steps, args.batch, args.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())

    (l_t, t_t), (l_f, t_f) = runs["torch.optim"], runs["fastopt"]
    print(f"{args.opt} {options} on an MLP of {n_params:,} parameters, {args.steps} steps "
          f"(fastopt backend: {fastopt.dispatch.select(None, False).name}; torch.optim with foreach=False)")
    print(f"{'step':>6} {'loss torch':>12} {'loss fastopt':>12} {'step ms torch':>14} {'step ms fastopt':>16}")
    for start in range(0, args.steps, args.every):
        end = min(start + args.every, args.steps)
        print(f"{end:>6} {l_t[end - 1]:>12.6f} {l_f[end - 1]:>12.6f} "
              f"{1e3 * statistics.median(t_t[start:end]):>14.3f} {1e3 * statistics.median(t_f[start:end]):>16.3f}")
    print(f"median step: torch.optim {1e3 * statistics.median(t_t):.3f} ms, "
          f"fastopt {1e3 * statistics.median(t_f):.3f} ms; "
          f"largest loss difference {max(abs(a - b) for a, b in zip(l_t, l_f)):.2e}")


if __name__ == "__main__":
    main()
