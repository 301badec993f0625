"""The benchmark harness: ``python -m fastopt bench`` and the ``benchmarks/`` pytest-benchmark suite.

Every number it prints is a ratio against something timed in the same run: the
roofline kernel (same bytes read and written per element, trivial math), the
NumPy reference backend and ``torch.optim``. Modules, one job each:

* :mod:`.cases`       what to run: rule configurations, their buffers, bytes per element, the fastopt call
* :mod:`.roofline`    the roofline kernels (Numba CPU, Numba CUDA) and the memory-copy checks
* :mod:`.competitors` ``torch.optim`` (fused / foreach); the NumPy competitor is the reference backend
* :mod:`.lists`       the list-of-tensors case: one call over a model's tensors vs one flat buffer
* :mod:`.timing`      the timer: warmup, adaptive call count, repeats, median and min
* :mod:`.runner`      the matrix case x size x implementation, and the ratios
* :mod:`.report`      the tables (terminal or Markdown) and the JSON document
* :mod:`.plot`        ``--plot``: ns/elem against size as a figure (matplotlib, optional)
* :mod:`.cli`         ``python -m fastopt bench [options]``
"""
