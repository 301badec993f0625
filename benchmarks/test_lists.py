"""pytest-benchmark suite, the list-of-tensors case: one call over a model's tensors vs one flat buffer.

For each case (``FASTOPT_BENCH_LIST_RULES``, default ``adamw``), layout
(``FASTOPT_BENCH_LAYOUTS``, default ``gpt,1000x1024``; the gpt total is
``FASTOPT_BENCH_LIST_SIZES``, default 2^24) and CPU backend, two tests in one
group: ``list`` (``fastopt.adamw_([p1, ...], [g1, ...], ...)``) and ``flat``
(the same call on one buffer per role of the same total). See
:mod:`fastopt.bench.lists`; ``python -m fastopt bench --lists`` prints the
ratio table.
"""
import pytest

from fastopt.bench import cases, lists

CASES, LAYOUTS, BACKENDS = lists.env_selection()
_NAMES, _SKIPPED = lists.plan(lists.ListConfig(cases=CASES, layouts=LAYOUTS, backends=BACKENDS))

PARAMS = [pytest.param(case, layout, name, form, id=f"{case.name}-{layout.name.replace(' ', '')}-{name}-{form}")
          for case in CASES for layout in LAYOUTS for name in [*_NAMES, *_SKIPPED] for form in ("list", "flat")]


@pytest.mark.parametrize("case,layout,name,form", PARAMS)
def test_list_update(benchmark, list_cache, case, layout, name, form):
    if name in _SKIPPED:
        pytest.skip(f"{name}: {_SKIPPED[name]}")
    bufs = list_cache.get(case, layout)[form == "flat"]
    fn = cases.fastopt_call(case, bufs, name)
    fn()  # compile, touch memory
    fn()
    benchmark.group = f"{case.name} {layout.name} ({layout.count} tensors, {layout.total} elements) {name}"
    benchmark.extra_info.update(case=case.name, layout=layout.name, tensors=layout.count, size=layout.total,
                                impl=name, form=form)
    benchmark(fn)
    stats = getattr(benchmark.stats, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info.update(ns_per_elem=stats.median / layout.total * 1e9)
