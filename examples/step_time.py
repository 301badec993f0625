"""Optimizer step time on a large model: fastopt.torch.AdamW vs torch.optim.AdamW.

The model is a stack of square Linear layers (4 x 4096^2 ~= 67M parameters by
default). Reported, as the median of ``--repeats`` steps after a warm-up:

* ``torch fused``: ``torch.optim.AdamW(fused=True)``;
* ``torch foreach``: ``torch.optim.AdamW(foreach=True)`` (torch's default);
* ``fastopt.torch``: ``fastopt.torch.AdamW``, through whatever backend dispatch picks;
* ``bare functional``: ``fastopt.adamw_`` on the adapter's own flat buffers (same backend),
  timed interleaved with the adapter's steps;

and the adapter's own cost: adapter minus bare functional, and (free of the
kernel's noise) a step with the functional call stubbed out, per element.

    python examples/step_time.py [--width 4096 --layers 4 --repeats 7 --threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastopt
import fastopt.torch


def median_step(opt, repeats: int) -> float:
    opt.step()  # warm-up: allocates the state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def model(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        fastopt.set_num_threads(args.threads)

    results = {}
    for label, make in (("torch fused", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)),
                        ("torch foreach", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True))):
        m = model(args.width, args.layers)
        results[label] = median_step(make(m), args.repeats)
        del m

    # The adapter, interleaved with the bare functional call on the adapter's own
    # flat buffers, so machine noise hits both alike.
    m = model(args.width, args.layers)
    n = sum(p.numel() for p in m.parameters())
    opt = fastopt.torch.AdamW(m.parameters(), lr=1e-3)
    opt.step()  # warm-up: allocates the state
    param, grad = opt._arrays
    state = opt._group_state[0]
    adapter, bare = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        fastopt.adamw_(param, grad, state["exp_avg"], state["exp_avg_sq"], step=state["step"], lr=1e-3)
        t2 = time.perf_counter()
        adapter.append(t1 - t0)
        bare.append(t2 - t1)
    results["fastopt.torch"] = statistics.median(adapter)
    results["bare functional"] = statistics.median(bare)
    # The layer's own cost, free of the kernel's noise: the same steps with the
    # functional call replaced by a no-op (what remains is fastopt.torch + fastopt.optim).
    kernel = fastopt.optim.AdamW._update_fn
    fastopt.optim.AdamW._update_fn = staticmethod(lambda *args, **kwargs: None)
    try:
        layer = median_step(opt, 200)
    finally:
        fastopt.optim.AdamW._update_fn = kernel

    backend = fastopt.dispatch.select(None, False).name
    print(f"AdamW step, {n:,} float32 parameters ({args.layers} x Linear({args.width}, {args.width})), "
          f"{torch.get_num_threads()} torch threads, fastopt backend {backend!r}, median of {args.repeats}")
    for label, s in results.items():
        print(f"  {label:16s} {1e3 * s:9.2f} ms   {1e9 * s / n:6.3f} ns/element")
    over = results["fastopt.torch"] - results["bare functional"]
    print(f"  adapter - bare   {1e3 * over:9.3f} ms   {1e9 * over / n:6.4f} ns/element "
          "(difference of medians: within the noise of the kernel)")
    print(f"  adapter layer    {1e3 * layer:9.3f} ms   {1e9 * layer / n:6.4f} ns/element "
          f"(a step with the kernel call stubbed out; {sum(1 for _ in m.parameters())} tensors, 1 group)")


if __name__ == "__main__":
    main()
