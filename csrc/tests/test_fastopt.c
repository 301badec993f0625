/* C unit tests of the fastopt library (ctest runs them once per CPU path:
 * FASTOPT_ISA=baseline, avx2, avx512; see CMakeLists.txt).
 *   - every rule and option, f32 and f64, odd sizes, against the plain scalar
 *     loops of reference.inc, bitwise, including NaN/Inf gradients;
 *   - known values of the first step;
 *   - bitwise the same result on 1 and 2 threads;
 *   - argument errors and prepare's range checks;
 *   - every rule of the generated table (rules_table.inc, RAdam included),
 *     every flag combination: list calls equal flat calls bitwise, f32 and
 *     f64, on 1 and 2 threads;
 *   - flush denormals (fastopt_set_flush_denormal): every rule and flag
 *     combination, f32 and f64, 1 and 2 threads, flat and list calls, equals
 *     the flush-off result with each stored value flushed, bitwise; the other
 *     tests run with it off (after it was on), so off is today's kernels. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"

#define FO_T_CAT_(a, b) a##b
#define FO_T_CAT(a, b) FO_T_CAT_(a, b)
#define FO_T_STR_(x) #x
#define FO_T_STR(x) FO_T_STR_(x)

enum { FO_T_SGD, FO_T_ADAGRAD, FO_T_RMSPROP, FO_T_ADADELTA, FO_T_ADAM, FO_T_ADAMW, FO_T_ADAMAX,
       FO_T_NADAM, FO_T_LION };

/* h: hyperparameters in the order of the rule's prepare function; f[0]: the
 * rule's option flag (nesterov, centered, amsgrad, decoupled), f[2]: maximize. */
typedef struct {
    const char *name;
    int rule;
    double h[6];
    int f[3];
} tcase;

static const tcase CASES[] = {
    /* lr, momentum, dampening, weight_decay | nesterov, -, maximize */
    {"sgd", FO_T_SGD, {0.1, 0, 0, 0}, {0, 0, 0}},
    {"sgd momentum", FO_T_SGD, {0.1, 0.9, 0, 0}, {0, 0, 0}},
    {"sgd dampening", FO_T_SGD, {0.1, 0.9, 0.3, 0}, {0, 0, 0}},
    {"sgd nesterov wd maximize", FO_T_SGD, {0.1, 0.9, 0, 0.01}, {1, 0, 1}},
    {"sgd wd", FO_T_SGD, {0.05, 0, 0, 0.1}, {0, 0, 0}},
    /* lr, lr_decay, weight_decay, eps */
    {"adagrad", FO_T_ADAGRAD, {1e-2, 0, 0, 1e-10}, {0, 0, 0}},
    {"adagrad decay wd maximize", FO_T_ADAGRAD, {0.1, 0.05, 0.1, 1e-6}, {0, 0, 1}},
    /* lr, alpha, eps, weight_decay, momentum | centered */
    {"rmsprop", FO_T_RMSPROP, {1e-2, 0.99, 1e-8, 0, 0}, {0, 0, 0}},
    {"rmsprop centered", FO_T_RMSPROP, {1e-2, 0.99, 1e-8, 0, 0}, {1, 0, 0}},
    {"rmsprop momentum", FO_T_RMSPROP, {1e-2, 0.99, 1e-8, 0, 0.9}, {0, 0, 0}},
    {"rmsprop centered momentum wd maximize", FO_T_RMSPROP, {1e-2, 0.9, 1e-6, 0.01, 0.5}, {1, 0, 1}},
    /* lr, rho, eps, weight_decay */
    {"adadelta", FO_T_ADADELTA, {1.0, 0.9, 1e-6, 0}, {0, 0, 0}},
    {"adadelta wd maximize", FO_T_ADADELTA, {0.5, 0.5, 1e-4, 0.1}, {0, 0, 1}},
    /* lr, beta1, beta2, eps, weight_decay | amsgrad */
    {"adam", FO_T_ADAM, {1e-3, 0.9, 0.999, 1e-8, 0}, {0, 0, 0}},
    {"adam amsgrad wd maximize", FO_T_ADAM, {1e-2, 0.9, 0.999, 1e-8, 0.05}, {1, 0, 1}},
    {"adamw", FO_T_ADAMW, {1e-3, 0.9, 0.999, 1e-8, 1e-2}, {0, 0, 0}},
    {"adamw amsgrad", FO_T_ADAMW, {1e-2, 0.8, 0.99, 1e-6, 0.1}, {1, 0, 0}},
    /* lr, beta1, beta2, eps, weight_decay */
    {"adamax", FO_T_ADAMAX, {2e-3, 0.9, 0.999, 1e-8, 0}, {0, 0, 0}},
    {"adamax wd maximize", FO_T_ADAMAX, {1e-2, 0.8, 0.99, 1e-6, 0.1}, {0, 0, 1}},
    /* lr, beta1, beta2, eps, weight_decay, momentum_decay | decoupled */
    {"nadam", FO_T_NADAM, {2e-3, 0.9, 0.999, 1e-8, 0, 4e-3}, {0, 0, 0}},
    {"nadam wd", FO_T_NADAM, {2e-3, 0.9, 0.999, 1e-8, 0.1, 4e-3}, {0, 0, 0}},
    {"nadam decoupled maximize", FO_T_NADAM, {1e-2, 0.8, 0.99, 1e-6, 0.1, 0.01}, {1, 0, 1}},
    /* lr, beta1, beta2, weight_decay */
    {"lion", FO_T_LION, {1e-4, 0.9, 0.99, 0}, {0, 0, 0}},
    {"lion wd maximize", FO_T_LION, {1e-3, 0.95, 0.98, 0.1}, {0, 0, 1}},
};
#define NCASES ((int)(sizeof(CASES) / sizeof(CASES[0])))

static const double SPECIALS[] = {NAN, INFINITY, -INFINITY, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-45};
#define NSPECIALS ((int64_t)(sizeof(SPECIALS) / sizeof(SPECIALS[0])))

/* Uniform in [-1, 1): xorshift64*. */
static double uniform(uint64_t *s)
{
    *s ^= *s >> 12, *s ^= *s << 25, *s ^= *s >> 27;
    return (double)((*s * 2685821657736338717ull) >> 11) * 0x1.0p-52 - 1.0;
}

#include "reference_both.inc"
#include "rules_table.inc"

static int failures;
#define CHECK(cond, ...)                             \
    do {                                             \
        if (!(cond)) {                               \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);                     \
            printf("\n");                            \
            failures++;                              \
        }                                            \
    } while (0)

static void test_matrix(void)
{
    static const int64_t sizes[] = {0, 1, 3, 17, 1000, 100003};
    for (int c = 0; c < NCASES; c++)
        for (int k = 0; k < (int)(sizeof(sizes) / sizeof(sizes[0])); k++)
            for (int specials = 0; specials < 2; specials++) {
                failures += run_case__f32(&CASES[c], sizes[k], 5, specials);
                failures += run_case__f64(&CASES[c], sizes[k], 5, specials);
            }
}

/* Large enough to be split over threads; the split must not change a bit. */
static void test_threads(void)
{
    const int64_t n = 300007;
    for (int c = 0; c < NCASES; c++) {
        fastopt_set_num_threads(1);
        failures += run_case__f32(&CASES[c], n, 2, 1);
        fastopt_set_num_threads(2);
        failures += run_case__f32(&CASES[c], n, 2, 1);
        failures += run_case__f64(&CASES[c], n, 2, 1);
    }
    /* The same buffers on 1, 2 and 3 threads, compared with each other. */
    float *out[3];
    for (int r = 0; r < 3; r++) {
        float *p = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float));
        float *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
        uint64_t rng = 42;
        for (int64_t i = 0; i < n; i++) p[i] = (float)uniform(&rng), g[i] = (float)uniform(&rng);
        fastopt_set_num_threads(r + 1);
        fastopt_adam_scalars s;
        for (int t = 1; t <= 3; t++) {
            fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 0, 0, t);
            CHECK(fastopt_adamw_f32(p, g, m, v, NULL, n, &s) == FASTOPT_OK, "adamw threads");
        }
        out[r] = p;
        free(g), free(m), free(v);
    }
    CHECK(!memcmp(out[0], out[1], n * sizeof(float)) && !memcmp(out[0], out[2], n * sizeof(float)),
          "adamw differs across thread counts");
    for (int r = 0; r < 3; r++) free(out[r]);
    fastopt_set_num_threads(0);
}

#define CLOSE(a, b) (fabs((a) - (b)) <= 1e-12 * fabs(b) + 1e-300)

/* First steps whose results are known in closed form. */
static void test_known_values(void)
{
    /* SGD: p - lr*g. */
    {
        double p[2] = {1.0, -2.0}, g[2] = {0.5, -4.0};
        fastopt_sgd_scalars s;
        fastopt_sgd_prepare(&s, 0.1, 0, 0, 0, 0, 0, 1);
        fastopt_sgd_f64(p, g, NULL, 2, &s);
        CHECK(CLOSE(p[0], 0.95) && CLOSE(p[1], -1.6), "sgd known values: %g %g", p[0], p[1]);
    }
    /* Adam's first step moves each parameter by lr * g/(|g| + eps*sqrt(1-b2)):
     * about lr*sign(g). AdamW also decays p by 1 - lr*wd first. */
    {
        double p[2] = {1.0, 1.0}, g[2] = {0.5, -0.25}, m[2] = {0}, v[2] = {0};
        const double lr = 1e-3, eps = 1e-8, wd = 0.1;
        fastopt_adam_scalars s;
        fastopt_adamw_prepare(&s, lr, 0.9, 0.999, eps, wd, 0, 0, 1);
        fastopt_adamw_f64(p, g, m, v, NULL, 2, &s);
        const double q = 1.0 - lr * wd;
        CHECK(fabs(p[0] - (q - lr * 0.5 / (0.5 + eps))) < 1e-15, "adamw known value %.17g", p[0]);
        CHECK(fabs(p[1] - (q + lr * 0.25 / (0.25 + eps))) < 1e-15, "adamw known value %.17g", p[1]);
        CHECK(CLOSE(m[0], 0.05) && CLOSE(v[0], 0.001 * 0.25), "adam moments %g %g", m[0], v[0]);
    }
    /* AdaGrad's first step: lr*g/(|g| + eps). */
    {
        double p = 0.0, g = 2.0, sum = 0.0;
        fastopt_adagrad_scalars s;
        fastopt_adagrad_prepare(&s, 0.5, 0.0, 0.0, 1e-10, 0, 1);
        fastopt_adagrad_f64(&p, &g, &sum, 1, &s);
        CHECK(CLOSE(sum, 4.0) && fabs(p + 0.5 * 2.0 / (2.0 + 1e-10)) < 1e-15, "adagrad %g", p);
    }
    /* Adamax's first step: lr*g/(|g| + eps) too (u = |g| + eps, clr = lr/(1-b1)). */
    {
        double p = 0.0, g = -3.0, m = 0.0, u = 0.0;
        fastopt_adamax_scalars s;
        fastopt_adamax_prepare(&s, 0.01, 0.9, 0.999, 1e-8, 0.0, 0, 1);
        fastopt_adamax_f64(&p, &g, &m, &u, 1, &s);
        CHECK(CLOSE(u, 3.0 + 1e-8) && fabs(p - 0.01 * 3.0 / (3.0 + 1e-8)) < 1e-15, "adamax %g", p);
    }
    /* Lion: p*(1-lr*wd) - lr*sign(c), sign(0) = 0; maximize flips it. */
    {
        float p[3] = {1.0f, 1.0f, 1.0f}, g[3] = {2.0f, -2.0f, 0.0f}, m[3] = {0};
        fastopt_lion_scalars s;
        fastopt_lion_prepare(&s, 0.5, 0.9, 0.99, 0.0, 1);
        fastopt_lion_f32(p, g, m, 3, &s);
        CHECK(p[0] == 1.5f && p[1] == 0.5f && p[2] == 1.0f, "lion %g %g %g", p[0], p[1], p[2]);
        CHECK(m[0] == -0.02f || fabsf(m[0] + 0.02f) < 1e-8f, "lion momentum %g", m[0]);
    }
    /* RMSProp's first step: lr*g/(sqrt(1-alpha)*|g| + eps). */
    {
        double p = 0.0, g = 1.0, sq = 0.0;
        fastopt_rmsprop_scalars s;
        fastopt_rmsprop_prepare(&s, 0.01, 0.75, 0.0, 0.0, 0.0, 0, 0, 1);
        fastopt_rmsprop_f64(&p, &g, &sq, NULL, NULL, 1, &s);
        CHECK(CLOSE(sq, 0.25) && CLOSE(p, -0.02), "rmsprop %g", p);
    }
    /* Adadelta's first step: sqrt(eps)/sqrt((1-rho)*g^2 + eps)*g. */
    {
        double p = 0.0, g = 1.0, sq = 0.0, acc = 0.0;
        fastopt_adadelta_scalars s;
        fastopt_adadelta_prepare(&s, 1.0, 0.75, 0.25, 0.0, 0, 1);
        fastopt_adadelta_f64(&p, &g, &sq, &acc, 1, &s);
        CHECK(CLOSE(p, -sqrt(0.25) / sqrt(0.5)) && CLOSE(acc, 0.25 * 0.5), "adadelta %g %g", p, acc);
    }
    /* NAdam's scalars: mu_1 = b1*(1 - 0.5*0.96^md), mu_product out. */
    {
        fastopt_nadam_scalars s;
        double mu = 1.0;
        fastopt_nadam_prepare(&s, &mu, 2e-3, 0.9, 0.999, 1e-8, 0.0, 4e-3, 0, 0, 1);
        const double mu1 = 0.9 * (1 - 0.5 * pow(0.96, 4e-3)), mu2 = 0.9 * (1 - 0.5 * pow(0.96, 8e-3));
        CHECK(CLOSE(mu, mu1), "nadam mu_product %g", mu);
        CHECK(CLOSE(s.grad_coef, 2e-3 * (1 - mu1) / (1 - mu1)) &&
              CLOSE(s.exp_avg_coef, 2e-3 * mu2 / (1 - mu1 * mu2)), "nadam coefficients");
        fastopt_nadam_prepare(&s, &mu, 2e-3, 0.9, 0.999, 1e-8, 0.0, 4e-3, 0, 0, 2);
        CHECK(CLOSE(mu, mu1 * mu2), "nadam mu_product step 2 %g", mu);
    }
    /* AMSGrad and Adamax maxima propagate NaN (fmax would not). */
    {
        float p = 1.0f, g = 0.5f, m = 0.0f, v = 0.0f, vmax = NAN;
        fastopt_adam_scalars s;
        fastopt_adam_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0, 1);
        fastopt_adam_f32(&p, &g, &m, &v, &vmax, 1, &s);
        CHECK(isnan(vmax) && isnan(p), "amsgrad max must propagate NaN");
    }
}

static void test_errors(void)
{
    float p[4] = {0}, g[4] = {0}, m[4] = {0}, v[4] = {0};
    fastopt_adam_scalars s;
    CHECK(fastopt_adam_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, 0, 1) == FASTOPT_OK, "prepare");
    CHECK(fastopt_adam_f32(p, g, m, v, NULL, 4, &s) == FASTOPT_ERR_NULL, "amsgrad needs max_exp_avg_sq");
    CHECK(fastopt_adam_f32(p, g, m, v, v, 4, NULL) == FASTOPT_ERR_NULL, "NULL scalars");
    CHECK(fastopt_adam_f32(p, NULL, m, v, v, 4, &s) == FASTOPT_ERR_NULL, "NULL grad");
    CHECK(fastopt_adam_f32(NULL, g, m, v, v, 4, &s) == FASTOPT_ERR_NULL, "NULL param");
    CHECK(fastopt_adam_f32(p, g, m, v, v, -1, &s) == FASTOPT_ERR_LENGTH, "n < 0");
    CHECK(fastopt_adam_f32(NULL, NULL, NULL, NULL, NULL, 0, &s) == FASTOPT_OK, "n == 0 touches nothing");
    fastopt_sgd_scalars ss;
    fastopt_sgd_prepare(&ss, 0.1, 0.9, 0.0, 0.0, 0, 0, 1);
    CHECK(fastopt_sgd_f32(p, g, NULL, 4, &ss) == FASTOPT_ERR_NULL, "momentum needs a buffer");
    fastopt_sgd_prepare(&ss, 0.1, 0.0, 0.0, 0.0, 0, 0, 1);
    CHECK(fastopt_sgd_f32(p, g, NULL, 4, &ss) == FASTOPT_OK, "plain sgd needs no buffer");
    fastopt_rmsprop_scalars rs;
    fastopt_rmsprop_prepare(&rs, 0.01, 0.99, 1e-8, 0, 0, 1, 0, 1);
    CHECK(fastopt_rmsprop_f32(p, g, m, NULL, NULL, 4, &rs) == FASTOPT_ERR_NULL, "centered needs grad_avg");
    CHECK(fastopt_set_num_threads(-1) == FASTOPT_ERR_THREADS, "threads < 0");
    CHECK(fastopt_get_num_threads() >= 1, "threads >= 1");

    /* prepare: every range check, and *out untouched on error. */
    memset(&s, 0x5a, sizeof s);
    fastopt_adam_scalars before = s;
    CHECK(fastopt_adam_prepare(&s, -1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 1) == FASTOPT_ERR_HYPER, "lr < 0");
    CHECK(fastopt_adam_prepare(&s, NAN, 0.9, 0.999, 1e-8, 0, 0, 0, 1) == FASTOPT_ERR_HYPER, "lr NaN");
    CHECK(fastopt_adam_prepare(&s, 1e-3, 1.0, 0.999, 1e-8, 0, 0, 0, 1) == FASTOPT_ERR_HYPER, "beta1 = 1");
    CHECK(fastopt_adam_prepare(&s, 1e-3, 0.9, -0.1, 1e-8, 0, 0, 0, 1) == FASTOPT_ERR_HYPER, "beta2 < 0");
    CHECK(fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, INFINITY, 0, 0, 0, 1) == FASTOPT_ERR_HYPER, "eps inf");
    CHECK(fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, -1, 0, 0, 1) == FASTOPT_ERR_HYPER, "wd < 0");
    CHECK(fastopt_adam_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 0) == FASTOPT_ERR_HYPER, "step 0");
    CHECK(!memcmp(&s, &before, sizeof s), "prepare wrote *out on error");
    CHECK(fastopt_adam_prepare(NULL, 1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 1) == FASTOPT_ERR_NULL, "NULL out");
    CHECK(fastopt_sgd_prepare(&ss, 0.1, 0.0, 0.0, 0.0, 1, 0, 1) == FASTOPT_ERR_HYPER, "nesterov, no momentum");
    CHECK(fastopt_sgd_prepare(&ss, 0.1, 0.9, 0.1, 0.0, 1, 0, 1) == FASTOPT_ERR_HYPER, "nesterov, dampening");
    CHECK(fastopt_rmsprop_prepare(&rs, 0.01, 1.5, 1e-8, 0, 0, 0, 0, 1) == FASTOPT_ERR_HYPER, "alpha > 1");
    CHECK(fastopt_rmsprop_prepare(&rs, 0.01, 1.0, 1e-8, 0, 0, 0, 0, 1) == FASTOPT_OK, "alpha = 1");
    fastopt_nadam_scalars ns;
    double mu = 1.5;
    CHECK(fastopt_nadam_prepare(&ns, &mu, 2e-3, 0.9, 0.999, 1e-8, 0, 4e-3, 0, 0, 1) == FASTOPT_ERR_HYPER,
          "mu_product > 1");
    CHECK(mu == 1.5, "mu_product untouched on error");
    CHECK(fastopt_nadam_prepare(&ns, NULL, 2e-3, 0.9, 0.999, 1e-8, 0, 4e-3, 0, 0, 1) == FASTOPT_ERR_NULL,
          "NULL mu_product");
    fastopt_lion_scalars ls;
    CHECK(fastopt_lion_prepare(&ls, 1e-4, 0.9, 1.0, 0, 0) == FASTOPT_ERR_HYPER, "lion beta2 = 1");
    CHECK(!strcmp(fastopt_strerror(FASTOPT_ERR_LENGTH), "n < 0"), "strerror");
    CHECK(!strcmp(fastopt_version(), FO_T_STR(FASTOPT_VERSION_MAJOR) "." FO_T_STR(FASTOPT_VERSION_MINOR) "."
                  FO_T_STR(FASTOPT_VERSION_PATCH)), "version string matches the header");
}

/* Every rule, every flag combination: fastopt_<rule>_list_* over tensors of
 * odd lengths (0 and 1 included, at odd offsets) equals one flat call per
 * tensor, bitwise; on 1 and 2 threads. */
#define FO_T_LIST_TEST(T, SFX)                                                                              \
    static void FO_T_CAT(test_lists, SFX)(void)                                                             \
    {                                                                                                       \
        enum { NT = 9 };                                                                                    \
        static const int64_t len[NT] = {0, 1, 3, 17, 1000, 0, 40001, 65, 70003};                            \
        int64_t total = 0;                                                                                  \
        for (int i = 0; i < NT; i++) total += len[i] + 3;                                                   \
        T *buf[2][2 + FO_T_MAX_STATE];                                                                      \
        for (int c = 0; c < 2; c++)                                                                         \
            for (int b = 0; b < 2 + FO_T_MAX_STATE; b++) buf[c][b] = malloc(total * sizeof(T));             \
        for (int rule = 0; rule < FO_T_NRULES; rule++)                                                      \
            for (unsigned flags = 0; flags < (1u << FO_T_RULES[rule].nflags); flags++)                       \
                for (int threads = 1; threads <= 2; threads++) {                                            \
                    fo_t_scalars s;                                                                         \
                    double carry = 1.0;                                                                     \
                    if (fo_t_prepare(rule, &s, &carry, flags, 3)) {                                         \
                        continue; /* e.g. nesterov without momentum */                                      \
                    }                                                                                       \
                    const unsigned need = fo_t_need(rule, &s);                                              \
                    for (int c = 0; c < 2; c++) {                                                           \
                        uint64_t rng = 7 + rule;                                                            \
                        for (int b = 0; b < 2 + FO_T_MAX_STATE; b++)                                        \
                            for (int64_t i = 0; i < total; i++)                                             \
                                buf[c][b][i] = (T)(b >= 2 ? fabs(uniform(&rng)) : uniform(&rng));           \
                    }                                                                                       \
                    T *p[NT], *g[NT], *st[FO_T_MAX_STATE][NT];                                              \
                    T *const *stab[FO_T_MAX_STATE];                                                         \
                    int64_t off = 0;                                                                        \
                    for (int i = 0; i < NT; i++) {                                                          \
                        const int64_t at = off + i % 3; /* odd offsets */                                   \
                        p[i] = buf[0][0] + at, g[i] = buf[0][1] + at;                                       \
                        for (int k = 0; k < FO_T_MAX_STATE; k++) st[k][i] = buf[0][2 + k] + at;             \
                        off += len[i] + 3;                                                                  \
                    }                                                                                       \
                    for (int k = 0; k < FO_T_MAX_STATE; k++) stab[k] = (need >> k & 1u) ? st[k] : NULL;     \
                    fastopt_set_num_threads(threads);                                                       \
                    int rc = FO_T_CAT(fo_t_list, SFX)(rule, p, (const T *const *)g, stab, len, NT, &s);     \
                    off = 0;                                                                                \
                    for (int i = 0; i < NT && !rc; i++) {                                                   \
                        const int64_t at = off + i % 3;                                                     \
                        T *fs[FO_T_MAX_STATE];                                                              \
                        for (int k = 0; k < FO_T_MAX_STATE; k++)                                            \
                            fs[k] = (need >> k & 1u) ? buf[1][2 + k] + at : NULL;                           \
                        rc = FO_T_CAT(fo_t_run, SFX)(rule, buf[1][0] + at, buf[1][1] + at, fs, len[i], &s); \
                        off += len[i] + 3;                                                                  \
                    }                                                                                       \
                    CHECK(rc == FASTOPT_OK, "%s list: return code %d", FO_T_RULES[rule].name, rc);          \
                    for (int b = 0; b < 2 + FO_T_MAX_STATE && !rc; b++)                                     \
                        CHECK(!memcmp(buf[0][b], buf[1][b], total * sizeof(T)),                             \
                              "%s %s flags %u threads %d: list differs from flat calls (buffer %d)",        \
                              FO_T_RULES[rule].name, FO_T_STR(SFX), flags, threads, b);                     \
                }                                                                                           \
        for (int c = 0; c < 2; c++)                                                                         \
            for (int b = 0; b < 2 + FO_T_MAX_STATE; b++) free(buf[c][b]);                                   \
        fastopt_set_num_threads(0);                                                                         \
    }
FO_T_LIST_TEST(float, _f32)
FO_T_LIST_TEST(double, _f64)

/* The flush rule, written independently of the library's: a non-NaN value
 * below the smallest normal in magnitude becomes a zero of its sign. */
#define FO_T_FLUSHED(x, TINY) ((x) != (x) || fabs((double)(x)) >= (TINY) ? (x) : copysign(0.0, (double)(x)))

/* Every rule, every flag combination, 1 and 2 threads: with flush on, flat
 * calls per tensor and one list call equal the flush-off flat calls with each
 * stored value (param, the written state buffers, inside the tensors) flushed,
 * bitwise. The inputs mix ordinary values, subnormals (+-, with zero
 * gradients, so results stay subnormal), values near the smallest normal and
 * the SPECIALS; the test checks that flushes of both signs happened. Flags
 * run one bit past the rule's flags: the hyperparameters whose default is 0
 * (momentum, weight decay, ...) at 0.5, so every written buffer is used.
 * Bitwise as everywhere in these tests: any NaN equals any NaN (its sign and
 * payload depend on the compiler's operand order, which differs per loop). */
#define FO_T_FLUSH_TEST(T, SFX, TINY)                                                                       \
    static int FO_T_CAT(same_bits, SFX)(const T *a, const T *b, int64_t n)                                  \
    {                                                                                                       \
        for (int64_t i = 0; i < n; i++)                                                                     \
            if (memcmp(&a[i], &b[i], sizeof(T)) && !(isnan(a[i]) && isnan(b[i])))                           \
                return 0;                                                                                   \
        return 1;                                                                                           \
    }                                                                                                       \
    static void FO_T_CAT(test_flush, SFX)(void)                                                             \
    {                                                                                                       \
        enum { NT = 6, NB = 2 + FO_T_MAX_STATE };                                                           \
        static const int64_t len[NT] = {1, 17, 0, 1000, 40001, 65};                                         \
        int64_t total = 0, flushed_pos = 0, flushed_neg = 0;                                                \
        for (int i = 0; i < NT; i++) total += len[i] + 3;                                                   \
        T *buf[3][NB]; /* 0: flush off, flat; 1: on, flat; 2: on, list */                                   \
        for (int c = 0; c < 3; c++)                                                                         \
            for (int b = 0; b < NB; b++) buf[c][b] = malloc(total * sizeof(T));                             \
        for (int rule = 0; rule < FO_T_NRULES; rule++)                                                      \
            for (unsigned flags = 0; flags < (2u << FO_T_RULES[rule].nflags); flags++)                      \
                for (int threads = 1; threads <= 2; threads++) {                                            \
                    fo_t_scalars s; /* flags bit nflags: momentum, weight decay, ... nonzero */             \
                    double carry = 1.0;                                                                     \
                    if (fo_t_prepare(rule, &s, &carry, flags, 3))                                           \
                        continue;                                                                           \
                    const unsigned need = fo_t_need(rule, &s);                                              \
                    uint64_t rng = 11 + rule + 31 * flags;                                                  \
                    for (int64_t i = 0; i < total; i++) {                                                   \
                        const int kind = (int)((uniform(&rng) + 1.0) * 4.0); /* 0..7 */                     \
                        for (int b = 0; b < NB; b++) {                                                      \
                            double u = uniform(&rng), x;                                                    \
                            if (kind < 3)                                                                   \
                                x = u;                                                                      \
                            else if (kind < 6) /* subnormal, zero gradient */                               \
                                x = b == 1 ? 0.0 : u * (TINY);                                              \
                            else if (kind == 6) /* around the smallest normal */                            \
                                x = b == 1 ? u * (TINY) : u * 2.0 * (TINY);                                 \
                            else                                                                            \
                                x = SPECIALS[(int64_t)((u + 1.0) * 0.5 * NSPECIALS) % NSPECIALS];           \
                            if (b >= 2 && kind < 3)                                                         \
                                x = fabs(x);                                                                \
                            buf[0][b][i] = buf[1][b][i] = buf[2][b][i] = (T)x;                              \
                        }                                                                                   \
                    }                                                                                       \
                    fastopt_set_num_threads(threads);                                                       \
                    T *p[NT], *g[NT], *st[FO_T_MAX_STATE][NT];                                              \
                    T *const *stab[FO_T_MAX_STATE];                                                         \
                    int rc = 0;                                                                             \
                    for (int c = 0; c < 2 && !rc; c++) {                                                    \
                        CHECK(fastopt_set_flush_denormal(c) == FASTOPT_OK, "set_flush_denormal");           \
                        CHECK(fastopt_get_flush_denormal() == c, "get_flush_denormal");                     \
                        int64_t off = 0;                                                                    \
                        for (int i = 0; i < NT && !rc; i++) {                                               \
                            const int64_t at = off + i % 3;                                                 \
                            T *fs[FO_T_MAX_STATE];                                                          \
                            for (int k = 0; k < FO_T_MAX_STATE; k++)                                        \
                                fs[k] = (need >> k & 1u) ? buf[c][2 + k] + at : NULL;                       \
                            rc = FO_T_CAT(fo_t_run, SFX)(rule, buf[c][0] + at, buf[c][1] + at, fs, len[i], &s); \
                            off += len[i] + 3;                                                              \
                        }                                                                                   \
                    }                                                                                       \
                    int64_t off = 0;                                                                        \
                    for (int i = 0; i < NT; i++) {                                                          \
                        const int64_t at = off + i % 3;                                                     \
                        p[i] = buf[2][0] + at, g[i] = buf[2][1] + at;                                       \
                        for (int k = 0; k < FO_T_MAX_STATE; k++) st[k][i] = buf[2][2 + k] + at;             \
                        off += len[i] + 3;                                                                  \
                    }                                                                                       \
                    for (int k = 0; k < FO_T_MAX_STATE; k++) stab[k] = (need >> k & 1u) ? st[k] : NULL;     \
                    if (!rc) /* flush still on */                                                           \
                        rc = FO_T_CAT(fo_t_list, SFX)(rule, p, (const T *const *)g, stab, len, NT, &s);     \
                    fastopt_set_flush_denormal(0);                                                          \
                    CHECK(rc == FASTOPT_OK, "%s flush: return code %d", FO_T_RULES[rule].name, rc);         \
                    /* the flush-off result, each stored value flushed */                                   \
                    off = 0;                                                                                \
                    for (int i = 0; i < NT; i++) {                                                          \
                        const int64_t at = off + i % 3;                                                     \
                        for (int b = 0; b < NB; b++) {                                                      \
                            if (b == 1 || (b >= 2 && !(need >> (b - 2) & 1u)))                              \
                                continue; /* not written */                                                 \
                            for (int64_t j = at; j < at + len[i]; j++) {                                    \
                                const T x = buf[0][b][j], y = (T)FO_T_FLUSHED(x, TINY);                     \
                                if (memcmp(&x, &y, sizeof(T)))                                              \
                                    *(signbit(x) ? &flushed_neg : &flushed_pos) += 1;                       \
                                buf[0][b][j] = y;                                                           \
                            }                                                                               \
                        }                                                                                   \
                        off += len[i] + 3;                                                                  \
                    }                                                                                       \
                    for (int c = 1; c < 3 && !rc; c++)                                                      \
                        for (int b = 0; b < NB; b++)                                                        \
                            CHECK(FO_T_CAT(same_bits, SFX)(buf[0][b], buf[c][b], total),                    \
                                  "%s %s flags %u threads %d: flush-on %s differs from the flushed "        \
                                  "flush-off result (buffer %d)", FO_T_RULES[rule].name, FO_T_STR(SFX),     \
                                  flags, threads, c == 1 ? "flat" : "list", b);                             \
                }                                                                                           \
        CHECK(flushed_pos > 0 && flushed_neg > 0, "%s: no flush happened (+%lld, -%lld)", FO_T_STR(SFX),    \
              (long long)flushed_pos, (long long)flushed_neg);                                              \
        for (int c = 0; c < 3; c++)                                                                         \
            for (int b = 0; b < NB; b++) free(buf[c][b]);                                                   \
        fastopt_set_num_threads(0);                                                                         \
    }
FO_T_FLUSH_TEST(float, _f32, FLT_MIN)
FO_T_FLUSH_TEST(double, _f64, DBL_MIN)

int main(void)
{
    const char *want = getenv("FASTOPT_ISA");
    printf("fastopt %s, CPU path %s (FASTOPT_ISA=%s), %d threads\n", fastopt_version(), fastopt_isa(),
           want ? want : "", fastopt_get_num_threads());
    if (want && strcmp(want, fastopt_isa()))
        printf("note: FASTOPT_ISA=%s is not supported here; testing %s\n", want, fastopt_isa());
    CHECK(fastopt_get_flush_denormal() == 0, "flush denormals is off by default");
    CHECK(fastopt_set_flush_denormal(7) == FASTOPT_OK && fastopt_get_flush_denormal() == 1, "nonzero is on");
    CHECK(fastopt_set_flush_denormal(0) == FASTOPT_OK && fastopt_get_flush_denormal() == 0, "0 is off");
    test_flush_f32();
    test_flush_f64();
    /* everything below runs with flush off (after it was on): today's kernels */
    test_errors();
    test_known_values();
    test_matrix();
    test_threads();
    test_lists_f32();
    test_lists_f64();
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures != 0;
}
