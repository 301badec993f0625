"""Optimizer step time on a small GPT: fastopt.torch.AdamW vs torch.optim.AdamW.

The model's parameters are those of a small GPT (nanoGPT's layout, 76 tensors:
embeddings, LayerNorms, attention and MLP weights and biases; see
``fastopt.bench.lists``), each its own tensor with a fixed gradient, about
``--params`` elements in all (default 14M). Timed in one run, the steps
interleaved in rotating order so that machine noise falls on all alike
(median and min of ``--repeats`` rounds of each order):

* ``torch fused``: ``torch.optim.AdamW(fused=True)``;
* ``torch foreach``: ``torch.optim.AdamW(foreach=True)`` (torch's default);
* ``fastopt.torch``: ``fastopt.torch.AdamW`` (one list call over the model's own tensors);
* ``bare list call``: ``fastopt.adamw_`` over the same tensors' NumPy views, the floor.

and the adapter's own cost per step, with the kernel call stubbed out.

    python examples/step_time.py [--params 14e6 --repeats 9 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastopt
import fastopt.torch
import fastopt.torch.steps
from fastopt.bench.lists import gpt_layout


def make_params(total: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in gpt_layout(total).shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=14e6, help="total parameters (default %(default)g)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        fastopt.set_num_threads(args.threads)

    steps = {}
    for label, make in (("torch fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
                        ("torch foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True)),
                        ("fastopt.torch", lambda ps: fastopt.torch.AdamW(ps, lr=1e-3))):
        opt = make(make_params(int(args.params)))
        opt.step()  # allocates the state
        steps[label] = opt.step
    ours = steps["fastopt.torch"].__self__
    params = ours.param_groups[0]["params"]
    n = sum(p.numel() for p in params)
    views = [[t.detach().numpy() for t in ts] for ts in
             ([p for p in params], [p.grad for p in params], [ours.state[p]["exp_avg"] for p in params],
              [ours.state[p]["exp_avg_sq"] for p in params])]
    steps["bare list call"] = lambda: fastopt.adamw_(*views, step=100, lr=1e-3)

    # Each repeat runs the steps in a new order (rotated): a step that follows torch's
    # pays for torch's OpenMP threads still spinning on the cores, whichever it is.
    times = {label: [] for label in steps}
    labels = list(steps)
    for r in range(args.repeats * len(labels)):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            steps[label]()
            times[label].append(time.perf_counter() - t0)

    # The adapter's own cost, free of the kernel's noise: steps with the kernel call stubbed out.
    # (both ways a step reaches the kernel: the functional call, and a replayed plan's pointer table)
    core, steps_module = type(ours).core, fastopt.torch.steps
    kernels = core.update, steps_module._run_table
    core.update = steps_module._run_table = lambda *args, **kwargs: None
    try:
        layer = []
        for _ in range(50):
            t0 = time.perf_counter()
            ours.step()
            layer.append(time.perf_counter() - t0)
    finally:
        core.update, steps_module._run_table = kernels

    backend = fastopt.dispatch.select(None, False).name
    print(f"AdamW step, {n:,} float32 parameters in {len(params)} tensors (a small GPT), "
          f"{torch.get_num_threads()} torch threads, fastopt backend {backend!r}, "
          f"{len(times['torch fused'])} interleaved steps each")
    fused = statistics.median(times["torch fused"])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"  {label:15s} median {1e3 * med:8.2f} ms  min {1e3 * min(ts):8.2f} ms  "
              f"{1e9 * med / n:6.3f} ns/element  torch fused/this {fused / med:5.2f}x")
    print(f"  adapter alone   median {1e3 * statistics.median(layer):8.3f} ms "
          f"(a step with the kernel call stubbed out: {1e6 * statistics.median(layer) / len(params):.2f} us per tensor)")


if __name__ == "__main__":
    main()
