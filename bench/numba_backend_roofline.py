"""One-off measurement for the Numba CPU backend (issue #4), not the bench CLI.

    PYTHONPATH=src python bench/numba_backend_roofline.py [--sizes 16 20 24] [--rounds 7]

fp32, ns per element of: the fastopt
functional call on the ``numba`` backend, a roofline Numba kernel with the
same reads and writes (``p+=g; s+=g ...``) timed in the same run,
``torch.optim`` fused (AdamW/Adam/Adagrad/SGD where torch has a fused CPU
path), and the NumPy reference backend (expressions with temporaries).
Contenders are interleaved round by round; the table gives the minimum over
rounds (on a shared machine other processes only ever add time) and, after
the slash, the median.
"""
from __future__ import annotations

import argparse
import time

import numba
import numpy as np
from numba import prange

import fastopt

_JIT = dict(parallel=True, error_model="numpy", cache=True)


@numba.njit(**_JIT)
def roof12(p, g):
    for i in prange(p.size):
        p[i] += g[i]


@numba.njit(**_JIT)
def roof20(p, g, a):
    for i in prange(p.size):
        p[i] += g[i]
        a[i] += g[i]


@numba.njit(**_JIT)
def roof28(p, g, a, b):
    for i in prange(p.size):
        p[i] += g[i]
        a[i] += g[i]
        b[i] += g[i]


# name: (functional, options, state buffers, roofline kernel, torch class and options)
CASES = {
    "adamw": ("adamw_", dict(lr=1e-3, weight_decay=1e-2), 2, roof28, ("AdamW", dict(lr=1e-3, weight_decay=1e-2))),
    "adam": ("adam_", dict(lr=1e-3), 2, roof28, ("Adam", dict(lr=1e-3))),
    "adagrad": ("adagrad_", dict(lr=1e-2), 1, roof20, ("Adagrad", dict(lr=1e-2))),
    "rmsprop": ("rmsprop_", dict(lr=1e-2), 1, roof20, None),
    "sgd-momentum": ("sgd_", dict(lr=0.1, momentum=0.9), 1, roof20, ("SGD", dict(lr=0.1, momentum=0.9))),
}


def per_call(fn, n_calls):
    t0 = time.perf_counter()
    for _ in range(n_calls):
        fn()
    return (time.perf_counter() - t0) / n_calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 20, 24])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--rules", nargs="+", default=list(CASES))
    ap.add_argument("--no-numpy", action="store_true")
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(fastopt.get_num_threads())
    except ImportError:
        torch = None
    print(f"threads={fastopt.get_num_threads()}; fp32; ns/elem, min/median of {args.rounds} rounds")
    print(f"{'rule':13s} {'N':>5s} {'numba':>13s} {'roof':>13s} {'%roof':>9s} {'torch':>13s} {'x torch':>11s}"
          f" {'numpy':>13s} {'x numpy':>11s}")
    for rule in args.rules:
        fname, opts, n_state, roof, torch_case = CASES[rule]
        fn = getattr(fastopt, fname)
        for log2 in args.sizes:
            n = 1 << log2
            rng = np.random.default_rng(0)
            p = rng.standard_normal(n).astype(np.float32)
            g = rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)
            state = [np.zeros(n, np.float32) for _ in range(n_state)]
            rp, rg, rs = p.copy(), g.copy(), [s.copy() for s in state]
            calls = max(2, int(1e8 / (n * 28)))  # ~0.03-0.1 s per contender and round
            contenders = {
                "numba": lambda: fn(p, g, *state, step=10, backend="numba", **opts),
                "roof": lambda: roof(rp, rg, *rs),
            }
            if not args.no_numpy:
                np_p, np_s = p.copy(), [s.copy() for s in state]
                contenders["numpy"] = lambda: fn(np_p, g, *np_s, step=10, backend="numpy", **opts)
            if torch is not None and torch_case is not None:
                cls, topts = torch_case
                tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
                tp.grad = torch.from_numpy(g.copy())
                try:
                    opt = getattr(torch.optim, cls)([tp], fused=True, **topts)
                    opt.step()
                    contenders["torch"] = opt.step
                except (RuntimeError, TypeError, ValueError) as exc:  # no fused CPU path for this rule
                    print(f"  (torch {cls} fused unavailable: {exc})")
            for f in contenders.values():  # warm up: compile, page in
                f()
            times = {k: [] for k in contenders}
            for _ in range(args.rounds):
                for k, f in contenders.items():
                    reps = calls if k != "numpy" else max(1, calls // 20)
                    times[k].append(per_call(f, reps) / n * 1e9)
            lo = {k: float(np.min(v)) for k, v in times.items()}
            med = {k: float(np.median(v)) for k, v in times.items()}
            nan = float("nan")

            def both(k, fmt="{:6.3f}"):
                return (fmt.format(lo.get(k, nan)) + "/" + fmt.format(med.get(k, nan))).rjust(13)

            def ratio(a, b, fmt="{:4.1f}x"):  # a / b at the minimum and at the median
                return (fmt.format(lo.get(a, nan) / lo[b]) + "/" + fmt.format(med.get(a, nan) / med[b])).rjust(11)
            print(f"{rule:13s} 2^{log2:<3d} {both('numba')} {both('roof')} "
                  f"{100 * lo['roof'] / lo['numba']:3.0f}/{100 * med['roof'] / med['numba']:3.0f}% "
                  f"{both('torch')} {ratio('torch', 'numba')} {both('numpy', '{:6.2f}')} {ratio('numpy', 'numba')}",
                  flush=True)
    print("threading layer:", numba.threading_layer())


if __name__ == "__main__":
    main()
