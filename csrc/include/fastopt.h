/*
 * fastopt: fused, in-place optimizer updates over flat buffers. Public C99 API.
 *
 * Each update reads and writes every element of its buffers exactly once
 * (one pass over memory), with the update rules of torch.optim (PyTorch 2.x).
 * Use:
 *
 *     fastopt_adam_scalars s;
 *     for (int64_t t = 1; t <= steps; t++) {
 *         compute_grad(param, grad, n);
 *         fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 0, 0, t);
 *         fastopt_adamw_f32(param, grad, exp_avg, exp_avg_sq, NULL, n, &s);
 *     }
 *
 * Two calls per step and rule:
 *   fastopt_<rule>_prepare(&s, hyperparameters..., step)  validates the
 *       hyperparameters and computes the per-step scalars (bias corrections,
 *       decayed learning rates) once, in double precision;
 *   fastopt_<rule>_f32 / _f64(buffers..., n, &s)  runs the update.
 * The scalar structs are plain data: fill them yourself if you prefer (the
 * field meanings are documented below); the Python package fills them from
 * fastopt.rules, whose NamedTuples have the same fields in the same order.
 *
 * Contract shared by every kernel fastopt_<rule>_f32/_f64:
 *   - Buffers hold n elements each and are updated in place. They must not
 *     overlap each other (grad is read-only and may be any memory that does not
 *     overlap a written buffer). No alignment is required.
 *   - A buffer documented as optional may be NULL when the option that uses it
 *     is off; it is then never touched. Every other buffer must be non-NULL
 *     when n > 0 (when n == 0 nothing is read or written, and NULL is fine).
 *   - The scalars pointer is never NULL.
 *   - f32 kernels convert the double scalars to float once and compute in
 *     float, as PyTorch does for float32 tensors; f64 kernels compute in double.
 *   - No a*b+c is contracted into an FMA and no approximate reciprocal or
 *     square root is used: every operation rounds as IEEE 754 says, so results
 *     are bitwise identical for any thread count and any CPU path
 *     (AVX-512, AVX2, baseline), and equal to the NumPy reference.
 *   - NaN and Inf in grad propagate as in PyTorch; nothing is skipped.
 *   - Returns FASTOPT_OK, or a negative FASTOPT_ERR_* code without touching
 *     any buffer.
 *   - Thread-safe: concurrent calls on disjoint buffers are fine.
 *
 * Lists of tensors: fastopt_<rule>_list_f32 / _f64(param, grad, state...,
 * n, count, &s) update `count` tensors in one call, with the same scalars:
 * param, grad and each state argument are tables of `count` pointers (tensor
 * i has n[i] elements), e.g. float *const *param. In addition to the contract
 * above, per tensor:
 *   - a table of an optional buffer may be NULL when its option is off (its
 *     entries are then never read); every other table, and n, must be non-NULL
 *     when count > 0, and their entries non-NULL where n[i] > 0;
 *   - count < 0 or any n[i] < 0 returns FASTOPT_ERR_LENGTH; every check is
 *     made before any buffer is written;
 *   - no buffer of any tensor may overlap a written buffer of any tensor;
 *   - the threads share the total element count (one contiguous range each,
 *     the same thread rule as a flat call of that many elements), so many
 *     small tensors use the threads as one large buffer would. Results are
 *     bitwise those of one flat call per tensor, for any thread count.
 *
 * Two-pass rules (LAMB, LARS: fastopt_rules.h): the step of each tensor is
 * scaled by a trust ratio of two of its norms, ||param|| and ||u||, u being the
 * update the rule would apply. fastopt_<rule>_trust_list_f32 / _f64 (and the
 * flat fastopt_<rule>_trust_*, a list of one) take the arguments of
 * fastopt_<rule>_list_* and run, per call:
 *   1. a read-only pass over param, grad and the state: per tensor, the sums of
 *      squares of param and of u in double, in the order of fastopt_sumsq_list
 *      (blocks of 4096, 8 lanes, a fixed tree, blocks in order; bitwise
 *      reproducible); fastopt_<rule>_norms[_list]_* is this pass alone;
 *   2. the update, tensor i with a copy of *s whose trust field is the ratio
 *      of tensor i's two sums (fastopt_<rule>_ratio gives that copy): the
 *      threads spread over all the elements as in a list call, results bitwise
 *      those of fastopt_<rule>_norms_list_*, fastopt_<rule>_ratio and one
 *      fastopt_<rule>_* call per tensor, for any thread count.
 * When the ratio does not apply (each rule says when: LAMB without weight decay
 * or use_nvlamb, LARS without adaptation) it is exactly fastopt_<rule>_list_*,
 * one pass. The contract of list calls holds; also FASTOPT_ERR_MEMORY when the
 * per-tensor tables (count scalars structs and sums) cannot be allocated,
 * before any buffer is written. The scalars' `measure` flag is pass 1's: every
 * entry point ignores the value in *s (prepare sets it to 0).
 *
 * Mixed-format updates (fastopt.formats in the Python package):
 * fastopt_<rule>_mixed_list(f, param, grad, state..., master, n, count, &s)
 * updates count tensors whose buffers are held in other formats than float32,
 * computing in float32 with the rule's float32 kernel. *f gives each role's
 * format (fastopt_formats, below); param, grad and each state argument are
 * tables of count untyped pointers (void *const *), tensor i's buffer holding
 * n[i] elements of its role's format (a float, a uint16_t holding a
 * bfloat16's or a float16's bits, or an 8-bit state buffer's uint8_t code:
 * below). Per tensor, every element is computed as
 *   1. load: param from master[i] when master is given (the float32 master
 *      copy, read and written in place), else from param[i]; grad and each
 *      state buffer from theirs. bfloat16 and float16 to float32 are exact
 *      (a float16 NaN becomes 0x7fc00000 with its sign);
 *   2. the rule's float32 update (fastopt_<rule>_list_f32, flushing included:
 *      fastopt_set_flush_denormal applies to the float32 results);
 *   3. store, each written buffer in its format: with a master copy, param[i]
 *      is the master's value rounded to nearest even (bfloat16:
 *      (b + 0x7fff + (b >> 16 & 1)) >> 16 of the float bits b; float16: IEEE,
 *      subnormals included, overflow to infinity); without one, a bfloat16
 *      param is rounded stochastically, as is every bfloat16 state buffer:
 *      (b + (r & 0xffff)) >> 16 with r the element's 32 random bits (an
 *      infinity stays infinite). A NaN stored as bfloat16 is 0x7fc0, as
 *      float16 0x7e00, with its sign.
 * 8-bit blockwise state (FASTOPT_FORMAT_I8, state buffers only; bitsandbytes'
 * scheme, fastopt.formats.Int8State in Python): state[k][i] points to n[i]
 * uint8_t codes, f->absmax[k][i] to the tensor's ceil(n[i] / 256) float scales,
 * one per block of 256 consecutive elements of the tensor (the last block
 * shorter), and f->signed_map[k] picks the map: nonzero the signed one (for a
 * buffer that may be negative), 0 the unsigned one (finer, for non-negative
 * buffers). The maps are fastopt.formats.dynamic_map: 256 ascending floats,
 * each map's 0.0 at index Z (the zero code: 127 signed, 0 unsigned), and
 * mid[c] (c < 255) the float of the midpoint of map[c] and map[c + 1] computed
 * in double (fastopt.formats.map_midpoints); every value is in the library
 * (src/int8_maps.inc). Such a buffer is
 *   1. loaded as map[code] * absmax of the element's block (a float32
 *      product: a NaN or infinite absmax gives NaN or infinities, 0 * inf NaN);
 *   2. updated in float32 as above (flushing included);
 *   3. stored per block: absmax = the largest |x| of the block's new values
 *      (+0 for a block of zeros), except that a block holding a NaN gets
 *      absmax = the quiet NaN 0x7fc00000 and every code Z; else each code is
 *      #{c : mid[c] < x / absmax} with the float32 division, except Z when
 *      absmax is 0 or x / absmax is NaN (an infinity in a block whose absmax
 *      is infinite). Codes and absmax are both written; the codes are those
 *      of the nearest map value (a tie: the lower one).
 * Blocks are a tensor's own: results do not depend on the threads. The absmax
 * arrays are written buffers (they must not overlap any buffer of the call).
 * The random bits of element j of tensor i, role r (0: param, 1 + k: state
 * buffer k in the rule's order) are mix32(stream + j) (mod 2^32) with
 * stream = mix32(f->key ^ mix32(i * 16 + r)) and mix32 Chris Wellons'
 * lowbias32 (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
 * x ^= x >> 16): they depend on the key, the tensor's position, the role and
 * the index only, never on the threads or the CPU path, so results are bitwise
 * reproducible (and equal to the Python package's backends). The contract of
 * list calls holds (a table of a buffer the scalars do not use may be NULL and
 * is never read; master may be NULL: no master copy, else its entries are
 * non-NULL where n[i] > 0), and also: f must be non-NULL (FASTOPT_ERR_NULL);
 * FASTOPT_ERR_FORMAT, before anything is written, when a format is unknown or
 * not one its role takes: param and grad F32, BF16 or F16; a used state buffer
 * F32, BF16 or I8; a master copy only for a BF16 or F16 param, and an F16 param
 * only with one (float16 cannot accumulate updates); FASTOPT_ERR_NULL, before
 * anything is written, when a used I8 buffer's f->absmax[k] is NULL (count > 0)
 * or an entry of it is NULL where n[i] > 0. f->absmax[k] and f->signed_map[k]
 * are read only for the used I8 buffers. A float32 role is computed in place,
 * so an all-F32 call is exactly fastopt_<rule>_list_f32.
 * The two-pass rules have no mixed-format entry points yet.
 *
 * Threads: the kernels split large buffers into one contiguous static chunk
 * per OpenMP thread (small buffers run on the calling thread); see
 * fastopt_set_num_threads. CPU path: chosen once at the first call from the
 * CPU's features; the environment variable FASTOPT_ISA=avx512|avx2|baseline
 * forces a (supported) path, for benchmarks. See fastopt_isa.
 */
#ifndef FASTOPT_H
#define FASTOPT_H

#include <stdint.h>

#if defined(_WIN32) && defined(FASTOPT_SHARED)
#  if defined(FASTOPT_BUILDING)
#    define FASTOPT_API __declspec(dllexport)
#  else
#    define FASTOPT_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define FASTOPT_API __attribute__((visibility("default")))
#else
#  define FASTOPT_API
#endif

#define FASTOPT_VERSION_MAJOR 0
#define FASTOPT_VERSION_MINOR 1
#define FASTOPT_VERSION_PATCH 0

#ifdef __cplusplus
extern "C" {
#endif

/* ---- cffi: the declarations below are parsed by the Python binding ---- */

/* Return codes. */
enum {
    FASTOPT_OK = 0,
    FASTOPT_ERR_NULL = -1,     /* a required pointer is NULL */
    FASTOPT_ERR_LENGTH = -2,   /* n < 0 */
    FASTOPT_ERR_HYPER = -3,    /* a hyperparameter or step is out of range (prepare) */
    FASTOPT_ERR_THREADS = -4,  /* fastopt_set_num_threads: n < 0 */
    FASTOPT_ERR_MEMORY = -5,   /* a two-pass update could not allocate its per-tensor tables */
    FASTOPT_ERR_FORMAT = -6    /* a mixed-format update's formats are unknown or not allowed for their roles */
};

/* Storage formats of a buffer role in a mixed-format update (fastopt_<rule>_mixed_list). */
enum {
    FASTOPT_FORMAT_F32 = 0,  /* float (IEEE binary32) */
    FASTOPT_FORMAT_BF16 = 1, /* bfloat16: the high 16 bits of a float, in a uint16_t */
    FASTOPT_FORMAT_F16 = 2,  /* IEEE binary16, in a uint16_t */
    FASTOPT_FORMAT_I8 = 3    /* 8-bit blockwise state (state buffers only): uint8_t codes, a float absmax per 256 */
};

/* The most state buffers a fastopt_formats describes (every rule has fewer). */
#define FASTOPT_FORMATS_MAX_STATE 8

/* The formats of one mixed-format update and its rounding key (see the top of this file). */
typedef struct {
    int param; /* FASTOPT_FORMAT_F32, _BF16 or _F16 (F16 needs a master copy) */
    int grad;  /* FASTOPT_FORMAT_F32, _BF16 or _F16 */
    /* state[k]: state buffer k in the rule's order, FASTOPT_FORMAT_F32, _BF16 or _I8
     * (read only for the buffers the update uses) */
    int state[FASTOPT_FORMATS_MAX_STATE];
    /* The call's 32-bit key of the random bits of stochastic rounding: a new one
     * every step (the Python package derives it from a seed and the step). */
    uint32_t key;
    /* For an I8 state buffer k: absmax[k], a table of count pointers, tensor i's
     * to its ceil(n[i] / 256) block scales (read and written); signed_map[k]:
     * nonzero for the signed map, 0 for the unsigned one. Unread for the others. */
    float *const *absmax[FASTOPT_FORMATS_MAX_STATE];
    int signed_map[FASTOPT_FORMATS_MAX_STATE];
} fastopt_formats;

/* Library version as "MAJOR.MINOR.PATCH"; a static string, never NULL. */
FASTOPT_API const char *fastopt_version(void);

/* A static description of a return code ("ok", "a required pointer is NULL", ...). */
FASTOPT_API const char *fastopt_strerror(int code);

/* Use n OpenMP threads in later updates; n == 0 restores the OpenMP default
 * (OMP_NUM_THREADS or the number of cores). Returns FASTOPT_ERR_THREADS for
 * n < 0. This and the flush setting below are the library's only global
 * state: set them between updates, not while another thread is running one.
 * Without OpenMP it has no effect. */
FASTOPT_API int fastopt_set_num_threads(int n);

/* The number of threads a large update uses (>= 1). It is 1 in a process
 * forked after the library was loaded: GNU OpenMP's thread pool does not
 * survive fork, so such a child runs updates on its calling thread. */
FASTOPT_API int fastopt_get_num_threads(void);

/* Flush denormals in later updates: on != 0 turns it on, 0 (the default) off.
 * When on, every value an update stores (param and each state buffer it
 * writes; grad is never written) whose magnitude is below the dtype's
 * smallest normal (FLT_MIN, DBL_MIN) and that is not NaN is stored as a zero
 * of its sign: stored = (fabs(x) >= MIN || x != x) ? x : x * 0. Only stored
 * values are flushed, never intermediates, and the CPU's FTZ/DAZ modes are not
 * touched, so results stay bitwise identical across CPU paths and thread
 * counts: exactly the flush-off results with that rule applied to each stored
 * value. When off, the kernels are exactly those without the option. Read
 * once per update call (flat and list alike); set it between updates, as the
 * thread count. Returns FASTOPT_OK. */
FASTOPT_API int fastopt_set_flush_denormal(int on);

/* 1 if updates flush denormals (fastopt_set_flush_denormal), else 0. */
FASTOPT_API int fastopt_get_flush_denormal(void);

/* The sum of squares of count tensors (x[i]: n[i] elements), in double, into
 * *out: the reduction behind a gradient norm (sqrt(*out) is the L2 norm of all
 * of them together); and, when each is not NULL, each tensor's own sum into
 * each[i] (LAMB's and LARS's per-tensor norms). Bitwise reproducible: the
 * order of the additions depends only on the sizes (blocks of 4096 elements,
 * each summed in 8 interleaved lanes and a fixed tree; blocks added in order,
 * all of them for *out, a tensor's own for each[i]), never on the thread count
 * or the CPU path. A NaN gives NaN; an Inf and no NaN, +Inf. Returns
 * FASTOPT_OK, FASTOPT_ERR_NULL (out NULL; x or n NULL with count > 0; x[i]
 * NULL with n[i] > 0) or FASTOPT_ERR_LENGTH (count or an n[i] < 0), then *out
 * and each untouched. */
FASTOPT_API int fastopt_sumsq_list_f32(const float *const *x, const int64_t *n, int64_t count, double *out,
                                       double *each);
FASTOPT_API int fastopt_sumsq_list_f64(const double *const *x, const int64_t *n, int64_t count, double *out,
                                       double *each);

/* The largest magnitude max |x[i][j]| of count tensors (x[i]: n[i] elements),
 * as a double (exact: every float is a double), into *out: the inf norm of all
 * of them together; and, when each is not NULL, each tensor's own into each[i]
 * (0.0 for an empty tensor, and *out is 0.0 when there are no elements). The
 * same blocks and thread split as fastopt_sumsq_list (a maximum is exact in any
 * order, so the result never depends on the thread count or the CPU path). A
 * NaN anywhere gives NaN (sticky: an Inf does not hide it), always the quiet
 * NaN of NAN (bits 0x7ff8000000000000, whatever the input NaN's sign and
 * payload), so results are bitwise comparable; an Inf and no NaN, +Inf. The
 * same checks and return codes as fastopt_sumsq_list: FASTOPT_OK,
 * FASTOPT_ERR_NULL (out NULL; x or n NULL with count > 0; x[i] NULL with n[i] >
 * 0) or FASTOPT_ERR_LENGTH (count or an n[i] < 0), then *out and each untouched. */
FASTOPT_API int fastopt_maxabs_list_f32(const float *const *x, const int64_t *n, int64_t count, double *out,
                                        double *each);
FASTOPT_API int fastopt_maxabs_list_f64(const double *const *x, const int64_t *n, int64_t count, double *out,
                                        double *each);

/* The CPU path the kernels use: "avx512", "avx2" or "baseline". Decided at
 * the first update (or call of this function) from the CPU's features and the
 * environment variable FASTOPT_ISA; an unsupported or unknown request falls
 * back to the best supported path. Static string, never NULL. */
FASTOPT_API const char *fastopt_isa(void);

/*
 * Conventions of the scalar structs (the same in every rule):
 *   grad_sign     -1.0 to maximize, else 1.0 (the gradient is multiplied by it).
 *   weight_decay  L2 coefficient: g += weight_decay*param. The term is skipped
 *                 when it is 0 (so 0*Inf never makes a NaN torch would not).
 *   param_decay   decoupled decay multiplier 1 - lr*weight_decay (AdamW, Lion,
 *                 decoupled NAdam and RAdam); exactly 1.0 when unused.
 *   one_minus_X   1 - X, computed in double by prepare.
 * Flags are int, 0 or 1.
 *
 * prepare functions: out must be non-NULL; lr, lr_decay, eps, weight decays,
 * momentum and momentum_decay must be finite and >= 0; betas in [0, 1); alpha
 * and rho in [0, 1]; step >= 1 (the 1-based count of this update). Each
 * function's comment in fastopt_rules.h lists its checks. Anything else returns
 * FASTOPT_ERR_HYPER (FASTOPT_ERR_NULL for a NULL pointer) and leaves *out (and
 * a carried value) unchanged. Arguments: out, then a carried in/out value if the
 * rule has one (NAdam's double *mu_product), then the hyperparameters in the
 * order of the Python signature (betas as beta1, beta2; flags as int), then
 * step unless the rule has none (Lion). They compute exactly what
 * fastopt.rules does in Python: they are generated from it.
 *
 * The rules, their structs and functions: fastopt_rules.h (included below).
 * Rules that share an element kernel share its struct (AdamW uses
 * fastopt_adam_scalars); only their prepare functions differ.
 */

/* ---- cffi: end ---- */

#ifdef __cplusplus
}
#endif

/* Every rule's scalars struct, prepare function and kernels (generated from
 * the Python package's rule table, fastopt/rules.py). */
#include "fastopt_rules.h"

#endif /* FASTOPT_H */
