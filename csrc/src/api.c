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

static void fo_loop_range(fo_loop loop, void *p, const void *g, void *s0, void *s1, void *s2, int64_t lo,
                          int64_t len, int64_t esize, const void *scalars)
{
    const int64_t b = lo * esize;
    loop(fo_off(p, b), (const char *)g + b, fo_off(s0, b), fo_off(s1, b), fo_off(s2, b), len, scalars);
}

/* Run kernel `rule` over n elements of `esize` bytes: the unaligned head, then
 * one contiguous static chunk per thread. Each element's result depends only
 * on that element, and every code path rounds identically, so the split never
 * changes a bit of the output. */
static int fo_run(int rule, int dtype, void *p, const void *g, void *s0, void *s1, void *s2,
                  unsigned need, int64_t n, const void *scalars)
{
    if (!scalars)
        return FASTOPT_ERR_NULL;
    if (n < 0)
        return FASTOPT_ERR_LENGTH;
    if (n == 0)
        return FASTOPT_OK;
    if (!p || !g || ((need & 1) && !s0) || ((need & 2) && !s1) || ((need & 4) && !s2))
        return FASTOPT_ERR_NULL;
    const fo_loop loop = fo_kernels_selected()->loop[rule][dtype];
    const int64_t esize = dtype == FO_F32 ? 4 : 8, align = FO_ALIGN_BYTES / esize;
    const uintptr_t mis = (uintptr_t)p % FO_ALIGN_BYTES;
    int64_t head = mis % esize ? 0 : (int64_t)((FO_ALIGN_BYTES - mis) % FO_ALIGN_BYTES) / esize;
    if (head > n)
        head = n;
    if (head)
        fo_loop_range(loop, p, g, s0, s1, s2, 0, head, esize, scalars);
    const int64_t rest = n - head;
    int64_t threads = fastopt_get_num_threads();
    const int64_t useful = rest * esize / FO_MIN_BYTES_PER_THREAD;
    if (threads > useful)
        threads = useful;
    if (threads <= 1) {
        if (rest)
            fo_loop_range(loop, p, g, s0, s1, s2, head, rest, esize, scalars);
        return FASTOPT_OK;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
    {
        const int64_t nt = omp_get_num_threads();
        const int64_t chunk = ((rest + nt - 1) / nt + align - 1) / align * align;
        const int64_t lo = omp_get_thread_num() * chunk;
        if (lo < rest)
            fo_loop_range(loop, p, g, s0, s1, s2, head + lo, rest - lo < chunk ? rest - lo : chunk, esize,
                          scalars);
    }
#endif
    return FASTOPT_OK;
}

/* ---- kernels: one definition per rule, instantiated per dtype ------------ */

#define FO_ENTRY_POINTS(T, SFX, DT)                                                                  \
    int fastopt_sgd_##SFX(T *param, const T *grad, T *momentum_buffer, int64_t n,                    \
                          const fastopt_sgd_scalars *s)                                              \
    {                                                                                                \
        return fo_run(FO_SGD, DT, param, grad, momentum_buffer, NULL, NULL,                          \
                      s && s->momentum != 0, n, s);                                                  \
    }                                                                                                \
    int fastopt_adagrad_##SFX(T *param, const T *grad, T *state_sum, int64_t n,                      \
                              const fastopt_adagrad_scalars *s)                                      \
    {                                                                                                \
        return fo_run(FO_ADAGRAD, DT, param, grad, state_sum, NULL, NULL, 1, n, s);                  \
    }                                                                                                \
    int fastopt_rmsprop_##SFX(T *param, const T *grad, T *square_avg, T *momentum_buffer,            \
                              T *grad_avg, int64_t n, const fastopt_rmsprop_scalars *s)              \
    {                                                                                                \
        return fo_run(FO_RMSPROP, DT, param, grad, square_avg, momentum_buffer, grad_avg,            \
                      s ? 1u | (s->use_momentum ? 2u : 0u) | (s->centered ? 4u : 0u) : 0u, n, s);   \
    }                                                                                                \
    int fastopt_adadelta_##SFX(T *param, const T *grad, T *square_avg, T *acc_delta, int64_t n,      \
                               const fastopt_adadelta_scalars *s)                                    \
    {                                                                                                \
        return fo_run(FO_ADADELTA, DT, param, grad, square_avg, acc_delta, NULL, 3, n, s);           \
    }                                                                                                \
    int fastopt_adam_##SFX(T *param, const T *grad, T *exp_avg, T *exp_avg_sq, T *max_exp_avg_sq,    \
                           int64_t n, const fastopt_adam_scalars *s)                                 \
    {                                                                                                \
        return fo_run(FO_ADAM, DT, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,                 \
                      s && s->amsgrad ? 7 : 3, n, s);                                                \
    }                                                                                                \
    int fastopt_adamw_##SFX(T *param, const T *grad, T *exp_avg, T *exp_avg_sq, T *max_exp_avg_sq,   \
                            int64_t n, const fastopt_adam_scalars *s)                                \
    {                                                                                                \
        return fastopt_adam_##SFX(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, n, s);           \
    }                                                                                                \
    int fastopt_adamax_##SFX(T *param, const T *grad, T *exp_avg, T *exp_inf, int64_t n,             \
                             const fastopt_adamax_scalars *s)                                        \
    {                                                                                                \
        return fo_run(FO_ADAMAX, DT, param, grad, exp_avg, exp_inf, NULL, 3, n, s);                  \
    }                                                                                                \
    int fastopt_nadam_##SFX(T *param, const T *grad, T *exp_avg, T *exp_avg_sq, int64_t n,           \
                            const fastopt_nadam_scalars *s)                                          \
    {                                                                                                \
        return fo_run(FO_NADAM, DT, param, grad, exp_avg, exp_avg_sq, NULL, 3, n, s);                \
    }                                                                                                \
    int fastopt_lion_##SFX(T *param, const T *grad, T *exp_avg, int64_t n,                           \
                           const fastopt_lion_scalars *s)                                            \
    {                                                                                                \
        return fo_run(FO_LION, DT, param, grad, exp_avg, NULL, NULL, 1, n, s);                       \
    }

FO_ENTRY_POINTS(float, f32, FO_F32)
FO_ENTRY_POINTS(double, f64, FO_F64)

/* ---- prepare: hyperparameters and step -> scalars ------------------------
 * The same checks and formulas as fastopt/rules.py (Python's float ** and
 * math.sqrt are C's pow and sqrt), so the scalars are bitwise the same. */

static int fo_nonneg(double x) { return isfinite(x) && x >= 0.0; }
static int fo_unit(double x) { return isfinite(x) && x >= 0.0 && x < 1.0; }        /* [0, 1) */
static int fo_unit_closed(double x) { return isfinite(x) && x >= 0.0 && x <= 1.0; } /* [0, 1] */
static double fo_sign(int maximize) { return maximize ? -1.0 : 1.0; }

#define FO_REQUIRE(cond) \
    do {                 \
        if (!(cond))     \
            return FASTOPT_ERR_HYPER; \
    } while (0)

int fastopt_sgd_prepare(fastopt_sgd_scalars *out, double lr, double momentum, double dampening,
                        double weight_decay, int nesterov, int maximize, int64_t step)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_nonneg(momentum) && isfinite(dampening) && fo_nonneg(weight_decay));
    FO_REQUIRE(step >= 1 && (!nesterov || (momentum > 0.0 && dampening == 0.0)));
    fastopt_sgd_scalars s = {lr, momentum, 1.0 - dampening, weight_decay, fo_sign(maximize),
                             nesterov != 0, step == 1};
    *out = s;
    return FASTOPT_OK;
}

int fastopt_adagrad_prepare(fastopt_adagrad_scalars *out, double lr, double lr_decay,
                            double weight_decay, double eps, int maximize, int64_t step)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_nonneg(lr_decay) && fo_nonneg(weight_decay) && fo_nonneg(eps));
    FO_REQUIRE(step >= 1);
    fastopt_adagrad_scalars s = {lr / (1.0 + (double)(step - 1) * lr_decay), eps, weight_decay,
                                 fo_sign(maximize)};
    *out = s;
    return FASTOPT_OK;
}

int fastopt_rmsprop_prepare(fastopt_rmsprop_scalars *out, double lr, double alpha, double eps,
                            double weight_decay, double momentum, int centered, int maximize,
                            int64_t step)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_unit_closed(alpha) && fo_nonneg(eps) && fo_nonneg(weight_decay));
    FO_REQUIRE(fo_nonneg(momentum) && step >= 1);
    fastopt_rmsprop_scalars s = {lr, alpha, 1.0 - alpha, eps, weight_decay, momentum,
                                 fo_sign(maximize), centered != 0, momentum > 0.0};
    *out = s;
    return FASTOPT_OK;
}

int fastopt_adadelta_prepare(fastopt_adadelta_scalars *out, double lr, double rho, double eps,
                             double weight_decay, int maximize, int64_t step)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_unit_closed(rho) && fo_nonneg(eps) && fo_nonneg(weight_decay));
    FO_REQUIRE(step >= 1);
    fastopt_adadelta_scalars s = {lr, rho, 1.0 - rho, eps, weight_decay, fo_sign(maximize)};
    *out = s;
    return FASTOPT_OK;
}

static int fo_adam_family(fastopt_adam_scalars *out, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int amsgrad, int maximize, int64_t step, int decoupled)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_unit(beta1) && fo_unit(beta2) && fo_nonneg(eps));
    FO_REQUIRE(fo_nonneg(weight_decay) && step >= 1);
    const double t = (double)step;
    fastopt_adam_scalars s = {beta1, beta2, 1.0 - beta1, 1.0 - beta2,
                              lr / (1.0 - pow(beta1, t)), sqrt(1.0 - pow(beta2, t)), eps,
                              decoupled ? 0.0 : weight_decay, decoupled ? 1.0 - lr * weight_decay : 1.0,
                              fo_sign(maximize), amsgrad != 0};
    *out = s;
    return FASTOPT_OK;
}

int fastopt_adam_prepare(fastopt_adam_scalars *out, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int amsgrad, int maximize, int64_t step)
{
    return fo_adam_family(out, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, step, 0);
}

int fastopt_adamw_prepare(fastopt_adam_scalars *out, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int amsgrad, int maximize, int64_t step)
{
    return fo_adam_family(out, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, step, 1);
}

int fastopt_adamax_prepare(fastopt_adamax_scalars *out, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int maximize, int64_t step)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_unit(beta1) && fo_unit(beta2) && fo_nonneg(eps));
    FO_REQUIRE(fo_nonneg(weight_decay) && step >= 1);
    fastopt_adamax_scalars s = {beta1, beta2, 1.0 - beta1, lr / (1.0 - pow(beta1, (double)step)), eps,
                                weight_decay, fo_sign(maximize)};
    *out = s;
    return FASTOPT_OK;
}

int fastopt_nadam_prepare(fastopt_nadam_scalars *out, double *mu_product, double lr, double beta1,
                          double beta2, double eps, double weight_decay, double momentum_decay,
                          int decoupled_weight_decay, int maximize, int64_t step)
{
    if (!out || !mu_product)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_unit(beta1) && fo_unit(beta2) && fo_nonneg(eps));
    FO_REQUIRE(fo_nonneg(weight_decay) && fo_nonneg(momentum_decay) && step >= 1);
    FO_REQUIRE(fo_unit_closed(*mu_product));
    const double t = (double)step;
    const double mu = beta1 * (1.0 - 0.5 * pow(0.96, t * momentum_decay));
    const double mu_next = beta1 * (1.0 - 0.5 * pow(0.96, (t + 1.0) * momentum_decay));
    const double product = *mu_product * mu;
    const int dec = decoupled_weight_decay != 0;
    fastopt_nadam_scalars s = {beta1, beta2, 1.0 - beta1, 1.0 - beta2, 1.0 - pow(beta2, t), eps,
                               lr * (1.0 - mu) / (1.0 - product),
                               lr * mu_next / (1.0 - product * mu_next),
                               dec ? 0.0 : weight_decay, dec ? 1.0 - lr * weight_decay : 1.0,
                               fo_sign(maximize)};
    *out = s;
    *mu_product = product;
    return FASTOPT_OK;
}

int fastopt_lion_prepare(fastopt_lion_scalars *out, double lr, double beta1, double beta2,
                         double weight_decay, int maximize)
{
    if (!out)
        return FASTOPT_ERR_NULL;
    FO_REQUIRE(fo_nonneg(lr) && fo_unit(beta1) && fo_unit(beta2) && fo_nonneg(weight_decay));
    fastopt_lion_scalars s = {lr, beta1, beta2, 1.0 - beta1, 1.0 - beta2, 1.0 - lr * weight_decay,
                              fo_sign(maximize)};
    *out = s;
    return FASTOPT_OK;
}
