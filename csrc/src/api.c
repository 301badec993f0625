/* The public entry points: argument checks, the thread split, and the
 * per-step scalars (prepare), mirroring fastopt/rules.py. */
#include <math.h>
#include <stddef.h>

#include "internal.h"

#ifdef _OPENMP
#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define FO_FORK_GUARD 1
#endif
#endif

const char *fastopt_version(void) { return "0.1.0"; }

const char *fastopt_strerror(int code)
{
    switch (code) {
    case FASTOPT_OK: return "ok";
    case FASTOPT_ERR_NULL: return "a required pointer is NULL";
    case FASTOPT_ERR_LENGTH: return "n < 0";
    case FASTOPT_ERR_HYPER: return "a hyperparameter or the step is out of range";
    case FASTOPT_ERR_THREADS: return "the thread count is < 0";
    case FASTOPT_ERR_MEMORY: return "out of memory (a two-pass update's per-tensor tables)";
    case FASTOPT_ERR_FORMAT: return "a format is unknown or not allowed for its role (fastopt_formats)";
    default: return "unknown fastopt error code";
    }
}

/* ---- threads ------------------------------------------------------------ */

static int fo_num_threads; /* 0: the OpenMP default */

int fastopt_set_num_threads(int n)
{
    if (n < 0)
        return FASTOPT_ERR_THREADS;
    fo_num_threads = n;
    return FASTOPT_OK;
}

#ifdef FO_FORK_GUARD
/* GNU OpenMP's thread pool does not survive fork(): a child that opens a
 * parallel region after its parent used one deadlocks (Python's
 * multiprocessing with the fork start method does exactly this). So a child
 * forked after the library was loaded runs every update on its calling thread. */
static volatile int fo_forked_child;
static void fo_mark_forked_child(void) { fo_forked_child = 1; }
__attribute__((constructor)) static void fo_register_fork_guard(void)
{
    pthread_atfork(NULL, NULL, fo_mark_forked_child);
}
#endif

int fastopt_get_num_threads(void)
{
#ifdef FO_FORK_GUARD
    if (fo_forked_child)
        return 1;
#endif
#ifdef _OPENMP
    return fo_num_threads > 0 ? fo_num_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

/* ---- flush denormals ---------------------------------------------------- */

static int fo_flush_denormal; /* 0: store every value as computed (the default) */

int fastopt_set_flush_denormal(int on)
{
    fo_flush_denormal = on != 0;
    return FASTOPT_OK;
}

int fastopt_get_flush_denormal(void) { return fo_flush_denormal; }

/* Below this many bytes of param per thread, waking another thread costs more
 * than it saves. Measured, AdamW f32 on 2 cores, 1 vs 2 threads: 2^14
 * elements 2.6 vs 3.3 us, 2^15 5.1 vs 4.4 us, 2^16 10.2 vs 7.1 us (opening a
 * parallel region costs ~1.3 us); so 2 threads from 2^15 elements up. */
#ifndef FO_MIN_BYTES_PER_THREAD /* a -D on the compiler command line can tune it */
#define FO_MIN_BYTES_PER_THREAD (64 * 1024)
#endif
/* Work starts at a 64-byte boundary of param: a few leading elements run on
 * their own first, then every chunk starts on a cache line. When the buffers
 * share their misalignment (NumPy's do, mostly: 16 bytes past a page), no
 * vector load or store straddles two lines: 20% faster on cache-resident
 * AdamW with AVX-512 (csrc/bench, offset 4). */
#define FO_ALIGN_BYTES 64

static void *fo_off(void *p, int64_t bytes) { return p ? (char *)p + bytes : NULL; }

/* The loop over elements [lo, lo + len) of one tensor. */
static void fo_loop_range(fo_loop loop, void *p, const void *g, void *const *state, int64_t lo, int64_t len,
                          int64_t esize, const void *scalars, int flush)
{
    const int64_t b = lo * esize;
    void *st[FO_MAX_STATE];
    for (int k = 0; k < FO_MAX_STATE; k++)
        st[k] = fo_off(state[k], b);
    loop(fo_off(p, b), (const char *)g + b, st, len, scalars, flush);
}

/* Elements before param's first 64-byte boundary (0 when param is not even
 * aligned to its element size), at most n. */
static int64_t fo_head(const void *p, int64_t n, int64_t esize)
{
    const uintptr_t mis = (uintptr_t)p % FO_ALIGN_BYTES;
    const int64_t head = mis % esize ? 0 : (int64_t)((FO_ALIGN_BYTES - mis) % FO_ALIGN_BYTES) / esize;
    return head < n ? head : n;
}

/* Threads for `elements` elements of `esize` bytes: FO_MIN_BYTES_PER_THREAD each at least. */
int64_t fo_threads_for(int64_t elements, int64_t esize)
{
    int64_t threads = fastopt_get_num_threads();
    const int64_t useful = elements / (FO_MIN_BYTES_PER_THREAD / esize);
    return threads < useful ? threads : useful;
}

/* Run kernel `kernel` over n elements of `esize` bytes: the unaligned head,
 * then one contiguous static chunk per thread. Each element's result depends
 * only on that element, and every code path rounds identically, so the split
 * never changes a bit of the output. Bit k of `need`: state[k] is required.
 * The flush setting is read once, here, for the whole call. */
static int fo_run(int kernel, int dtype, void *p, const void *g, void *const *state, unsigned need, int64_t n,
                  const void *scalars)
{
    if (!scalars)
        return FASTOPT_ERR_NULL;
    if (n < 0)
        return FASTOPT_ERR_LENGTH;
    if (n == 0)
        return FASTOPT_OK;
    if (!p || !g)
        return FASTOPT_ERR_NULL;
    for (int k = 0; k < FO_MAX_STATE; k++)
        if ((need >> k & 1u) && !state[k])
            return FASTOPT_ERR_NULL;
    const fo_loop loop = fo_kernels_selected()->loop[kernel][dtype];
    const int flush = fo_flush_denormal;
    const int64_t esize = dtype == FO_F32 ? 4 : 8, align = FO_ALIGN_BYTES / esize;
    const int64_t head = fo_head(p, n, esize);
    if (head)
        fo_loop_range(loop, p, g, state, 0, head, esize, scalars, flush);
    const int64_t rest = n - head;
    const int64_t threads = fo_threads_for(rest, esize);
    if (threads <= 1) {
        if (rest)
            fo_loop_range(loop, p, g, state, head, rest, esize, scalars, flush);
        return FASTOPT_OK;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t nt = omp_get_num_threads();
        const int64_t chunk = ((rest + nt - 1) / nt + align - 1) / align * align;
        const int64_t lo = omp_get_thread_num() * chunk;
        if (lo < rest)
            fo_loop_range(loop, p, g, state, head + lo, rest - lo < chunk ? rest - lo : chunk, esize, scalars,
                          flush);
    }
#endif
    return FASTOPT_OK;
}

/* ---- lists of tensors ----------------------------------------------------
 * fastopt_<rule>_list_*: tables of per-tensor pointers. The total element
 * count is split into one contiguous range per thread (the same thread count
 * rule as fo_run, on the total); each thread walks the tensors its range
 * covers. Inside a tensor of at least FO_LIST_ALIGN_MIN_BYTES, a range
 * boundary is moved up to the next 64-byte boundary of that tensor's param
 * (its head, then whole lines), so it runs as fo_run would run it: head
 * first, then aligned chunks. A smaller tensor runs unaligned from its first
 * element: the head, up to 15 elements through the loop's scalar remainder,
 * measured 5-8% of a list call over 1000 tensors of 1024 floats, while the
 * aligned stores gain nothing on so few lines. (Either way every element
 * gets the same bits: the loops are elementwise.) */

#define FO_LIST_ALIGN_MIN_BYTES (64 * 1024)

/* Entry i of a table of float * or double * (read with its own type). */
static void *fo_at(const void *table, int64_t i, int dtype)
{
    if (!table)
        return NULL;
    return dtype == FO_F32 ? (void *)((float *const *)table)[i] : (void *)((double *const *)table)[i];
}

/* Where a range boundary at local element x of a tensor of n elements (head
 * `head`) falls: 0, n, the head, or an aligned element past it. */
static int64_t fo_cut(int64_t x, int64_t n, int64_t head, int64_t align)
{
    if (x <= 0)
        return 0;
    if (x >= n)
        return n;
    if (x <= head)
        return head;
    x = head + (x - head + align - 1) / align * align;
    return x < n ? x : n;
}

typedef struct {
    fo_loop loop;
    int dtype;
    int64_t esize, align, count;
    const void *param, *grad;
    const void *const *state; /* FO_MAX_STATE tables (NULL: unused) */
    const int64_t *n;
    const void *scalars; /* tensor i's: (const char *)scalars + i * stride */
    int64_t stride;      /* 0: one struct for every tensor */
    int flush; /* fastopt_get_flush_denormal(), read once per call */
} fo_list;

/* The elements [lo, hi) of the concatenation of the tensors. */
static void fo_list_range(const fo_list *L, int64_t lo, int64_t hi)
{
    int64_t offset = 0;
    for (int64_t i = 0; i < L->count && offset < hi; offset += L->n[i], i++) {
        const int64_t n = L->n[i];
        if (n == 0 || offset + n <= lo)
            continue;
        void *p = fo_at(L->param, i, L->dtype);
        const void *g = fo_at(L->grad, i, L->dtype);
        void *st[FO_MAX_STATE];
        for (int k = 0; k < FO_MAX_STATE; k++)
            st[k] = fo_at(L->state[k], i, L->dtype);
        const int64_t head = n * L->esize >= FO_LIST_ALIGN_MIN_BYTES ? fo_head(p, n, L->esize) : 0;
        const int64_t a = fo_cut(lo - offset, n, head, L->align), b = fo_cut(hi - offset, n, head, L->align);
        const void *scalars = (const char *)L->scalars + i * L->stride;
        if (a < head && a < b) /* the head on its own, as fo_run runs it */
            fo_loop_range(L->loop, p, g, st, a, (b < head ? b : head) - a, L->esize, scalars, L->flush);
        const int64_t from = a > head ? a : head;
        if (from < b)
            fo_loop_range(L->loop, p, g, st, from, b - from, L->esize, scalars, L->flush);
    }
}

/* fo_list_range as a fo_range. */
static void fo_list_range_of(const void *ctx, int64_t lo, int64_t hi) { fo_list_range((const fo_list *)ctx, lo, hi); }

int fo_list_check(int dtype, const void *param, const void *grad, const void *const *state, unsigned need,
                  const int64_t *n, int64_t count, const void *scalars, int64_t *total)
{
    *total = 0;
    if (!scalars)
        return FASTOPT_ERR_NULL;
    if (count < 0)
        return FASTOPT_ERR_LENGTH;
    if (count == 0)
        return FASTOPT_OK;
    if (!n || !param || !grad)
        return FASTOPT_ERR_NULL;
    for (int k = 0; k < FO_MAX_STATE; k++)
        if ((need >> k & 1u) && !state[k])
            return FASTOPT_ERR_NULL;
    const int64_t esize = dtype == FO_F32 ? 4 : 8;
    int64_t sum = 0;
    for (int64_t i = 0; i < count; i++) {
        if (n[i] < 0 || n[i] > INT64_MAX / esize - sum)
            return FASTOPT_ERR_LENGTH;
        if (n[i] == 0)
            continue;
        if (!fo_at(param, i, dtype) || !fo_at(grad, i, dtype))
            return FASTOPT_ERR_NULL;
        for (int k = 0; k < FO_MAX_STATE; k++)
            if ((need >> k & 1u) && !fo_at(state[k], i, dtype))
                return FASTOPT_ERR_NULL;
        sum += n[i];
    }
    *total = sum;
    return FASTOPT_OK;
}

static int fo_run_list(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                       unsigned need, const int64_t *n, int64_t count, const void *scalars)
{
    return fo_run_list_each(kernel, dtype, param, grad, state, need, n, count, scalars, 0);
}

int fo_run_list_each(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                     unsigned need, const int64_t *n, int64_t count, const void *scalars, int64_t stride)
{
    int64_t total;
    const int rc = fo_list_check(dtype, param, grad, state, need, n, count, scalars, &total);
    if (rc != FASTOPT_OK || count == 0)
        return rc;
    const int64_t esize = dtype == FO_F32 ? 4 : 8;
    const fo_list L = {fo_kernels_selected()->loop[kernel][dtype], dtype, esize, FO_ALIGN_BYTES / esize, count,
                       param, grad, state, n, scalars, stride, fo_flush_denormal};
    fo_split(total, esize, fo_list_range_of, &L);
    return FASTOPT_OK;
}

void fo_split(int64_t total, int64_t esize, fo_range range, const void *ctx)
{
    const int64_t threads = fo_threads_for(total, esize);
    if (threads <= 1) {
        range(ctx, 0, total);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t nt = omp_get_num_threads();
        const int64_t chunk = (total + nt - 1) / nt;
        const int64_t lo = omp_get_thread_num() * chunk;
        if (lo < total)
            range(ctx, lo, total - lo < chunk ? total : lo + chunk);
    }
#endif
}

/* ---- prepare: hyperparameters and step -> scalars ------------------------
 * The checks and formulas of fastopt/rules.py, translated (Python's float **,
 * math.sqrt, math.log and math.exp are C's pow, sqrt, log and exp, the libm
 * functions Python calls; int step arithmetic stays int64_t until Python would
 * convert it), so the scalars are bitwise the same. */

static int fo_nonneg(double x) { return isfinite(x) && x >= 0.0; }
static int fo_unit(double x) { return isfinite(x) && x >= 0.0 && x < 1.0; }        /* [0, 1) */
static int fo_unit_closed(double x) { return isfinite(x) && x >= 0.0 && x <= 1.0; } /* [0, 1] */
/* A number of warmup steps, whole and exact as a double; 0: no warmup (Python's None). */
static int fo_warmup(double x) { return isfinite(x) && x >= 0.0 && x <= 0x1p53 && x == floor(x); }

/* int64_t + and - of the step arithmetic: exact, as Python's int, except
 * that they saturate where int64_t would overflow (steps near INT64_MAX). */
static inline int64_t fo_add_i64(int64_t a, int64_t b)
{
    if (b > 0 && a > INT64_MAX - b)
        return INT64_MAX;
    if (b < 0 && a < INT64_MIN - b)
        return INT64_MIN;
    return a + b;
}
static inline int64_t fo_sub_i64(int64_t a, int64_t b)
{
    if (b < 0 && a > INT64_MAX + b)
        return INT64_MAX;
    if (b > 0 && a < INT64_MIN + b)
        return INT64_MIN;
    return a - b;
}

#define FO_REQUIRE(cond) \
    do {                 \
        if (!(cond))     \
            return FASTOPT_ERR_HYPER; \
    } while (0)

/* Every rule's prepare function and entry points, generated from the rule table. */
#include "rules_api.inc"
