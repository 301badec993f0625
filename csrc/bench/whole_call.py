"""Python-level timings of the c backend (fp32), each against its competitor
in the same run, alternating, best of many rounds (a shared machine only ever
adds time):

- the whole ``fastopt.<rule>_(...)`` call at N = 2^10 (validation, scalars,
  binding, kernel) and the binding alone (``fastopt.backends.c.run``);
- ``fastopt.adamw_`` vs ``torch.optim.AdamW(fused=True).step()`` at 2^10, 2^20, 2^24.

    PYTHONPATH=src python csrc/bench/whole_call.py [threads]
    FASTOPT_ISA=avx2 PYTHONPATH=src python csrc/bench/whole_call.py   # the AVX2 path
"""
import sys
import time

import numpy as np

import fastopt
from fastopt.backends import c as cbackend
from fastopt.rules import RULES

sys.path.insert(0, "tests")
from oracle import needed_state  # noqa: E402


def best(fn, calls, rounds=25):
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return min(times)


def rule_call(rule, options, n):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    state = [np.zeros_like(p) if name in needed_state(rule, options) else None for name in RULES[rule].state]
    fn = getattr(fastopt, rule + "_")
    kw = dict(options, backend="c")
    if RULES[rule].takes_step:
        kw["step"] = 3
    if rule == "nadam":
        kw["mu_product"] = 0.5
    scalars, _ = RULES[rule].prepare({**RULES[rule].defaults, **kw}, 3)
    used = tuple(s if name in needed_state(rule, options) else None for s, name in zip(state, RULES[rule].state))
    whole = lambda: fn(p, g, *state, **kw)  # noqa: E731
    binding = lambda: cbackend.run(RULES[rule].kernel, p, g, used, scalars)  # noqa: E731
    return whole, binding


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    fastopt.set_num_threads(threads)
    assert fastopt.backends()["c"].available, fastopt.backends()["c"].reason
    print(f"c backend, CPU path {cbackend.cpu_path()}, {threads} threads, fp32, best of many rounds")
    print("\nWhole Python call at N = 2^10 (us): fastopt.<rule>_(...) | binding alone (backends.c.run)")
    cases = [("sgd", dict(lr=0.1)), ("sgd", dict(lr=0.1, momentum=0.9)), ("adagrad", {}), ("rmsprop", {}),
             ("adadelta", {}), ("adam", {}), ("adamw", {}), ("adamw", dict(amsgrad=True)), ("adamax", {}),
             ("nadam", {}), ("lion", {})]
    for rule, options in cases:
        whole, binding = rule_call(rule, options, 1 << 10)
        tw, tb = best(whole, 2000), best(binding, 2000)
        print(f"  {rule + ' ' + ','.join(options):24s} {tw * 1e6:6.2f} | {tb * 1e6:5.2f}")

    import torch
    torch.set_num_threads(threads)
    print("\nAdamW: fastopt.adamw_ (c) vs torch.optim.AdamW(fused=True).step()")
    print(f"  {'N':>10s} {'fastopt us':>11s} {'ns/elem':>8s} {'torch us':>10s} {'ns/elem':>8s} {'speedup':>8s}")
    for log2n in (10, 20, 24):
        n = 1 << log2n
        whole, _ = rule_call("adamw", {}, n)
        tp = torch.nn.Parameter(torch.randn(n))
        tp.grad = torch.randn(n)
        opt = torch.optim.AdamW([tp], lr=1e-3, weight_decay=1e-2, fused=True)
        calls = {10: 2000, 20: 20, 24: 1}[log2n]  # 2^20: many calls, so both run cache-warm
        rounds = {10: 10, 20: 10, 24: 5}[log2n]
        # Blocks of one side at a time, alternating, best of all: torch and
        # fastopt each bring an OpenMP runtime whose idle threads spin for a
        # while after a call, which would slow the other side on 2 cores.
        tf, tt = [], []
        for _ in range(3):
            tf.append(best(whole, calls, rounds))
            tt.append(best(opt.step, calls, rounds))
        f, t = min(tf), min(tt)
        print(f"  {n:10d} {f * 1e6:11.2f} {f / n * 1e9:8.3f} {t * 1e6:10.2f} {t / n * 1e9:8.3f} {t / f:7.2f}x")


if __name__ == "__main__":
    main()
