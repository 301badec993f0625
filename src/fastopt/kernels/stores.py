"""How an update stores a value: the storage seam of the compiled loops.

The element functions (:mod:`fastopt.kernels.elements`) compute new values;
the loops around them store each one through a store function
``store(x, tiny)`` (``tiny``: the smallest normal number of the buffer dtype,
as a value of that dtype). Today there are two, for float32/float64 buffers:

* :func:`keep`: the value as computed (the default);
* :func:`flush_subnormal`: a subnormal value is stored as a zero of its sign
  (``fastopt.set_flush_denormal(True)``). Only stored values are flushed, not
  intermediates, so the result is defined exactly and the NumPy reference
  reproduces it bit for bit. ``x * (|x| >= tiny)`` is ``x`` or a zero of
  its sign and keeps a NaN (the comparison is False for NaN), without a
  float literal (which would promote a float32 loop in Numba).

Coming storage formats (bf16, 8-bit blockwise state) are further store (and
load) functions at this seam, not copies of the rules. Plain Python, compiled
by each backend like the element functions.
"""


def keep(x, tiny):
    return x


def flush_subnormal(x, tiny):
    # x * (|x| >= tiny): times 1 or times 0 (a zero of x's sign; NaN stays NaN, as
    # the comparison is False). A select-free product: it vectorizes in Numba,
    # where a conditional expression here made the loop 3x slower.
    return x * (abs(x) >= tiny)
