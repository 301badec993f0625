"""Determinism: the same bytes on repeated runs, and concurrent calls from
several Python threads on distinct buffers equal the same calls made serially.

(1 vs 2 CPU threads inside one call is checked in test_backends.py.)
"""
import threading

import numpy as np
import pytest

import fastopt
from oracle import MATRIX, inputs, run_fastopt

BACKENDS = [name for name, info in fastopt.backends().items() if info.available and info.device == "cpu"]
# One case per rule is enough here: the property concerns the plumbing, not the math.
ONE_PER_RULE = {rule: (rule, opts) for rule, opts in reversed(MATRIX)}
CASES = list(ONE_PER_RULE.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule,options", CASES, ids=[r for r, _ in CASES])
def test_repeated_runs_identical(backend, rule, options):
    p0, grads = inputs(70001, 3, np.float32, seed=21)
    (p1, s1), (p2, s2) = (run_fastopt(rule, options, p0, grads, backend=backend) for _ in range(2))
    assert p1.tobytes() == p2.tobytes()
    assert all(s1[k].tobytes() == s2[k].tobytes() for k in s1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_threads_match_serial(backend):
    jobs = [(rule, opts, *inputs(1 << 16, 4, dtype, seed=i))
            for i, ((rule, opts), dtype) in enumerate(zip(CASES * 2, [np.float32, np.float64] * len(CASES)))]
    serial = [run_fastopt(rule, opts, p0, grads, backend=backend) for rule, opts, p0, grads in jobs]
    concurrent = [None] * len(jobs)
    errors = []
    start = threading.Barrier(len(jobs))

    def work(i):
        rule, opts, p0, grads = jobs[i]
        try:
            start.wait()
            concurrent[i] = run_fastopt(rule, opts, p0, grads, backend=backend)
        except Exception as exc:  # surfaced below, with the job that failed
            errors.append((i, exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (p_s, s_s), (p_c, s_c) in zip(serial, concurrent):
        assert p_s.tobytes() == p_c.tobytes()
        assert all(s_s[k].tobytes() == s_c[k].tobytes() for k in s_s)

