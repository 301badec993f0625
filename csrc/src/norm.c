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
 * sum (for LAMB's and LARS's trust ratios) is its blocks' sums added in order. */
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

static int fo_sumsq(const void *const *x, const int64_t *n, int64_t count, int64_t esize, double *out,
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
                const double b = esize == 4 ? fo_block_f32((const float *)x[t] + lo, len)
                                            : fo_block_f64((const double *)x[t] + lo, len);
                total += b;
                mine += b;
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
        sums[b] = esize == 4 ? fo_block_f32((const float *)x[t] + lo, len)
                             : fo_block_f64((const double *)x[t] + lo, len);
    }
    for (int64_t b = 0; b < blocks; b++)
        total += sums[b];
    if (each)
        for (int64_t t = 0; t < count; t++) {
            double mine = 0.0;
            for (int64_t b = first[t]; b < first[t + 1]; b++)
                mine += sums[b];
            each[t] = mine;
        }
    free(sums);
    free(first);
    *out = total;
    return FASTOPT_OK;
}

int fastopt_sumsq_list_f32(const float *const *x, const int64_t *n, int64_t count, double *out, double *each)
{
    return fo_sumsq((const void *const *)x, n, count, 4, out, each);
}

int fastopt_sumsq_list_f64(const double *const *x, const int64_t *n, int64_t count, double *out, double *each)
{
    return fo_sumsq((const void *const *)x, n, count, 8, out, each);
}
