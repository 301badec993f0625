/* Private to the library: the kernel table and the per-ISA units. */
#ifndef FASTOPT_INTERNAL_H
#define FASTOPT_INTERNAL_H

#include <stdint.h>

#include "fastopt.h"

/* The kernel enum (FO_SGD, ..., FO_NKERNELS), FO_KERNEL_LIST(X) and
 * FO_MAX_STATE, generated from the rule table. */
#include "rules_internal.h"

/* Dtypes (columns of fo_kernels.loop). */
enum { FO_F32, FO_F64, FO_NDTYPES };

/* Every kernel, whatever its rule, has this shape internally: FO_MAX_STATE
 * state buffer pointers (unused ones are NULL, never touched), n elements,
 * the rule's public scalars struct. One shape lets one driver (api.c) chunk
 * every rule over the threads. The loops run on the calling thread. flush:
 * nonzero to store values below the smallest normal as signed zeros
 * (fastopt_set_flush_denormal, read once per update call). */
typedef void (*fo_loop)(void *param, const void *grad, void *const *state, int64_t n, const void *scalars,
                        int flush);

/* Pass 1 of a two-pass kernel (LAMB, LARS) over one block of n <= FO_TRUST_BLOCK
 * elements: the sums of squares, in double, of param and of the update u the
 * kernel would apply (its element function with the measure flag on), each in
 * 8 lanes and a fixed tree (the order of norm.c's blocks). Nothing is written but
 * the two sums. trust.c schedules the blocks. */
#define FO_TRUST_BLOCK 4096
/* <kernel>_sums_ works through a block in pieces of this many elements (the update
 * of a piece into a scratch array, then its squares into the lanes): memory and
 * arithmetic alternate finely enough for the prefetchers to keep streaming. */
#define FO_TRUST_PIECE 512
typedef void (*fo_sums)(const void *param, const void *grad, const void *const *state, int64_t n,
                        const void *scalars, double *param_sumsq, double *update_sumsq);

/* 8-bit blockwise state: the constants (FO_I8_BLOCK, FO_I8_BUCKET_LO, ...) of
 * int8_maps.inc (generated from fastopt.formats) and its tables, defined once in
 * formats.c; index 0 the unsigned map, 1 the signed one. */
#include "int8_maps.inc"
extern const float fo_i8_map[2][256];             /* the values a code stands for (times its absmax) */
extern const float fo_i8_mids[2][256];            /* the 255 decision midpoints, then +inf */
extern const uint8_t fo_i8_first[2][FO_I8_FIRST]; /* per bucket: #{mid < every value of the bucket} */
extern const uint32_t fo_i8_fused[2][FO_I8_FUSED]; /* per top 16 bits: first code | its threshold << 8 */

/* One map's tables, as the conversions take them. */
typedef struct {
    const float *map, *mids;
    const uint8_t *first;
    const uint32_t *fused; /* the AVX-512 path's lookup: one read per code */
    uint32_t zero;         /* the code of 0.0 */
} fo_i8_tables;

/* The conversions of the mixed-format updates (formats.c), from convert.inc,
 * compiled in every CPU path's unit so that they vectorize with its
 * instructions. A 16-bit value is its bits (uint16_t); n elements each. */
typedef struct {
    void (*load_bf16)(float *out, const uint16_t *in, int64_t n); /* exact */
    void (*load_f16)(float *out, const uint16_t *in, int64_t n);  /* exact; a NaN: 0x7fc00000 | sign */
    void (*store_bf16_nearest)(uint16_t *out, const float *in, int64_t n);
    void (*store_f16_nearest)(uint16_t *out, const float *in, int64_t n);
    /* element i rounded with the random bits fo_mix32(counter + i) */
    void (*store_bf16_stochastic)(uint16_t *out, const float *in, int64_t n, uint32_t counter);
    /* 8-bit blockwise state, n elements from the start of a block (blocks of
     * FO_I8_BLOCK, the last one shorter; absmax[j]: block j's): load, exact
     * (map[code] * absmax in float32); store: per block its absmax (the quiet NaN
     * FO_I8_QUIET_NAN when it holds a NaN) and its codes (fastopt.h) */
    void (*load_i8)(float *out, const uint8_t *codes, const float *absmax, int64_t n, const float *map);
    void (*store_i8)(uint8_t *codes, float *absmax, const float *in, int64_t n, const fo_i8_tables *t);
} fo_convert;

typedef struct {
    const char *name;  /* "avx512", "avx2", "baseline" */
    fo_loop loop[FO_NKERNELS][FO_NDTYPES];
    fo_sums sums[FO_NKERNELS][FO_NDTYPES]; /* the two-pass kernels' (FO_TRUST_LIST); NULL for the others */
    fo_convert convert;
} fo_kernels;

/* One table per CPU path, each from its own translation unit compiled with
 * that path's -m flags (isa_unit.inc). */
extern const fo_kernels fo_kernels_baseline;
#ifdef FASTOPT_X86_DISPATCH
extern const fo_kernels fo_kernels_avx2;
extern const fo_kernels fo_kernels_avx512;
#endif

/* The table chosen for this CPU (and FASTOPT_ISA), decided once. */
const fo_kernels *fo_kernels_selected(void);

/* api.c, for trust.c: the argument checks of a list call (fastopt.h's contract;
 * FASTOPT_OK with *total the element count), and a list call whose tensor i
 * takes the scalars at (const char *)scalars + i * stride (stride 0: one
 * struct for every tensor, as fastopt_<rule>_list_*). */
int fo_list_check(int dtype, const void *param, const void *grad, const void *const *state, unsigned need,
                  const int64_t *n, int64_t count, const void *scalars, int64_t *total);
int fo_run_list_each(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                     unsigned need, const int64_t *n, int64_t count, const void *scalars, int64_t stride);

/* api.c: the threads for `elements` elements of `esize` bytes (the same rule
 * for every entry point: FO_MIN_BYTES_PER_THREAD bytes per thread at least). */
int64_t fo_threads_for(int64_t elements, int64_t esize);
/* Run range(ctx, lo, hi) over [0, total) split into one contiguous range per thread
 * (fo_threads_for's count for elements of esize bytes; the calling thread alone below
 * it): the list calls' and the mixed-format calls' thread split. */
typedef void (*fo_range)(const void *ctx, int64_t lo, int64_t hi);
void fo_split(int64_t total, int64_t esize, fo_range range, const void *ctx);

/* formats.c: the mixed-format list update of fastopt_<rule>_mixed_list (state:
 * FO_MAX_STATE tables, NULL for an unused buffer; bit k of `need`: state[k] is
 * required). */
int fo_run_mixed(int kernel, const fastopt_formats *f, void *const *param, const void *const *grad,
                 void *const *const *state, float *const *master, unsigned need, const int64_t *n, int64_t count,
                 const void *scalars);

/* lowbias32 (Chris Wellons): the invertible 32-bit mixer behind the random bits of
 * stochastic rounding (fastopt.formats.mix32). */
static inline uint32_t fo_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* trust.c: the two-pass entry points' drivers. fo_ratio writes a tensor's value of
 * the rule's trust field into the scalars at out (a copy of *scalars). */
typedef void (*fo_ratio)(void *out, const void *scalars, double param_sumsq, double update_sumsq);
int fo_trust_sums(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                  unsigned need, const int64_t *n, int64_t count, const void *scalars, double *param_sumsq,
                  double *update_sumsq);
int fo_trust_run(int kernel, int dtype, const void *param, const void *grad, const void *const *state,
                 unsigned need, const int64_t *n, int64_t count, const void *scalars, int64_t size, int trusted,
                 fo_ratio ratio);

#define FO_CAT_(a, b) a##b
#define FO_CAT(a, b) FO_CAT_(a, b)

#if defined(__GNUC__)
#  define FO_INLINE inline __attribute__((always_inline))
#else
#  define FO_INLINE inline
#endif

#endif /* FASTOPT_INTERNAL_H */
