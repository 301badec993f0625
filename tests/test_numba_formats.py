"""The Numba mixed-format loops (fastopt.kernels.numba_formats): the integer
conversions against fastopt.formats' definitions, the generated code (vectorised,
no float64), and the on-disk cache. The updates themselves are checked against the
reference in test_formats.py."""
import os
import re
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastopt
from fastopt import formats as F
from fastopt.kernels import numba_formats, numba_loops

SRC = os.path.dirname(os.path.dirname(os.path.abspath(fastopt.__file__)))


def _float32_cases(n=200_000, seed=1):
    """Random float32 bits of every exponent, every float16 rounding boundary
    (each float16 value and the midpoints next to it), and the specials."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(all="ignore"):
        exact = halves.astype(np.float32).view(np.uint32)
    edges = (exact[:, None] + np.array([0, 1, 0x0FFF, 0x1000, 0x1001, -1, -0x1000], np.int64)).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0x7F7FFFFF,
                        0x00000001, 0x807FFFFF, 0x477FE000, 0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001],
                       np.uint32)
    return np.concatenate([bits, edges.ravel(), special]).view(np.float32)


def test_loads_are_the_definition_for_every_16_bit_value():
    every = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(every.size, np.float32)
    numba_formats.load_bf16(every, out)
    assert np.array_equal(out.view(np.uint32), F.load(every.view(F.bfloat16())).view(np.uint32))
    numba_formats.load_f16(every, out)
    assert np.array_equal(out.view(np.uint32), F.load(every.view(np.float16)).view(np.uint32))


def test_round_to_nearest_is_the_definition():
    x = _float32_cases()
    out = np.empty(x.size, np.uint16)
    numba_formats.store_bf16_nearest(x, out)
    assert np.array_equal(out, F.bf16_nearest(x))
    numba_formats.store_f16_nearest(x, out)
    assert np.array_equal(out, F.f16_nearest(x))


@pytest.mark.parametrize("first", [0, 12345, 2 ** 32 - 100])
def test_stochastic_rounding_is_the_definition(first):
    # ``first``: the tile's first element in its tensor; near 2**32 the counter wraps
    # within the tile (rounding_bits' ``mix32(s + i)``, mod 2**32)
    x = _float32_cases(20_000)
    key = F.rounding_key(7, 3)
    s = F.stream(key, 2, 1)
    counters = (s + first + np.arange(x.size, dtype=np.uint64)) % 2 ** 32
    bits = F.mix32(counters.astype(np.uint32))
    if first == 0:
        assert np.array_equal(bits, F.rounding_bits(key, 2, 1, x.size))
    out = np.empty(x.size, np.uint16)
    numba_formats.store_bf16_stochastic(x, out, np.uint32(s), first)
    assert np.array_equal(out, F.bf16_stochastic(x, bits))


def _fresh_asm(fn, *args):
    """Assembly of ``fn`` compiled anew (cached code cannot be inspected)."""
    fresh = numba.njit(error_model="numpy")(fn.py_func)
    fresh(*args)
    return next(iter(fresh.inspect_asm().values()))


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="x86-64 assembly")
@pytest.mark.parametrize("name", ["load_bf16", "load_f16", "store_bf16_nearest", "store_f16_nearest",
                                  "store_bf16_stochastic"])
def test_conversion_loops_are_vectorised_32_bit_code(name):
    x, h = np.ones(256, np.float32), np.ones(256, np.uint16)
    fn = getattr(numba_formats, name)
    args = {"load": (h, x), "store": (x, h)}[name[:name.index("_")]]
    asm = _fresh_asm(fn, *args, *((np.uint32(1), 0) if name.endswith("stochastic") else ()))
    assert not re.search(r"cvtss2sd|cvtps2pd|cvtsd2ss", asm), "float64 in a conversion loop"
    # packed 32-bit integer (or float) operations on whole vector registers
    assert re.search(r"\bv?p(add|srl|sll|and|or|xor|cmpgt|mull)d\s+.*%[xyz]mm", asm), "not vectorised"
    if name.endswith("stochastic"):
        assert re.search(r"\bv?pmulld\s+.*%[xyz]mm", asm), "the hash is not vectorised"


def test_cache_key_covers_the_segment_and_the_format_codes():
    # The mixed loops have numba_loops' segments compiled in, and formats' codes:
    # their closure carries a hash of those files, which Numba's cache does not check.
    assert numba_formats._mixed_source_key() == numba_formats.MIXED_SOURCE_KEY
    for serial, parallel in numba_formats.MIXED_LOOPS.values():
        for loop in (serial, parallel):
            cells = [c.cell_contents for c in loop.py_func.__closure__]
            assert numba_formats.MIXED_SOURCE_KEY in cells
            assert any(getattr(numba_loops, getattr(c, "__name__", ""), None) is c for c in cells)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="the parallel loop needs 2 threads")
def test_second_process_loads_the_mixed_loops_from_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path),
               PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = """
        import ml_dtypes, numpy as np, fastopt
        from fastopt.backends import numba_cpu
        from fastopt.kernels import stores
        from fastopt.kernels.numba_formats import MIXED_LOOPS
        p, g = np.ones(100, ml_dtypes.bfloat16), np.ones(100, np.float16)
        m, master = np.ones(100, ml_dtypes.bfloat16), np.ones(100, np.float32)
        # (SGD: the kernel of one state buffer compiles fastest)
        fastopt.sgd_(p, g, m, step=1, lr=0.1, momentum=0.9, master_param=master, backend="numba")
        numba_cpu.PARALLEL_MIN_BYTES = 0
        fastopt.set_num_threads(2)
        fastopt.sgd_(p, g, m, step=2, lr=0.1, momentum=0.9, backend="numba")  # bf16 param, no master: stochastic
        for loop in MIXED_LOOPS["sgd", stores.keep]:
            s = loop.stats
            print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))
    """
    def run():
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()
    assert run() == ["0", "1"] * 2  # compiled and saved (one signature: formats are runtime values)
    assert run() == ["1", "0"] * 2  # loaded, not compiled
