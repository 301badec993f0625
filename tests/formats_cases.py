"""Mixed-format update cases driven at the backend level (``run_mixed``), shared by the
CUDA simulator worker (cuda_sim_formats_worker.py) and test_cuda_formats.py.

A case is (rule, options, combination of formats); :func:`run_case` builds small
tensors in those formats, takes a few steps with a backend's ``run_mixed`` (the
scalars and the rounding key as fastopt.functional makes them), and returns every
written buffer's host copy (16-bit buffers as their uint16 bits).
"""
import ml_dtypes
import numpy as np

from fastopt import formats as F
from fastopt.rules import RULES
from oracle import FULL, initial_state, needed_state

BF16, F16, F32 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)
#: name -> (param dtype, grad dtype, state dtype, master copy), as tests/test_formats.py
COMBOS = {
    "state-bf16": (F32, F32, BF16, False),
    "all-bf16": (BF16, BF16, BF16, False),
    "master-bf16-state-bf16": (BF16, BF16, BF16, True),
    "master-f16": (F16, F16, F32, True),
    "state-int8": (F32, F32, "int8", False),
    "master-bf16-state-int8": (BF16, BF16, "int8", True),
}
SHAPES = [(19,), (3, 7), (0,), (40,)]
INT8_SHAPES = [(19,), (0,), (300,)]  # (300: two 8-bit blocks, the last one partial)
STEPS = 2

#: Every rule with every state buffer in use, in every combination of 16-bit formats; 8-bit
#: state (whose kernels run a thread block of 256 per block: slow in the simulator, which
#: runs each thread in Python) for the rule shapes of 1 and 3 state buffers.
SIM_CASES = {f"{rule}-{combo}": (rule, options, combo) for rule, options in FULL.items() for combo in COMBOS
             if "int8" not in combo}
SIM_CASES.update({f"{rule}-{combo}": (rule, FULL[rule], combo)
                  for rule, combo in [("lion", "state-int8"), ("adam", "master-bf16-state-int8")]})


def run_case(rule, options, combo, run_mixed, to_device=lambda a: a.copy(), to_host=lambda a: a, seed=0):
    pdt, gdt, sdt, master = COMBOS[combo]
    r = RULES[rule]
    rng = np.random.default_rng(seed)
    shapes = INT8_SHAPES if sdt == "int8" else SHAPES
    p32 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    params = [to_device(p.astype(pdt)) for p in p32]
    masters = [to_device(p.copy()) for p in p32] if master else None
    need = needed_state(rule, options)
    starts = [initial_state(rule, options, p) for p in p32]
    signed = {b.name: b.signed for b in r.buffers}

    def state_buffer(values, name):
        if sdt == "int8":  # (its codes and absmax on the device)
            q = F.Int8State.from_float(values * 0.01 + 0.001 * (not signed[name]), signed[name])
            return F.Int8State(to_device(q.codes), to_device(q.absmax), q.signed)
        return to_device(values.astype(sdt))
    states = tuple([state_buffer(st[name], name) for st in starts] if name in need else None for name in r.state)
    fmt = F.INT8 if sdt == "int8" else F.format_of(sdt)
    formats = F.CallFormats(F.format_of(pdt), F.format_of(gdt),
                            tuple(fmt if name in need else None for name in r.state), master)
    hyper = {**r.defaults, **options}
    carried = r.carry[1] if r.carry else None
    for t in range(1, STEPS + 1):
        grads = [to_device((rng.standard_normal(s) * 0.5).astype(gdt)) for s in shapes]
        if r.carry:
            hyper[r.carry[0]] = carried
        flat, _ = r.prepared(hyper)
        scalars, carried = r.scalars_at(flat, t)
        run_mixed(r.kernel, params, grads, states, masters, formats, scalars, F.rounding_key(3, t))
    out = {"param": [np.asarray(to_host(p)).view(np.uint8) for p in params]}
    if masters:
        out["master_param"] = [np.asarray(to_host(m)).view(np.uint8) for m in masters]
    for name, arrays in zip(r.state, states):
        if arrays is not None and sdt == "int8":
            out[name] = [np.asarray(to_host(a.codes)).view(np.uint8) for a in arrays]
            out[name + ".absmax"] = [np.asarray(to_host(a.absmax)).view(np.uint8) for a in arrays]
        elif arrays is not None:
            out[name] = [np.asarray(to_host(a)).view(np.uint8) for a in arrays]
    return out
