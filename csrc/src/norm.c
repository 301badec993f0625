/* The sum of squares of many tensors: the reduction behind a gradient norm.
 *
 * Reproducible by construction: the summation order depends only on the data's
 * layout, never on the thread count or the CPU path. Each tensor is cut into
 * blocks of FO_NORM_BLOCK elements (the last may be shorter); a block is summed
 * in double in FO_NORM_LANES interleaved lanes (element i goes to lane i mod 8,
 * each lane in index order), the lanes combined by a fixed tree; the blocks'
 * sums are added in order, tensor by tensor. Threads only decide who computes
 * which block. Squares are exact in double and no multiply-add is contracted
 * (-ffp-contract=off), so the NumPy reference (fastopt.backends.reference)
 * reproduces every bit. A NaN anywhere gives NaN, an Inf (and no NaN) +Inf:
 * the same call tells a loss scaler that a gradient overflowed. Each tensor's own
 * sum (for LAMB's and LARS's trust ratios) is its blocks' sums added in order.
 *
 * The largest magnitude (the inf norm) takes the same blocks and the same
 * thread split: a block's max |x| (any order: a maximum is exact), the blocks'
 * maxima combined in order. NaN is sticky (a NaN anywhere gives NaN) and every
 * NaN returned is the canonical quiet NaN of NAN (0x7ff8000000000000), whatever
 * the input's payload or sign, so the bits equal the other backends'. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "fastopt.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define FO_NORM_BLOCK 4096
#define FO_NORM_LANES 8
/* Blocks per thread at least: a parallel region costs ~1-2 us, a block ~0.5 us. */
#define FO_NORM_MIN_BLOCKS 16

#define FO_BLOCK_SUM(name, T)                                                             \
    static double name(const T *x, int64_t n)                                             \
    {                                                                                     \
        double acc[FO_NORM_LANES] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};             \
        int64_t i = 0;                                                                    \
        for (; i + FO_NORM_LANES <= n; i += FO_NORM_LANES)                                \
            for (int l = 0; l < FO_NORM_LANES; l++) {                                     \
                const double v = (double)x[i + l];                                        \
                acc[l] += v * v;                                                          \
            }                                                                             \
        for (int l = 0; i + l < n; l++) {                                                 \
            const double v = (double)x[i + l];                                            \
            acc[l] += v * v;                                                              \
        }                                                                                 \
        return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])); \
    }

FO_BLOCK_SUM(fo_block_f32, float)
FO_BLOCK_SUM(fo_block_f64, double)

/* max(m, a) with NaN sticky: a NaN a replaces m, and a NaN m stays (a > NaN is false). */
#define FO_MAX_NAN(m, a) (((a) > (m) || (a) != (a)) ? (a) : (m))

/* A block's max |x|. GCC does not vectorize a float max that keeps NaN, and
 * the scalar loop runs at ~0.4 ns an element (3x sumsq's), so on x86-64 the
 * bulk of a block goes through SSE2 (every x86-64 CPU has it): four running
 * maxima (maxps(a, m) = a > m ? a : m, which skips a NaN a), and, to find
 * NaNs, two running sums of the same |x|: terms >= 0 never make Inf - Inf, so
 * a sum is NaN exactly when a NaN was added (an overflow only makes +Inf). The
 * tail, and other CPUs, take the scalar loop. Any split gives the same result:
 * a maximum is exact, and every NaN becomes the canonical NAN. */
#if defined(__SSE2__) || defined(_M_X64)
#include <emmintrin.h>
#define FO_MAX_SSE2 1
#endif

static double fo_block_max_f32(const float *x, int64_t n)
{
    float m = 0.0f;
    int64_t i = 0;
#ifdef FO_MAX_SSE2
    if (n >= 16) {
        const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7fffffff));
        __m128 m0 = _mm_setzero_ps(), m1 = m0, m2 = m0, m3 = m0, s0 = m0, s1 = m0;
        for (; i + 16 <= n; i += 16) {
            const __m128 a0 = _mm_and_ps(_mm_loadu_ps(x + i), abs_mask);
            const __m128 a1 = _mm_and_ps(_mm_loadu_ps(x + i + 4), abs_mask);
            const __m128 a2 = _mm_and_ps(_mm_loadu_ps(x + i + 8), abs_mask);
            const __m128 a3 = _mm_and_ps(_mm_loadu_ps(x + i + 12), abs_mask);
            m0 = _mm_max_ps(a0, m0);
            m1 = _mm_max_ps(a1, m1);
            m2 = _mm_max_ps(a2, m2);
            m3 = _mm_max_ps(a3, m3);
            s0 = _mm_add_ps(s0, _mm_add_ps(a0, a1));
            s1 = _mm_add_ps(s1, _mm_add_ps(a2, a3));
        }
        float lane[4], sum[4];
        _mm_storeu_ps(lane, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
        _mm_storeu_ps(sum, _mm_add_ps(s0, s1));
        for (int l = 0; l < 4; l++) {
            m = FO_MAX_NAN(m, lane[l]);
            if (sum[l] != sum[l])
                m = sum[l];
        }
    }
#endif
    for (; i < n; i++) {
        const float a = fabsf(x[i]);
        m = FO_MAX_NAN(m, a);
    }
    return m != m ? (double)NAN : (double)m;
}

static double fo_block_max_f64(const double *x, int64_t n)
{
    double m = 0.0;
    int64_t i = 0;
#ifdef FO_MAX_SSE2
    if (n >= 8) {
        const __m128d abs_mask = _mm_castsi128_pd(_mm_set1_epi64x(0x7fffffffffffffffLL));
        __m128d m0 = _mm_setzero_pd(), m1 = m0, m2 = m0, m3 = m0, s0 = m0, s1 = m0;
        for (; i + 8 <= n; i += 8) {
            const __m128d a0 = _mm_and_pd(_mm_loadu_pd(x + i), abs_mask);
            const __m128d a1 = _mm_and_pd(_mm_loadu_pd(x + i + 2), abs_mask);
            const __m128d a2 = _mm_and_pd(_mm_loadu_pd(x + i + 4), abs_mask);
            const __m128d a3 = _mm_and_pd(_mm_loadu_pd(x + i + 6), abs_mask);
            m0 = _mm_max_pd(a0, m0);
            m1 = _mm_max_pd(a1, m1);
            m2 = _mm_max_pd(a2, m2);
            m3 = _mm_max_pd(a3, m3);
            s0 = _mm_add_pd(s0, _mm_add_pd(a0, a1));
            s1 = _mm_add_pd(s1, _mm_add_pd(a2, a3));
        }
        double lane[2], sum[2];
        _mm_storeu_pd(lane, _mm_max_pd(_mm_max_pd(m0, m1), _mm_max_pd(m2, m3)));
        _mm_storeu_pd(sum, _mm_add_pd(s0, s1));
        for (int l = 0; l < 2; l++) {
            m = FO_MAX_NAN(m, lane[l]);
            if (sum[l] != sum[l])
                m = sum[l];
        }
    }
#endif
    for (; i < n; i++) {
        const double a = fabs(x[i]);
        m = FO_MAX_NAN(m, a);
    }
    return m != m ? (double)NAN : m;
}

enum { FO_SUMSQ, FO_MAXABS };

/* Block [lo, lo + len) of tensor x: its sum of squares or its max |x|. */
static double fo_block(int op, int64_t esize, const void *x, int64_t lo, int64_t len)
{
    if (op == FO_SUMSQ)
        return esize == 4 ? fo_block_f32((const float *)x + lo, len) : fo_block_f64((const double *)x + lo, len);
    return esize == 4 ? fo_block_max_f32((const float *)x + lo, len) : fo_block_max_f64((const double *)x + lo, len);
}

/* The running result with the next block's: added (in order), or the sticky-NaN maximum. */
static double fo_combine(int op, double acc, double b)
{
    return op == FO_SUMSQ ? acc + b : FO_MAX_NAN(acc, b);
}

/* The global block b of the call: its tensor (first[t] <= b < first[t + 1]) and offset. */
static int64_t fo_tensor_of(const int64_t *first, int64_t count, int64_t b)
{
    int64_t lo = 0, hi = count; /* first[lo] <= b < first[hi] */
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (first[mid] <= b)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* fastopt_sumsq_list_* (op FO_SUMSQ) and fastopt_maxabs_list_* (FO_MAXABS): the
 * checks, the blocks, the thread split and the in-order combination they share. */
static int fo_reduce(int op, const void *const *x, const int64_t *n, int64_t count, int64_t esize, double *out,
                     double *each)
{
    if (!out || (count > 0 && (!x || !n)))
        return FASTOPT_ERR_NULL;
    if (count < 0)
        return FASTOPT_ERR_LENGTH;
    int64_t blocks = 0;
    for (int64_t t = 0; t < count; t++) {
        if (n[t] < 0)
            return FASTOPT_ERR_LENGTH;
        if (n[t] > 0 && !x[t])
            return FASTOPT_ERR_NULL;
        blocks += (n[t] + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK;
    }
    int64_t threads = fastopt_get_num_threads();
    if (threads > blocks / FO_NORM_MIN_BLOCKS)
        threads = blocks / FO_NORM_MIN_BLOCKS;
    int64_t *first = threads > 1 ? malloc((size_t)(count + 1) * sizeof *first) : NULL;
    double *sums = first ? malloc((size_t)blocks * sizeof *sums) : NULL;
    double total = 0.0;
    if (!sums) { /* one thread (or no memory for the partial sums): the same order, serially */
        free(first);
        for (int64_t t = 0; t < count; t++) {
            double mine = 0.0;
            for (int64_t lo = 0; lo < n[t]; lo += FO_NORM_BLOCK) {
                const int64_t len = n[t] - lo < FO_NORM_BLOCK ? n[t] - lo : FO_NORM_BLOCK;
                const double b = fo_block(op, esize, x[t], lo, len);
                total = fo_combine(op, total, b);
                mine = fo_combine(op, mine, b);
            }
            if (each)
                each[t] = mine;
        }
        *out = total;
        return FASTOPT_OK;
    }
    first[0] = 0;
    for (int64_t t = 0; t < count; t++)
        first[t + 1] = first[t] + (n[t] + FO_NORM_BLOCK - 1) / FO_NORM_BLOCK;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t = fo_tensor_of(first, count, b);
        const int64_t lo = (b - first[t]) * FO_NORM_BLOCK;
        const int64_t len = n[t] - lo < FO_NORM_BLOCK ? n[t] - lo : FO_NORM_BLOCK;
        sums[b] = fo_block(op, esize, x[t], lo, len);
    }
    for (int64_t b = 0; b < blocks; b++)
        total = fo_combine(op, total, sums[b]);
    if (each)
        for (int64_t t = 0; t < count; t++) {
            double mine = 0.0;
            for (int64_t b = first[t]; b < first[t + 1]; b++)
                mine = fo_combine(op, mine, sums[b]);
            each[t] = mine;
        }
    free(sums);
    free(first);
    *out = total;
    return FASTOPT_OK;
}

int fastopt_sumsq_list_f32(const float *const *x, const int64_t *n, int64_t count, double *out, double *each)
{
    return fo_reduce(FO_SUMSQ, (const void *const *)x, n, count, 4, out, each);
}

int fastopt_sumsq_list_f64(const double *const *x, const int64_t *n, int64_t count, double *out, double *each)
{
    return fo_reduce(FO_SUMSQ, (const void *const *)x, n, count, 8, out, each);
}

int fastopt_maxabs_list_f32(const float *const *x, const int64_t *n, int64_t count, double *out, double *each)
{
    return fo_reduce(FO_MAXABS, (const void *const *)x, n, count, 4, out, each);
}

int fastopt_maxabs_list_f64(const double *const *x, const int64_t *n, int64_t count, double *out, double *each)
{
    return fo_reduce(FO_MAXABS, (const void *const *)x, n, count, 8, out, each);
}
