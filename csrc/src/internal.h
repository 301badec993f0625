/* Private to the library: the kernel table, the per-ISA units and the
 * field lists of the public scalar structs. */
#ifndef FASTOPT_INTERNAL_H
#define FASTOPT_INTERNAL_H

#include <stdint.h>

#include "fastopt.h"

/* Kernel indices (rows of fo_kernels.loop) and dtypes (columns). */
enum { FO_SGD, FO_ADAGRAD, FO_RMSPROP, FO_ADADELTA, FO_ADAM, FO_ADAMAX, FO_NADAM, FO_LION, FO_NRULES };
enum { FO_F32, FO_F64, FO_NDTYPES };

/* Every kernel, whatever its rule, has this shape internally: up to three
 * state buffers (unused ones are never touched), n elements, the rule's
 * public scalars struct. One shape lets one driver (api.c) chunk every rule
 * over the threads. The loops run on the calling thread. */
typedef void (*fo_loop)(void *param, const void *grad, void *s0, void *s1, void *s2,
                        int64_t n, const void *scalars);

typedef struct {
    const char *name;  /* "avx512", "avx2", "baseline" */
    fo_loop loop[FO_NRULES][FO_NDTYPES];
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

/* Field lists of the public scalar structs, real fields R(...) then int flags
 * I(...). The kernels use them to build a copy of the struct in the buffer
 * dtype (isa_unit.inc). Conversion is by name, so order does not matter here;
 * the order of the public structs is checked against fastopt.rules by the
 * Python tests. */
#define FO_SGD_FIELDS(R, I) R(lr) R(momentum) R(one_minus_dampening) R(weight_decay) R(grad_sign) \
    I(nesterov) I(first_step)
#define FO_ADAGRAD_FIELDS(R, I) R(clr) R(eps) R(weight_decay) R(grad_sign)
#define FO_RMSPROP_FIELDS(R, I) R(lr) R(alpha) R(one_minus_alpha) R(eps) R(weight_decay) R(momentum) \
    R(grad_sign) I(centered) I(use_momentum)
#define FO_ADADELTA_FIELDS(R, I) R(lr) R(rho) R(one_minus_rho) R(eps) R(weight_decay) R(grad_sign)
#define FO_ADAM_FIELDS(R, I) R(beta1) R(beta2) R(one_minus_beta1) R(one_minus_beta2) R(step_size) \
    R(bias_correction2_sqrt) R(eps) R(weight_decay) R(param_decay) R(grad_sign) I(amsgrad)
#define FO_ADAMAX_FIELDS(R, I) R(beta1) R(beta2) R(one_minus_beta1) R(clr) R(eps) R(weight_decay) \
    R(grad_sign)
#define FO_NADAM_FIELDS(R, I) R(beta1) R(beta2) R(one_minus_beta1) R(one_minus_beta2) \
    R(bias_correction2) R(eps) R(grad_coef) R(exp_avg_coef) R(weight_decay) R(param_decay) R(grad_sign)
#define FO_LION_FIELDS(R, I) R(lr) R(beta1) R(beta2) R(one_minus_beta1) R(one_minus_beta2) \
    R(param_decay) R(grad_sign)

#define FO_CAT_(a, b) a##b
#define FO_CAT(a, b) FO_CAT_(a, b)

#if defined(__GNUC__)
#  define FO_INLINE inline __attribute__((always_inline))
#else
#  define FO_INLINE inline
#endif

#endif /* FASTOPT_INTERNAL_H */
