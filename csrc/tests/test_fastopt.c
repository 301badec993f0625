/* C unit tests of the fastopt library (ctest runs them once per CPU path:
 * FASTOPT_ISA=baseline, avx2, avx512; see CMakeLists.txt). Every rule comes
 * from the generated table (rules_table.inc, written by `python -m
 * fastopt.codegen` from the rule table): nothing here names a rule, so a rule
 * added to the table is tested without a line changed here.
 *   - every rule, every flag combination and several hyperparameter sets (the
 *     defaults; those whose default is 0 made nonzero; other and boundary
 *     values of each kind), f32 and f64, odd sizes, consecutive steps, with and
 *     without NaN/Inf/subnormal gradients: the library against the plain
 *     reference loops of rules_table.inc (fo_t_ref_*), bitwise;
 *   - large buffers over threads: 1 and 2 threads against the reference, and
 *     1, 2 and 3 threads against each other;
 *   - argument errors of the flat and list kernels (every required buffer of
 *     every flag combination), with every buffer untouched; prepare's checks
 *     for every hyperparameter, the step and the carried value, against the
 *     ranges of the table's kinds (fo_t_expect_h), *out and the carried
 *     value untouched on error;
 *   - every flag combination: list calls equal flat calls bitwise, f32 and
 *     f64, on 1 and 2 threads;
 *   - flush denormals (fastopt_set_flush_denormal): every rule and flag
 *     combination, f32 and f64, 1 and 2 threads, flat and list calls, equals
 *     the flush-off result with each stored value flushed, bitwise; the other
 *     tests run with it off (after it was on), so off is today's kernels.
 * The reference is translated from the same element functions as the kernels
 * (rules_table.inc says how it differs): these tests check the library's
 * loops, flag specialization, CPU paths, tails, threads and list machinery.
 * The math itself, element functions and prepare formulas, is checked against
 * the NumPy reference and fastopt.rules by the Python tests
 * (tests/test_backends.py, tests/test_c_library.py). */
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

static const double SPECIALS[] = {NAN, INFINITY, -INFINITY, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-45};
#define NSPECIALS ((int64_t)(sizeof(SPECIALS) / sizeof(SPECIALS[0])))

/* Uniform in [-1, 1): xorshift64*. */
static double uniform(uint64_t *s)
{
    *s ^= *s >> 12, *s ^= *s << 25, *s ^= *s >> 27;
    return (double)((*s * 2685821657736338717ull) >> 11) * 0x1.0p-52 - 1.0;
}

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

/* ---- hyperparameter sets, from each hyperparameter's kind and default ------ */

enum { V_DEFAULTS, V_NONZERO, V_OTHER, V_LOW, V_HIGH, NVARIANTS };
static const char *const VARIANT[NVARIANTS] = {"defaults", "zero defaults at 0.5", "other values",
                                               "lower boundaries", "upper boundaries"};

/* The real hyperparameters of set v (fo_t_prepare_h's h): the defaults; those
 * whose default is 0 (momentum, weight decay, ...) at their kind's nonzero
 * value (0.5; a warmup: 4 steps), so every option buffer is used; other values
 * (decay rates below 0.5, where torch's lerp starts from the end, the rest 3
 * times their default or half the nonzero value); the lower boundaries (decay
 * rates at 0); the upper ones (decay rates just below 1, closed-unit ones at 1). */
static void hyper_set(int rule, int v, double *h)
{
    const fo_t_rule *r = &FO_T_RULES[rule];
    for (int k = 0; k < r->nhyper; k++) {
        const double d = r->hyper[k].dflt;
        const int kind = r->hyper[k].kind;
        double x = d;
        if (v == V_NONZERO)
            x = d == 0.0 ? fo_t_kind_nonzero(kind) : d;
        else if (v == V_OTHER)
            x = kind == FO_T_UNIT          ? 0.3
                : kind == FO_T_UNIT_CLOSED ? 0.45
                : d == 0.0                 ? fo_t_kind_nonzero(kind) / 2.0
                                           : 3.0 * d;
        else if (v == V_LOW)
            x = kind == FO_T_UNIT || kind == FO_T_UNIT_CLOSED ? 0.0 : d;
        else if (v == V_HIGH)
            x = kind == FO_T_UNIT ? 0x1.fffffffffffffp-1 : kind == FO_T_UNIT_CLOSED ? 1.0 : d;
        h[k] = x;
    }
}

/* ---- the library against the reference ------------------------------------ */

/* The step counts of a case's consecutive calls: the first steps (SGD's
 * first_step), then later ones (RAdam's rectified steps, decayed rates). */
static const int64_t STEPS[] = {1, 2, 3, 10, 1000};

/* One rule and hyperparameter set, `steps` calls (at the step counts of STEPS)
 * from the same start (random param, non-negative random state) through the
 * library and the reference,
 * with the same scalars (prepare's carried value advancing), compared bitwise
 * after every step (any NaN equals any NaN: its sign and payload depend on the
 * compiler's operand order). Buffers a call does not need are passed as NULL. */
#define FO_T_RUN_CASE(T, SFX)                                                                               \
    static int FO_T_CAT(same_bits, SFX)(const T *a, const T *b, int64_t n)                                  \
    {                                                                                                       \
        for (int64_t i = 0; i < n; i++)                                                                     \
            if (memcmp(&a[i], &b[i], sizeof(T)) && !(isnan(a[i]) && isnan(b[i])))                           \
                return 0;                                                                                   \
        return 1;                                                                                           \
    }                                                                                                       \
    static int FO_T_CAT(run_case, SFX)(int rule, int v, const double *h, unsigned flags, int64_t n,         \
                                       int steps, int specials)                                            \
    {                                                                                                       \
        enum { NB = 2 + FO_T_MAX_STATE };                                                                   \
        const fo_t_rule *r = &FO_T_RULES[rule];                                                             \
        T *lib[NB], *ref[NB];                                                                               \
        for (int b = 0; b < NB; b++) {                                                                      \
            lib[b] = (T *)malloc((size_t)(n > 0 ? n : 1) * sizeof(T));                                      \
            ref[b] = (T *)malloc((size_t)(n > 0 ? n : 1) * sizeof(T));                                      \
        }                                                                                                   \
        uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)n ^ (uint64_t)rule << 40 ^ (uint64_t)flags << 48;  \
        for (int b = 0; b < NB; b++)                                                                        \
            for (int64_t i = 0; i < n; i++)                                                                 \
                lib[b][i] = ref[b][i] = (T)(b >= 2 ? fabs(uniform(&rng)) : uniform(&rng));                  \
        double carry = r->carry_init;                                                                       \
        int bad = 0;                                                                                        \
        for (int t = 1; t <= steps && !bad; t++) {                                                          \
            T *g = lib[1];                                                                                  \
            for (int64_t i = 0; i < n; i++) g[i] = (T)uniform(&rng);                                        \
            if (specials)                                                                                   \
                for (int64_t i = t; i < n; i += 13) g[i] = (T)SPECIALS[(i / 13) % NSPECIALS];               \
            fo_t_scalars s;                                                                                 \
            int rc = fo_t_prepare_h(rule, &s, &carry, h, flags, STEPS[t - 1]);                              \
            const unsigned need = rc ? 0u : fo_t_need(rule, &s);                                            \
            T *st[FO_T_MAX_STATE], *rst[FO_T_MAX_STATE];                                                    \
            for (int k = 0; k < FO_T_MAX_STATE; k++) {                                                      \
                st[k] = (need >> k & 1u) ? lib[2 + k] : NULL;                                               \
                rst[k] = (need >> k & 1u) ? ref[2 + k] : NULL;                                              \
            }                                                                                               \
            if (!rc) {                                                                                      \
                rc = FO_T_CAT(fo_t_run, SFX)(rule, lib[0], g, st, n, &s);                                   \
                FO_T_CAT(fo_t_ref, SFX)(rule, ref[0], g, rst, n, &s);                                       \
            }                                                                                               \
            if (rc) {                                                                                       \
                printf("FAIL %s (%s, flags %u) %s n=%lld step %lld: return code %d\n", r->name, VARIANT[v], \
                       flags, FO_T_STR(SFX), (long long)n, (long long)STEPS[t - 1], rc);                    \
                bad = 1;                                                                                    \
            }                                                                                               \
            for (int b = 0; b < NB && !bad; b++) {                                                          \
                if (b == 1 || (b >= 2 && !(need >> (b - 2) & 1u)))                                          \
                    continue;                                                                               \
                if (FO_T_CAT(same_bits, SFX)(lib[b], ref[b], n))                                            \
                    continue;                                                                               \
                int64_t i = 0;                                                                              \
                while (!memcmp(&lib[b][i], &ref[b][i], sizeof(T)) || (isnan(lib[b][i]) && isnan(ref[b][i]))) \
                    i++;                                                                                    \
                printf("FAIL %s (%s, flags %u, specials %d) %s n=%lld step %lld: %s[%lld] = %a, "          \
                       "reference %a\n", r->name, VARIANT[v], flags, specials, FO_T_STR(SFX), (long long)n,  \
                       (long long)STEPS[t - 1],                                                             \
                       b ? r->state[b - 2] : "param", (long long)i, (double)lib[b][i], (double)ref[b][i]);  \
                bad = 1;                                                                                    \
            }                                                                                               \
        }                                                                                                   \
        for (int b = 0; b < NB; b++) free(lib[b]), free(ref[b]);                                            \
        return bad;                                                                                         \
    }
FO_T_RUN_CASE(float, _f32)
FO_T_RUN_CASE(double, _f64)

/* Every rule, flag combination and hyperparameter set prepare accepts. */
static void test_matrix(void)
{
    static const int64_t sizes[] = {0, 1, 3, 17, 1000, 4099, 100003};
    int cases = 0;
    for (int rule = 0; rule < FO_T_NRULES; rule++)
        for (int v = 0; v < NVARIANTS; v++)
            for (unsigned flags = 0; flags < (1u << FO_T_RULES[rule].nflags); flags++) {
                double h[FO_T_MAX_HYPER];
                hyper_set(rule, v, h);
                if (fo_t_expect_h(rule, FO_T_RULES[rule].carry_init, h, flags, 1) != FASTOPT_OK)
                    continue; /* e.g. nesterov without momentum */
                cases++;
                for (int k = 0; k < (int)(sizeof(sizes) / sizeof(sizes[0])); k++)
                    for (int specials = 0; specials < 2; specials++) {
                        /* the large size (over threads): once per flag combination, every buffer used */
                        if (sizes[k] > 10000 && (v != V_NONZERO || !specials))
                            continue;
                        const int steps = sizes[k] > 10000 ? 3 : 5;
                        failures += run_case_f32(rule, v, h, flags, sizes[k], steps, specials);
                        failures += run_case_f64(rule, v, h, flags, sizes[k], steps, specials);
                    }
            }
    printf("matrix: %d rule, flag and hyperparameter combinations\n", cases);
}

/* The most flags prepare accepts with the nonzero set (every option buffer used). */
static unsigned most_flags(int rule, const double *h)
{
    for (unsigned flags = (1u << FO_T_RULES[rule].nflags) - 1;; flags--)
        if (fo_t_expect_h(rule, FO_T_RULES[rule].carry_init, h, flags, 1) == FASTOPT_OK || flags == 0)
            return flags;
}

/* Large enough to be split over threads; the split must not change a bit. */
static void test_threads(void)
{
    const int64_t n = 300007;
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        double h[FO_T_MAX_HYPER];
        hyper_set(rule, V_NONZERO, h);
        const unsigned flags = most_flags(rule, h);
        fastopt_set_num_threads(1);
        failures += run_case_f32(rule, V_NONZERO, h, flags, n, 2, 1);
        fastopt_set_num_threads(2);
        failures += run_case_f32(rule, V_NONZERO, h, flags, n, 2, 1);
        failures += run_case_f64(rule, V_NONZERO, h, flags, n, 2, 1);
    }
    /* The same buffers on 1, 2 and 3 threads, compared with each other. */
    enum { NB = 2 + FO_T_MAX_STATE };
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        double h[FO_T_MAX_HYPER];
        hyper_set(rule, V_NONZERO, h);
        const unsigned flags = most_flags(rule, h);
        float *out[3][NB];
        int rc = 0;
        for (int r = 0; r < 3; r++) {
            uint64_t rng = 42;
            for (int b = 0; b < NB; b++) {
                out[r][b] = malloc(n * sizeof(float));
                for (int64_t i = 0; i < n; i++) out[r][b][i] = (float)(b >= 2 ? fabs(uniform(&rng)) : uniform(&rng));
            }
            fastopt_set_num_threads(r + 1);
            double carry = FO_T_RULES[rule].carry_init;
            for (int t = 1; t <= 3 && !rc; t++) {
                fo_t_scalars s;
                rc = fo_t_prepare_h(rule, &s, &carry, h, flags, t);
                const unsigned need = rc ? 0u : fo_t_need(rule, &s);
                float *st[FO_T_MAX_STATE];
                for (int k = 0; k < FO_T_MAX_STATE; k++) st[k] = (need >> k & 1u) ? out[r][2 + k] : NULL;
                if (!rc)
                    rc = fo_t_run_f32(rule, out[r][0], out[r][1], st, n, &s);
            }
        }
        CHECK(rc == FASTOPT_OK, "%s threads: return code %d", FO_T_RULES[rule].name, rc);
        for (int b = 0; b < NB; b++)
            CHECK(!memcmp(out[0][b], out[1][b], n * sizeof(float)) && !memcmp(out[0][b], out[2][b], n * sizeof(float)),
                  "%s: buffer %d differs across thread counts", FO_T_RULES[rule].name, b);
        for (int r = 0; r < 3; r++)
            for (int b = 0; b < NB; b++) free(out[r][b]);
    }
    fastopt_set_num_threads(0);
}

/* ---- errors ------------------------------------------------------------------ */

/* The values every hyperparameter, and the carried value, is tried with: each
 * kind's boundaries and beyond, and the non-finite values. */
static const double PROBES[] = {0.0, -0.0, 5e-324, -5e-324, DBL_MIN, 1e-8, 0.5, -0.5, 0x1.fffffffffffffp-1, 1.0,
                                0x1.0000000000001p+0, 1.5, 2.0, -1.0, 1e300, DBL_MAX, -DBL_MAX, NAN, INFINITY,
                                -INFINITY};
#define NPROBES ((int)(sizeof(PROBES) / sizeof(PROBES[0])))

/* prepare's return code against fo_t_expect_h; on error *out and the carried value untouched. */
static void check_prepare(int rule, const double *h, double carry, unsigned flags, int64_t step, const char *what,
                          double value)
{
    const fo_t_rule *r = &FO_T_RULES[rule];
    fo_t_scalars s, before;
    memset(&s, 0x5a, sizeof s);
    before = s;
    double c = carry;
    const int want = fo_t_expect_h(rule, carry, h, flags, step);
    const int rc = fo_t_prepare_h(rule, &s, &c, h, flags, step);
    CHECK(rc == want, "%s prepare, %s = %g, flags %u, step %lld: returned %d, expected %d", r->name, what, value,
          flags, (long long)step, rc, want);
    if (rc != FASTOPT_OK) {
        CHECK(!memcmp(&s, &before, sizeof s), "%s prepare, %s = %g: wrote *out on error", r->name, what, value);
        CHECK(!memcmp(&c, &carry, sizeof c), "%s prepare, %s = %g: wrote the carried value on error", r->name,
              what, value);
    }
}

static void test_prepare_errors(int rule)
{
    const fo_t_rule *r = &FO_T_RULES[rule];
    double h[FO_T_MAX_HYPER];
    /* every hyperparameter set and flag combination (the relation across hyperparameters included) */
    for (int v = 0; v < NVARIANTS; v++)
        for (unsigned flags = 0; flags < (1u << r->nflags); flags++) {
            hyper_set(rule, v, h);
            check_prepare(rule, h, r->carry_init, flags, 1, VARIANT[v], 0.0);
        }
    /* each hyperparameter, and the carried value, at every probe */
    for (int k = 0; k < r->nhyper; k++) {
        int refused = 0;
        for (int i = 0; i < NPROBES; i++) {
            hyper_set(rule, V_DEFAULTS, h);
            h[k] = PROBES[i];
            check_prepare(rule, h, r->carry_init, 0, 1, r->hyper[k].name, PROBES[i]);
            refused += !fo_t_kind_ok(r->hyper[k].kind, PROBES[i]);
        }
        CHECK(refused >= 3, "%s: %s (%s) refused only %d probes (NaN and the infinities at least)", r->name,
              r->hyper[k].name, FO_T_KIND_RANGE[r->hyper[k].kind], refused);
    }
    hyper_set(rule, V_DEFAULTS, h);
    if (r->carry_kind >= 0)
        for (int i = 0; i < NPROBES; i++) check_prepare(rule, h, PROBES[i], 0, 1, "the carried value", PROBES[i]);
    static const int64_t steps[] = {1, 2, 1000000, INT64_MAX, 0, -1, INT64_MIN};
    for (int i = 0; i < (int)(sizeof(steps) / sizeof(steps[0])); i++)
        check_prepare(rule, h, r->carry_init, 0, steps[i], "step", (double)steps[i]);
    /* NULL pointers: FASTOPT_ERR_NULL, the carried value untouched */
    fo_t_scalars s;
    double carry = r->carry_init;
    CHECK(fo_t_prepare_h(rule, NULL, &carry, h, 0, 1) == FASTOPT_ERR_NULL, "%s prepare: NULL out", r->name);
    if (r->carry_kind >= 0)
        CHECK(fo_t_prepare_h(rule, &s, NULL, h, 0, 1) == FASTOPT_ERR_NULL, "%s prepare: NULL carried value",
              r->name);
    CHECK(carry == r->carry_init, "%s prepare(NULL) wrote the carried value", r->name);
}

/* The kernels' argument errors, flat and list, for every flag combination:
 * the documented code and not a byte written; then the calls that are fine. */
static void test_kernel_errors(int rule)
{
    enum { NB = 2 + FO_T_MAX_STATE, LEN = 5 };
    const fo_t_rule *r = &FO_T_RULES[rule];
    float buf[NB][LEN], snap[NB][LEN];
    for (unsigned flags = 0; flags < (2u << r->nflags); flags++) {
        fo_t_scalars s;
        double carry = r->carry_init;
        if (fo_t_prepare(rule, &s, &carry, flags, 1) != FASTOPT_OK)
            continue;
        const unsigned need = fo_t_need(rule, &s);
        uint64_t rng = 5 + flags;
        for (int b = 0; b < NB; b++)
            for (int i = 0; i < LEN; i++) buf[b][i] = (float)(b >= 2 ? fabs(uniform(&rng)) : uniform(&rng));
        memcpy(snap, buf, sizeof buf);
        float *all[FO_T_MAX_STATE], *needed[FO_T_MAX_STATE], *nulls[FO_T_MAX_STATE] = {NULL};
        for (int k = 0; k < FO_T_MAX_STATE; k++) {
            all[k] = k < r->nstate ? buf[2 + k] : NULL;
            needed[k] = (need >> k & 1u) ? buf[2 + k] : NULL;
        }
#define ERR(call, code, ...) CHECK((call) == (code), __VA_ARGS__)
        ERR(fo_t_run_f32(rule, buf[0], buf[1], all, LEN, NULL), FASTOPT_ERR_NULL, "%s: NULL scalars", r->name);
        ERR(fo_t_run_f32(rule, NULL, buf[1], all, LEN, &s), FASTOPT_ERR_NULL, "%s: NULL param", r->name);
        ERR(fo_t_run_f32(rule, buf[0], NULL, all, LEN, &s), FASTOPT_ERR_NULL, "%s: NULL grad", r->name);
        ERR(fo_t_run_f32(rule, buf[0], buf[1], all, -1, &s), FASTOPT_ERR_LENGTH, "%s: n < 0", r->name);
        ERR(fo_t_run_f32(rule, buf[0], buf[1], all, INT64_MIN, &s), FASTOPT_ERR_LENGTH, "%s: n = INT64_MIN",
            r->name);
        for (int k = 0; k < r->nstate; k++)
            if (need >> k & 1u) {
                float *miss[FO_T_MAX_STATE];
                memcpy(miss, all, sizeof miss);
                miss[k] = NULL;
                ERR(fo_t_run_f32(rule, buf[0], buf[1], miss, LEN, &s), FASTOPT_ERR_NULL,
                    "%s flags %u: %s is required", r->name, flags, r->state[k]);
            }
        /* lists: two tensors, the second of length LEN */
        float *pt[2] = {NULL, buf[0]}, *st[FO_T_MAX_STATE][2];
        const float *gt[2] = {NULL, buf[1]};
        float *const *stab[FO_T_MAX_STATE];
        const int64_t len[2] = {0, LEN}, neg[2] = {0, -1};
        for (int k = 0; k < FO_T_MAX_STATE; k++) {
            st[k][0] = NULL, st[k][1] = buf[2 + k];
            stab[k] = k < r->nstate ? st[k] : NULL;
        }
        ERR(fo_t_list_f32(rule, pt, gt, stab, len, 2, NULL), FASTOPT_ERR_NULL, "%s list: NULL scalars", r->name);
        ERR(fo_t_list_f32(rule, pt, gt, stab, len, -1, &s), FASTOPT_ERR_LENGTH, "%s list: count < 0", r->name);
        ERR(fo_t_list_f32(rule, pt, gt, stab, neg, 2, &s), FASTOPT_ERR_LENGTH, "%s list: n[1] < 0", r->name);
        ERR(fo_t_list_f32(rule, pt, gt, stab, NULL, 2, &s), FASTOPT_ERR_NULL, "%s list: NULL n", r->name);
        ERR(fo_t_list_f32(rule, NULL, gt, stab, len, 2, &s), FASTOPT_ERR_NULL, "%s list: NULL param", r->name);
        ERR(fo_t_list_f32(rule, pt, NULL, stab, len, 2, &s), FASTOPT_ERR_NULL, "%s list: NULL grad", r->name);
        float *pnull[2] = {NULL, NULL};
        ERR(fo_t_list_f32(rule, pnull, gt, stab, len, 2, &s), FASTOPT_ERR_NULL, "%s list: a NULL param entry",
            r->name);
        for (int k = 0; k < r->nstate; k++)
            if (need >> k & 1u) {
                float *const *miss[FO_T_MAX_STATE];
                memcpy(miss, stab, sizeof miss);
                miss[k] = NULL;
                ERR(fo_t_list_f32(rule, pt, gt, miss, len, 2, &s), FASTOPT_ERR_NULL,
                    "%s list flags %u: the %s table is required", r->name, flags, r->state[k]);
                miss[k] = pnull;
                ERR(fo_t_list_f32(rule, pt, gt, miss, len, 2, &s), FASTOPT_ERR_NULL,
                    "%s list flags %u: a NULL %s entry", r->name, flags, r->state[k]);
            }
        CHECK(!memcmp(snap, buf, sizeof buf), "%s flags %u: an error path wrote a buffer", r->name, flags);
        /* fine: n == 0 with every pointer NULL, count == 0, the needed buffers only */
        ERR(fo_t_run_f32(rule, NULL, NULL, nulls, 0, &s), FASTOPT_OK, "%s: n == 0 touches nothing", r->name);
        float *const *tnulls[FO_T_MAX_STATE] = {NULL};
        ERR(fo_t_list_f32(rule, NULL, NULL, tnulls, NULL, 0, &s), FASTOPT_OK, "%s list: count == 0", r->name);
        CHECK(!memcmp(snap, buf, sizeof buf), "%s flags %u: an empty call wrote a buffer", r->name, flags);
        ERR(fo_t_run_f32(rule, buf[0], buf[1], needed, LEN, &s), FASTOPT_OK, "%s flags %u: the needed buffers",
            r->name, flags);
        /* every buffer passed: the ones the call does not need come back untouched */
        ERR(fo_t_run_f32(rule, buf[0], buf[1], all, LEN, &s), FASTOPT_OK, "%s flags %u: every buffer", r->name,
            flags);
        for (int k = 0; k < r->nstate; k++)
            if (!(need >> k & 1u))
                CHECK(!memcmp(snap[2 + k], buf[2 + k], sizeof buf[0]), "%s flags %u: unneeded %s written",
                      r->name, flags, r->state[k]);
#undef ERR
    }
}

static void test_errors(void)
{
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        test_prepare_errors(rule);
        test_kernel_errors(rule);
    }
    CHECK(fastopt_set_num_threads(-1) == FASTOPT_ERR_THREADS, "threads < 0");
    CHECK(fastopt_get_num_threads() >= 1, "threads >= 1");
    CHECK(!strcmp(fastopt_strerror(FASTOPT_ERR_LENGTH), "n < 0"), "strerror");
    CHECK(!strcmp(fastopt_version(), FO_T_STR(FASTOPT_VERSION_MAJOR) "." FO_T_STR(FASTOPT_VERSION_MINOR) "."
                  FO_T_STR(FASTOPT_VERSION_PATCH)), "version string matches the header");
}

/* ---- lists and flush --------------------------------------------------------- */

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
                    double carry = FO_T_RULES[rule].carry_init;                                             \
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
                    double carry = FO_T_RULES[rule].carry_init;                                             \
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

/* fastopt_sumsq_list: the reference order written out (4096-element blocks, 8
 * lanes, a fixed tree, blocks in order) must give the same bits, for 1 and 2
 * threads; a NaN propagates; bad arguments are refused without writing *out. */
static double sumsq_reference(const float *const *x, const int64_t *n, int64_t count, double *each)
{
    double total = 0.0;
    for (int64_t t = 0; t < count; t++) {
        each[t] = 0.0;
        for (int64_t lo = 0; lo < n[t]; lo += 4096) {
            double acc[8] = {0};
            for (int64_t i = lo; i < n[t] && i < lo + 4096; i++)
                acc[(i - lo) % 8] += (double)x[t][i] * (double)x[t][i];
            const double b = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            total += b;
            each[t] += b;
        }
    }
    return total;
}

static void test_sumsq(void)
{
    enum { COUNT = 5 };
    static const int64_t n[COUNT] = {1, 4097, 0, 140000, 9}; /* 39 blocks: 2 threads do split them */
    float *x[COUNT];
    uint32_t seed = 12345;
    for (int t = 0; t < COUNT; t++) {
        x[t] = malloc((size_t)(n[t] ? n[t] : 1) * sizeof(float));
        for (int64_t i = 0; i < n[t]; i++) {
            seed = seed * 1664525u + 1013904223u;
            x[t][i] = (float)((int32_t)seed) / 2147483648.0f;
        }
    }
    double want_each[COUNT];
    const double want = sumsq_reference((const float *const *)x, n, COUNT, want_each);
    for (int threads = 1; threads <= 2; threads++) {
        fastopt_set_num_threads(threads);
        double got = -1.0, each[COUNT];
        CHECK(fastopt_sumsq_list_f32((const float *const *)x, n, COUNT, &got, each) == FASTOPT_OK,
              "sumsq: return code");
        CHECK(!memcmp(&got, &want, sizeof got), "sumsq, %d threads: %.17g, expected %.17g", threads, got, want);
        CHECK(!memcmp(each, want_each, sizeof each), "sumsq, %d threads: the per-tensor sums differ", threads);
        CHECK(fastopt_sumsq_list_f32((const float *const *)x, n, COUNT, &got, NULL) == FASTOPT_OK
              && !memcmp(&got, &want, sizeof got), "sumsq without per-tensor sums, %d threads", threads);
    }
    fastopt_set_num_threads(0);
    x[3][123] = NAN;
    double got = 0.0;
    CHECK(fastopt_sumsq_list_f32((const float *const *)x, n, COUNT, &got, NULL) == FASTOPT_OK && isnan(got),
          "sumsq: NaN");
    got = 7.0;
    const int64_t bad[2] = {3, -1};
    CHECK(fastopt_sumsq_list_f32((const float *const *)x, bad, 2, &got, NULL) == FASTOPT_ERR_LENGTH && got == 7.0,
          "sumsq: n < 0");
    CHECK(fastopt_sumsq_list_f32(NULL, n, 2, &got, NULL) == FASTOPT_ERR_NULL && got == 7.0, "sumsq: NULL x");
    CHECK(fastopt_sumsq_list_f32((const float *const *)x, n, 2, NULL, NULL) == FASTOPT_ERR_NULL, "sumsq: NULL out");
    for (int t = 0; t < COUNT; t++)
        free(x[t]);
}

/* fastopt_maxabs_list: a plain scalar max |x| (NaN sticky, returned as the
 * canonical NAN) must give the same bits for 1 and 2 threads (49+ blocks, so 2
 * threads split them), f32 and f64, with the largest magnitude a negative
 * value; sizes around the SSE2 body (16 floats, 8 doubles) and its tail; Inf,
 * NaN of any sign and payload (in a body, in a tail, with an Inf), empty
 * tensors and calls; bad arguments refused without writing *out or each. */
#define FO_T_MAXABS_REF(SFX, T, FABS)                                                             \
    static double maxabs_reference##SFX(const T *const *x, const int64_t *n, int64_t count, double *each) \
    {                                                                                             \
        double total = 0.0;                                                                       \
        int nan_total = 0;                                                                        \
        for (int64_t t = 0; t < count; t++) {                                                     \
            double m = 0.0;                                                                       \
            int nan = 0;                                                                          \
            for (int64_t i = 0; i < n[t]; i++) {                                                  \
                const double a = (double)FABS(x[t][i]);                                           \
                if (a != a)                                                                       \
                    nan = 1;                                                                      \
                else if (a > m)                                                                   \
                    m = a;                                                                        \
            }                                                                                     \
            each[t] = nan ? (double)NAN : m;                                                      \
            nan_total |= nan;                                                                     \
            if (m > total)                                                                        \
                total = m;                                                                        \
        }                                                                                         \
        return nan_total ? (double)NAN : total;                                                   \
    }
FO_T_MAXABS_REF(_f32, float, fabsf)
FO_T_MAXABS_REF(_f64, double, fabs)

static int same_bits(const double *a, const double *b, size_t count)
{
    return !memcmp(a, b, count * sizeof *a);
}

static void test_maxabs(void)
{
    enum { COUNT = 7 };
    static const int64_t n[COUNT] = {1, 4097, 0, 200000, 9, 17, 16};
    float *x[COUNT];
    double *xd[COUNT];
    uint32_t seed = 777;
    for (int t = 0; t < COUNT; t++) {
        x[t] = malloc((size_t)(n[t] ? n[t] : 1) * sizeof(float));
        xd[t] = malloc((size_t)(n[t] ? n[t] : 1) * sizeof(double));
        for (int64_t i = 0; i < n[t]; i++) {
            seed = seed * 1664525u + 1013904223u;
            x[t][i] = (float)((int32_t)seed) / 2147483648.0f;
        }
    }
    x[3][123456] = -3.5f; /* the largest magnitude: negative, in the SSE2 body of a middle block */
    x[5][16] = -1.75f;    /* a tensor's largest in a tail */
    const double canonical = NAN;
    for (int round = 0; round < 4; round++) {
        /* 0: finite; 1: an Inf; 2: a NaN (negative, with a payload) in a body and an Inf; 3: a NaN in a tail only */
        if (round == 1)
            x[3][5] = -INFINITY;
        if (round == 2) {
            uint32_t bits = 0xffc01234u;
            memcpy(&x[3][77777], &bits, sizeof bits);
        }
        if (round == 3) {
            x[3][5] = 0.5f;
            x[3][77777] = 0.25f;
            x[5][16] = NAN;
        }
        for (int t = 0; t < COUNT; t++)
            for (int64_t i = 0; i < n[t]; i++)
                xd[t][i] = (double)x[t][i];
        double want_each[COUNT], want_each_d[COUNT];
        const double want = maxabs_reference_f32((const float *const *)x, n, COUNT, want_each);
        const double want_d = maxabs_reference_f64((const double *const *)xd, n, COUNT, want_each_d);
        CHECK(same_bits(&want, &want_d, 1) && same_bits(want_each, want_each_d, COUNT),
              "maxabs reference, round %d: f32 and f64 differ", round);
        CHECK(round == 0 ? want == 3.5 : round == 1 ? want == INFINITY : same_bits(&want, &canonical, 1),
              "maxabs reference, round %d: %g", round, want);
        for (int threads = 1; threads <= 2; threads++) {
            fastopt_set_num_threads(threads);
            double got = -1.0, each[COUNT];
            CHECK(fastopt_maxabs_list_f32((const float *const *)x, n, COUNT, &got, each) == FASTOPT_OK,
                  "maxabs f32: return code");
            CHECK(same_bits(&got, &want, 1), "maxabs f32, round %d, %d threads: %.17g, expected %.17g", round,
                  threads, got, want);
            CHECK(same_bits(each, want_each, COUNT), "maxabs f32, round %d, %d threads: per-tensor maxima differ",
                  round, threads);
            got = -1.0;
            CHECK(fastopt_maxabs_list_f32((const float *const *)x, n, COUNT, &got, NULL) == FASTOPT_OK
                  && same_bits(&got, &want, 1), "maxabs f32 without per-tensor maxima, round %d, %d threads",
                  round, threads);
            got = -1.0;
            CHECK(fastopt_maxabs_list_f64((const double *const *)xd, n, COUNT, &got, each) == FASTOPT_OK,
                  "maxabs f64: return code");
            CHECK(same_bits(&got, &want_d, 1), "maxabs f64, round %d, %d threads: %.17g, expected %.17g", round,
                  threads, got, want_d);
            CHECK(same_bits(each, want_each_d, COUNT), "maxabs f64, round %d, %d threads: per-tensor maxima differ",
                  round, threads);
        }
    }
    fastopt_set_num_threads(0);
    /* empty: no tensors, or only empty ones (NULL pointers allowed), give 0.0 */
    double got = -1.0, each[3] = {-1.0, -1.0, -1.0};
    CHECK(fastopt_maxabs_list_f32(NULL, NULL, 0, &got, NULL) == FASTOPT_OK && got == 0.0, "maxabs: no tensors");
    const float *none[3] = {NULL, NULL, NULL};
    static const int64_t zeros[3] = {0, 0, 0};
    got = -1.0;
    CHECK(fastopt_maxabs_list_f32(none, zeros, 3, &got, each) == FASTOPT_OK && got == 0.0 && each[0] == 0.0
          && each[1] == 0.0 && each[2] == 0.0, "maxabs: empty tensors");
    /* errors: *out and each untouched */
    got = 7.0;
    each[0] = 7.0;
    const int64_t bad[2] = {3, -1};
    CHECK(fastopt_maxabs_list_f32((const float *const *)x, bad, 2, &got, each) == FASTOPT_ERR_LENGTH && got == 7.0
          && each[0] == 7.0, "maxabs: n < 0");
    CHECK(fastopt_maxabs_list_f64((const double *const *)xd, n, -1, &got, each) == FASTOPT_ERR_LENGTH && got == 7.0,
          "maxabs: count < 0");
    CHECK(fastopt_maxabs_list_f32(NULL, n, 2, &got, NULL) == FASTOPT_ERR_NULL && got == 7.0, "maxabs: NULL x");
    CHECK(fastopt_maxabs_list_f64((const double *const *)xd, NULL, 2, &got, NULL) == FASTOPT_ERR_NULL && got == 7.0,
          "maxabs: NULL n");
    const float *holes[2] = {x[0], NULL};
    static const int64_t ones[2] = {1, 1};
    CHECK(fastopt_maxabs_list_f32(holes, ones, 2, &got, each) == FASTOPT_ERR_NULL && got == 7.0 && each[0] == 7.0,
          "maxabs: NULL x[i] with n[i] > 0");
    CHECK(fastopt_maxabs_list_f32((const float *const *)x, n, 2, NULL, NULL) == FASTOPT_ERR_NULL,
          "maxabs: NULL out");
    for (int t = 0; t < COUNT; t++) {
        free(x[t]);
        free(xd[t]);
    }
}

int main(void)
{
    const char *want = getenv("FASTOPT_ISA");
    printf("fastopt %s, CPU path %s (FASTOPT_ISA=%s), %d threads, %d rules\n", fastopt_version(), fastopt_isa(),
           want ? want : "", fastopt_get_num_threads(), FO_T_NRULES);
    if (want && strcmp(want, fastopt_isa()))
        printf("note: FASTOPT_ISA=%s is not supported here; testing %s\n", want, fastopt_isa());
    CHECK(fastopt_get_flush_denormal() == 0, "flush denormals is off by default");
    CHECK(fastopt_set_flush_denormal(7) == FASTOPT_OK && fastopt_get_flush_denormal() == 1, "nonzero is on");
    CHECK(fastopt_set_flush_denormal(0) == FASTOPT_OK && fastopt_get_flush_denormal() == 0, "0 is off");
    test_flush_f32();
    test_flush_f64();
    /* everything below runs with flush off (after it was on): today's kernels */
    test_errors();
    test_matrix();
    test_threads();
    test_lists_f32();
    test_lists_f64();
    test_sumsq();
    test_maxabs();
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures != 0;
}
