"""Shared pieces of the pytest-benchmark suite in bench/test_bench.py.

Not collected by the default ``python -m pytest`` (testpaths is ``tests``). Run:

    python -m pytest bench --benchmark-only
    FASTOPT_BENCH_RULES=adamw,sgd FASTOPT_BENCH_SIZES=2^16,2^24 python -m pytest bench --benchmark-only
    FASTOPT_BENCH_HUGE=1 python -m pytest bench --benchmark-only -k "2^26"

Environment variables (the case and size syntax of ``python -m fastopt bench``):

* ``FASTOPT_BENCH_RULES``     rules or cases, comma separated (default: all)
* ``FASTOPT_BENCH_SIZES``     sizes: 2^20, 1M, 1048576 (default: 2^10..2^24 in steps of 4x)
* ``FASTOPT_BENCH_HUGE=1``    also 2^26
* ``FASTOPT_BENCH_BACKENDS``  fastopt backends (default: every CPU one; unavailable ones are skipped with the reason)
* ``FASTOPT_NUM_THREADS``     threads for the backends, the roofline and torch
"""
import numpy as np
import pytest

from fastopt.bench import cases, runner


def pytest_report_header(config):
    chosen, sizes, backends = cases.env_selection()
    return [f"fastopt bench: cases {','.join(c.name for c in chosen)}; "
            f"sizes {','.join(map(cases.format_size, sizes))}; backends {backends or 'all'}; "
            f"threads {runner.apply_threads()}"]


class BufferCache:
    """The buffers of one (case, size) at a time. Tests run implementation-fastest,
    so each (case, size) is allocated once and freed before the next."""

    def __init__(self):
        self.key, self.bufs = None, None

    def get(self, case, n):
        if self.key != (case.name, n):
            self.key, self.bufs = None, None  # free the previous size first
            self.bufs = cases.make_buffers(case, n, np.float32)
            self.key = (case.name, n)
        return self.bufs


@pytest.fixture(scope="session")
def buffer_cache():
    runner.apply_threads()
    return BufferCache()
