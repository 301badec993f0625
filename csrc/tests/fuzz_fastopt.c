/* A deterministic, seedable random-input driver for the public fastopt API
 * (ctest runs it once per CPU path and under ASan+UBSan; see CMakeLists.txt).
 * Every rule comes from the generated table (rules_table.inc): the driver
 * names no rule, and a rule added to the table is fuzzed without a line
 * changed here.
 *
 * Each case draws a rule, a dtype, a length (0, tails around SIMD widths,
 * now and then past the OpenMP threshold), buffers and hyperparameters, then
 * runs 1-4 consecutive steps and checks:
 *   - prepare's return code against the table's ranges (fo_t_expect_h: each
 *     hyperparameter's kind, the step, the carried value, the relation across
 *     hyperparameters), with valid and invalid values and NULL pointers; on
 *     error *out and the carried value are untouched. (The scalars prepare
 *     computes are compared with Python's, bit for bit, for every rule by
 *     tests/test_c_library.py: this driver does not repeat the formulas.)
 *   - every written buffer against the plain reference loops of
 *     rules_table.inc (fo_t_ref_*), bitwise (any NaN equals any NaN); grad
 *     unchanged; an optional buffer that is not needed, when passed, untouched;
 *     canary elements before and after each misaligned buffer untouched
 *     (exact-size buffers: ASan watches the ends);
 *   - some steps through the list entry points, the buffers cut into 1-6
 *     tensors (empty ones included): the same result as the reference;
 *   - for large buffers (and some small ones) the same step on two thread
 *     counts (1 vs 2, 3 or 4), both against the reference;
 *   - error paths, flat and list: NULL scalars, n < 0 (count < 0, an n[i] < 0),
 *     a NULL required buffer (table, entry, n): the documented code and every
 *     buffer byte-identical afterwards.
 * Some cases skip prepare and fill the scalars struct by hand with arbitrary
 * values (the header allows it), field by field from the table: kernels and
 * reference must still agree bit for bit.
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
#include "rules_table.inc"

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

static double pick(uint64_t *r, const double *v, int nv) { return v[rint_(r, 0, nv - 1)]; }
#define PICK(r, arr) pick(r, arr, (int)(sizeof(arr) / sizeof(arr[0])))

/* ---- hyperparameters ---------------------------------------------------- */

typedef struct {
    double h[FO_T_MAX_HYPER]; /* the real hyperparameters, in prepare's order */
    unsigned flags;           /* the flag hyperparameters, bit k: flag k */
    int64_t step;             /* first step of the case */
    double carry;             /* the carried value before the first step (rules with one) */
} hyper;

/* Values around every kind's boundaries (0, 1, the subnormals, the largest
 * doubles) and the non-finite ones; draws for a kind take those of this pool
 * that fo_t_kind_ok accepts (valid) or refuses (invalid), so any kind of the
 * table is fuzzed at its own boundaries. */
static const double POOL[] = {0.0, -0.0, 5e-324, -5e-324, DBL_MIN, -DBL_MIN, 1e-45, 1e-12, 1e-8, 1e-3, 1e-2,
                              0.1, 0.5, -0.5, 0.9, 0.99, 0.999, 0x1.fffffffffffffp-1, 1.0, 0x1.0000000000001p+0,
                              -1e-300, -1e-3, 1.5, 2.0, -1.0, -2.0, 3e38, 1e30, 1e300, -1e300, DBL_MAX, -DBL_MAX,
                              NAN, -NAN, INFINITY, -INFINITY};

static double gen_hyper_value(uint64_t *r, int kind, int valid)
{
    for (int tries = 0; tries < 200; tries++) {
        double x;
        if (valid && chance(r, 40)) { /* a continuous draw */
            switch ((int)rint_(r, 0, 3)) {
            case 0: x = pow(10.0, -12.0 + 14.0 * unif(r)); break;
            case 1: x = unif(r); break;
            case 2: x = 4.0 * unif(r) - 2.0; break;
            default: x = chance(r, 50) ? 1.0 : 0.0; break;
            }
        } else {
            x = PICK(r, POOL);
        }
        if (fo_t_kind_ok(kind, x) == valid)
            return x;
    }
    return valid ? 0.0 : NAN;
}

/* Mostly valid sets (to exercise the kernels); some with invalid members. */
static void gen_hyper(uint64_t *r, int rule, hyper *hp)
{
    const fo_t_rule *R = &FO_T_RULES[rule];
    const int all_valid = chance(r, 80);
    /* the member made invalid: a hyperparameter, nhyper: the step, nhyper + 1: the carried value */
    const int bad_at = all_valid ? -1 : (int)rint_(r, 0, R->nhyper + 1);
    memset(hp, 0, sizeof *hp);
    const int carry_valid = all_valid || (bad_at != R->nhyper + 1 && !chance(r, 5));
    hp->carry = R->carry_kind < 0 ? 0.0
                : carry_valid && chance(r, 40) ? R->carry_init
                                               : gen_hyper_value(r, R->carry_kind, carry_valid);
    for (int tries = 0;; tries++) {
        hp->flags = (unsigned)(next64(r) & ((1u << R->nflags) - 1u));
        for (int k = 0; k < R->nhyper; k++) {
            const int valid = all_valid || (k != bad_at && !chance(r, 10));
            /* the default now and then: 0 turns an option off (momentum, weight decay: no buffer, no term) */
            hp->h[k] = valid && chance(r, 25) ? R->hyper[k].dflt : gen_hyper_value(r, R->hyper[k].kind, valid);
        }
        /* a set that is valid but for the relation across hyperparameters (SGD's Nesterov): mostly drawn again */
        if (!all_valid || !R->has_relation || tries >= 50 || fo_t_relation(rule, hp->carry, hp->h, hp->flags))
            break;
    }
    static const int64_t steps_ok[] = {1, 1, 1, 2, 3, 7, 10, 100, 1000000, 1000000000000ll, INT64_MAX - 3};
    static const int64_t steps_bad[] = {0, -1, -2, INT64_MIN, -1000000};
    const int step_valid = all_valid || (bad_at != R->nhyper && !chance(r, 5));
    hp->step = step_valid ? steps_ok[rint_(r, 0, 10)] : steps_bad[rint_(r, 0, 4)];
    if (step_valid && chance(r, 20)) hp->step = rint_(r, 1, 5000);
}

/* "lr=-1 (not finite and >= 0) beta1=0.9 ... flags=0x1 (amsgrad maximize) carry=1": for messages. */
static void describe(char *out, size_t size, int rule, const hyper *hp, double carry)
{
    const fo_t_rule *R = &FO_T_RULES[rule];
    size_t at = 0;
    for (int k = 0; k < R->nhyper && at < size; k++) {
        const int kind = R->hyper[k].kind, ok = fo_t_kind_ok(kind, hp->h[k]);
        at += (size_t)snprintf(out + at, size - at, "%s=%g%s%s%s ", R->hyper[k].name, hp->h[k], ok ? "" : " (not ",
                               ok ? "" : FO_T_KIND_RANGE[kind], ok ? "" : ")");
    }
    if (at < size)
        at += (size_t)snprintf(out + at, size - at, "flags=0x%x (%s)", hp->flags, R->flags);
    if (R->carry_kind >= 0 && at < size)
        snprintf(out + at, size - at, " carry=%g", carry);
}

/* Same double, or both NaN. */
static int same_d(double a, double b) { return !memcmp(&a, &b, sizeof a) || (isnan(a) && isnan(b)); }

/* Scalars filled by hand, field by field, with arbitrary values (flags 0 or 1). */
static double raw_value(uint64_t *r)
{
    static const double v[] = {0.0, -0.0, 1.0, -1.0, 0.5, 0.9, 0.999, 1e-3, 1e-8, 2.0, 1e30, -1e30, 1e300,
                               DBL_MAX, 5e-324, 1e-40, INFINITY, -INFINITY, NAN};
    const int c = (int)rint_(r, 0, 99);
    if (c < 20) return 0.0; /* a term off (weight decay) */
    if (c < 35) return 1.0; /* a multiplier off (param_decay), grad_sign */
    if (c < 45) return -1.0;
    return chance(r, 30) ? 4.0 * unif(r) - 2.0 : PICK(r, v);
}
static void raw_scalars(uint64_t *r, int rule, fo_t_scalars *s)
{
    const fo_t_rule *R = &FO_T_RULES[rule];
    memset(s, 0, sizeof *s);
    for (int f = 0; f < R->nfields; f++) {
        unsigned char *at = (unsigned char *)s + R->fields[f].offset;
        if (R->fields[f].flag) {
            const int bit = (int)(next64(r) & 1);
            memcpy(at, &bit, sizeof bit);
        } else {
            const double x = raw_value(r);
            memcpy(at, &x, sizeof x);
        }
    }
}

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

/* ---- calling the library and the reference ------------------------------ */

#define NBUF (2 + FO_T_MAX_STATE) /* param, grad, the state buffers */
#define MAXT 6                    /* most tensors of a list call */

/* A list call over the buffers cut into tensors. */
typedef struct {
    int64_t count;
    int64_t len[MAXT];
    void *ent[NBUF][MAXT]; /* each tensor's piece of each buffer */
    int table[NBUF];       /* 0: the table is passed as NULL */
    int null_n;            /* n passed as NULL */
} list_call;

/* The n elements of each buffer cut into 1-MAXT tensors (some empty). A state
 * buffer passed as NULL (unneeded, or n == 0) gets a NULL table or, like a
 * required buffer, a table of NULL entries (all of them empty tensors). */
static void make_list(uint64_t *r, int dt, void *const *b, int64_t n, unsigned need, int nstate, list_call *lc)
{
    const size_t es = dt ? 8 : 4;
    int64_t cut[MAXT + 1];
    memset(lc, 0, sizeof *lc);
    lc->count = rint_(r, 1, MAXT);
    cut[0] = 0, cut[lc->count] = n;
    for (int64_t i = 1; i < lc->count; i++) {
        int64_t x = chance(r, 20) ? cut[i - 1] : rint_(r, 0, n), j = i; /* sorted: insertion */
        while (j > 1 && cut[j - 1] > x) cut[j] = cut[j - 1], j--;
        cut[j] = x;
    }
    for (int64_t i = 0; i < lc->count; i++) {
        lc->len[i] = cut[i + 1] - cut[i];
        for (int k = 0; k < NBUF; k++) lc->ent[k][i] = b[k] ? (unsigned char *)b[k] + (size_t)cut[i] * es : NULL;
    }
    for (int k = 0; k < NBUF; k++)
        lc->table[k] = k < 2 || (k - 2 < nstate && (b[k] || (need >> (k - 2) & 1u) || chance(r, 50)));
}

#define FO_CALLS(T, SFX)                                                                                    \
    static int call_flat##SFX(int rule, void *const *b, int64_t n, const fo_t_scalars *s)                   \
    {                                                                                                       \
        T *st[FO_T_MAX_STATE];                                                                              \
        for (int k = 0; k < FO_T_MAX_STATE; k++) st[k] = (T *)b[2 + k];                                     \
        return fo_t_run##SFX(rule, (T *)b[0], (const T *)b[1], st, n, s);                                   \
    }                                                                                                       \
    static void call_ref##SFX(int rule, void *const *b, int64_t n, const fo_t_scalars *s)                   \
    {                                                                                                       \
        T *st[FO_T_MAX_STATE];                                                                              \
        for (int k = 0; k < FO_T_MAX_STATE; k++) st[k] = (T *)b[2 + k];                                     \
        fo_t_ref##SFX(rule, (T *)b[0], (const T *)b[1], st, n, s);                                          \
    }                                                                                                       \
    static int call_list##SFX(int rule, const list_call *lc, const fo_t_scalars *s)                         \
    {                                                                                                       \
        T *p[MAXT], *st[FO_T_MAX_STATE][MAXT];                                                              \
        const T *g[MAXT];                                                                                   \
        T *const *stab[FO_T_MAX_STATE];                                                                     \
        for (int64_t i = 0; i < lc->count && i < MAXT; i++) {                                               \
            p[i] = (T *)lc->ent[0][i], g[i] = (const T *)lc->ent[1][i];                                     \
            for (int k = 0; k < FO_T_MAX_STATE; k++) st[k][i] = (T *)lc->ent[2 + k][i];                     \
        }                                                                                                   \
        for (int k = 0; k < FO_T_MAX_STATE; k++) stab[k] = lc->table[2 + k] ? st[k] : NULL;                 \
        return fo_t_list##SFX(rule, lc->table[0] ? p : NULL, lc->table[1] ? g : NULL, stab,                 \
                              lc->null_n ? NULL : lc->len, lc->count, s);                                   \
    }
FO_CALLS(float, _f32)
FO_CALLS(double, _f64)

static int call_flat(int dt, int rule, void *const *b, int64_t n, const fo_t_scalars *s)
{
    return dt ? call_flat_f64(rule, b, n, s) : call_flat_f32(rule, b, n, s);
}
static void call_ref(int dt, int rule, void *const *b, int64_t n, const fo_t_scalars *s)
{
    if (dt)
        call_ref_f64(rule, b, n, s);
    else
        call_ref_f32(rule, b, n, s);
}
static int call_list(int dt, int rule, const list_call *lc, const fo_t_scalars *s)
{
    return dt ? call_list_f64(rule, lc, s) : call_list_f32(rule, lc, s);
}

/* ---- one case ------------------------------------------------------------- */

typedef struct {
    long cases, steps, calls, list_calls, error_cases, thread_pairs, raw_cases, mismatches;
    long elements;
    long per_rule[FO_T_NRULES];
} counts;

static uint64_t g_seed;
static int g_verbose;

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
               (unsigned long long)g_seed, (unsigned long long)iter, FO_T_RULES[rule].name, dt ? "f64" : "f32",
               (long long)n, (long long)step, threads, fastopt_isa(), what);
}

static const char *buf_name(int rule, int k)
{
    return k == 0 ? "param" : k == 1 ? "grad" : FO_T_RULES[rule].state[k - 2] ? FO_T_RULES[rule].state[k - 2] : "-";
}

static void run_case(uint64_t iter, counts *ct)
{
    uint64_t r = g_seed * 0x9E3779B97F4A7C15ull ^ (iter + 1) * 0xD1B54A32D192ED03ull;
    next64(&r);
    const int rule = (int)rint_(&r, 0, FO_T_NRULES - 1), dt = (int)rint_(&r, 0, 1);
    const fo_t_rule *R = &FO_T_RULES[rule];
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
    for (int k = 2 + R->nstate; k < NBUF; k++) lb[k].ptr = NULL; /* the rule has no such buffer */

    fo_t_scalars s;
    double carry = hp.carry;
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
            if (chance(&r, 5)) { /* NULL out / NULL carried value */
                const double carry_before = carry;
                const int null_carry = R->carry_kind >= 0 && chance(&r, 50);
                const int rc = fo_t_prepare_h(rule, null_carry ? &s : NULL, null_carry ? NULL : &carry, hp.h,
                                              hp.flags, step);
                ct->error_cases++;
                if (rc != FASTOPT_ERR_NULL) report(ct, iter, rule, dt, n, step, 0, "prepare with a NULL pointer");
                if (!same_d(carry, carry_before))
                    report(ct, iter, rule, dt, n, step, 0, "prepare(NULL) wrote the carried value");
            }
            fo_t_scalars before;
            memset(&s, 0x5A, sizeof s);
            before = s;
            const double carry_in = carry;
            const int want = fo_t_expect_h(rule, carry, hp.h, hp.flags, step);
            const int rc = fo_t_prepare_h(rule, &s, &carry, hp.h, hp.flags, step);
            if (rc != want) {
                char msg[400], desc[320];
                describe(desc, sizeof desc, rule, &hp, carry_in);
                snprintf(msg, sizeof msg, "prepare returned %d, expected %d (%s)", rc, want, desc);
                report(ct, iter, rule, dt, n, step, 0, msg);
                break;
            }
            if (rc != FASTOPT_OK) {
                ct->error_cases++;
                if (memcmp(&s, &before, sizeof s)) report(ct, iter, rule, dt, n, step, 0, "prepare wrote *out on error");
                if (!same_d(carry, carry_in))
                    report(ct, iter, rule, dt, n, step, 0, "prepare wrote the carried value on error");
                break;
            }
        }
        if (t == 0) {
            /* An optional buffer the options leave unused: NULL, or a buffer
             * that must come back untouched. */
            need = fo_t_need(rule, &s);
            for (int k = 0; k < R->nstate; k++)
                if (!(need >> k & 1u) && n > 0 && chance(&r, 50)) pass_unneeded |= 1u << k;
            for (int k = 0; k < R->nstate; k++)
                if (!(need >> k & 1u) && !(pass_unneeded >> k & 1u)) lb[2 + k].ptr = NULL;
        }
        void *args[NBUF];
        for (int k = 0; k < NBUF; k++) args[k] = lb[k].ptr;
        for (int k = 0; k < NBUF; k++) memcpy(snap[k], lb[k].base, (lb[k].pre + (size_t)n + lb[k].post) * es);

        /* An error path: the documented code, and not a byte written. */
        if (chance(&r, 25)) {
            int want, want2 = 1, rc, kind; /* want2: a second acceptable code */
            int64_t en = n;
            if (!chance(&r, 40)) { /* flat */
                void *eargs[NBUF];
                memcpy(eargs, args, sizeof eargs);
                int null_s = 0;
                kind = (int)rint_(&r, 0, 3);
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
                    for (int k = 0; k < R->nstate; k++)
                        if (need >> k & 1u) cand[nc++] = 2 + k;
                    eargs[cand[rint_(&r, 0, nc - 1)]] = NULL;
                    if (chance(&r, 20)) eargs[cand[rint_(&r, 0, nc - 1)]] = NULL;
                    want = FASTOPT_ERR_NULL;
                }
                rc = call_flat(dt, rule, eargs, en, null_s ? NULL : &s);
            } else { /* list */
                list_call lc;
                make_list(&r, dt, args, n, need, R->nstate, &lc);
                int null_s = 0, cand[NBUF], nc = 0;
                cand[nc++] = 0, cand[nc++] = 1;
                for (int k = 0; k < R->nstate; k++)
                    if (need >> k & 1u) cand[nc++] = 2 + k;
                kind = 10 + (int)rint_(&r, 0, 5);
                if (kind == 14 && n == 0) kind = 15; /* no tensor with elements: no entry is required */
                want = FASTOPT_ERR_NULL;
                switch (kind) {
                case 10: null_s = 1; break;
                case 11:
                    lc.count = chance(&r, 20) ? INT64_MIN : -rint_(&r, 1, 100), want = FASTOPT_ERR_LENGTH;
                    break;
                case 12:
                    lc.len[rint_(&r, 0, lc.count - 1)] = chance(&r, 20) ? INT64_MIN : -rint_(&r, 1, 1000);
                    want = FASTOPT_ERR_LENGTH;
                    break;
                case 13: lc.table[cand[rint_(&r, 0, nc - 1)]] = 0; break; /* a required table */
                case 14: {                                                 /* a required entry */
                    int64_t i;
                    do i = rint_(&r, 0, lc.count - 1); while (lc.len[i] == 0);
                    lc.ent[cand[rint_(&r, 0, nc - 1)]][i] = NULL;
                    break;
                }
                default: lc.null_n = 1; break;
                }
                rc = call_list(dt, rule, &lc, null_s ? NULL : &s);
            }
            ct->error_cases++;
            if (rc != want && rc != want2) {
                char msg[96];
                snprintf(msg, sizeof msg, "error path (kind %d, n %lld) returned %d, expected %d", kind,
                         (long long)en, rc, want);
                report(ct, iter, rule, dt, n, step, 0, msg);
            }
            for (int k = 0; k < NBUF; k++)
                if (memcmp(snap[k], lb[k].base, (lb[k].pre + (size_t)n + lb[k].post) * es)) {
                    char msg[96];
                    snprintf(msg, sizeof msg, "error path (kind %d) wrote %s", kind, buf_name(rule, k));
                    report(ct, iter, rule, dt, n, step, 0, msg);
                }
        }

        /* The reference step (the buffers the call needs). */
        {
            void *rb[NBUF] = {ref[0], ref[1]};
            for (int k = 0; k < FO_T_MAX_STATE; k++) rb[2 + k] = (need >> k & 1u) ? ref[2 + k] : NULL;
            call_ref(dt, rule, rb, n, &s);
        }

        /* The library step, flat or as a list, on one or two thread counts. */
        const int as_list = chance(&r, 30);
        list_call lc;
        if (as_list) make_list(&r, dt, args, n, need, R->nstate, &lc);
        const int pair = large || chance(&r, 10);
        int tc[2] = {(int)rint_(&r, 0, 3), 0};
        if (pair) tc[0] = 1, tc[1] = (int)rint_(&r, 2, 4), ct->thread_pairs++;
        for (int run = 0; run < (pair ? 2 : 1); run++) {
            if (run)
                for (int k = 0; k < NBUF; k++)
                    memcpy(lb[k].base, snap[k], (lb[k].pre + (size_t)n + lb[k].post) * es);
            fastopt_set_num_threads(tc[run]);
            const int rc = as_list ? call_list(dt, rule, &lc, &s) : call_flat(dt, rule, args, n, &s);
            if (rc != FASTOPT_OK) {
                char msg[64];
                snprintf(msg, sizeof msg, "valid %s call returned %d", as_list ? "list" : "flat", rc);
                report(ct, iter, rule, dt, n, step, tc[run], msg);
                break;
            }
            for (int k = 0; k < NBUF; k++) {
                char msg[200];
                if (!fbuf_guards_ok(&lb[k], n, es)) {
                    snprintf(msg, sizeof msg, "wrote outside %s (offset %zu, %zu after)", buf_name(rule, k),
                             lb[k].pre, lb[k].post);
                    report(ct, iter, rule, dt, n, step, tc[run], msg);
                }
                if (!args[k] || n == 0) continue;
                const int unused = k >= 2 && (k - 2 >= R->nstate || !(need >> (k - 2) & 1u));
                if (k == 1 || unused) { /* grad, unused state: bytes unchanged */
                    if (memcmp(args[k], snap[k] + lb[k].pre * es, nbytes)) {
                        snprintf(msg, sizeof msg, "%s written (%s)", buf_name(rule, k), k == 1 ? "read-only" : "unused");
                        report(ct, iter, rule, dt, n, step, tc[run], msg);
                    }
                    continue;
                }
                int64_t i = first_diff(dt, args[k], ref[k], n);
                if (i >= 0) {
                    snprintf(msg, sizeof msg, "%s[%lld] = %a, reference %a (offset %zu, %s)", buf_name(rule, k),
                             (long long)i, get(dt, args[k], i), get(dt, ref[k], i), lb[k].pre,
                             as_list ? "list" : "flat");
                    report(ct, iter, rule, dt, n, step, tc[run], msg);
                }
            }
            ct->calls++;
            ct->list_calls += as_list;
            ct->elements += n;
        }
    }
    if (g_verbose || ct->mismatches != mism0)
        printf("case %llu: %s %s n=%lld steps=%d step0=%lld%s\n", (unsigned long long)iter, R->name,
               dt ? "f64" : "f32", (long long)n, nsteps, (long long)hp.step, raw ? " raw scalars" : "");
    for (int k = 0; k < NBUF; k++) free(lb[k].base), free(ref[k]), free(snap[k]);
    ct->cases++;
    ct->per_rule[rule]++;
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
    printf("fastopt %s fuzz: seed %llu, CPU path %s (FASTOPT_ISA=%s), %d threads by default, %d rules\n",
           fastopt_version(), (unsigned long long)g_seed, fastopt_isa(), want ? want : "", fastopt_get_num_threads(),
           FO_T_NRULES);
    if (want && strcmp(want, fastopt_isa()))
        printf("note: FASTOPT_ISA=%s is not supported here; fuzzing %s\n", want, fastopt_isa());
    counts ct;
    memset(&ct, 0, sizeof ct);
    if (only >= 0)
        run_case((uint64_t)only, &ct);
    else
        for (long i = 0; i < iters; i++) run_case((uint64_t)i, &ct);
    fastopt_set_num_threads(0);
    printf("%ld cases (%ld steps, %ld kernel calls compared over %ld elements, %ld of them list calls, %ld steps "
           "on two thread counts, %ld cases with hand-filled scalars), %ld error-path cases, %ld mismatches\n",
           ct.cases, ct.steps, ct.calls, ct.elements, ct.list_calls, ct.thread_pairs, ct.raw_cases, ct.error_cases,
           ct.mismatches);
    printf("cases per rule:");
    for (int k = 0; k < FO_T_NRULES; k++) printf(" %s %ld", FO_T_RULES[k].name, ct.per_rule[k]);
    printf("\n");
    return ct.mismatches != 0;
}
