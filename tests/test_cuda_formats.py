"""The CUDA backend's mixed-format updates (fastopt.formats) without a GPU.

1. Numba's CUDA simulator (cuda_sim_formats_worker.py, a child process): every rule
   with every state buffer in use, in four combinations of formats, over a list of
   small tensors, equals the NumPy reference bit for bit (8-bit state: one thread block
   per block of 256, the absmax a shared-memory reduction); and the device conversions
   equal fastopt.formats' on float16/bfloat16 bit patterns (every one with an extreme
   exponent, a sample of the rest) and on float32's edge values (ties, subnormals,
   overflow, NaN payloads).
2. Real PTX for sm_90, assembled by ptxas: float32 arithmetic only (no float64
   promotion from the integer bit code), IEEE rounding, no spills; every kernel in the
   richest combination (bf16 params with a master copy, bf16 state), Adam in the others.
"""
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from fastopt import formats as F
from fastopt.backends import reference
from fastopt.kernels import cuda_formats
from fastopt.rules import RULES
from cuda_sim_formats_worker import edge_values, load_patterns
from formats_cases import COMBOS, SIM_CASES, run_case
from oracle import FULL, needed_state
from test_cuda_backend import assemble, instructions

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cudasim_formats") / "sim")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cuda_sim_formats_worker.py"), out], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"simulator worker failed:\n{proc.stdout}\n{proc.stderr}"
    with np.load(out + ".npz") as z:
        arrays = dict(z)
    return arrays, time.perf_counter() - start


@pytest.mark.parametrize("name", list(SIM_CASES))
def test_simulator_matches_reference_bitwise(sim, name):
    arrays, _ = sim
    rule, options, combo = SIM_CASES[name]
    ref = run_case(rule, options, combo, reference.run_mixed)
    assert any(a.size for a in ref["param"])
    for role, expected in ref.items():
        for i, a in enumerate(expected):
            got = arrays[f"{name}/{role}/{i}"]
            assert got.tobytes() == a.tobytes(), f"{name}: {role}[{i}] differs from the reference"


def test_simulator_conversions_match_the_specification(sim):
    arrays, _ = sim
    x = edge_values()
    bits = F.mix32(np.arange(x.size, dtype=np.uint64) * np.uint64(2654435761) & np.uint64(0xFFFFFFFF))
    assert np.array_equal(arrays["conversions/to_bf16"], F.bf16_nearest(x))
    assert np.array_equal(arrays["conversions/to_f16"], F.f16_nearest(x))
    assert np.array_equal(arrays["conversions/sr"], F.bf16_stochastic(x, bits))
    every = load_patterns()
    assert arrays["conversions/from_bf16"].tobytes() == F.load(every.view(F.bfloat16())).tobytes()
    assert arrays["conversions/from_f16"].tobytes() == F.load(every.view(np.float16)).tobytes()


def test_simulator_runtime(sim):
    assert sim[1] < 300, f"the formats simulator worker took {sim[1]:.0f} s"


# ---- PTX --------------------------------------------------------------------------------

def _variants():
    out = []
    for rule, options in FULL.items():
        r = RULES[rule]
        need = set(needed_state(rule, options))
        for combo in ("master-bf16-state-bf16",) if r.kernel != "adam" else COMBOS:
            pdt, gdt, sdt, master = COMBOS[combo]
            fmt = F.INT8 if sdt == "int8" else F.format_of(sdt)
            out.append((r.kernel, F.CallFormats(F.format_of(pdt), F.format_of(gdt),
                                                tuple(fmt if n in need else None for n in r.state), master)))
    return sorted(set(out), key=str)


VARIANTS = _variants()


@pytest.mark.parametrize("kernel,formats", VARIANTS, ids=[cuda_formats._name(k, f, False) for k, f in VARIANTS])
def test_ptx_compiles_and_assembles(kernel, formats, tmp_path):
    from numba import cuda

    signed = tuple(b.signed if f == F.INT8 else None for b, f in zip(RULES[kernel].buffers, formats.state)) \
        if F.INT8 in formats.state else ()
    fn = cuda_formats.make_kernel(kernel, formats, False, signed)
    sig = cuda_formats.signature(kernel, formats)
    for cc in [(9, 0)]:
        ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
        ops = instructions(ptx)
        assert not [op for op in ops if ".f64" in op], f"float64 arithmetic in a float32 kernel: {set(ops)}"
        assert not [op for op in ops if ".ftz" in op or ".approx" in op or ".full" in op], set(ops)
        assert "st.global.u16" in ops or "st.global.u8" in ops  # (every variant here stores 16- or 8-bit values)
        if F.INT8 in formats.state:
            assert "bar.sync" in ops  # (the block's absmax: a reduction in shared memory)
        report = assemble(ptx, cc, tmp_path)
        assert "0 bytes spill stores" in report, report
        assert int(re.search(r"Used (\d+) registers", report).group(1)) <= 64, report
