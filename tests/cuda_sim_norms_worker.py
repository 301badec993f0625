"""The reductions on device arrays under Numba's CUDA simulator; started by test_norms.py.

NUMBA_ENABLE_CUDASIM must be set before ``numba.cuda`` is first imported, so
this runs in a child process: ``NUMBA_ENABLE_CUDASIM=1 python cuda_sim_norms_worker.py OUT``.
It writes ``OUT.npz`` (the host inputs of every case) and ``OUT.json`` (what
the cuda backend returned for them, each float as its 64 bits in hex
(:func:`enc`: NaN payloads included), and the outcome of the error checks);
the parent computes the NumPy reference from the same inputs and compares bit
for bit. The simulator runs one Python thread per CUDA thread, so the arrays
are small: sizes around the 4096-element block.
"""
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

SIZES = [0, 1, 7, 9, 4095, 4096, 4097, 8193, 3 * 4096 + 5]
DTYPES = {"f32": np.float32, "f64": np.float64}


def case_arrays(dtype, seed):
    """The host inputs: SIZES with a negative largest magnitude planted in a middle block."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(n).astype(dtype) for n in SIZES]
    xs[-1][2 * 4096 + 3] = -7.25
    xs[5][4095] = 5.5  # a tensor's largest in its last element
    return xs


def special_arrays(dtype):
    """(Inf case, NaN case): a -Inf; then also a negative NaN with a payload, in a tail block."""
    inf = case_arrays(dtype, seed=9)
    inf[4][17] = -np.inf
    nan = [a.copy() for a in inf]
    bits = np.array([0xffc01234 if dtype == np.float32 else 0xfff8000000001234],
                    dtype=np.uint32 if dtype == np.float32 else np.uint64)
    nan[-1][3 * 4096 + 2] = bits.view(dtype)[0]
    return inf, nan


def enc(v) -> str:
    """The float64 bits of ``v`` in hex, most significant first (test_norms.bits)."""
    return struct.pack(">d", v).hex()


class Interface:
    """A non-Numba __cuda_array_interface__ object (like a CuPy array or a torch CUDA tensor)."""

    def __init__(self, cai):
        self.__cuda_array_interface__ = cai


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # reported to the parent, which asserts on type and text
        return [type(exc).__name__, str(exc)]
    return None


def main(out: str) -> None:
    from numba import cuda

    import fastopt
    from fastopt.backends import cuda as backend
    from fastopt.buffers import device_interface

    assert backend.SIMULATOR, "run with NUMBA_ENABLE_CUDASIM=1"
    report, inputs = {}, {}

    def run(key, xs, wrap=lambda d: d, every_entry=False):
        """Both reductions of ``xs`` on device copies (the total and each array's);
        ``every_entry``: also through the other entry points (total only)."""
        for i, a in enumerate(xs):
            inputs[f"{key}/{i}"] = a
        owners = [cuda.to_device(a) for a in xs]  # alive while an Interface describes their memory
        dev = [wrap(o) for o in owners]
        total, each = fastopt.sums_of_squares(dev)
        mtotal, meach = fastopt.max_abs_each(dev)
        got = {"count": len(xs), "sumsq_total": enc(total), "sumsq_each": [enc(v) for v in each],
               "maxabs_total": enc(mtotal), "maxabs_each": [enc(v) for v in meach]}
        if every_entry:
            got.update(sumsq=enc(fastopt.sum_of_squares(dev)), maxabs=enc(fastopt.max_abs(dev)),
                       norm2=enc(fastopt.total_norm(dev)), norminf=enc(fastopt.total_norm(dev, np.inf)))
        report[key] = got

    for dname, dtype in DTYPES.items():
        xs = case_arrays(dtype, seed=1)
        for threads in (256, 16):  # 16: two norm blocks per thread block, so a tensor spans several
            backend.NORM_THREADS = threads
            run(f"{dname}/list/t{threads}", xs, every_entry=threads == 256)
        backend.NORM_THREADS = 256
        for i in (0, 5, len(SIZES) - 1):
            run(f"{dname}/one/{i}", [xs[i]])
        run(f"{dname}/2d", [xs[-1][:12288].reshape(96, 128), xs[3]])
        run(f"{dname}/interface", xs[4:], wrap=lambda d: Interface(device_interface(d)))
        inf, nan = special_arrays(dtype)
        run(f"{dname}/inf", inf)
        run(f"{dname}/nan", nan)
        run(f"{dname}/empties", [np.zeros(0, dtype), np.zeros(0, dtype)])
    report["empty_list"] = [fastopt.sum_of_squares([]), fastopt.max_abs([]), fastopt.total_norm([], np.inf)]
    report["single_array"] = enc(fastopt.max_abs(cuda.to_device(np.array([[-2.0, 1.0]], np.float32))))

    d = cuda.to_device(np.ones(8, np.float32))
    h = np.ones(8, np.float32)
    report["errors"] = {
        "device_then_host": error_of(lambda: fastopt.max_abs([d, h])),
        "host_then_device": error_of(lambda: fastopt.sum_of_squares([h, d])),
        "mixed_dtypes": error_of(lambda: fastopt.max_abs([d, cuda.to_device(np.ones(8))])),
        "bad_dtype": error_of(lambda: fastopt.max_abs([cuda.to_device(np.ones(8, np.int32))])),
        "not_contiguous": error_of(lambda: fastopt.sum_of_squares([cuda.to_device(np.ones((4, 4), np.float32))[:, 1]])),
        "host_backend": error_of(lambda: fastopt.total_norm([d], backend="c")),
        "bad_norm_type": error_of(lambda: fastopt.total_norm([d], 1.0)),
    }
    report["compiled"] = sorted(f"{k[0]}/{k[1]}" for k in backend._compiled if k[0] in ("sumsq", "maxabs"))
    np.savez(out + ".npz", **inputs)
    with open(out + ".json", "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1])
