/* fastopt._tables: the checked pointer tables of a list call, in one pass.
 *
 * fastopt.adamw_([p1, p2, ...], [g1, ...], [m1, ...], [v1, ...], step=t)
 * over a model's tensors needs, per array, a handful of checks (type, dtype,
 * shape, contiguity, writability) and its address; and, across the whole
 * call, the proof that no two arrays overlap. In Python that is ~1.5 us per
 * array: 6 ms for 1000 tensors of AdamW, 15x the update of the same elements
 * in one flat buffer. Here it is a few nanoseconds per array plus one sort.
 *
 * This module decides only "valid, and here are the tables" or "not this
 * fast case" (None). It never raises for a bad buffer: on None,
 * fastopt.buffers runs its Python checks, which name the argument and the
 * problem; that keeps every message in one place. So it accepts only what
 * those checks accept, and is stricter where the compiled loops need it
 * (aligned data, which the Numba loops assume of a raw pointer).
 *
 * Built next to the cffi extension fastopt._c by the top-level CMakeLists.txt;
 * the package works without it, at the Python checks' speed. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch(p)
#else
#define PREFETCH(p) ((void)(p))
#endif

typedef struct {
    uintptr_t lo, hi; /* the bytes [lo, hi) of one non-empty array */
} span;

/* Sort spans by lo: LSD radix sort on lo - min, one byte per pass, only as
 * many passes as the address range needs (three for 16 MiB). 4000 spans sort
 * in ~50 us; glibc's qsort takes ~380 us, more than the update. Returns the
 * buffer (a or tmp) that holds the result. */
static span *sort_spans(span *a, span *tmp, size_t n)
{
    uintptr_t min = UINTPTR_MAX, max = 0;
    for (size_t i = 0; i < n; i++) {
        min = a[i].lo < min ? a[i].lo : min;
        max = a[i].lo > max ? a[i].lo : max;
    }
    const uintptr_t range = max - min;
    for (unsigned shift = 0; shift < 8 * sizeof(uintptr_t) && (range >> shift); shift += 8) {
        size_t start[257] = {0};
        for (size_t i = 0; i < n; i++)
            start[((a[i].lo - min) >> shift & 255u) + 1]++;
        for (int d = 0; d < 256; d++)
            start[d + 1] += start[d];
        for (size_t i = 0; i < n; i++)
            tmp[start[(a[i].lo - min) >> shift & 255u]++] = a[i];
        span *t = a;
        a = tmp;
        tmp = t;
    }
    return a;
}

/* The spans of the last call found disjoint, in the order collected. A
 * training loop passes the same tensors every step (and the allocator hands
 * a fresh gradient the same address), so most calls are this one again: a
 * memcmp instead of a sort. Only the addresses matter, not which arrays they
 * came from, so an equal list of spans is disjoint whatever arrays hold
 * them. Callers hold the GIL, which serializes the use of this cache. */
static span *last_spans;
static size_t last_count, last_capacity;

static void remember(const span *spans, size_t n)
{
    if (n > last_capacity) {
        span *grown = realloc(last_spans, n * sizeof *grown);
        if (!grown) {
            last_count = 0; /* no cache: correct, only slower */
            return;
        }
        last_spans = grown;
        last_capacity = n;
    }
    memcpy(last_spans, spans, n * sizeof *spans);
    last_count = n;
}

/* 1 when no two spans overlap, 0 when two do, -1 when out of memory. Spans
 * already in ascending order (arrays allocated one after another often are)
 * need no sort. Reorders `spans`. */
static int disjoint(span *spans, size_t n)
{
    if (n == last_count && n && !memcmp(spans, last_spans, n * sizeof *spans))
        return 1;
    size_t i = 1;
    while (i < n && spans[i - 1].hi <= spans[i].lo)
        i++;
    if (i >= n) {
        remember(spans, n);
        return 1;
    }
    span *tmp = malloc(2 * n * sizeof *tmp);
    if (!tmp)
        return -1;
    memcpy(tmp + n, spans, n * sizeof *spans); /* as collected, for the cache */
    const span *s = sort_spans(spans, tmp, n);
    int ok = 1;
    for (i = 1; i < n && ok; i++)
        ok = s[i - 1].hi <= s[i].lo;
    if (ok)
        remember(tmp + n, n);
    free(tmp);
    return ok;
}

static int is_list(PyObject *o) { return PyList_CheckExact(o) || PyTuple_CheckExact(o); }

/* Same shape: ndim and every extent. (Inline loops here and below, not
 * memcmp or PyArray_SIZE: those are calls, through NumPy's API table for the
 * latter, and were half of the time per array.) */
static int same_shape(PyArrayObject *a, PyArrayObject *b)
{
    const int nd = PyArray_NDIM(a);
    if (nd != PyArray_NDIM(b))
        return 0;
    const npy_intp *da = PyArray_DIMS(a), *db = PyArray_DIMS(b);
    for (int d = 0; d < nd; d++)
        if (da[d] != db[d])
            return 0;
    return 1;
}

static npy_intp element_count(PyArrayObject *a)
{
    const npy_intp *dims = PyArray_DIMS(a);
    npy_intp size = 1;
    for (int d = 0; d < PyArray_NDIM(a); d++)
        size *= dims[d];
    return size;
}

static void prefetch_shape(PyObject *o)
{
    if (PyArray_CheckExact(o)) /* (reading the type is safe for any object) */
        PREFETCH(PyArray_DIMS((PyArrayObject *)o));
}

PyDoc_STRVAR(host_tables_doc,
"host_tables(lists, grad_index) -> numpy.ndarray | None\n\n"
"lists: a tuple of R lists (or tuples) of one length N, one per role (param,\n"
"grad, state buffers...); grad_index: the role that is only read.\n\n"
"Returns an int64 array of shape (R + 1, N): row r holds the data address of\n"
"each array of role r, the last row each position's element count. That is\n"
"returned only when every array is a plain numpy.ndarray (no subclass) of\n"
"native float32 or float64, the dtype of lists[0][0]; position i of every role\n"
"has the shape of lists[0][i]; every array is C-contiguous and aligned, and\n"
"writable unless of role grad_index; and no two non-empty arrays share a byte.\n"
"Otherwise None (the caller's checks then find and name the problem).");

static PyObject *host_tables(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *lists;
    int grad_index;
    if (!PyArg_ParseTuple(args, "O!i:host_tables", &PyTuple_Type, &lists, &grad_index))
        return NULL;
    const Py_ssize_t roles = PyTuple_GET_SIZE(lists);
    if (roles < 1 || !is_list(PyTuple_GET_ITEM(lists, 0)))
        Py_RETURN_NONE;
    PyObject *first = PyTuple_GET_ITEM(lists, 0);
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(first);
    if (count < 1)
        Py_RETURN_NONE;
    for (Py_ssize_t r = 1; r < roles; r++) {
        PyObject *seq = PyTuple_GET_ITEM(lists, r);
        if (!is_list(seq) || PySequence_Fast_GET_SIZE(seq) != count)
            Py_RETURN_NONE;
    }
    PyObject **params = PySequence_Fast_ITEMS(first);
    if (!PyArray_CheckExact(params[0]))
        Py_RETURN_NONE;
    const int type_num = PyArray_TYPE((PyArrayObject *)params[0]);
    if (type_num != NPY_FLOAT32 && type_num != NPY_FLOAT64)
        Py_RETURN_NONE;
    const npy_intp itemsize = type_num == NPY_FLOAT32 ? 4 : 8;

    npy_intp dims[2] = {roles + 1, count};
    PyArrayObject *table = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT64);
    span *spans = table ? malloc((size_t)(roles * count) * sizeof *spans) : NULL;
    if (!spans) {
        Py_XDECREF(table);
        return PyErr_NoMemory();
    }
    int64_t *t = PyArray_DATA(table);
    int64_t *sizes = t + roles * count;
    size_t n_spans = 0;
    int ok = 1;
    PyTypeObject *const ndarray = &PyArray_Type; /* (an API-table load, once) */
    for (Py_ssize_t r = 0; r < roles && ok; r++) {
        PyObject **items = PySequence_Fast_ITEMS(PyTuple_GET_ITEM(lists, r));
        const int required = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | (r == grad_index ? 0 : NPY_ARRAY_WRITEABLE);
        for (Py_ssize_t i = 0; i < count; i++) {
            /* The array objects and their shapes lie scattered over the heap,
             * and after a training step none is in cache: fetch the objects
             * 16 ahead and the shapes of those fetched 8 ago, so the misses
             * overlap instead of costing a memory latency each. */
            if (i + 16 < count) {
                PREFETCH(items[i + 16]);
                PREFETCH(params[i + 16]);
            }
            if (r > 0 && i + 8 < count) {
                prefetch_shape(items[i + 8]);
                prefetch_shape(params[i + 8]);
            }
            PyArrayObject *a = (PyArrayObject *)items[i];
            if (Py_TYPE(a) != ndarray || PyArray_TYPE(a) != type_num || !PyArray_ISNOTSWAPPED(a)
                || (PyArray_FLAGS(a) & required) != required
                || (r > 0 && !same_shape(a, (PyArrayObject *)params[i]))) {
                ok = 0;
                break;
            }
            const uintptr_t lo = (uintptr_t)PyArray_DATA(a);
            const npy_intp size = element_count(a);
            t[r * count + i] = (int64_t)lo;
            if (r == 0)
                sizes[i] = size;
            if (size > 0)
                spans[n_spans++] = (span){lo, lo + (uintptr_t)(size * itemsize)};
        }
    }
    if (ok)
        ok = disjoint(spans, n_spans);
    free(spans);
    if (ok == 1)
        return (PyObject *)table;
    Py_DECREF(table);
    if (ok < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(disjoint_table_doc,
"disjoint_table(table, itemsize) -> bool\n\n"
"For a pointer table built by the caller (int64, C-contiguous, shape (roles + 1, N):\n"
"row r < roles the data addresses of role r, 0 for a buffer the call does not\n"
"use; the last row the element counts):\n"
"True when every address is aligned to itemsize and no two non-empty arrays\n"
"share a byte (the proof host_tables makes of ndarrays, for callers that hold\n"
"tensors and checked everything else themselves, as fastopt.torch does).");

static PyObject *disjoint_table(PyObject *self, PyObject *args)
{
    (void)self;
    PyArrayObject *table;
    Py_ssize_t itemsize;
    if (!PyArg_ParseTuple(args, "O!n:disjoint_table", &PyArray_Type, &table, &itemsize))
        return NULL;
    if (PyArray_TYPE(table) != NPY_INT64 || PyArray_NDIM(table) != 2 || !PyArray_IS_C_CONTIGUOUS(table)
        || PyArray_DIMS(table)[0] < 2 || itemsize < 1) {
        PyErr_SetString(PyExc_TypeError, "table must be a C-contiguous int64 array of shape (roles + 1, N)");
        return NULL;
    }
    const npy_intp roles = PyArray_DIMS(table)[0] - 1, count = PyArray_DIMS(table)[1];
    const int64_t *t = PyArray_DATA(table), *sizes = t + roles * count;
    span *spans = malloc((size_t)(roles * count + 1) * sizeof *spans);
    if (!spans)
        return PyErr_NoMemory();
    size_t n = 0;
    int ok = 1;
    for (npy_intp r = 0; r < roles && ok; r++)
        for (npy_intp i = 0; i < count; i++) {
            const uintptr_t lo = (uintptr_t)t[r * count + i];
            if (sizes[i] < 0 || lo % (uintptr_t)itemsize) {
                ok = 0;
                break;
            }
            if (sizes[i] > 0 && lo) /* (a null address: a row of a buffer the call does not use) */
                spans[n++] = (span){lo, lo + (uintptr_t)sizes[i] * (uintptr_t)itemsize};
        }
    if (ok)
        ok = disjoint(spans, n);
    free(spans);
    if (ok < 0)
        return PyErr_NoMemory();
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"host_tables", host_tables, METH_VARARGS, host_tables_doc},
    {"disjoint_table", disjoint_table, METH_VARARGS, disjoint_table_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fastopt._tables",
    "The checked pointer tables of a list call (fastopt.buffers.check_lists' fast path).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tables(void)
{
    import_array();
    return PyModule_Create(&module);
}
