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

typedef struct {
    const char *name;  /* "avx512", "avx2", "baseline" */
    fo_loop loop[FO_NKERNELS][FO_NDTYPES];
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

#define FO_CAT_(a, b) a##b
#define FO_CAT(a, b) FO_CAT_(a, b)

#if defined(__GNUC__)
#  define FO_INLINE inline __attribute__((always_inline))
#else
#  define FO_INLINE inline
#endif

#endif /* FASTOPT_INTERNAL_H */
