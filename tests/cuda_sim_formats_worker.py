"""Runs the CUDA backend's mixed-format updates under Numba's CUDA simulator; started by
test_cuda_formats.py (NUMBA_ENABLE_CUDASIM must be set before numba.cuda is imported).

``NUMBA_ENABLE_CUDASIM=1 python cuda_sim_formats_worker.py OUT`` writes ``OUT.npz``: per
(rule, formats) case the bits of every written buffer after a few list updates of small
tensors (blocks of 8 threads, 2 blocks: every thread loops). The parent runs the same
updates with the NumPy reference and compares bit for bit.
"""
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from formats_cases import SIM_CASES, run_case  # noqa: E402

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":  # (imported by the parent test too, for edge_values)
    from numba import cuda

    from fastopt.kernels import cuda_formats as cf


def to_device(a):
    return cuda.to_device(a.view(np.uint16) if a.dtype.itemsize == 2 else a)  # (16-bit buffers: their bits)


def main(out: str) -> None:
    from fastopt.backends import cuda as backend
    from fastopt.kernels import elements

    # As cuda_sim_worker.py: the simulator runs the element functions as Python, where
    # math.sqrt would compute in float64; np.sqrt keeps float32 float32.
    elements.math = types.SimpleNamespace(sqrt=np.sqrt, copysign=np.copysign)
    backend.THREADS_PER_BLOCK, backend.MAX_BLOCKS = 8, 2
    results = {}
    for name, (rule, options, combo) in SIM_CASES.items():
        for role, arrays in run_case(rule, options, combo, backend.run_mixed, to_device=to_device,
                                     to_host=lambda a: a.copy_to_host()).items():
            for i, a in enumerate(arrays):
                results[f"{name}/{role}/{i}"] = a
    results.update(conversions())
    np.savez(out + ".npz", **results)


def convert(x, bits, every, to_bf16, to_f16, sr, from_bf16, from_f16):
    """The device conversions, element by element (a kernel: module-level, so that the
    simulator swaps its ``cuda`` global)."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        to_bf16[i] = cf.bf16_nearest(x[i])
        to_f16[i] = cf.f16_nearest(x[i])
        sr[i] = cf.bf16_stochastic(x[i], cf.mix32(bits[i]))
    for i in range(cuda.grid(1), every.size, cuda.gridsize(1)):
        from_bf16[i] = cf.bf16_load(every[i])
        from_f16[i] = cf.f16_load(every[i])


def conversions() -> dict:
    """The device conversions over edge values (every float16 and bfloat16 bit pattern loaded;
    float32 specials, subnormals and float16's rounding boundaries stored)."""
    kernel = cuda.jit(convert)
    x = edge_values()
    bits = np.arange(x.size, dtype=np.uint64) * np.uint64(2654435761)
    every = load_patterns()
    outs = [np.zeros(x.size, np.uint16) for _ in range(3)] + [np.zeros(every.size, np.float32) for _ in range(2)]
    dev = [cuda.to_device(a) for a in (x, bits, every, *outs)]
    kernel[4, 64](*dev)
    names = ["to_bf16", "to_f16", "sr", "from_bf16", "from_f16"]
    return {f"conversions/{n}": d.copy_to_host() for n, d in zip(names, dev[3:])}


def edge_values() -> np.ndarray:
    """float32 values at every edge of the conversions (shared with the parent test)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(500) * np.exp(rng.uniform(-40, 40, 500))).astype(np.float32)
    f16_edges = np.array([65504, 65519.996, 65520, 65536, 6.1035156e-05, 6.1e-05, 5.96e-08, 2.98e-08,
                          2.9802322e-08, 2.99e-08, 1e-8, 3.4e38, 1e-40, 0.0, np.inf, np.nan], np.float32)
    specials = np.concatenate([f16_edges, -f16_edges,
                               np.array([0x7F800001, 0xFFC12345, 0x7FFFFFFF, 0x00000001, 0x3F808000, 0x3F818000,
                                         0x3F80FFFF], np.uint32).view(np.float32)])
    # float16 values and the midpoints between neighbours (the ties), every 29th pair
    # (the simulator runs a thread's loop in Python: a sample keeps it to seconds)
    halves = np.arange(0, 1 << 16, 29, dtype=np.uint16).view(np.float16).astype(np.float32)
    nxt = (np.arange(0, 1 << 16, 29, dtype=np.uint32) + 1).astype(np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        mids = (halves + nxt) / 2
    return np.concatenate([specials, x, halves[np.isfinite(halves)], mids[np.isfinite(mids)]]).astype(np.float32)


def load_patterns() -> np.ndarray:
    """16-bit patterns loaded: every one with the extreme exponents (zeros, subnormals,
    infinities and NaNs of both formats, both signs), and a sample of the rest."""
    edges = [np.arange(lo, lo + 0x400) for lo in (0x0000, 0x7C00, 0x7F00, 0x8000, 0xFC00, 0xFF00)]
    return np.unique(np.concatenate(edges + [np.arange(0, 1 << 16, 97)])).astype(np.uint16)


if __name__ == "__main__":
    main(sys.argv[1])
