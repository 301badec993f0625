"""Shared pieces of the pytest-benchmark suite: benchmarks/test_kernels.py and benchmarks/test_lists.py.

Not collected by the default ``python -m pytest`` (testpaths is ``tests``). Run:

    python -m pytest benchmarks --benchmark-only
    FASTOPT_BENCH_RULES=adamw,sgd FASTOPT_BENCH_SIZES=2^16,2^24 python -m pytest benchmarks --benchmark-only
    FASTOPT_BENCH_HUGE=1 python -m pytest benchmarks --benchmark-only -k "2^26"
    python -m pytest benchmarks/test_lists.py --benchmark-only        # list of tensors vs one flat buffer

Environment variables (the case and size syntax of ``python -m fastopt bench``):

* ``FASTOPT_BENCH_RULES``      rules or cases, comma separated (default: all)
* ``FASTOPT_BENCH_SIZES``      sizes: 2^20, 1M, 1048576 (default: 2^10..2^24 in steps of 4x)
* ``FASTOPT_BENCH_HUGE=1``     also 2^26
* ``FASTOPT_BENCH_BACKENDS``   fastopt backends (default: every CPU one; unavailable ones are skipped with the reason)
* ``FASTOPT_BENCH_LIST_RULES`` the list tests' rules or cases (default: the adamw case)
* ``FASTOPT_BENCH_LAYOUTS``    the list tests' layouts: gpt, NxM (default: gpt,1000x1024)
* ``FASTOPT_BENCH_LIST_SIZES`` the gpt layout's totals (default: 2^24)
* ``FASTOPT_NUM_THREADS``      threads for the backends, the roofline and torch
"""
import numpy as np
import pytest

from fastopt.bench import cases, lists, runner


def pytest_report_header(config):
    chosen, sizes, backends = cases.env_selection()
    list_cases, layouts, _ = lists.env_selection()
    return [f"fastopt bench: cases {','.join(c.name for c in chosen)}; "
            f"sizes {','.join(map(cases.format_size, sizes))}; backends {backends or 'all'}; "
            f"threads {runner.apply_threads()}",
            f"fastopt bench lists: cases {','.join(c.name for c in list_cases)}; "
            f"layouts {', '.join(f'{lay.name} ({lay.count} tensors, {lay.total} elements)' for lay in layouts)}"]


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


class ListCache:
    """The (lists, flat) buffers of one (case, layout) at a time, as :class:`BufferCache`."""

    def __init__(self):
        self.key, self.bufs = None, None

    def get(self, case, layout):
        if self.key != (case.name, layout):
            self.key, self.bufs = None, None
            self.bufs = lists.list_buffers(case, layout, np.float32)
            self.key = (case.name, layout)
        return self.bufs


@pytest.fixture(scope="session")
def list_cache():
    runner.apply_threads()
    return ListCache()
