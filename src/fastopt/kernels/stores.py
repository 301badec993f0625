"""How an update stores a value: the storage seam of the compiled loops.

The element functions (:mod:`fastopt.kernels.elements`) compute new values;
the loops around them store each one through a store function
``store(x, tiny)`` (``tiny``: the smallest normal number of the buffer dtype,
as a value of that dtype). Today there are two, for float32/float64 buffers:

* :func:`keep`: the value as computed (the default);
* :func:`flush_subnormal`: a subnormal value is stored as a zero of its sign
  (``fastopt.set_flush_denormal(True)``). Only stored values are flushed, not
  intermediates, so the result is defined exactly and the NumPy reference
  reproduces it bit for bit. A value with ``|x| < tiny`` (a subnormal or a
  zero) is stored as ``x * 0``, a zero of its sign; every other value (normal,
  infinite, NaN: the comparison is False for NaN) is stored unchanged, bits
  and all. The zero is ``tiny - tiny``, not a float literal (which would
  promote a float32 loop in Numba).

Coming storage formats (bf16, 8-bit blockwise state) are further store (and
load) functions at this seam, not copies of the rules. Plain Python, compiled
by each backend like the element functions.
"""


def keep(x, tiny):
    return x


def flush_subnormal(x, tiny):
    # A select between x and x * 0, both computed (vectorised: a compare and a
    # masked multiply). The product by an exact zero, never x * tiny: x * tiny is
    # subnormal for every |x| < 1, which x86 computes slowly, in the lanes a
    # select does not keep too (the loop ran 2-3x slower). ``flushed`` is
    # assigned before the branch: assigned inside it, it left a dead loop-carried
    # phi per store in Numba's inlined loop body, and a conditional expression as
    # the return value warns (NumbaIRAssumptionWarning).
    # The CPU loops (LLVM 15+) compile numba_loops._flush_subnormal in its place,
    # bit for bit the same with a class test for |x| < tiny: keep the two alike.
    flushed = x * (tiny - tiny)
    if abs(x) < tiny:
        return flushed
    return x
