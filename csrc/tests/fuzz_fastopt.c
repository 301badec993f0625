/* A deterministic, seedable random-input driver for the public fastopt API
 * (ctest runs it once per CPU path and under ASan+UBSan; see CMakeLists.txt).
 *
 * Each case draws a rule, a dtype, a length (0, tails around SIMD widths,
 * now and then past the OpenMP threshold), buffers and hyperparameters, then
 * runs 1-4 consecutive steps and checks:
 *   - prepare's return code against the documented ranges (valid and invalid
 *     hyperparameters, steps, mu_product, NULL pointers); on error *out and
 *     *mu_product are untouched; on success the documented fields;
 *   - every written buffer against the scalar loops of reference.inc, bitwise
 *     (any NaN equals any NaN); grad unchanged; an optional buffer that is not
 *     needed, when passed, untouched; canary elements before and after each
 *     misaligned buffer untouched (exact-size buffers: ASan watches the ends);
 *   - for large buffers (and some small ones) the same step on two thread
 *     counts (1 vs 2, 3 or 4), both against the reference;
 *   - error paths: NULL scalars, n < 0, a NULL required buffer: the
 *     documented code and every buffer byte-identical afterwards.
 * Some cases skip prepare and fill the scalars struct with arbitrary values
 * (the header allows filling it by hand): kernels and reference must still
 * agree bit for bit.
 *
 * Usage: fuzz_fastopt [--iters N] [--seed S] [--case I] [--verbose]
 *   (defaults from FASTOPT_FUZZ_ITERS / FASTOPT_FUZZ_SEED, else 4000 and 1).
 * Case I of seed S depends on nothing else, so a failure printed as
 * "seed S case I" reruns alone with --seed S --case I. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"

#define FO_T_CAT_(a, b) a##b
#define FO_T_CAT(a, b) FO_T_CAT_(a, b)
#define FO_REF_LOOPS_ONLY

#include "reference_both.inc"

/* ---- random numbers: splitmix64 ---------------------------------------- */

static uint64_t next64(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static int64_t rint_(uint64_t *s, int64_t lo, int64_t hi) /* [lo, hi] */
{
    return lo + (int64_t)(next64(s) % (uint64_t)(hi - lo + 1));
}
static double unif(uint64_t *s) { return (double)(next64(s) >> 11) * 0x1.0p-53; } /* [0, 1) */
static int chance(uint64_t *s, int percent) { return (int)(next64(s) % 100) < percent; }

/* ---- rules -------------------------------------------------------------- */

enum { R_SGD, R_ADAGRAD, R_RMSPROP, R_ADADELTA, R_ADAM, R_ADAMW, R_ADAMAX, R_NADAM, R_LION, R_N };
static const char *const RULE_NAME[R_N] = {"sgd", "adagrad", "rmsprop", "adadelta", "adam",
                                           "adamw", "adamax", "nadam", "lion"};
/* State buffers per rule (s0, s1, s2 in the kernel's argument order). */
static const int NSTATE[R_N] = {1, 1, 3, 2, 3, 3, 2, 2, 1};

/* Kinds of hyperparameter, with the documented valid ranges. */
enum { K_NONNEG, K_UNIT, K_UNIT_CLOSED, K_FINITE };
/* Per rule: kinds of the prepare arguments h[0..nh-1], in prepare's order. */
static const int NH[R_N] = {4, 4, 5, 4, 5, 5, 5, 6, 4};
static const int KINDS[R_N][6] = {
    {K_NONNEG, K_NONNEG, K_FINITE, K_NONNEG},             /* lr momentum dampening wd */
    {K_NONNEG, K_NONNEG, K_NONNEG, K_NONNEG},             /* lr lr_decay wd eps */
    {K_NONNEG, K_UNIT_CLOSED, K_NONNEG, K_NONNEG, K_NONNEG}, /* lr alpha eps wd momentum */
    {K_NONNEG, K_UNIT_CLOSED, K_NONNEG, K_NONNEG},        /* lr rho eps wd */
    {K_NONNEG, K_UNIT, K_UNIT, K_NONNEG, K_NONNEG},       /* lr beta1 beta2 eps wd */
    {K_NONNEG, K_UNIT, K_UNIT, K_NONNEG, K_NONNEG},
    {K_NONNEG, K_UNIT, K_UNIT, K_NONNEG, K_NONNEG},
    {K_NONNEG, K_UNIT, K_UNIT, K_NONNEG, K_NONNEG, K_NONNEG}, /* ... momentum_decay */
    {K_NONNEG, K_UNIT, K_UNIT, K_NONNEG},                 /* lr beta1 beta2 wd */
};

typedef struct {
    double h[6];
    int flag;     /* nesterov, centered, amsgrad, decoupled_weight_decay */
    int maximize;
    int64_t step; /* first step of the case */
    double mu;    /* NAdam's mu_product before the first step */
} hyper;

typedef union {
    fastopt_sgd_scalars sgd;
    fastopt_adagrad_scalars adagrad;
    fastopt_rmsprop_scalars rmsprop;
    fastopt_adadelta_scalars adadelta;
    fastopt_adam_scalars adam;
    fastopt_adamax_scalars adamax;
    fastopt_nadam_scalars nadam;
    fastopt_lion_scalars lion;
} scalars;

static int ok_kind(int kind, double x)
{
    switch (kind) {
    case K_NONNEG: return isfinite(x) && x >= 0.0;
    case K_UNIT: return isfinite(x) && x >= 0.0 && x < 1.0;
    case K_UNIT_CLOSED: return isfinite(x) && x >= 0.0 && x <= 1.0;
    default: return isfinite(x);
    }
}

static double pick(uint64_t *r, const double *v, int nv) { return v[rint_(r, 0, nv - 1)]; }
#define PICK(r, arr) pick(r, arr, (int)(sizeof(arr) / sizeof(arr[0])))

static double gen_hyper_value(uint64_t *r, int kind, int valid)
{
    static const double nonneg_ok[] = {0.0, -0.0, 1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 1e-8, 1e-12, 5e-324,
                                       DBL_MIN, 1e30, 1e300, DBL_MAX, 3e38, 1e-45};
    static const double nonneg_bad[] = {-1e-3, -1.0, -5e-324, -DBL_MIN, -DBL_MAX, NAN, -NAN, INFINITY,
                                        -INFINITY};
    static const double unit_ok[] = {0.0, -0.0, 0.5, 0.9, 0.99, 0.999, 0x1.fffffffffffffp-1, 5e-324, 1e-8};
    static const double unit_bad[] = {1.0, 0x1.0000000000001p+0, 2.0, -1e-300, -0.5, NAN, INFINITY, -INFINITY,
                                      DBL_MAX, -5e-324};
    static const double closed_ok[] = {0.0, -0.0, 0.5, 0.9, 0.99, 1.0, 0x1.fffffffffffffp-1, 5e-324};
    static const double closed_bad[] = {0x1.0000000000001p+0, 1.5, -1e-300, -5e-324, NAN, INFINITY,
                                        -INFINITY};
    static const double finite_ok[] = {0.0, -0.0, 0.1, 0.5, 1.0, -1.0, 2.0, -1e300, DBL_MAX, 5e-324};
    static const double finite_bad[] = {NAN, INFINITY, -INFINITY};
    if (!valid) {
        switch (kind) {
        case K_NONNEG: return PICK(r, nonneg_bad);
        case K_UNIT: return PICK(r, unit_bad);
        case K_UNIT_CLOSED: return PICK(r, closed_bad);
        default: return PICK(r, finite_bad);
        }
    }
    if (chance(r, 40)) { /* a continuous draw */
        switch (kind) {
        case K_NONNEG: return pow(10.0, -12.0 + 14.0 * unif(r));
        case K_UNIT: return unif(r);
        case K_UNIT_CLOSED: return chance(r, 10) ? 1.0 : unif(r);
        default: return 4.0 * unif(r) - 2.0;
        }
    }
    switch (kind) {
    case K_NONNEG: return PICK(r, nonneg_ok);
    case K_UNIT: return PICK(r, unit_ok);
    case K_UNIT_CLOSED: return PICK(r, closed_ok);
    default: return PICK(r, finite_ok);
    }
}

/* Mostly valid sets (to exercise the kernels); some with invalid members. */
static void gen_hyper(uint64_t *r, int rule, hyper *hp)
{
    const int all_valid = chance(r, 80);
    int bad_at = all_valid ? -1 : (int)rint_(r, 0, NH[rule] + 1); /* NH: the step, NH+1: mu_product */
    memset(hp, 0, sizeof *hp);
    for (int k = 0; k < NH[rule]; k++) {
        int valid = all_valid || (k != bad_at && !chance(r, 10));
        hp->h[k] = gen_hyper_value(r, KINDS[rule][k], valid);
    }
    hp->flag = chance(r, 50);
    hp->maximize = chance(r, 30);
    if (rule == R_SGD && hp->flag && all_valid) { /* nesterov: momentum > 0, no dampening */
        if (!(hp->h[1] > 0.0)) hp->h[1] = 0.9;
        hp->h[2] = 0.0;
    }
    if (rule == R_SGD && !hp->flag && chance(r, 30)) hp->h[1] = 0.0; /* plain SGD, no buffer */
    if (rule == R_RMSPROP && chance(r, 40)) hp->h[4] = 0.0;          /* no momentum buffer */
    static const int64_t steps_ok[] = {1, 1, 1, 2, 3, 7, 10, 100, 1000000, 1000000000000ll, INT64_MAX - 3};
    static const int64_t steps_bad[] = {0, -1, -2, INT64_MIN, -1000000};
    const int step_valid = all_valid || (bad_at != NH[rule] && !chance(r, 5));
    hp->step = step_valid ? steps_ok[rint_(r, 0, 10)] : steps_bad[rint_(r, 0, 4)];
    if (step_valid && chance(r, 20)) hp->step = rint_(r, 1, 5000);
    static const double mu_ok[] = {1.0, 1.0, 1.0, 0.0, 0.5, 0.9, 5e-324, 0x1.fffffffffffffp-1};
    static const double mu_bad[] = {0x1.0000000000001p+0, -5e-324, -0.5, 2.0, NAN, INFINITY, -INFINITY};
    const int mu_valid = all_valid || (bad_at != NH[rule] + 1 && !chance(r, 5));
    hp->mu = mu_valid ? PICK(r, mu_ok) : PICK(r, mu_bad);
}

/* prepare's expected result, from the documented ranges. */
static int expect_prepare(int rule, const hyper *hp, int64_t step, double mu)
{
    for (int k = 0; k < NH[rule]; k++)
        if (!ok_kind(KINDS[rule][k], hp->h[k])) return FASTOPT_ERR_HYPER;
    if (rule != R_LION && step < 1) return FASTOPT_ERR_HYPER;
    if (rule == R_SGD && hp->flag && !(hp->h[1] > 0.0 && hp->h[2] == 0.0)) return FASTOPT_ERR_HYPER;
    if (rule == R_NADAM && !ok_kind(K_UNIT_CLOSED, mu)) return FASTOPT_ERR_HYPER;
    return FASTOPT_OK;
}

static int call_prepare(int rule, scalars *out, double *mu, const hyper *hp, int64_t step)
{
    const double *h = hp->h;
    const int f = hp->flag, mx = hp->maximize;
    switch (rule) {
    case R_SGD: return fastopt_sgd_prepare(out ? &out->sgd : NULL, h[0], h[1], h[2], h[3], f, mx, step);
    case R_ADAGRAD: return fastopt_adagrad_prepare(out ? &out->adagrad : NULL, h[0], h[1], h[2], h[3], mx, step);
    case R_RMSPROP:
        return fastopt_rmsprop_prepare(out ? &out->rmsprop : NULL, h[0], h[1], h[2], h[3], h[4], f, mx, step);
    case R_ADADELTA: return fastopt_adadelta_prepare(out ? &out->adadelta : NULL, h[0], h[1], h[2], h[3], mx, step);
    case R_ADAM: return fastopt_adam_prepare(out ? &out->adam : NULL, h[0], h[1], h[2], h[3], h[4], f, mx, step);
    case R_ADAMW: return fastopt_adamw_prepare(out ? &out->adam : NULL, h[0], h[1], h[2], h[3], h[4], f, mx, step);
    case R_ADAMAX: return fastopt_adamax_prepare(out ? &out->adamax : NULL, h[0], h[1], h[2], h[3], h[4], mx, step);
    case R_NADAM:
        return fastopt_nadam_prepare(out ? &out->nadam : NULL, mu, h[0], h[1], h[2], h[3], h[4], h[5], f, mx, step);
    default: return fastopt_lion_prepare(out ? &out->lion : NULL, h[0], h[1], h[2], h[3], mx);
    }
}

/* Same double, or both NaN. */
static int same_d(double a, double b) { return !memcmp(&a, &b, sizeof a) || (isnan(a) && isnan(b)); }

/* The fields the header defines by formula, after a successful prepare. */
static const char *check_fields(int rule, const scalars *s, const hyper *hp, int64_t step, double mu_in,
                                double mu_out)
{
    /* prepare takes -0.0 as +0.0 (as the Python checks do): compare with that. */
    double hn[sizeof hp->h / sizeof hp->h[0]];
    for (size_t k = 0; k < sizeof hn / sizeof hn[0]; k++)
        hn[k] = hp->h[k] + 0.0;
    const double *h = hn, sign = hp->maximize ? -1.0 : 1.0, t = (double)step;
/* torch's lerp(m, g, 1-beta1) switches form at 1-beta1 = 0.5 (rules.py). */
#define EXP_AVG_WEIGHT(b1) ((b1) > 0.5 ? 1.0 - (b1) : -(b1))
#define F(cond, name) \
    if (!(cond)) return name
    switch (rule) {
    case R_SGD:
        F(same_d(s->sgd.lr, h[0]) && same_d(s->sgd.momentum, h[1]) && same_d(s->sgd.weight_decay, h[3]), "sgd copies");
        F(same_d(s->sgd.one_minus_dampening, 1.0 - h[2]), "sgd one_minus_dampening");
        F(s->sgd.grad_sign == sign && s->sgd.nesterov == hp->flag && s->sgd.first_step == (step == 1) &&
              s->sgd.use_momentum == (h[1] != 0.0), "sgd flags");
        break;
    case R_ADAGRAD:
        F(same_d(s->adagrad.clr, h[0] / (1.0 + (double)(step - 1) * h[1])), "adagrad clr");
        F(same_d(s->adagrad.eps, h[3]) && same_d(s->adagrad.weight_decay, h[2]), "adagrad copies");
        F(s->adagrad.grad_sign == sign, "adagrad grad_sign");
        break;
    case R_RMSPROP:
        F(same_d(s->rmsprop.lr, h[0]) && same_d(s->rmsprop.alpha, h[1]) && same_d(s->rmsprop.eps, h[2]) &&
              same_d(s->rmsprop.weight_decay, h[3]) && same_d(s->rmsprop.momentum, h[4]), "rmsprop copies");
        F(same_d(s->rmsprop.one_minus_alpha, 1.0 - h[1]), "rmsprop one_minus_alpha");
        F(s->rmsprop.grad_sign == sign && s->rmsprop.centered == hp->flag &&
              s->rmsprop.use_momentum == (h[4] > 0.0), "rmsprop flags");
        break;
    case R_ADADELTA:
        F(same_d(s->adadelta.lr, h[0]) && same_d(s->adadelta.rho, h[1]) && same_d(s->adadelta.eps, h[2]) &&
              same_d(s->adadelta.weight_decay, h[3]), "adadelta copies");
        F(same_d(s->adadelta.one_minus_rho, 1.0 - h[1]) && s->adadelta.grad_sign == sign, "adadelta derived");
        break;
    case R_ADAM:
    case R_ADAMW: {
        const int dec = rule == R_ADAMW;
        F(same_d(s->adam.beta1, h[1]) && same_d(s->adam.beta2, h[2]) && same_d(s->adam.eps, h[3]), "adam copies");
        F(same_d(s->adam.exp_avg_weight, EXP_AVG_WEIGHT(h[1])) && same_d(s->adam.one_minus_beta2, 1.0 - h[2]) &&
              s->adam.exp_avg_from_end == (h[1] <= 0.5), "adam exp_avg lerp");
        F(same_d(s->adam.step_size, h[0] / (1.0 - pow(h[1], t))), "adam step_size");
        F(same_d(s->adam.bias_correction2_sqrt, sqrt(1.0 - pow(h[2], t))), "adam bias_correction2_sqrt");
        F(same_d(s->adam.weight_decay, dec ? 0.0 : h[4]), "adam weight_decay");
        F(same_d(s->adam.param_decay, dec ? 1.0 - h[0] * h[4] : 1.0), "adam param_decay");
        F(s->adam.grad_sign == sign && s->adam.amsgrad == hp->flag, "adam flags");
        break;
    }
    case R_ADAMAX:
        F(same_d(s->adamax.beta1, h[1]) && same_d(s->adamax.beta2, h[2]) && same_d(s->adamax.eps, h[3]) &&
              same_d(s->adamax.weight_decay, h[4]), "adamax copies");
        F(same_d(s->adamax.exp_avg_weight, EXP_AVG_WEIGHT(h[1])) && s->adamax.exp_avg_from_end == (h[1] <= 0.5),
          "adamax exp_avg lerp");
        F(same_d(s->adamax.clr, h[0] / (1.0 - pow(h[1], t))) && s->adamax.grad_sign == sign, "adamax clr");
        break;
    case R_NADAM: {
        const int dec = hp->flag;
        F(same_d(s->nadam.beta1, h[1]) && same_d(s->nadam.beta2, h[2]) && same_d(s->nadam.eps, h[3]), "nadam copies");
        F(same_d(s->nadam.exp_avg_weight, EXP_AVG_WEIGHT(h[1])) && same_d(s->nadam.one_minus_beta2, 1.0 - h[2]) &&
              s->nadam.exp_avg_from_end == (h[1] <= 0.5), "nadam exp_avg lerp");
        F(same_d(s->nadam.bias_correction2, 1.0 - pow(h[2], t)), "nadam bias_correction2");
        F(same_d(s->nadam.weight_decay, dec ? 0.0 : h[4]), "nadam weight_decay");
        F(same_d(s->nadam.param_decay, dec ? 1.0 - h[0] * h[4] : 1.0), "nadam param_decay");
        F(s->nadam.grad_sign == sign, "nadam grad_sign");
        F(same_d(mu_out, mu_in * (h[1] * (1.0 - 0.5 * pow(0.96, t * h[5])))), "nadam mu_product");
        break;
    }
    default:
        F(same_d(s->lion.lr, h[0]) && same_d(s->lion.beta1, h[1]) && same_d(s->lion.beta2, h[2]), "lion copies");
        F(same_d(s->lion.one_minus_beta1, 1.0 - h[1]) && same_d(s->lion.one_minus_beta2, 1.0 - h[2]),
          "lion one_minus_beta");
        F(same_d(s->lion.param_decay, 1.0 - h[0] * h[3]) && s->lion.grad_sign == sign, "lion param_decay");
        break;
    }
#undef F
#undef EXP_AVG_WEIGHT
    return NULL;
}

/* Scalars filled by hand, with arbitrary values (flags 0 or 1). */
static double raw_value(uint64_t *r)
{
    static const double v[] = {0.0, -0.0, 1.0, -1.0, 0.5, 0.9, 0.999, 1e-3, 1e-8, 2.0, 1e30, -1e30, 1e300,
                               DBL_MAX, 5e-324, 1e-40, INFINITY, -INFINITY, NAN};
    return chance(r, 30) ? 4.0 * unif(r) - 2.0 : PICK(r, v);
}
static void raw_scalars(uint64_t *r, int rule, scalars *s)
{
    memset(s, 0, sizeof *s);
#define RV raw_value(r)
#define SIGN (chance(r, 85) ? (chance(r, 50) ? 1.0 : -1.0) : RV)
#define BIT ((int)(next64(r) & 1))
    switch (rule) {
    case R_SGD: {
        fastopt_sgd_scalars x = {RV, chance(r, 30) ? 0.0 : RV, RV, chance(r, 40) ? 0.0 : RV, SIGN, BIT, BIT, 0};
        x.use_momentum = x.momentum != 0; /* the buffer is passed exactly when momentum != 0 */
        s->sgd = x;
        break;
    }
    case R_ADAGRAD: {
        fastopt_adagrad_scalars x = {RV, RV, chance(r, 40) ? 0.0 : RV, SIGN};
        s->adagrad = x;
        break;
    }
    case R_RMSPROP: {
        fastopt_rmsprop_scalars x = {RV, RV, RV, RV, chance(r, 40) ? 0.0 : RV, RV, SIGN, RV, BIT, BIT, BIT};
        s->rmsprop = x;
        break;
    }
    case R_ADADELTA: {
        fastopt_adadelta_scalars x = {RV, RV, RV, RV, chance(r, 40) ? 0.0 : RV, SIGN};
        s->adadelta = x;
        break;
    }
    case R_ADAM:
    case R_ADAMW: {
        fastopt_adam_scalars x = {RV, RV, RV, RV, RV, RV, RV, chance(r, 40) ? 0.0 : RV, chance(r, 40) ? 1.0 : RV,
                                  SIGN, BIT, BIT};
        s->adam = x;
        break;
    }
    case R_ADAMAX: {
        fastopt_adamax_scalars x = {RV, RV, RV, RV, RV, chance(r, 40) ? 0.0 : RV, SIGN, BIT};
        s->adamax = x;
        break;
    }
    case R_NADAM: {
        fastopt_nadam_scalars x = {RV, RV, RV, RV, RV, RV, RV, RV, chance(r, 40) ? 0.0 : RV,
                                   chance(r, 40) ? 1.0 : RV, SIGN, BIT};
        s->nadam = x;
        break;
    }
    default: {
        fastopt_lion_scalars x = {RV, RV, RV, RV, RV, chance(r, 40) ? 1.0 : RV, SIGN};
        s->lion = x;
        break;
    }
    }
#undef RV
#undef SIGN
#undef BIT
}

/* Which state buffers the kernel needs, from the scalars (bit k: s_k). */
static unsigned need_mask(int rule, const scalars *s)
{
    switch (rule) {
    case R_SGD: return s->sgd.momentum != 0 ? 1u : 0u;
    case R_RMSPROP: return 1u | (s->rmsprop.use_momentum ? 2u : 0u) | (s->rmsprop.centered ? 4u : 0u);
    case R_ADAM:
    case R_ADAMW: return s->adam.amsgrad ? 7u : 3u;
    default: return (1u << NSTATE[rule]) - 1u;
    }
}

/* ---- calling the library and the reference ------------------------------ */

#define CALL_LIB(SFX, T)                                                                                   \
    static int FO_T_CAT(call_lib, SFX)(int rule, T *p, const T *g, T *const *st, int64_t n,              \
                                       const scalars *s, int null_s)                                      \
    {                                                                                                      \
        switch (rule) {                                                                                    \
        case R_SGD: return FO_T_CAT(fastopt_sgd, SFX)(p, g, st[0], n, null_s ? NULL : &s->sgd);           \
        case R_ADAGRAD: return FO_T_CAT(fastopt_adagrad, SFX)(p, g, st[0], n, null_s ? NULL : &s->adagrad); \
        case R_RMSPROP:                                                                                    \
            return FO_T_CAT(fastopt_rmsprop, SFX)(p, g, st[0], st[1], st[2], n, null_s ? NULL : &s->rmsprop); \
        case R_ADADELTA:                                                                                   \
            return FO_T_CAT(fastopt_adadelta, SFX)(p, g, st[0], st[1], n, null_s ? NULL : &s->adadelta);  \
        case R_ADAM: return FO_T_CAT(fastopt_adam, SFX)(p, g, st[0], st[1], st[2], n, null_s ? NULL : &s->adam); \
        case R_ADAMW:                                                                                      \
            return FO_T_CAT(fastopt_adamw, SFX)(p, g, st[0], st[1], st[2], n, null_s ? NULL : &s->adam);  \
        case R_ADAMAX: return FO_T_CAT(fastopt_adamax, SFX)(p, g, st[0], st[1], n, null_s ? NULL : &s->adamax); \
        case R_NADAM: return FO_T_CAT(fastopt_nadam, SFX)(p, g, st[0], st[1], n, null_s ? NULL : &s->nadam); \
        default: return FO_T_CAT(fastopt_lion, SFX)(p, g, st[0], n, null_s ? NULL : &s->lion);            \
        }                                                                                                  \
    }                                                                                                      \
    static void FO_T_CAT(call_ref, SFX)(int rule, T *p, const T *g, T *const *st, int64_t n, const scalars *s) \
    {                                                                                                      \
        switch (rule) {                                                                                    \
        case R_SGD: FO_T_CAT(ref_sgd_, SFX)(p, g, st[0], n, &s->sgd); break;                               \
        case R_ADAGRAD: FO_T_CAT(ref_adagrad_, SFX)(p, g, st[0], n, &s->adagrad); break;                   \
        case R_RMSPROP: FO_T_CAT(ref_rmsprop_, SFX)(p, g, st[0], st[1], st[2], n, &s->rmsprop); break;     \
        case R_ADADELTA: FO_T_CAT(ref_adadelta_, SFX)(p, g, st[0], st[1], n, &s->adadelta); break;         \
        case R_ADAM:                                                                                       \
        case R_ADAMW: FO_T_CAT(ref_adam_, SFX)(p, g, st[0], st[1], st[2], n, &s->adam); break;             \
        case R_ADAMAX: FO_T_CAT(ref_adamax_, SFX)(p, g, st[0], st[1], n, &s->adamax); break;               \
        case R_NADAM: FO_T_CAT(ref_nadam_, SFX)(p, g, st[0], st[1], n, &s->nadam); break;                  \
        default: FO_T_CAT(ref_lion_, SFX)(p, g, st[0], n, &s->lion); break;                                \
        }                                                                                                  \
    }
CALL_LIB(_f32, float)
CALL_LIB(_f64, double)

/* ---- buffers -------------------------------------------------------------- */

/* One library-side buffer: either exactly n elements from malloc (ASan sees
 * any access past either end), or n elements at an offset of `pre` elements
 * inside a larger block, with canary elements before and after. */
typedef struct {
    unsigned char *base; /* the allocation */
    size_t pre, post;    /* canary elements before and after (0, 0: exact) */
    void *ptr;           /* what the kernel gets (NULL when passed as NULL) */
} fbuf;

static const unsigned char CANARY[4] = {0xA5, 0x5A, 0xC3, 0x3C};

static void fbuf_alloc(fbuf *b, uint64_t *r, int64_t n, size_t es)
{
    if (chance(r, 50)) {
        b->pre = b->post = 0;
    } else {
        b->pre = (size_t)rint_(r, 0, 31);
        b->post = (size_t)rint_(r, b->pre ? 0 : 1, 16);
    }
    size_t bytes = (b->pre + (size_t)n + b->post) * es;
    b->base = malloc(bytes ? bytes : 1);
    if (!b->base) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    for (size_t i = 0; i < b->pre * es; i++) b->base[i] = CANARY[i & 3];
    for (size_t i = 0; i < b->post * es; i++) b->base[(b->pre + (size_t)n) * es + i] = CANARY[i & 3];
    b->ptr = b->base + b->pre * es;
}

static int fbuf_guards_ok(const fbuf *b, int64_t n, size_t es)
{
    for (size_t i = 0; i < b->pre * es; i++)
        if (b->base[i] != CANARY[i & 3]) return 0;
    for (size_t i = 0; i < b->post * es; i++)
        if (b->base[(b->pre + (size_t)n) * es + i] != CANARY[i & 3]) return 0;
    return 1;
}

static double special_value(uint64_t *r, int dt)
{
    static const double f32s[] = {0.0, -0.0, 1.0, -1.0, FLT_MIN, -FLT_MIN, 1e-40, -1e-40, 1.4e-45, -1.4e-45,
                                  FLT_MAX, -FLT_MAX, 1e30, -1e30, 1e20, INFINITY, -INFINITY, NAN, -NAN};
    static const double f64s[] = {0.0, -0.0, 1.0, -1.0, DBL_MIN, -DBL_MIN, 1e-310, -1e-310, 5e-324, -5e-324,
                                  DBL_MAX, -DBL_MAX, 1e300, -1e300, 1e160, INFINITY, -INFINITY, NAN, -NAN};
    return dt ? PICK(r, f64s) : PICK(r, f32s);
}

/* A NaN with a payload (quiet or signaling), as raw bits. */
static void put_nan_payload(uint64_t *r, int dt, void *buf, int64_t i)
{
    if (dt) {
        uint64_t bits = 0x7FF0000000000000ull | (next64(r) & 0x800FFFFFFFFFFFFFull);
        if (!(bits & 0x000FFFFFFFFFFFFFull)) bits |= 1;
        memcpy((double *)buf + i, &bits, 8);
    } else {
        uint32_t bits = 0x7F800000u | ((uint32_t)next64(r) & 0x807FFFFFu);
        if (!(bits & 0x007FFFFFu)) bits |= 1;
        memcpy((float *)buf + i, &bits, 4);
    }
}

static void put(int dt, void *buf, int64_t i, double v)
{
    if (dt)
        ((double *)buf)[i] = v;
    else
        ((float *)buf)[i] = (float)v; /* out-of-range doubles are never drawn for f32 but +-inf */
}

/* Values: one of several distributions per buffer, salted with specials. */
static void fill_values(uint64_t *r, int dt, void *buf, int64_t n)
{
    const int dist = (int)rint_(r, 0, 5), salt = (int)rint_(r, 0, 3);
    const int emin = dt ? -320 : -45, emax = dt ? 307 : 37;
    const double konst = special_value(r, dt);
    for (int64_t i = 0; i < n; i++) {
        double v;
        switch (dist) {
        case 0: v = 2.0 * unif(r) - 1.0; break;
        case 1: v = (next64(r) & 1 ? -1.0 : 1.0) * pow(10.0, (double)rint_(r, emin, emax) + unif(r)); break;
        case 2: v = 0.0; break;
        case 3: v = unif(r); break;
        case 4: v = (double)rint_(r, -2, 2); break;
        default: v = konst; break;
        }
        if (!dt && fabs(v) > FLT_MAX && isfinite(v)) v = v > 0 ? FLT_MAX : -FLT_MAX;
        put(dt, buf, i, v);
        /* salt: none, 1 in 64, 1 in 8, 1 in 2 */
        if (salt && (next64(r) % (salt == 1 ? 64 : salt == 2 ? 8 : 2)) == 0) {
            if (chance(r, 10))
                put_nan_payload(r, dt, buf, i);
            else
                put(dt, buf, i, special_value(r, dt));
        }
    }
}

/* Bitwise equal, or both NaN; returns the first differing index or -1. */
static int64_t first_diff(int dt, const void *a, const void *b, int64_t n)
{
    if (n <= 0 || !memcmp(a, b, (size_t)n * (dt ? 8 : 4))) return -1;
    for (int64_t i = 0; i < n; i++) {
        if (dt) {
            double x = ((const double *)a)[i], y = ((const double *)b)[i];
            if (memcmp(&x, &y, 8) && !(isnan(x) && isnan(y))) return i;
        } else {
            float x = ((const float *)a)[i], y = ((const float *)b)[i];
            if (memcmp(&x, &y, 4) && !(isnan(x) && isnan(y))) return i;
        }
    }
    return -1;
}

static double get(int dt, const void *buf, int64_t i)
{
    return dt ? ((const double *)buf)[i] : (double)((const float *)buf)[i];
}

/* ---- one case ------------------------------------------------------------- */

typedef struct {
    long cases, steps, calls, error_cases, thread_pairs, raw_cases, mismatches;
    long elements;
} counts;

static uint64_t g_seed;
static int g_verbose;

#define NBUF 5 /* param, grad, s0, s1, s2 */
static const char *const BUF_NAME[NBUF] = {"param", "grad", "state0", "state1", "state2"};

static int64_t gen_length(uint64_t *r)
{
    const int c = (int)rint_(r, 0, 99);
    if (c < 4) return 0;
    if (c < 50) return rint_(r, 1, 67);
    if (c < 70) {
        static const int64_t w[] = {4, 8, 16, 32, 64};
        int64_t n = w[rint_(r, 0, 4)] * rint_(r, 1, 8) + rint_(r, -3, 3);
        return n < 1 ? 1 : n;
    }
    if (c < 90) return rint_(r, 68, 4096);
    /* past the one-thread threshold (64 KiB of param per thread) */
    return rint_(r, 8192, 120000);
}

static void report(counts *ct, uint64_t iter, int rule, int dt, int64_t n, int64_t step, int threads,
                   const char *what)
{
    ct->mismatches++;
    if (ct->mismatches <= 20)
        printf("MISMATCH seed %llu case %llu: %s %s n=%lld step=%lld threads=%d isa=%s: %s\n",
               (unsigned long long)g_seed, (unsigned long long)iter, RULE_NAME[rule], dt ? "f64" : "f32",
               (long long)n, (long long)step, threads, fastopt_isa(), what);
}

static int call_lib(int dt, int rule, void *const *b, int64_t n, const scalars *s, int null_s)
{
    if (dt)
        return call_lib_f64(rule, (double *)b[0], (const double *)b[1], (double *const *)(b + 2), n, s, null_s);
    return call_lib_f32(rule, (float *)b[0], (const float *)b[1], (float *const *)(b + 2), n, s, null_s);
}

static void run_case(uint64_t iter, counts *ct)
{
    uint64_t r = g_seed * 0x9E3779B97F4A7C15ull ^ (iter + 1) * 0xD1B54A32D192ED03ull;
    next64(&r);
    const int rule = (int)rint_(&r, 0, R_N - 1), dt = (int)rint_(&r, 0, 1);
    const size_t es = dt ? 8 : 4;
    const int64_t n = gen_length(&r);
    const int large = n >= 8192;
    const int raw = chance(&r, 12);
    hyper hp;
    gen_hyper(&r, rule, &hp);
    int nsteps = (int)rint_(&r, 1, large ? 2 : 4);
    const long mism0 = ct->mismatches;

    /* Library buffers (fbuf) and the reference's plain copies. */
    fbuf lb[NBUF];
    void *ref[NBUF];
    unsigned char *snap[NBUF];
    const size_t nbytes = (size_t)n * es;
    for (int k = 0; k < NBUF; k++) {
        fbuf_alloc(&lb[k], &r, n, es);
        ref[k] = malloc(nbytes ? nbytes : 1);
        snap[k] = malloc((lb[k].pre + (size_t)n + lb[k].post) * es + 1);
        if (!ref[k] || !snap[k]) exit(2);
        if (k != 1) fill_values(&r, dt, lb[k].ptr, n);
        if (n) memcpy(ref[k], lb[k].ptr, nbytes);
        /* n == 0: nothing may be touched, so NULL is allowed for every buffer */
        if (n == 0 && chance(&r, 50)) lb[k].ptr = NULL;
    }
    for (int k = 2 + NSTATE[rule]; k < NBUF; k++) lb[k].ptr = NULL; /* the rule has no such buffer */

    scalars s;
    double mu = hp.mu;
    unsigned need = 0, pass_unneeded = 0;
    for (int t = 0; t < nsteps && ct->mismatches == mism0; t++) {
        if (hp.step > INT64_MAX - t) break;
        const int64_t step = hp.step + t;
        ct->steps++;
        fill_values(&r, dt, lb[1].ptr ? lb[1].ptr : ref[1], n);
        if (n && lb[1].ptr) memcpy(ref[1], lb[1].ptr, nbytes);

        /* prepare */
        if (raw) {
            if (t == 0) raw_scalars(&r, rule, &s), ct->raw_cases++;
        } else {
            if (chance(&r, 5)) { /* NULL out / NULL mu_product */
                double mu_before = mu;
                const int null_mu = rule == R_NADAM && chance(&r, 50);
                int rc = call_prepare(rule, null_mu ? &s : NULL, null_mu ? NULL : &mu, &hp, step);
                ct->error_cases++;
                if (rc != FASTOPT_ERR_NULL) report(ct, iter, rule, dt, n, step, 0, "prepare with a NULL pointer");
                if (!same_d(mu, mu_before)) report(ct, iter, rule, dt, n, step, 0, "prepare(NULL) wrote mu_product");
            }
            scalars before;
            memset(&s, 0x5A, sizeof s);
            before = s;
            const double mu_in = mu;
            const int want = expect_prepare(rule, &hp, step, mu);
            const int rc = call_prepare(rule, &s, &mu, &hp, step);
            if (rc != want) {
                char msg[160];
                snprintf(msg, sizeof msg, "prepare returned %d, expected %d (h = %g %g %g %g %g %g, mu %g)", rc, want,
                         hp.h[0], hp.h[1], hp.h[2], hp.h[3], hp.h[4], hp.h[5], mu_in);
                report(ct, iter, rule, dt, n, step, 0, msg);
                break;
            }
            if (rc != FASTOPT_OK) {
                ct->error_cases++;
                if (memcmp(&s, &before, sizeof s)) report(ct, iter, rule, dt, n, step, 0, "prepare wrote *out on error");
                if (!same_d(mu, mu_in)) report(ct, iter, rule, dt, n, step, 0, "prepare wrote mu_product on error");
                break;
            }
            const char *bad = check_fields(rule, &s, &hp, step, mu_in, mu);
            if (bad) {
                report(ct, iter, rule, dt, n, step, 0, bad);
                break;
            }
        }
        if (t == 0) {
            /* An optional buffer the options leave unused: NULL, or a buffer
             * that must come back untouched. */
            need = need_mask(rule, &s);
            for (int k = 0; k < NSTATE[rule]; k++)
                if (!(need >> k & 1u) && n > 0 && chance(&r, 50)) pass_unneeded |= 1u << k;
            for (int k = 0; k < NSTATE[rule]; k++)
                if (!(need >> k & 1u) && !(pass_unneeded >> k & 1u)) lb[2 + k].ptr = NULL;
        }
        void *args[NBUF];
        for (int k = 0; k < NBUF; k++) args[k] = lb[k].ptr;
        for (int k = 0; k < NBUF; k++) memcpy(snap[k], lb[k].base, (lb[k].pre + (size_t)n + lb[k].post) * es);

        /* An error path: the documented code, and not a byte written. */
        if (chance(&r, 25)) {
            void *eargs[NBUF];
            memcpy(eargs, args, sizeof eargs);
            int64_t en = n;
            int null_s = 0, want, want2 = 1; /* want2: a second acceptable code */
            const int kind = (int)rint_(&r, 0, 3);
            if (kind == 0) {
                null_s = 1, want = FASTOPT_ERR_NULL;
                /* both errors at once: the header gives no precedence */
                if (chance(&r, 30)) en = -rint_(&r, 1, 100), want2 = FASTOPT_ERR_LENGTH;
            } else if (kind == 1 || n == 0) {
                en = chance(&r, 20) ? INT64_MIN : -rint_(&r, 1, 1000);
                want = FASTOPT_ERR_LENGTH;
            } else {
                /* a NULL required buffer: param, grad or a needed state */
                int cand[NBUF], nc = 0;
                cand[nc++] = 0, cand[nc++] = 1;
                for (int k = 0; k < NSTATE[rule]; k++)
                    if (need >> k & 1u) cand[nc++] = 2 + k;
                eargs[cand[rint_(&r, 0, nc - 1)]] = NULL;
                if (chance(&r, 20)) eargs[cand[rint_(&r, 0, nc - 1)]] = NULL;
                want = FASTOPT_ERR_NULL;
            }
            const int rc = call_lib(dt, rule, eargs, en, &s, null_s);
            ct->error_cases++;
            if (rc != want && rc != want2) {
                char msg[96];
                snprintf(msg, sizeof msg, "error path (kind %d, n %lld) returned %d, expected %d", kind,
                         (long long)en, rc, want);
                report(ct, iter, rule, dt, n, step, 0, msg);
            }
            for (int k = 0; k < NBUF; k++)
                if (memcmp(snap[k], lb[k].base, (lb[k].pre + (size_t)n + lb[k].post) * es)) {
                    char msg[64];
                    snprintf(msg, sizeof msg, "error path wrote %s", BUF_NAME[k]);
                    report(ct, iter, rule, dt, n, step, 0, msg);
                }
        }

        /* The reference step. */
        {
            void *rst[3] = {ref[2], ref[3], ref[4]};
            if (dt)
                call_ref_f64(rule, ref[0], ref[1], (double *const *)rst, n, &s);
            else
                call_ref_f32(rule, ref[0], ref[1], (float *const *)rst, n, &s);
        }

        /* The library step, on one or two thread counts. */
        const int pair = large || chance(&r, 10);
        int tc[2] = {(int)rint_(&r, 0, 3), 0};
        if (pair) tc[0] = 1, tc[1] = (int)rint_(&r, 2, 4), ct->thread_pairs++;
        for (int run = 0; run < (pair ? 2 : 1); run++) {
            if (run)
                for (int k = 0; k < NBUF; k++)
                    memcpy(lb[k].base, snap[k], (lb[k].pre + (size_t)n + lb[k].post) * es);
            fastopt_set_num_threads(tc[run]);
            const int rc = call_lib(dt, rule, args, n, &s, 0);
            if (rc != FASTOPT_OK) {
                char msg[64];
                snprintf(msg, sizeof msg, "valid call returned %d", rc);
                report(ct, iter, rule, dt, n, step, tc[run], msg);
                break;
            }
            for (int k = 0; k < NBUF; k++) {
                char msg[200];
                if (!fbuf_guards_ok(&lb[k], n, es)) {
                    snprintf(msg, sizeof msg, "wrote outside %s (offset %zu, %zu after)", BUF_NAME[k], lb[k].pre,
                             lb[k].post);
                    report(ct, iter, rule, dt, n, step, tc[run], msg);
                }
                if (!args[k] || n == 0) continue;
                const int unused = k >= 2 && (k - 2 >= NSTATE[rule] || !(need >> (k - 2) & 1u));
                if (k == 1 || unused) { /* grad, unused state: bytes unchanged */
                    if (memcmp(args[k], snap[k] + lb[k].pre * es, nbytes)) {
                        snprintf(msg, sizeof msg, "%s written (%s)", BUF_NAME[k], k == 1 ? "read-only" : "unused");
                        report(ct, iter, rule, dt, n, step, tc[run], msg);
                    }
                    continue;
                }
                int64_t i = first_diff(dt, args[k], ref[k], n);
                if (i >= 0) {
                    snprintf(msg, sizeof msg, "%s[%lld] = %a, reference %a (offset %zu)", BUF_NAME[k], (long long)i,
                             get(dt, args[k], i), get(dt, ref[k], i), lb[k].pre);
                    report(ct, iter, rule, dt, n, step, tc[run], msg);
                }
            }
            ct->calls++;
            ct->elements += n;
        }
    }
    if (g_verbose || ct->mismatches != mism0)
        printf("case %llu: %s %s n=%lld steps=%d step0=%lld%s\n", (unsigned long long)iter, RULE_NAME[rule],
               dt ? "f64" : "f32", (long long)n, nsteps, (long long)hp.step, raw ? " raw scalars" : "");
    for (int k = 0; k < NBUF; k++) free(lb[k].base), free(ref[k]), free(snap[k]);
    ct->cases++;
}

int main(int argc, char **argv)
{
    const char *e;
    long iters = (e = getenv("FASTOPT_FUZZ_ITERS")) ? atol(e) : 4000;
    g_seed = (e = getenv("FASTOPT_FUZZ_SEED")) ? strtoull(e, NULL, 0) : 1;
    long only = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--iters") && i + 1 < argc)
            iters = atol(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            g_seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--case") && i + 1 < argc)
            only = atol(argv[++i]);
        else if (!strcmp(argv[i], "--verbose"))
            g_verbose = 1;
        else {
            fprintf(stderr, "usage: %s [--iters N] [--seed S] [--case I] [--verbose]\n", argv[0]);
            return 2;
        }
    }
    const char *want = getenv("FASTOPT_ISA");
    printf("fastopt %s fuzz: seed %llu, CPU path %s (FASTOPT_ISA=%s), %d threads by default\n", fastopt_version(),
           (unsigned long long)g_seed, fastopt_isa(), want ? want : "", fastopt_get_num_threads());
    if (want && strcmp(want, fastopt_isa()))
        printf("note: FASTOPT_ISA=%s is not supported here; fuzzing %s\n", want, fastopt_isa());
    counts ct;
    memset(&ct, 0, sizeof ct);
    if (only >= 0)
        run_case((uint64_t)only, &ct);
    else
        for (long i = 0; i < iters; i++) run_case((uint64_t)i, &ct);
    fastopt_set_num_threads(0);
    printf("%ld cases (%ld steps, %ld kernel calls compared over %ld elements, %ld steps on two thread counts, "
           "%ld cases with hand-filled scalars), %ld error-path cases, %ld mismatches\n",
           ct.cases, ct.steps, ct.calls, ct.elements, ct.thread_pairs, ct.raw_cases, ct.error_cases, ct.mismatches);
    return ct.mismatches != 0;
}
