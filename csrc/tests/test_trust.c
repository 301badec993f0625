/* The two-pass rules' entry points (fastopt.h, "Two-pass rules"), for every rule
 * of the table that has them (fo_t_two_pass), every flag combination and both
 * dtypes, over tensors around the block (4096) and lane (8) boundaries, one of
 * them all zeros (the ratio's zero guards) and one large enough for threads:
 *   - fastopt_<rule>_norms_list_*: param's sums are fastopt_sumsq_list's
 *     per-tensor sums, bit for bit; the same sums for 1 and 2 threads;
 *   - fastopt_<rule>_trust_list_*: bitwise the composition it promises
 *     (norms_list, then fastopt_<rule>_ratio and one flat update per tensor),
 *     for 1 and 2 threads; the flat _trust_ is the list of one; when the ratio
 *     does not apply (ratio leaves the scalars as they are), exactly _list_;
 *   - argument errors return their codes with every buffer untouched.
 * The math itself (the element functions, the ratio) is checked against the
 * NumPy reference by the Python tests (tests/test_trust_rules.py). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"
#include "rules_table.inc"

#define FO_T_CAT_(a, b) a##b
#define FO_T_CAT(a, b) FO_T_CAT_(a, b)

static int failures;

#define CHECK(cond, ...)                                 \
    do {                                                 \
        if (!(cond)) {                                   \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
            printf(__VA_ARGS__);                         \
            printf("\n");                                \
            failures++;                                  \
        }                                                \
    } while (0)

enum { NT = 7, NB = 2 + FO_T_MAX_STATE };
static const int64_t SIZES[NT] = {0, 20, 1, 7, 4097, 3 * 4096 + 5, 70001}; /* tensor 1: all zeros */

static uint64_t next64(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static double uniform(uint64_t *s) { return (double)(next64(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0; }

/* The scalars structs equal field by field (no padding bytes compared). */
static int same_scalars(int rule, const fo_t_scalars *a, const fo_t_scalars *b)
{
    const fo_t_rule *r = &FO_T_RULES[rule];
    for (int f = 0; f < r->nfields; f++) {
        const size_t size = r->fields[f].flag ? sizeof(int) : sizeof(double);
        if (memcmp((const char *)a + r->fields[f].offset, (const char *)b + r->fields[f].offset, size))
            return 0;
    }
    return 1;
}

#define FO_T_TRUST_CASE(T, SFX)                                                                              \
    static int FO_T_CAT(same, SFX)(T *const *a, T *const *b)                                                 \
    {                                                                                                        \
        for (int t = 0; t < NT; t++)                                                                         \
            for (int64_t i = 0; i < SIZES[t]; i++)                                                           \
                if (memcmp(&a[t][i], &b[t][i], sizeof(T)) && !(isnan(a[t][i]) && isnan(b[t][i])))           \
                    return 0;                                                                                \
        return 1;                                                                                            \
    }                                                                                                        \
    /* Copies k = 0..NC-1 of every buffer (role b, tensor t): buf[k][b][t]. */                                \
    enum { FO_T_CAT(NC, SFX) = 5 };                                                                          \
    static void FO_T_CAT(trust_case, SFX)(int rule, unsigned flags)                                          \
    {                                                                                                        \
        const fo_t_rule *r = &FO_T_RULES[rule];                                                              \
        fo_t_scalars s;                                                                                      \
        double carry = r->carry_init;                                                                        \
        if (fo_t_prepare(rule, &s, &carry, flags, 3) != FASTOPT_OK)                                          \
            return;                                                                                          \
        const unsigned need = fo_t_need(rule, &s);                                                           \
        T *buf[FO_T_CAT(NC, SFX)][NB][NT];                                                                   \
        uint64_t rng = 0x2545F4914F6CDD1Dull ^ (uint64_t)rule << 32 ^ flags;                                 \
        for (int b = 0; b < NB; b++)                                                                         \
            for (int t = 0; t < NT; t++) {                                                                   \
                T *x = (T *)malloc((size_t)(SIZES[t] ? SIZES[t] : 1) * sizeof(T));                           \
                for (int64_t i = 0; i < SIZES[t]; i++)                                                       \
                    x[i] = t == 1 && b < 2 ? (T)0 : (T)(b >= 2 ? fabs(uniform(&rng)) : uniform(&rng));       \
                buf[0][b][t] = x;                                                                            \
                for (int k = 1; k < FO_T_CAT(NC, SFX); k++) {                                                \
                    buf[k][b][t] = (T *)malloc((size_t)(SIZES[t] ? SIZES[t] : 1) * sizeof(T));               \
                    memcpy(buf[k][b][t], x, (size_t)SIZES[t] * sizeof(T));                                   \
                }                                                                                            \
            }                                                                                                \
        T *const *st[FO_T_CAT(NC, SFX)][FO_T_MAX_STATE];                                                     \
        for (int k = 0; k < FO_T_CAT(NC, SFX); k++)                                                          \
            for (int j = 0; j < FO_T_MAX_STATE; j++)                                                         \
                st[k][j] = (need >> j & 1u) ? buf[k][2 + j] : NULL;                                          \
        const char *dt = sizeof(T) == 4 ? "f32" : "f64";                                                     \
        /* pass 1: param's sums are fastopt_sumsq_list's, for 1 and 2 threads */                            \
        double ps[2][NT], us[2][NT], each[NT], total;                                                        \
        for (int th = 0; th < 2; th++) {                                                                     \
            fastopt_set_num_threads(th + 1);                                                                 \
            CHECK(FO_T_CAT(fo_t_norms_list, SFX)(rule, buf[0][0], (const T *const *)buf[0][1], st[0], SIZES,  \
                                                 NT, &s, ps[th], us[th]) == FASTOPT_OK,                      \
                  "%s %s flags %u: norms_list failed", r->name, dt, flags);                                 \
        }                                                                                                    \
        CHECK(FO_T_CAT(fastopt_sumsq_list, SFX)((const T *const *)buf[0][0], SIZES, NT, &total, each) == 0,   \
              "sumsq_list failed");                                                                          \
        for (int t = 0; t < NT; t++) {                                                                       \
            CHECK(!memcmp(&ps[0][t], &each[t], sizeof(double)), "%s %s flags %u: param_sumsq[%d] = %a, "     \
                  "fastopt_sumsq_list's %a", r->name, dt, flags, t, ps[0][t], each[t]);                      \
            CHECK(!memcmp(&ps[0][t], &ps[1][t], sizeof(double)) && !memcmp(&us[0][t], &us[1][t], sizeof(double)),\
                  "%s %s flags %u: tensor %d's sums differ between 1 and 2 threads", r->name, dt, flags, t); \
        }                                                                                                    \
        /* both passes: the composition, for 1 and 2 threads; the flat call of each tensor alike */          \
        for (int th = 0; th < 2; th++) {                                                                     \
            fastopt_set_num_threads(th + 1);                                                                 \
            CHECK(FO_T_CAT(fo_t_trust_list, SFX)(rule, buf[1 + th][0], (const T *const *)buf[1 + th][1],      \
                                                 st[1 + th], SIZES, NT, &s) == FASTOPT_OK,                   \
                  "%s %s flags %u: trust_list failed", r->name, dt, flags);                                 \
        }                                                                                                    \
        int trusted = 0;                                                                                     \
        for (int t = 0; t < NT; t++) {                                                                       \
            fo_t_scalars mine;                                                                               \
            T *sv[FO_T_MAX_STATE];                                                                           \
            CHECK(fo_t_ratio(rule, &mine, &s, ps[0][t], us[0][t]) == FASTOPT_OK, "ratio failed");            \
            trusted |= !same_scalars(rule, &mine, &s);                                                       \
            if (t == 1)                                                                                      \
                CHECK(same_scalars(rule, &mine, &s), "%s %s flags %u: the zero tensor's ratio changed the "   \
                      "scalars (its norms are 0: the guard keeps them)", r->name, dt, flags);               \
            for (int j = 0; j < FO_T_MAX_STATE; j++)                                                         \
                sv[j] = st[3][j] ? buf[3][2 + j][t] : NULL;                                                  \
            CHECK(FO_T_CAT(fo_t_run, SFX)(rule, buf[3][0][t], buf[3][1][t], sv, SIZES[t], &mine) == 0,        \
                  "flat run failed");                                                                        \
            for (int j = 0; j < FO_T_MAX_STATE; j++)                                                         \
                sv[j] = st[4][j] ? buf[4][2 + j][t] : NULL;                                                  \
            CHECK(FO_T_CAT(fo_t_trust, SFX)(rule, buf[4][0][t], buf[4][1][t], sv, SIZES[t], &s) == 0,         \
                  "flat trust failed");                                                                      \
        }                                                                                                    \
        for (int b = 0; b < NB; b++) {                                                                       \
            if (b >= 2 && !st[0][b - 2])                                                                     \
                continue;                                                                                    \
            CHECK(FO_T_CAT(same, SFX)(buf[1][b], buf[2][b]), "%s %s flags %u: buffer %d differs between 1 and " \
                  "2 threads", r->name, dt, flags, b);                                                       \
            CHECK(FO_T_CAT(same, SFX)(buf[1][b], buf[3][b]), "%s %s flags %u: buffer %d differs from norms + " \
                  "ratio + one flat update per tensor", r->name, dt, flags, b);                              \
        }                                                                                                    \
        if (!trusted) { /* no ratio applies: exactly the list update */                                      \
            for (int b = 0; b < NB; b++)                                                                     \
                for (int t = 0; t < NT; t++)                                                                 \
                    memcpy(buf[3][b][t], buf[0][b][t], (size_t)SIZES[t] * sizeof(T));                        \
            CHECK(FO_T_CAT(fo_t_list, SFX)(rule, buf[3][0], (const T *const *)buf[3][1], st[3], SIZES, NT, &s)  \
                  == 0, "list failed");                                                                      \
            for (int b = 0; b < NB; b++)                                                                     \
                if (b < 2 || st[0][b - 2])                                                                   \
                    CHECK(FO_T_CAT(same, SFX)(buf[1][b], buf[3][b]), "%s %s flags %u: without a ratio, "      \
                          "buffer %d differs from the list update", r->name, dt, flags, b);                  \
        }                                                                                                    \
        /* flat _trust_ of each tensor: its own ratio, the same as in the list (sums are per tensor) */      \
        for (int b = 0; b < NB; b++)                                                                         \
            if (b < 2 || st[0][b - 2])                                                                       \
                CHECK(FO_T_CAT(same, SFX)(buf[1][b], buf[4][b]), "%s %s flags %u: flat trust calls differ "   \
                      "(buffer %d)", r->name, dt, flags, b);                                                  \
        /* errors: codes, and nothing written */                                                             \
        for (int b = 0; b < NB; b++)                                                                         \
            for (int t = 0; t < NT; t++)                                                                     \
                memcpy(buf[3][b][t], buf[0][b][t], (size_t)SIZES[t] * sizeof(T));                            \
        int64_t bad[NT];                                                                                     \
        memcpy(bad, SIZES, sizeof bad);                                                                      \
        bad[4] = -1;                                                                                         \
        CHECK(FO_T_CAT(fo_t_trust_list, SFX)(rule, buf[3][0], (const T *const *)buf[3][1], st[3], SIZES, NT,  \
                                             NULL) == FASTOPT_ERR_NULL, "NULL scalars");                     \
        CHECK(FO_T_CAT(fo_t_trust_list, SFX)(rule, buf[3][0], (const T *const *)buf[3][1], st[3], SIZES, -1,  \
                                             &s) == FASTOPT_ERR_LENGTH, "count < 0");                        \
        CHECK(FO_T_CAT(fo_t_trust_list, SFX)(rule, buf[3][0], (const T *const *)buf[3][1], st[3], bad, NT,    \
                                             &s) == FASTOPT_ERR_LENGTH, "n[4] < 0");                         \
        CHECK(FO_T_CAT(fo_t_trust_list, SFX)(rule, NULL, (const T *const *)buf[3][1], st[3], SIZES, NT, &s)   \
              == FASTOPT_ERR_NULL, "NULL param table");                                                      \
        CHECK(FO_T_CAT(fo_t_norms_list, SFX)(rule, buf[3][0], (const T *const *)buf[3][1], st[3], SIZES, NT,  \
                                             &s, NULL, us[0]) == FASTOPT_ERR_NULL, "NULL sums");             \
        for (int j = 0; j < FO_T_MAX_STATE; j++)                                                             \
            if (st[3][j]) {                                                                                  \
                T *const *keep = st[3][j];                                                                   \
                st[3][j] = NULL;                                                                             \
                CHECK(FO_T_CAT(fo_t_trust_list, SFX)(rule, buf[3][0], (const T *const *)buf[3][1], st[3],     \
                                                     SIZES, NT, &s) == FASTOPT_ERR_NULL,                     \
                      "%s: a NULL %s table", r->name, r->state[j]);                                          \
                st[3][j] = keep;                                                                             \
            }                                                                                                \
        for (int b = 0; b < NB; b++)                                                                         \
            for (int t = 0; t < NT; t++)                                                                     \
                CHECK(!memcmp(buf[3][b][t], buf[0][b][t], (size_t)SIZES[t] * sizeof(T)),                     \
                      "%s %s flags %u: an error path wrote buffer %d", r->name, dt, flags, b);              \
        for (int k = 0; k < FO_T_CAT(NC, SFX); k++)                                                          \
            for (int b = 0; b < NB; b++)                                                                     \
                for (int t = 0; t < NT; t++)                                                                 \
                    free(buf[k][b][t]);                                                                      \
    }

FO_T_TRUST_CASE(float, _f32)
FO_T_TRUST_CASE(double, _f64)

int main(void)
{
    int cases = 0;
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        if (!fo_t_two_pass(rule))
            continue;
        /* every flag combination, and with the hyperparameters whose default is 0 at 0.5 */
        for (unsigned flags = 0; flags < (2u << FO_T_RULES[rule].nflags); flags++) {
            trust_case_f32(rule, flags);
            trust_case_f64(rule, flags);
            cases++;
        }
    }
    printf("two-pass: %d rule and flag combinations on %s\n", cases, fastopt_isa());
    if (failures)
        printf("%d failures\n", failures);
    return failures ? 1 : 0;
}
