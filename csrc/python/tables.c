/* fastopt._tables: the checked pointer tables of a list call, in one pass;
 * and host_call, the checks and the kernel call of flat updates in one step.
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

/* ---- One flat update: the checks of fastopt.buffers and the kernel call in one step ---- */

#define HOST_CALL_MAX_STATE 6
#define HOST_CALL_MAX_SCALARS 32

/* The generated entry points are int f(T *param, const T *grad, T *state_1, ...,
 * T *state_k, int64_t n, const scalars *s). They are called through a pointer of
 * that shape with void pointers, which every C ABI passes as it passes T *. */
static int call_kernel(void *fn, void *const *ptr, Py_ssize_t nstate, int64_t n, const void *s)
{
    void *p = ptr[0], *g = ptr[1];
    switch (nstate) {
    case 0: return ((int (*)(void *, void *, int64_t, const void *))fn)(p, g, n, s);
    case 1: return ((int (*)(void *, void *, void *, int64_t, const void *))fn)(p, g, ptr[2], n, s);
    case 2: return ((int (*)(void *, void *, void *, void *, int64_t, const void *))fn)(p, g, ptr[2], ptr[3], n, s);
    case 3:
        return ((int (*)(void *, void *, void *, void *, void *, int64_t, const void *))fn)(p, g, ptr[2], ptr[3],
                                                                                           ptr[4], n, s);
    case 4:
        return ((int (*)(void *, void *, void *, void *, void *, void *, int64_t, const void *))fn)(
            p, g, ptr[2], ptr[3], ptr[4], ptr[5], n, s);
    case 5:
        return ((int (*)(void *, void *, void *, void *, void *, void *, void *, int64_t, const void *))fn)(
            p, g, ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], n, s);
    default:
        return ((int (*)(void *, void *, void *, void *, void *, void *, void *, void *, int64_t, const void *))fn)(
            p, g, ptr[2], ptr[3], ptr[4], ptr[5], ptr[6], ptr[7], n, s);
    }
}

/* The struct of a rule's scalars: nfloat doubles, then ints; the union keeps it
 * aligned for both. */
typedef union {
    double d[HOST_CALL_MAX_SCALARS];
    int i[2 * HOST_CALL_MAX_SCALARS];
} packed_scalars;

typedef struct {
    void *ptr[2 + HOST_CALL_MAX_STATE];
    Py_ssize_t nstate;
    int64_t n;
    int type_num;
    packed_scalars s;
} checked_call;

static int pack_scalars(PyObject *scalars, Py_ssize_t nfloat, packed_scalars *s);

/* 1 when (arrays, scalars) is the plain case (see host_call_doc) and c is
 * filled; 0 when not; -1 with an exception set (a scalar that is no number). */
static int check_call(PyObject *call, Py_ssize_t nfloat, checked_call *c)
{
    if (!PyTuple_CheckExact(call) || PyTuple_GET_SIZE(call) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(call, 0))
        || !PyTuple_Check(PyTuple_GET_ITEM(call, 1)))
        return 0;
    PyObject *arrays = PyTuple_GET_ITEM(call, 0), *scalars = PyTuple_GET_ITEM(call, 1);
    const Py_ssize_t count = PyTuple_GET_SIZE(arrays), nscalar = PyTuple_GET_SIZE(scalars);
    if (count < 2 || count > 2 + HOST_CALL_MAX_STATE || nfloat < 0 || nfloat > nscalar
        || nscalar > HOST_CALL_MAX_SCALARS)
        return 0;
    PyObject *const first = PyTuple_GET_ITEM(arrays, 0);
    if (!PyArray_CheckExact(first))
        return 0;
    PyArrayObject *const param = (PyArrayObject *)first;
    const int type_num = PyArray_TYPE(param);
    if (type_num != NPY_FLOAT32 && type_num != NPY_FLOAT64)
        return 0;
    const npy_intp size = element_count(param);
    const uintptr_t bytes = (uintptr_t)size * (type_num == NPY_FLOAT32 ? 4u : 8u);
    PyTypeObject *const ndarray = &PyArray_Type;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *o = PyTuple_GET_ITEM(arrays, i);
        if (o == Py_None && i >= 2) {
            c->ptr[i] = NULL;
            continue;
        }
        PyArrayObject *a = (PyArrayObject *)o;
        const int required = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | (i == 1 ? 0 : NPY_ARRAY_WRITEABLE);
        if (Py_TYPE(o) != ndarray || PyArray_TYPE(a) != type_num || !PyArray_ISNOTSWAPPED(a)
            || (PyArray_FLAGS(a) & required) != required || (i > 0 && !same_shape(a, param)))
            return 0;
        c->ptr[i] = PyArray_DATA(a);
        /* Contiguous arrays of one size overlap exactly when their starts are
         * less than one array's bytes apart. */
        for (Py_ssize_t j = 0; j < i && bytes; j++) {
            const uintptr_t x = (uintptr_t)c->ptr[i], y = (uintptr_t)c->ptr[j];
            if (y && (x > y ? x - y : y - x) < bytes)
                return 0;
        }
    }
    if (pack_scalars(scalars, nfloat, &c->s))
        return -1;
    c->nstate = count - 2;
    c->n = (int64_t)size;
    c->type_num = type_num;
    return 1;
}

/* The calls of one host_call touch disjoint memory: no array of one call
 * overlaps an array of another (a stateful optimizer's groups are disjoint
 * segments; each call's own arrays were checked in check_call). */
static int calls_disjoint(const checked_call *calls, Py_ssize_t ncalls)
{
    if (ncalls < 2)
        return 1;
    size_t n = 0;
    for (Py_ssize_t k = 0; k < ncalls; k++)
        n += (size_t)(2 + calls[k].nstate);
    span *spans = malloc(n * sizeof *spans);
    if (!spans)
        return -1;
    n = 0;
    for (Py_ssize_t k = 0; k < ncalls; k++) {
        const uintptr_t bytes = (uintptr_t)calls[k].n * (calls[k].type_num == NPY_FLOAT32 ? 4u : 8u);
        for (Py_ssize_t i = 0; i < 2 + calls[k].nstate; i++)
            if (calls[k].ptr[i] && bytes)
                spans[n++] = (span){(uintptr_t)calls[k].ptr[i], (uintptr_t)calls[k].ptr[i] + bytes};
    }
    span *tmp = malloc(n * sizeof *tmp + 1);
    int ok = -1;
    if (tmp) {
        const span *sorted = sort_spans(spans, tmp, n);
        ok = 1;
        for (size_t i = 1; i < n && ok; i++)
            ok = sorted[i - 1].hi <= sorted[i].lo;
        free(tmp);
    }
    free(spans);
    return ok;
}

PyDoc_STRVAR(host_call_doc,
"host_call(functions, calls, nfloat) -> int | None\n\n"
"functions: (address of the float32 entry point, address of the float64 one)\n"
"of one generated kernel, fastopt_<kernel>_f32/_f64; calls: a tuple of\n"
"(arrays, scalars) pairs, one kernel call each: arrays is (param, grad,\n"
"state...) in the kernel's order, None for a state buffer the call does not\n"
"use (passed as NULL); scalars the rule's scalars, nfloat floats then flags,\n"
"in the order of the C struct (doubles, then ints).\n\n"
"When every array of every call is a plain numpy.ndarray of native float32 or\n"
"float64 (the dtype of its param), of its param's shape, C-contiguous, aligned,\n"
"writable except the grads, and no two non-empty arrays of the whole call share\n"
"a byte (what fastopt.buffers.check_buffers accepts, stricter on alignment),\n"
"runs the calls in order with the GIL released and returns 0, or the status of\n"
"the first that failed (the later ones are not run). Otherwise returns None\n"
"having run nothing: the caller's checks then find and name the problem.");

static PyObject *host_call(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *functions, *calls;
    Py_ssize_t nfloat;
    if (!PyArg_ParseTuple(args, "O!O!n:host_call", &PyTuple_Type, &functions, &PyTuple_Type, &calls, &nfloat))
        return NULL;
    if (PyTuple_GET_SIZE(functions) != 2) {
        PyErr_SetString(PyExc_ValueError, "host_call: functions must hold the float32 and float64 addresses");
        return NULL;
    }
    void *fn[2] = {PyLong_AsVoidPtr(PyTuple_GET_ITEM(functions, 0)),
                   PyLong_AsVoidPtr(PyTuple_GET_ITEM(functions, 1))};
    if (PyErr_Occurred())
        return NULL;
    if (!fn[0] || !fn[1]) {
        PyErr_SetString(PyExc_ValueError, "host_call: a null function address");
        return NULL;
    }
    const Py_ssize_t ncalls = PyTuple_GET_SIZE(calls);
    checked_call one[2];
    checked_call *checked = ncalls <= 2 ? one : malloc((size_t)ncalls * sizeof *checked);
    if (!checked)
        return PyErr_NoMemory();
    int ok = 1;
    for (Py_ssize_t k = 0; k < ncalls && ok == 1; k++)
        ok = check_call(PyTuple_GET_ITEM(calls, k), nfloat, &checked[k]);
    if (ok == 1)
        ok = calls_disjoint(checked, ncalls);
    PyObject *result = NULL;
    if (ok == 1) {
        int rc = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t k = 0; k < ncalls && !rc; k++) {
            const checked_call *c = &checked[k];
            rc = call_kernel(fn[c->type_num == NPY_FLOAT32 ? 0 : 1], c->ptr, c->nstate, c->n, &c->s);
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromLong(rc);
    } else if (ok == 0) {
        result = Py_NewRef(Py_None);
    } else if (!PyErr_Occurred()) {
        PyErr_NoMemory();
    }
    if (checked != one)
        free(checked);
    return result;
}

/* The generated list entry points are int f(T *const *param, const T *const *grad,
 * T *const *state_1, ..., T *const *state_k, const int64_t *n, int64_t count,
 * const scalars *s); called as call_kernel calls the flat ones. */
static int call_list_kernel(void *fn, void *const *rows, Py_ssize_t nstate, const int64_t *n, int64_t count,
                            const void *s)
{
    void *p = rows[0], *g = rows[1];
    typedef const int64_t *sizes;
    switch (nstate) {
    case 0: return ((int (*)(void *, void *, sizes, int64_t, const void *))fn)(p, g, n, count, s);
    case 1: return ((int (*)(void *, void *, void *, sizes, int64_t, const void *))fn)(p, g, rows[2], n, count, s);
    case 2:
        return ((int (*)(void *, void *, void *, void *, sizes, int64_t, const void *))fn)(p, g, rows[2], rows[3], n,
                                                                                          count, s);
    case 3:
        return ((int (*)(void *, void *, void *, void *, void *, sizes, int64_t, const void *))fn)(
            p, g, rows[2], rows[3], rows[4], n, count, s);
    case 4:
        return ((int (*)(void *, void *, void *, void *, void *, void *, sizes, int64_t, const void *))fn)(
            p, g, rows[2], rows[3], rows[4], rows[5], n, count, s);
    case 5:
        return ((int (*)(void *, void *, void *, void *, void *, void *, void *, sizes, int64_t, const void *))fn)(
            p, g, rows[2], rows[3], rows[4], rows[5], rows[6], n, count, s);
    default:
        return ((int (*)(void *, void *, void *, void *, void *, void *, void *, void *, sizes, int64_t,
                         const void *))fn)(p, g, rows[2], rows[3], rows[4], rows[5], rows[6], rows[7], n, count, s);
    }
}

/* Scalars into the struct layout; 0, or -1 with an exception set. */
static int pack_scalars(PyObject *scalars, Py_ssize_t nfloat, packed_scalars *s)
{
    const Py_ssize_t nscalar = PyTuple_GET_SIZE(scalars);
    if (nfloat < 0 || nfloat > nscalar || nscalar > HOST_CALL_MAX_SCALARS) {
        PyErr_SetString(PyExc_ValueError, "at most 32 scalars, nfloat of them floats");
        return -1;
    }
    for (Py_ssize_t k = 0; k < nfloat; k++) {
        s->d[k] = PyFloat_AsDouble(PyTuple_GET_ITEM(scalars, k));
        if (s->d[k] == -1.0 && PyErr_Occurred())
            return -1;
    }
    int *flags = (int *)(s->d + nfloat);
    for (Py_ssize_t k = nfloat; k < nscalar; k++) {
        const int truth = PyObject_IsTrue(PyTuple_GET_ITEM(scalars, k));
        if (truth < 0)
            return -1;
        flags[k - nfloat] = truth;
    }
    return 0;
}

PyDoc_STRVAR(table_call_doc,
"table_call(function, table, used, scalars, nfloat) -> int\n\n"
"One list call from a pointer table the caller built and proved (see\n"
"disjoint_table): function is the address of a generated list entry point,\n"
"fastopt_<kernel>_list_f32/_f64, of the table's dtype; table an int64\n"
"C-contiguous array of shape (R, N): row 0 the params' addresses, row 1 the\n"
"grads', row 2 + k state buffer k's (rows of unused buffers after the last used\n"
"one may be left out), the last row the element counts; used one bool per state\n"
"buffer of the kernel (an unused one's row is passed as NULL); scalars as for\n"
"host_call. Runs the kernel with the GIL released; returns its status.");

static PyObject *table_call(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *function, *used, *scalars;
    PyArrayObject *table;
    Py_ssize_t nfloat;
    if (!PyArg_ParseTuple(args, "OO!O!O!n:table_call", &function, &PyArray_Type, &table, &PyTuple_Type, &used,
                          &PyTuple_Type, &scalars, &nfloat))
        return NULL;
    const Py_ssize_t nstate = PyTuple_GET_SIZE(used);
    if (PyArray_TYPE(table) != NPY_INT64 || PyArray_NDIM(table) != 2 || !PyArray_IS_C_CONTIGUOUS(table)
        || PyArray_DIMS(table)[0] < 3 || nstate > HOST_CALL_MAX_STATE) {
        PyErr_SetString(PyExc_TypeError, "table_call: table must be a C-contiguous int64 array of shape "
                                         "(rows, N), rows >= 3, with at most 6 state buffers");
        return NULL;
    }
    const npy_intp last = PyArray_DIMS(table)[0] - 1; /* the sizes' row */
    void *fn = PyLong_AsVoidPtr(function);
    if (!fn) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "table_call: a null function address");
        return NULL;
    }
    packed_scalars s;
    if (pack_scalars(scalars, nfloat, &s))
        return NULL;
    const npy_intp count = PyArray_DIMS(table)[1];
    int64_t *t = PyArray_DATA(table);
    void *rows[2 + HOST_CALL_MAX_STATE];
    for (Py_ssize_t r = 0; r < 2 + nstate; r++) {
        int on = 1;
        if (r >= 2 && (on = PyObject_IsTrue(PyTuple_GET_ITEM(used, r - 2))) < 0)
            return NULL;
        if (on && r >= last) {
            PyErr_SetString(PyExc_ValueError, "table_call: the table has no row for a used state buffer");
            return NULL;
        }
        rows[r] = on ? (void *)(t + r * count) : NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = call_list_kernel(fn, rows, nstate, t + last * count, (int64_t)count, &s);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

/* ---- A replayed torch step: its tensors re-proved in one pass ---- */

static PyObject *s_grad, *s_layout, *s_dtype, *s_shape, *s_is_contiguous, *s_data_ptr; /* interned names */

/* 1 when o.is_contiguous() is True, 0 when not, -1 with an exception set. */
static int contiguous(PyObject *o)
{
    PyObject *r = PyObject_CallMethodNoArgs(o, s_is_contiguous);
    if (!r)
        return -1;
    const int yes = r == Py_True;
    Py_DECREF(r);
    return yes;
}

/* o.data_ptr() into *out: 1, or -1 with an exception set. */
static int data_ptr(PyObject *o, long long *out)
{
    PyObject *r = PyObject_CallMethodNoArgs(o, s_data_ptr);
    if (!r)
        return -1;
    *out = PyLong_AsLongLong(r);
    Py_DECREF(r);
    return *out == -1 && PyErr_Occurred() ? -1 : 1;
}

/* getattr(o, name) is expected: 1, 0, or -1 with an exception set. */
static int attr_is(PyObject *o, PyObject *name, PyObject *expected)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (!v)
        return -1;
    const int same = v == expected;
    Py_DECREF(v);
    return same;
}

PyDoc_STRVAR(replay_tensors_doc,
"replay_tensors(params, has_grad, tensor_type, layout, dtype, shapes, members, pointers,\n"
"               state, states, keyed) -> (grads, grad_pointers) | None\n\n"
"The per-tensor checks of a replayed fastopt.torch step (fastopt.torch.steps.Plan),\n"
"in one pass instead of a Python pass per check. params: the group's parameters;\n"
"has_grad: a bool per parameter, whether it had a gradient when planned; members:\n"
"the parameters the plan steps (those with a gradient), with pointers their data\n"
"addresses and shapes their shapes. Each gradient must be exactly of type\n"
"tensor_type, of the given layout and dtype (identical objects), of its member's\n"
"shape, and contiguous; each member of dtype, contiguous, at its address; state\n"
"(a dict: optimizer.state) must map each member to the dict states[k], and each\n"
"(key, tensors) of keyed must find tensors[k] under key in it (identical objects).\n"
"Returns the gradients and their data addresses, or None when anything differs\n"
"(the caller's general path then checks and names it). Tensors are read through\n"
"their Python attributes (grad, layout, dtype, shape, is_contiguous(), data_ptr()):\n"
"torch is not linked.");

static PyObject *replay_tensors(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *params, *has_grad, *tensor_type, *layout, *dtype, *shapes, *members, *pointers, *state, *states,
        *keyed;
    if (!PyArg_ParseTuple(args, "O!O!OOOO!O!O!O!O!O!:replay_tensors", &PyList_Type, &params, &PyList_Type, &has_grad,
                          &tensor_type, &layout, &dtype, &PyList_Type, &shapes, &PyList_Type, &members, &PyList_Type,
                          &pointers, &PyDict_Type, &state, &PyList_Type, &states, &PyList_Type, &keyed))
        return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(members);
    if (PyList_GET_SIZE(has_grad) != PyList_GET_SIZE(params) || PyList_GET_SIZE(shapes) != n
        || PyList_GET_SIZE(pointers) != n || PyList_GET_SIZE(states) != n) {
        PyErr_SetString(PyExc_ValueError, "replay_tensors: the lists disagree in length");
        return NULL;
    }
    PyObject *grads = PyList_New(n), *grad_pointers = PyList_New(n);
    if (!grads || !grad_pointers)
        goto fail;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); i++) {
        PyObject *g = PyObject_GetAttr(PyList_GET_ITEM(params, i), s_grad);
        if (!g)
            goto fail;
        const int want = PyList_GET_ITEM(has_grad, i) == Py_True;
        if ((g != Py_None) != want || (want && k >= n)) {
            Py_DECREF(g);
            goto differs;
        }
        if (g == Py_None) {
            Py_DECREF(g);
            continue;
        }
        PyList_SET_ITEM(grads, k++, g); /* (owns g now) */
    }
    if (k != n)
        goto differs;
    for (k = 0; k < n; k++) {
        PyObject *g = PyList_GET_ITEM(grads, k), *m = PyList_GET_ITEM(members, k);
        int ok = (PyObject *)Py_TYPE(g) == tensor_type;
        if (ok == 1)
            ok = attr_is(g, s_layout, layout);
        if (ok == 1)
            ok = attr_is(g, s_dtype, dtype);
        if (ok == 1) {
            PyObject *shape = PyObject_GetAttr(g, s_shape);
            ok = shape ? PyObject_RichCompareBool(shape, PyList_GET_ITEM(shapes, k), Py_EQ) : -1;
            Py_XDECREF(shape);
        }
        if (ok == 1)
            ok = contiguous(g);
        long long address = 0;
        if (ok == 1)
            ok = data_ptr(g, &address);
        if (ok == 1) {
            PyObject *value = PyLong_FromLongLong(address);
            if (!value)
                goto fail;
            PyList_SET_ITEM(grad_pointers, k, value);
        }
        if (ok == 1)
            ok = attr_is(m, s_dtype, dtype);
        if (ok == 1)
            ok = contiguous(m);
        if (ok == 1 && (ok = data_ptr(m, &address)) == 1) {
            const long long planned = PyLong_AsLongLong(PyList_GET_ITEM(pointers, k));
            if (planned == -1 && PyErr_Occurred())
                goto fail;
            ok = address == planned;
        }
        if (ok == 1) {
            PyObject *entry = PyDict_GetItemWithError(state, m); /* (borrowed) */
            ok = entry == PyList_GET_ITEM(states, k) ? 1 : (entry || !PyErr_Occurred() ? 0 : -1);
            for (Py_ssize_t j = 0; ok == 1 && j < PyList_GET_SIZE(keyed); j++) {
                PyObject *pair = PyList_GET_ITEM(keyed, j);
                if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyList_Check(PyTuple_GET_ITEM(pair, 1))
                    || PyList_GET_SIZE(PyTuple_GET_ITEM(pair, 1)) != n || !PyDict_Check(entry)) {
                    ok = 0;
                    break;
                }
                PyObject *t = PyDict_GetItemWithError(entry, PyTuple_GET_ITEM(pair, 0));
                ok = t == PyList_GET_ITEM(PyTuple_GET_ITEM(pair, 1), k) ? 1 : (t || !PyErr_Occurred() ? 0 : -1);
            }
        }
        if (ok < 0)
            goto fail;
        if (!ok)
            goto differs;
    }
    {
        PyObject *result = PyTuple_Pack(2, grads, grad_pointers);
        Py_DECREF(grads);
        Py_DECREF(grad_pointers);
        return result;
    }
differs:
    Py_XDECREF(grads);
    Py_XDECREF(grad_pointers);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(grads);
    Py_XDECREF(grad_pointers);
    return NULL;
}

static PyMethodDef methods[] = {
    {"host_tables", host_tables, METH_VARARGS, host_tables_doc},
    {"disjoint_table", disjoint_table, METH_VARARGS, disjoint_table_doc},
    {"host_call", host_call, METH_VARARGS, host_call_doc},
    {"table_call", table_call, METH_VARARGS, table_call_doc},
    {"replay_tensors", replay_tensors, METH_VARARGS, replay_tensors_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fastopt._tables",
    "The checked pointer tables of a list call (fastopt.buffers.check_lists' fast path) and the checked "
    "flat calls of host_call (fastopt.backends.c.run_checked).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tables(void)
{
    import_array();
    if (!(s_grad = PyUnicode_InternFromString("grad")) || !(s_layout = PyUnicode_InternFromString("layout"))
        || !(s_dtype = PyUnicode_InternFromString("dtype")) || !(s_shape = PyUnicode_InternFromString("shape"))
        || !(s_is_contiguous = PyUnicode_InternFromString("is_contiguous"))
        || !(s_data_ptr = PyUnicode_InternFromString("data_ptr")))
        return NULL;
    return PyModule_Create(&module);
}
