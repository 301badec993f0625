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
    FASTOPT_ERR_THREADS = -4   /* fastopt_set_num_threads: n < 0 */
};

/* Library version as "MAJOR.MINOR.PATCH"; a static string, never NULL. */
FASTOPT_API const char *fastopt_version(void);

/* A static description of a return code ("ok", "a required pointer is NULL", ...). */
FASTOPT_API const char *fastopt_strerror(int code);

/* Use n OpenMP threads in later updates; n == 0 restores the OpenMP default
 * (OMP_NUM_THREADS or the number of cores). Returns FASTOPT_ERR_THREADS for
 * n < 0. This is the library's only global state: set it between updates,
 * not while another thread is running one. Without OpenMP it has no effect. */
FASTOPT_API int fastopt_set_num_threads(int n);

/* The number of threads a large update uses (>= 1). It is 1 in a process
 * forked after the library was loaded: GNU OpenMP's thread pool does not
 * survive fork, so such a child runs updates on its calling thread. */
FASTOPT_API int fastopt_get_num_threads(void);

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
 *                 decoupled NAdam); exactly 1.0 when unused.
 *   one_minus_X   1 - X, computed in double by prepare.
 * Flags are int, 0 or 1.
 *
 * prepare functions: out must be non-NULL; lr, lr_decay, eps, weight decays,
 * momentum and momentum_decay must be finite and >= 0; betas in [0, 1); alpha
 * and rho in [0, 1]; step >= 1 (the 1-based count of this update). Anything else returns
 * FASTOPT_ERR_HYPER (FASTOPT_ERR_NULL for a NULL pointer) and leaves *out
 * unchanged. They compute exactly what fastopt.rules does in Python.
 */

/* ---- SGD (torch.optim.SGD) ----
 * g = grad*grad_sign (+ weight_decay*p);
 * with momentum: buf = g at the first step, else buf = momentum*buf + (1-dampening)*g;
 *                g = g + momentum*buf (nesterov) or g = buf;
 * p -= lr*g. */
typedef struct {
    double lr;
    double momentum;
    double one_minus_dampening;
    double weight_decay;
    double grad_sign;
    int nesterov;
    int first_step;     /* step == 1: the buffer starts as g, undamped */
} fastopt_sgd_scalars;

/* nesterov requires momentum > 0 and dampening == 0; dampening may be any
 * finite value. */
FASTOPT_API int fastopt_sgd_prepare(fastopt_sgd_scalars *out, double lr, double momentum,
                                    double dampening, double weight_decay, int nesterov,
                                    int maximize, int64_t step);

/* momentum_buffer: optional, used (and required) when s->momentum != 0. */
FASTOPT_API int fastopt_sgd_f32(float *param, const float *grad, float *momentum_buffer,
                                int64_t n, const fastopt_sgd_scalars *s);
FASTOPT_API int fastopt_sgd_f64(double *param, const double *grad, double *momentum_buffer,
                                int64_t n, const fastopt_sgd_scalars *s);

/* ---- AdaGrad (Duchi et al. 2011; torch.optim.Adagrad) ----
 * g = grad*grad_sign (+ weight_decay*p); state_sum += g*g;
 * p -= clr*g/(sqrt(state_sum) + eps). */
typedef struct {
    double clr;         /* lr/(1 + (step-1)*lr_decay) */
    double eps;
    double weight_decay;
    double grad_sign;
} fastopt_adagrad_scalars;

FASTOPT_API int fastopt_adagrad_prepare(fastopt_adagrad_scalars *out, double lr, double lr_decay,
                                        double weight_decay, double eps, int maximize,
                                        int64_t step);

FASTOPT_API int fastopt_adagrad_f32(float *param, const float *grad, float *state_sum,
                                    int64_t n, const fastopt_adagrad_scalars *s);
FASTOPT_API int fastopt_adagrad_f64(double *param, const double *grad, double *state_sum,
                                    int64_t n, const fastopt_adagrad_scalars *s);

/* ---- RMSProp (Hinton 2012; torch.optim.RMSprop) ----
 * g = grad*grad_sign (+ weight_decay*p); sq = alpha*sq + (1-alpha)*g*g;
 * centered: ga = ga + (1-alpha)*(g-ga), avg = sqrt(sq - ga*ga) + eps,
 * else avg = sqrt(sq) + eps;
 * momentum: buf = momentum*buf + g/avg, p -= lr*buf; else p -= lr*g/avg. */
typedef struct {
    double lr;
    double alpha;
    double one_minus_alpha;
    double eps;
    double weight_decay;
    double momentum;
    double grad_sign;
    int centered;
    int use_momentum;   /* momentum > 0 */
} fastopt_rmsprop_scalars;

FASTOPT_API int fastopt_rmsprop_prepare(fastopt_rmsprop_scalars *out, double lr, double alpha,
                                        double eps, double weight_decay, double momentum,
                                        int centered, int maximize, int64_t step);

/* momentum_buffer: optional, required when s->use_momentum;
 * grad_avg: optional, required when s->centered. */
FASTOPT_API int fastopt_rmsprop_f32(float *param, const float *grad, float *square_avg,
                                    float *momentum_buffer, float *grad_avg,
                                    int64_t n, const fastopt_rmsprop_scalars *s);
FASTOPT_API int fastopt_rmsprop_f64(double *param, const double *grad, double *square_avg,
                                    double *momentum_buffer, double *grad_avg,
                                    int64_t n, const fastopt_rmsprop_scalars *s);

/* ---- Adadelta (Zeiler 2012; torch.optim.Adadelta) ----
 * g = grad*grad_sign (+ weight_decay*p); sq = rho*sq + (1-rho)*g*g;
 * d = sqrt(acc + eps)/sqrt(sq + eps)*g; acc = rho*acc + (1-rho)*d*d; p -= lr*d. */
typedef struct {
    double lr;
    double rho;
    double one_minus_rho;
    double eps;
    double weight_decay;
    double grad_sign;
} fastopt_adadelta_scalars;

FASTOPT_API int fastopt_adadelta_prepare(fastopt_adadelta_scalars *out, double lr, double rho,
                                         double eps, double weight_decay, int maximize,
                                         int64_t step);

FASTOPT_API int fastopt_adadelta_f32(float *param, const float *grad, float *square_avg,
                                     float *acc_delta, int64_t n, const fastopt_adadelta_scalars *s);
FASTOPT_API int fastopt_adadelta_f64(double *param, const double *grad, double *square_avg,
                                     double *acc_delta, int64_t n, const fastopt_adadelta_scalars *s);

/* ---- Adam, AMSGrad and AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019;
 *      torch.optim.Adam / AdamW) ----
 * p *= param_decay (AdamW); g = grad*grad_sign (+ weight_decay*p, Adam);
 * m = m + (1-beta1)*(g-m); v = beta2*v + (1-beta2)*g*g;
 * amsgrad: vmax = max(vmax, v) (NaN propagates) and vmax replaces v below;
 * p -= step_size * m/(sqrt(v)/bias_correction2_sqrt + eps).
 * Adam and AdamW share the struct and the kernel; only prepare differs. */
typedef struct {
    double beta1;
    double beta2;
    double one_minus_beta1;
    double one_minus_beta2;
    double step_size;               /* lr/(1 - beta1^step) */
    double bias_correction2_sqrt;   /* sqrt(1 - beta2^step) */
    double eps;
    double weight_decay;            /* L2 term (Adam); 0 for AdamW */
    double param_decay;             /* 1 - lr*weight_decay (AdamW); 1 for Adam */
    double grad_sign;
    int amsgrad;
} fastopt_adam_scalars;

/* Adam: weight_decay is an L2 term added to the gradient. */
FASTOPT_API int fastopt_adam_prepare(fastopt_adam_scalars *out, double lr, double beta1,
                                     double beta2, double eps, double weight_decay,
                                     int amsgrad, int maximize, int64_t step);
/* AdamW: weight_decay is decoupled (p *= 1 - lr*weight_decay). */
FASTOPT_API int fastopt_adamw_prepare(fastopt_adam_scalars *out, double lr, double beta1,
                                      double beta2, double eps, double weight_decay,
                                      int amsgrad, int maximize, int64_t step);

/* max_exp_avg_sq: optional, required when s->amsgrad. fastopt_adamw_* is the
 * same kernel as fastopt_adam_* under the AdamW name. */
FASTOPT_API int fastopt_adam_f32(float *param, const float *grad, float *exp_avg,
                                 float *exp_avg_sq, float *max_exp_avg_sq,
                                 int64_t n, const fastopt_adam_scalars *s);
FASTOPT_API int fastopt_adam_f64(double *param, const double *grad, double *exp_avg,
                                 double *exp_avg_sq, double *max_exp_avg_sq,
                                 int64_t n, const fastopt_adam_scalars *s);
FASTOPT_API int fastopt_adamw_f32(float *param, const float *grad, float *exp_avg,
                                  float *exp_avg_sq, float *max_exp_avg_sq,
                                  int64_t n, const fastopt_adam_scalars *s);
FASTOPT_API int fastopt_adamw_f64(double *param, const double *grad, double *exp_avg,
                                  double *exp_avg_sq, double *max_exp_avg_sq,
                                  int64_t n, const fastopt_adam_scalars *s);

/* ---- Adamax (Kingma & Ba 2015, sec. 7; torch.optim.Adamax) ----
 * g = grad*grad_sign (+ weight_decay*p); m = m + (1-beta1)*(g-m);
 * u = max(beta2*u, |g| + eps) (NaN propagates); p -= clr*m/u. */
typedef struct {
    double beta1;
    double beta2;
    double one_minus_beta1;
    double clr;         /* lr/(1 - beta1^step) */
    double eps;
    double weight_decay;
    double grad_sign;
} fastopt_adamax_scalars;

FASTOPT_API int fastopt_adamax_prepare(fastopt_adamax_scalars *out, double lr, double beta1,
                                       double beta2, double eps, double weight_decay,
                                       int maximize, int64_t step);

FASTOPT_API int fastopt_adamax_f32(float *param, const float *grad, float *exp_avg,
                                   float *exp_inf, int64_t n, const fastopt_adamax_scalars *s);
FASTOPT_API int fastopt_adamax_f64(double *param, const double *grad, double *exp_avg,
                                   double *exp_inf, int64_t n, const fastopt_adamax_scalars *s);

/* ---- NAdam (Dozat 2016; torch.optim.NAdam) ----
 * p *= param_decay (decoupled); g = grad*grad_sign (+ weight_decay*p);
 * m, v as Adam; denom = sqrt(v/bias_correction2) + eps;
 * p -= grad_coef*g/denom; p -= exp_avg_coef*m/denom. */
typedef struct {
    double beta1;
    double beta2;
    double one_minus_beta1;
    double one_minus_beta2;
    double bias_correction2;    /* 1 - beta2^step */
    double eps;
    double grad_coef;           /* lr*(1-mu_t)/(1-mu_product) */
    double exp_avg_coef;        /* lr*mu_next/(1-mu_product*mu_next) */
    double weight_decay;
    double param_decay;
    double grad_sign;
} fastopt_nadam_scalars;

/* mu_product is in/out: the product of the momentum schedule mu_1..mu_{step-1}
 * (1.0 before the first step, must be in [0, 1]); on success it becomes
 * mu_product*mu_step, to pass to the next step (torch keeps it per parameter
 * as state["mu_product"]). mu_t = beta1*(1 - 0.5*0.96^(t*momentum_decay)). */
FASTOPT_API int fastopt_nadam_prepare(fastopt_nadam_scalars *out, double *mu_product, double lr,
                                      double beta1, double beta2, double eps, double weight_decay,
                                      double momentum_decay, int decoupled_weight_decay,
                                      int maximize, int64_t step);

FASTOPT_API int fastopt_nadam_f32(float *param, const float *grad, float *exp_avg,
                                  float *exp_avg_sq, int64_t n, const fastopt_nadam_scalars *s);
FASTOPT_API int fastopt_nadam_f64(double *param, const double *grad, double *exp_avg,
                                  double *exp_avg_sq, int64_t n, const fastopt_nadam_scalars *s);

/* ---- Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") ----
 * g = grad*grad_sign; c = beta1*m + (1-beta1)*g;
 * p = p*param_decay - lr*sign(c) (sign(0) = 0, sign(NaN) = NaN);
 * m = beta2*m + (1-beta2)*g. Lion has no step count. */
typedef struct {
    double lr;
    double beta1;
    double beta2;
    double one_minus_beta1;
    double one_minus_beta2;
    double param_decay;     /* 1 - lr*weight_decay */
    double grad_sign;
} fastopt_lion_scalars;

FASTOPT_API int fastopt_lion_prepare(fastopt_lion_scalars *out, double lr, double beta1,
                                     double beta2, double weight_decay, int maximize);

FASTOPT_API int fastopt_lion_f32(float *param, const float *grad, float *exp_avg,
                                 int64_t n, const fastopt_lion_scalars *s);
FASTOPT_API int fastopt_lion_f64(double *param, const double *grad, double *exp_avg,
                                 int64_t n, const fastopt_lion_scalars *s);

/* ---- cffi: end ---- */

#ifdef __cplusplus
}
#endif
#endif /* FASTOPT_H */
