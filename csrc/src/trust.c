/* The two-pass updates (LAMB, LARS): a trust ratio per tensor.
 *
 * Pass 1 (fo_trust_sums) reads every tensor once and reduces, per tensor, the
 * sums of squares of param and of the update u the rule would apply, in double,
 * in the order of norm.c: each tensor cut into blocks of FO_TRUST_BLOCK (4096)
 * elements; per block the kernel's generated <kernel>_sums_ (one per CPU path:
 * the element function with its measure flag on into a scratch block, then both
 * blocks in 8 interleaved lanes and a fixed tree); the blocks' sums of a tensor
 * added in order. Threads only decide who computes which block, so the sums are
 * bitwise the same for any thread count and CPU path, and param's are
 * fastopt_sumsq_list's per-tensor sums. Pass 2 (fo_trust_run) is the rule's list
 * update with per-tensor scalars: each a copy of the call's with the trust field
 * set by the rule's ratio (generated from the rule table), the threads spread
 * over all the elements as in every list call.
 *
 * Everything is checked before anything is written; pass 1 only reads. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Blocks per thread at least: a parallel region costs ~1-2 us, a block of pass 1
 * (four buffers read, the update computed, two sums) ~2 us. */
#define FO_TRUST_MIN_BLOCKS 4

/* Entry i of a table of float * or double * (NULL table: NULL). */
static const char *fo_entry(const void *table, int64_t i, int dtype)
{
    if (!table)
        return NULL;
    return dtype == FO_F32 ? (const char *)((const float *const *)table)[i]
                           : (const char *)((const double *const *)table)[i];
}

/* The tensor of global block b (first[t] <= b < first[t + 1]). */
static int64_t fo_block_tensor(const int64_t *first, int64_t count, int64_t b)
{
    int64_t lo = 0, hi = count;
    while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (first[mid] <= b)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Block [lo, lo + len) of tensor t through the kernel's pass-1 function. */
static void fo_trust_block(fo_sums sums, int dtype, const void *param, const void *grad,
                           const void *const *state, int64_t t, int64_t lo, int64_t len, const void *scalars,
                           double *ps, double *us)
{
    const int64_t off = lo * (dtype == FO_F32 ? 4 : 8);
    const void *st[FO_MAX_STATE];
    for (int k = 0; k < FO_MAX_STATE; k++) {
        const char *base = fo_entry(state[k], t, dtype);
        st[k] = base ? base + off : NULL;
    }
    sums(fo_entry(param, t, dtype) + off, fo_entry(grad, t, dtype) + off, st, len, scalars, ps, us);
}

int fo_trust_sums(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                  unsigned need, const int64_t *n, int64_t count, const void *scalars, double *param_sumsq,
                  double *update_sumsq)
{
    int64_t total;
    int rc = fo_list_check(dtype, param, grad, state, need, n, count, scalars, &total);
    if (rc != FASTOPT_OK)
        return rc;
    if (count == 0)
        return FASTOPT_OK;
    if (!param_sumsq || !update_sumsq)
        return FASTOPT_ERR_NULL;
    const fo_sums sums = fo_kernels_selected()->sums[kernel][dtype];
    if (!sums)
        return FASTOPT_ERR_NULL; /* (not a two-pass kernel: the generated entry points never ask) */
    int64_t blocks = 0;
    for (int64_t t = 0; t < count; t++)
        blocks += (n[t] + FO_TRUST_BLOCK - 1) / FO_TRUST_BLOCK;
    int64_t threads = fastopt_get_num_threads();
    if (threads > blocks / FO_TRUST_MIN_BLOCKS)
        threads = blocks / FO_TRUST_MIN_BLOCKS;
    if (threads <= 1) { /* the same order, serially */
        for (int64_t t = 0; t < count; t++) {
            double pt = 0.0, ut = 0.0;
            for (int64_t lo = 0; lo < n[t]; lo += FO_TRUST_BLOCK) {
                double pb, ub;
                fo_trust_block(sums, dtype, param, grad, state, t, lo,
                               n[t] - lo < FO_TRUST_BLOCK ? n[t] - lo : FO_TRUST_BLOCK, scalars, &pb, &ub);
                pt += pb;
                ut += ub;
            }
            param_sumsq[t] = pt;
            update_sumsq[t] = ut;
        }
        return FASTOPT_OK;
    }
    int64_t *first = malloc((size_t)(count + 1) * sizeof *first);
    double *ps = malloc((size_t)blocks * 2 * sizeof *ps);
    if (!first || !ps) {
        free(first);
        free(ps);
        return FASTOPT_ERR_MEMORY;
    }
    double *us = ps + blocks;
    first[0] = 0;
    for (int64_t t = 0; t < count; t++)
        first[t + 1] = first[t] + (n[t] + FO_TRUST_BLOCK - 1) / FO_TRUST_BLOCK;
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)threads) schedule(static)
#endif
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t t = fo_block_tensor(first, count, b);
        const int64_t lo = (b - first[t]) * FO_TRUST_BLOCK;
        fo_trust_block(sums, dtype, param, grad, state, t, lo,
                       n[t] - lo < FO_TRUST_BLOCK ? n[t] - lo : FO_TRUST_BLOCK, scalars, &ps[b], &us[b]);
    }
    for (int64_t t = 0; t < count; t++) {
        double pt = 0.0, ut = 0.0;
        for (int64_t b = first[t]; b < first[t + 1]; b++) {
            pt += ps[b];
            ut += us[b];
        }
        param_sumsq[t] = pt;
        update_sumsq[t] = ut;
    }
    free(ps);
    free(first);
    return FASTOPT_OK;
}

int fo_trust_run(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                 unsigned need, const int64_t *n, int64_t count, const void *scalars, int64_t size, int trusted,
                 fo_ratio ratio)
{
    if (!trusted) /* no ratio this step: the one pass of the update (also every argument error) */
        return fo_run_list_each(kernel, dtype, param, grad, state, need, n, count, scalars, 0);
    int64_t total;
    int rc = fo_list_check(dtype, param, grad, state, need, n, count, scalars, &total);
    if (rc != FASTOPT_OK || count == 0)
        return rc;
    double *sums = malloc((size_t)count * 2 * sizeof *sums);
    char *each = malloc((size_t)count * (size_t)size);
    if (!sums || !each) {
        free(sums);
        free(each);
        return FASTOPT_ERR_MEMORY;
    }
    rc = fo_trust_sums(kernel, dtype, param, grad, state, need, n, count, scalars, sums, sums + count);
    if (rc == FASTOPT_OK) {
        for (int64_t t = 0; t < count; t++) {
            char *mine = each + t * size;
            memcpy(mine, scalars, (size_t)size);
            ratio(mine, scalars, sums[t], sums[count + t]);
        }
        rc = fo_run_list_each(kernel, dtype, param, grad, state, need, n, count, each, size);
    }
    free(each);
    free(sums);
    return rc;
}
