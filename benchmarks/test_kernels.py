"""pytest-benchmark suite: rule case x size x implementation, fp32, on shared buffers.

Implementations are the CLI's (``fastopt.bench.runner.plan``): the roofline
kernel (threaded and serial variants), every fastopt CPU backend (skipped with
the reason when it does not load here; ``numpy`` is the NumPy reference) and
``torch.optim`` (fused or foreach). Each test records bytes per element, ns/elem and
GB/s in ``extra_info`` (``--benchmark-json`` keeps them). For the ratios and
the % roofline table use ``python -m fastopt bench``.
"""
import pytest

from fastopt.bench import cases, runner

CASES, SIZES, BACKENDS = cases.env_selection()
_IMPLS, _SKIPPED = runner.plan(runner.Config(cases=CASES, sizes=SIZES, backends=BACKENDS))
_BY_NAME = {impl.name: impl for impl in _IMPLS}

#: (impl name, variant index): the roofline has a threaded (0) and a serial (1) variant.
_ROWS = [("roofline-threads", "roofline", 0), ("roofline-serial", "roofline", 1)]
_ROWS += [(impl.name, impl.name, 0) for impl in _IMPLS if impl.kind in ("backend", "competitor")]
_ROWS += [(name, name, 0) for name in _SKIPPED]

PARAMS = [pytest.param(case, n, name, impl, variant, id=f"{case.name}-{cases.format_size(n)}-{name}")
          for case in CASES for n in SIZES for name, impl, variant in _ROWS]


@pytest.mark.parametrize("case,n,name,impl_name,variant", PARAMS)
def test_update(benchmark, buffer_cache, case, n, name, impl_name, variant):
    if impl_name in _SKIPPED:
        pytest.skip(f"{impl_name}: {_SKIPPED[impl_name]}")
    bufs = buffer_cache.get(case, n)
    variants = _BY_NAME[impl_name].make(case, bufs)
    if variants is None:
        pytest.skip(f"{impl_name} has no {case.rule}")
    label, fn = variants[variant]
    fn()  # compile, touch memory
    fn()
    benchmark.group = f"{case.name} {cases.format_size(n)}"
    nbytes = case.bytes_per_elem(bufs.param.itemsize)
    benchmark.extra_info.update(case=case.name, size=n, impl=impl_name, variant=label, bytes_per_elem=nbytes)
    benchmark(fn)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(ns_per_elem=stats.median / n * 1e9, gbps=nbytes * n / stats.median / 1e9)
