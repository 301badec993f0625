"""The compiled checks of a list call (``fastopt._tables``, csrc/python/tables.c).

``host_tables`` must accept exactly the host list calls that the Python
checks of :mod:`fastopt.buffers` accept (minus misaligned arrays, which it
leaves to them), and return their true addresses and sizes: a table entry
that is wrong would make a kernel write to the wrong memory, and an overlap
it missed would make the result depend on the thread schedule. So every
rejection below is checked against the Python checks too, and the overlap
test against a brute-force pairwise test on random views.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import fastopt
from fastopt import buffers
from oracle import FULL, gpt_shapes, list_inputs, run_lists

NAMES = ["param", "grad", "exp_avg", "exp_avg_sq"]


@pytest.fixture(autouse=True)
def compiled():
    if buffers.host_tables([[np.zeros(1, np.float32)], [np.zeros(1, np.float32)]]) is None:
        pytest.fail("fastopt._tables did not load (it is built with the package)")


def adamw_lists(n=5, size=16, dtype=np.float32):
    return [[np.ones(size, dtype) for _ in range(n)] for _ in NAMES]


def python_verdict(lists):
    """What the Python checks say of the call: None (valid) or the exception type."""
    saved = buffers._tables
    buffers._tables = False
    try:
        buffers.check_lists(NAMES[:len(lists)], lists)
        return None
    except (TypeError, ValueError) as exc:
        return type(exc)
    finally:
        buffers._tables = saved


def test_table_holds_the_addresses_and_sizes():
    lists = [[np.ones(s, np.float64) for s in [(3,), (2, 5), (0,), (7, 1, 2)]] for _ in NAMES]
    table = buffers.host_tables(lists)
    assert table.dtype == np.int64 and table.shape == (len(NAMES) + 1, 4)
    for r, arrays in enumerate(lists):
        assert list(table[r]) == [a.__array_interface__["data"][0] for a in arrays]
    assert list(table[-1]) == [3, 10, 0, 14]
    on_device, checked = buffers.check_lists(NAMES, lists)
    assert not on_device and np.array_equal(checked, table)


def test_tuples_and_a_read_only_gradient_are_fine():
    lists = adamw_lists()
    for g in lists[1]:
        g.flags.writeable = False
    assert buffers.host_tables(tuple(tuple(x) for x in lists)) is not None


def _broken(kind):
    lists = adamw_lists()
    if kind == "subclass":
        lists[2][3] = lists[2][3].view(np.matrix)
    elif kind == "not an array":
        lists[0][1] = [1.0] * 16
    elif kind == "integer dtype":
        for r in range(4):
            lists[r] = [a.astype(np.int32) for a in lists[r]]
    elif kind == "mixed dtype":
        lists[3][2] = lists[3][2].astype(np.float64)
    elif kind == "byte-swapped":
        lists[2][0] = lists[2][0].astype(">f4")
    elif kind == "shape":
        lists[1][4] = np.ones((4, 4), np.float32)
    elif kind == "length":
        lists[3] = lists[3][:-1]
    elif kind == "not contiguous":
        lists[0][2] = np.ones(32, np.float32)[::2]
    elif kind == "read-only param":
        lists[0][0].flags.writeable = False
    elif kind == "read-only state":
        lists[3][4].flags.writeable = False
    elif kind == "same array twice":
        lists[2][1] = lists[3][4]
    elif kind == "overlapping views":
        base = np.ones(100, np.float32)
        lists[2][0], lists[3][0] = base[:16], base[10:26]
    elif kind == "list of lists":
        lists[2] = "not a list"
    return lists


BROKEN = ["subclass", "not an array", "integer dtype", "mixed dtype", "byte-swapped", "shape", "length",
          "not contiguous", "read-only param", "read-only state", "same array twice", "overlapping views",
          "list of lists"]


@pytest.mark.parametrize("kind", BROKEN)
def test_every_invalid_call_is_left_to_the_python_checks(kind):
    lists = _broken(kind)
    assert buffers.host_tables(lists) is None
    assert python_verdict(lists) is not None, "the Python checks accept it: the test is wrong"
    with pytest.raises((TypeError, ValueError)):  # and check_lists still raises, naming it
        buffers.check_lists(NAMES, lists)


def test_misaligned_arrays_take_the_python_path_and_still_update():
    raw = np.zeros(4 * 17 + 1, np.uint8)[1:].view(np.float32)  # 1 byte off: not aligned
    assert not raw.flags.aligned
    lists = adamw_lists(n=1, size=17)
    lists[0][0] = raw
    raw[:] = 1.0
    assert buffers.host_tables(lists) is None and python_verdict(lists) is None
    fastopt.adamw_(*lists, step=1, backend="c")
    assert np.all(raw < 1.0)


def test_empty_arrays_overlap_nothing():
    base = np.ones(64, np.float32)
    lists = adamw_lists(n=2)
    for r in range(4):  # position 0: empty, two of them views at the same address
        lists[r][0] = base[5:5] if r >= 2 else np.ones(0, np.float32)
    assert buffers.host_tables(lists) is not None and python_verdict(lists) is None


def test_an_overlap_after_a_cached_disjoint_call_is_found():
    # The last disjoint list of spans is remembered; any change must be re-checked.
    lists = adamw_lists(n=200)
    assert buffers.host_tables(lists) is not None
    assert buffers.host_tables(lists) is not None  # (from the cache)
    lists[3][150] = lists[0][7]
    assert buffers.host_tables(lists) is None
    lists[3][150] = np.ones(16, np.float32)
    assert buffers.host_tables(lists) is not None


def table_of(lists):
    """A caller-built table (what fastopt.torch makes from tensors): addresses by role, then sizes."""
    rows = [[a.__array_interface__["data"][0] for a in arrays] for arrays in lists]
    return np.array(rows + [[a.size for a in lists[0]]], dtype=np.int64)


def test_disjoint_table_is_the_overlap_proof_of_host_tables():
    lists = adamw_lists(n=50)
    assert buffers.disjoint_table(table_of(lists), 4)
    lists[2][30] = lists[1][3]  # a written buffer on a gradient
    assert not buffers.disjoint_table(table_of(lists), 4)
    table = table_of(adamw_lists(n=50))
    table[3] = 0  # a role the call does not use: a row of nulls, not checked
    assert buffers.disjoint_table(table, 4)
    table[0, 7] += 2  # an address not aligned to the element
    assert not buffers.disjoint_table(table, 4)
    with pytest.raises(TypeError, match="int64 array"):
        buffers._extension().disjoint_table(table.astype(np.int32), 4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), min_size=2, max_size=60), st.randoms())
def test_overlap_verdict_matches_pairwise_test(spans, rnd):
    """Views into one buffer at random offsets, in random order (so the sort
    runs): valid exactly when no two non-empty views share an element."""
    base = np.ones(256, np.float32)
    views = [base[lo:lo + n] for lo, n in spans]
    rnd.shuffle(views)
    half = len(views) // 2
    lists = [views[:half], views[half:2 * half]]
    sizes = [v.size for v in lists[1]]
    lists[0] = [v if v.size == s else np.ones(s, np.float32) for v, s in zip(lists[0], sizes)]  # shapes per position
    flat = [v for arrays in lists for v in arrays if v.size]
    offsets = [(v.__array_interface__["data"][0], v.nbytes) for v in flat]
    overlap = any(a < b + m and b < a + n for i, (a, n) in enumerate(offsets) for (b, m) in offsets[:i])
    assert (buffers.host_tables(lists) is None) == overlap
    assert (python_verdict(lists) is not None) == overlap
    assert buffers.disjoint_table(table_of(lists), 4) == (not overlap)


@pytest.mark.parametrize("backend", ["numba", "c"])
@pytest.mark.parametrize("rule", ["adamw", "rmsprop", "lion"])
def test_list_calls_are_the_same_without_the_compiled_checks(backend, rule, monkeypatch):
    p0, grads = list_inputs(gpt_shapes()[:20], 2, np.float32, seed=3)
    with_tables = run_lists(rule, FULL[rule], p0, grads, backend=backend)
    monkeypatch.setattr(buffers, "_tables", False)
    without = run_lists(rule, FULL[rule], p0, grads, backend=backend)
    for a, b in zip(with_tables[0], without[0]):
        assert a.tobytes() == b.tobytes()
    for name in with_tables[1]:
        for a, b in zip(with_tables[1][name], without[1][name]):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", ["numba", "c"])
def test_table_rows_follow_the_kernel_order(backend):
    """RMSprop centered without momentum passes square_avg and grad_avg but no
    momentum_buffer: the given buffers' rows are not the kernel's, so the table
    is reordered; an unused buffer that is passed (Adam's max_exp_avg_sq
    without amsgrad) is checked but not written."""
    p0, grads = list_inputs(gpt_shapes()[:12], 2, np.float32, seed=5)
    options = dict(FULL["rmsprop"], momentum=0.0, centered=True)
    p_list, s_list = run_lists("rmsprop", options, p0, grads, backend=backend)
    p_ref, s_ref = run_lists("rmsprop", options, p0, grads, backend="numpy", per_tensor=True)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(p_list, p_ref))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(s_list["grad_avg"], s_ref["grad_avg"]))
    p, g = [a.copy() for a in p0], grads[0]
    m, v, vmax = ([np.zeros_like(a) for a in p0] for _ in range(3))
    fastopt.adam_(p, g, m, v, vmax, step=1, backend=backend)
    assert all(not a.any() for a in vmax)
    q = [a.copy() for a in p0]
    fastopt.adam_(q, g, [np.zeros_like(a) for a in p0], [np.zeros_like(a) for a in p0], step=1, backend=backend)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(p, q))
