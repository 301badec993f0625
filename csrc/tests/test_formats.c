/* C tests of the mixed-format updates (fastopt_<rule>_mixed_list; fastopt.h,
 * "Mixed-format updates"); ctest runs them once per CPU path. The references
 * are written here, scalar and plainly, from the definitions of
 * fastopt.formats; the update itself is the table's reference loop
 * (rules_table.inc, fo_t_ref_f32). Every rule comes from the table, except
 * where a test needs an update that shows one conversion on its own: SGD with
 * lr = 0 keeps its param (p - 0*g), and at its first step with momentum its
 * buffer is the gradient.
 *   - the conversions, exactly: every bfloat16 and float16 pattern loaded (a
 *     gradient copied into a float32 momentum buffer); float32 patterns (every
 *     high half with the low halves that decide a rounding, and a random
 *     sample) rounded to nearest even to bfloat16 and float16 (a param written
 *     from its master copy) and stochastically to bfloat16 (a state buffer, and
 *     a param without a master copy), with the random bits of each tensor and
 *     role;
 *   - every rule, in every combination of formats (param float32, bfloat16
 *     with and without a master copy, float16 with one; grad float32, bfloat16,
 *     float16; the state float32, bfloat16, or mixed), with NaN, Inf and
 *     subnormal gradients, flush off and on, lists of tensors crossing tiles,
 *     1 and 2 threads: equal to loading, the reference update, flushing and
 *     storing (any NaN equals any NaN here: which NaN an operation on two NaNs
 *     gives depends on the compiler's operand order, as in test_fastopt.c);
 *   - the argument errors (formats, NULL pointers, lengths), with every buffer
 *     untouched;
 *   - 8-bit blockwise state (FASTOPT_FORMAT_I8): the maps rebuilt here from their
 *     definition (and compared with the library's generated tables), quantization
 *     by a binary search over the midpoints; quantization exactly (values at, next
 *     to and between every midpoint, zeros, NaN and infinities in blocks), every
 *     rule with all its state 8-bit (both maps) over tensors of 0, 1, 255, 256,
 *     257, 1000 and 5000 elements and over a large list on 1 and 2 threads (the
 *     same bytes), and its argument errors. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"

static const double SPECIALS[] = {NAN, INFINITY, -INFINITY, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-45,
                                  65520.0, -6e-8, 1e-5};
#define NSPECIALS ((int64_t)(sizeof(SPECIALS) / sizeof(SPECIALS[0])))

/* xorshift64*: uniform in [-1, 1), and 32 random bits. */
static uint64_t next64(uint64_t *s)
{
    *s ^= *s >> 12, *s ^= *s << 25, *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}
static double uniform(uint64_t *s) { return (double)(next64(s) >> 11) * 0x1.0p-52 - 1.0; }

#include "rules_table.inc"

static int failures;
#define CHECK(cond, ...)                                \
    do {                                                \
        if (!(cond)) {                                  \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);                        \
            printf("\n");                               \
            failures++;                                 \
        }                                               \
    } while (0)

enum { F32 = FASTOPT_FORMAT_F32, BF16 = FASTOPT_FORMAT_BF16, F16 = FASTOPT_FORMAT_F16, I8 = FASTOPT_FORMAT_I8 };

/* ---- the references: fastopt.formats's definitions, one element at a time ---- */

static uint32_t bits_of(float x)
{
    uint32_t b;
    memcpy(&b, &x, 4);
    return b;
}

static float float_of(uint32_t b)
{
    float x;
    memcpy(&x, &b, 4);
    return x;
}

static int nan32(uint32_t b) { return (b & 0x7fffffffu) > 0x7f800000u; }

static uint32_t ref_mix32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

/* The random bits of element i of tensor t, role r (0: param, 1 + k: state k). */
static uint32_t ref_bits(uint32_t key, int t, int r, int64_t i)
{
    const uint32_t stream = ref_mix32(key ^ ref_mix32((uint32_t)(t * 16 + r)));
    return ref_mix32(stream + (uint32_t)i);
}

static uint32_t ref_load_bf16(uint32_t h) { return h << 16; }

static uint32_t ref_load_f16(uint32_t h)
{
    const uint32_t sign = (h & 0x8000u) << 16, e = h >> 10 & 31u, m = h & 1023u;
    if (e == 31)
        return sign | (m ? 0x7fc00000u : 0x7f800000u);
    const double a = e ? ldexp(1024.0 + m, (int)e - 25) : ldexp((double)m, -24);
    return sign | bits_of((float)a); /* (exact: at most 11 significant bits) */
}

/* Round to nearest even on bit 16: up when the dropped half is more than half
 * a unit, or exactly half and the kept part is odd. */
static uint32_t ref_bf16_nearest(uint32_t b)
{
    if (nan32(b))
        return (b >> 16 & 0x8000u) | 0x7fc0u;
    const uint32_t kept = b >> 16, dropped = b & 0xffffu;
    return (kept + (dropped > 0x8000u || (dropped == 0x8000u && (kept & 1u)))) & 0xffffu;
}

/* Up when the dropped half and the random 16 bits carry into bit 16. */
static uint32_t ref_bf16_stochastic(uint32_t b, uint32_t r)
{
    if (nan32(b))
        return (b >> 16 & 0x8000u) | 0x7fc0u;
    return ((b >> 16) + ((b & 0xffffu) + (r & 0xffffu) > 0xffffu)) & 0xffffu;
}

/* IEEE binary16, round to nearest even, in double: units of 2^-24 below 2^-14
 * (a count of 1024 is the smallest normal's bits), else 11 significant bits;
 * 65520 (65504 and half a unit) and up overflow to infinity. */
static uint32_t ref_f16_nearest(uint32_t b)
{
    const uint32_t sign = b >> 16 & 0x8000u;
    if (nan32(b))
        return sign | 0x7e00u;
    const double a = fabs((double)float_of(b));
    if (a >= 65520.0)
        return sign | 0x7c00u;
    if (a < 0x1p-14)
        return sign | (uint32_t)nearbyint(a * 0x1p24);
    int e;
    double q = nearbyint(frexp(a, &e) * 2048.0); /* a = q 2^(e - 11), q in [1024, 2048] */
    if (q == 2048.0)
        q = 1024.0, e++;
    return sign | (uint32_t)(e + 14) << 10 | ((uint32_t)q - 1024u);
}

/* fastopt_set_flush_denormal's rule. */
static float ref_flush(float x) { return fabsf(x) >= FLT_MIN || isnan(x) ? x : copysignf(0.0f, x); }

/* 8-bit blockwise state (fastopt.formats): the maps from their definition,
 * bitsandbytes' create_dynamic_map(signed, 7, 8) in double (per decade
 * 10^-6 .. 10^0 the midpoints of NumPy's linspace(0.1, 1, items): i * step + 0.1,
 * the last one 1.0), then 0 and 1, sorted; REF_MAP[m] their floats, REF_MIDS[m][c]
 * the float of the double midpoint of values c and c + 1. m: 1 signed, 0 unsigned. */
#define BLOCK 256
static float REF_MAP[2][256], REF_MIDS[2][255];
static uint8_t REF_ZERO[2]; /* the code of 0.0 */

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void ref_maps(void)
{
    for (int m = 0; m < 2; m++) {
        double data[256];
        int count = 0;
        for (int i = 0; i < 7; i++) {
            const int items = m ? (1 << i) + 1 : (1 << (i + 1)) + 1;
            const double step = (1.0 - 0.1) / (items - 1), scale = pow(10.0, (double)(i - 6));
            double bounds[130];
            for (int j = 0; j < items; j++)
                bounds[j] = (double)j * step + 0.1;
            bounds[items - 1] = 1.0;
            for (int j = 0; j + 1 < items; j++)
                data[count++] = scale * ((bounds[j] + bounds[j + 1]) / 2.0);
            for (int j = 0; m && j + 1 < items; j++)
                data[count++] = -scale * ((bounds[j] + bounds[j + 1]) / 2.0);
        }
        data[count++] = 0.0, data[count++] = 1.0;
        if (count != 256) {
            printf("FAIL: the %s map has %d values\n", m ? "signed" : "unsigned", count);
            failures++;
            return;
        }
        qsort(data, 256, sizeof data[0], cmp_double);
        for (int c = 0; c < 256; c++) {
            REF_MAP[m][c] = (float)data[c];
            if (data[c] == 0.0)
                REF_ZERO[m] = (uint8_t)c;
        }
        for (int c = 0; c < 255; c++)
            REF_MIDS[m][c] = (float)((data[c] + data[c + 1]) / 2.0);
    }
}

/* #{mid < v} by a binary search (v not NaN). */
static uint8_t ref_code(float v, int m)
{
    int lo = 0, hi = 255; /* the answer is in [lo, hi] */
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (REF_MIDS[m][mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (uint8_t)lo;
}

static int64_t nblocks(int64_t n) { return (n + BLOCK - 1) / BLOCK; }

/* fastopt.formats.quantize of n values: per block, absmax = max |x| (the quiet
 * NaN 0x7fc00000 and every code the zero code when the block holds a NaN), each
 * code #{mid < x / absmax}, the zero code when absmax is 0 or the ratio NaN. */
static void ref_quantize(const float *x, int64_t n, int m, uint8_t *codes, float *absmax)
{
    for (int64_t j = 0; j < nblocks(n); j++) {
        const int64_t lo = j * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        float a = 0.0f;
        int nan = 0;
        for (int64_t i = lo; i < hi; i++) {
            nan |= isnan(x[i]);
            a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
        }
        absmax[j] = nan ? float_of(0x7fc00000u) : a;
        for (int64_t i = lo; i < hi; i++) {
            const float v = x[i] / a;
            codes[i] = nan || !(a > 0.0f) || isnan(v) ? REF_ZERO[m] : ref_code(v, m);
        }
    }
}

/* fastopt.formats.dequantize: map[code] * absmax, in float. */
static void ref_dequantize(const uint8_t *codes, const float *absmax, int64_t n, int m, float *out)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = REF_MAP[m][codes[i]] * absmax[i / BLOCK];
}

/* The library's generated tables (static copies here: FO_I8_TABLE), compared with the
 * references above: the maps and midpoints, and that the search-free lookup they
 * define is the binary search at and around every midpoint and at random values. */
#define FO_I8_DEFINE_TABLES
#define FO_I8_TABLE static
#include "../src/int8_maps.inc"

static uint8_t table_code(float v, int m)
{
    const uint32_t b = bits_of(v);
    uint32_t top = b >> 16 & 0x7fffu;
    top = top < FO_I8_BUCKET_LO ? FO_I8_BUCKET_LO : top > FO_I8_BUCKET_HI ? FO_I8_BUCKET_HI : top;
    const uint32_t c = fo_i8_first[m][top - FO_I8_BUCKET_LO + (b >> 31) * FO_I8_BUCKETS];
    return (uint8_t)(c + (fo_i8_mids[m][c] < v));
}

static void test_int8_references(void)
{
    ref_maps();
    CHECK(FO_I8_BLOCK == BLOCK && REF_ZERO[0] == FO_I8_ZERO_UNSIGNED && REF_ZERO[1] == FO_I8_ZERO_SIGNED,
          "the block and the zero codes: %d %d", REF_ZERO[0], REF_ZERO[1]);
    CHECK(REF_MAP[1][0] == -0x1.fc6666p-1f && REF_MAP[0][1] == 0x1.5cf752p-22f, "known map values");
    uint64_t rng = 99;
    for (int m = 0; m < 2; m++) {
        int bad = 0;
        for (int c = 0; c < 256; c++)
            bad += bits_of(REF_MAP[m][c]) != bits_of(fo_i8_map[m][c]) ||
                   bits_of(c < 255 ? REF_MIDS[m][c] : INFINITY) != bits_of(fo_i8_mids[m][c]);
        CHECK(!bad, "map %d: %d values differ from the generated tables", m, bad);
        for (int c = 0; c < 255; c++)
            for (int d = -3; d <= 3; d++) {
                uint32_t b = bits_of(REF_MIDS[m][c]);
                b = (int32_t)b < 0 ? b - (uint32_t)d : b + (uint32_t)d;
                const float v = float_of(b);
                if (fabsf(v) <= 1.0f)
                    CHECK(table_code(v, m) == ref_code(v, m), "map %d: the code of %a", m, (double)v);
            }
        for (int k = 0; k < 1000000; k++) {
            const float v = (float)uniform(&rng) * float_of((uint32_t)(127 - (int)(next64(&rng) % 40)) << 23);
            CHECK(table_code(v, m) == ref_code(v, m), "map %d: the code of %a", m, (double)v);
        }
        CHECK(table_code(0.0f, m) == REF_ZERO[m] && table_code(-0.0f, m) == REF_ZERO[m] &&
              table_code(1e-40f, m) == REF_ZERO[m] && table_code(1.0f, m) == 255 &&
              table_code(-1.0f, m) == (m ? 0 : REF_ZERO[m]), "map %d: zeros and ends", m);
    }
}

static void test_references(void)
{
    /* (the values of fastopt.formats: NumPy's float16, ml_dtypes' bfloat16) */
    static const struct { float x; uint32_t f16, bf16; } KNOWN[] = {
        {0x1p0f, 0x3c00, 0x3f80}, {-0x1p1f, 0xc000, 0xc000}, {0x1.ffcp15f, 0x7bff, 0x4780},
        {0x1.ffdep15f, 0x7bff, 0x4780}, {0x1.ffep15f, 0x7c00, 0x4780}, {0x1p-24f, 0x1, 0x3380},
        {0x1p-25f, 0x0, 0x3300}, {0x1.8p-24f, 0x2, 0x33c0}, {0x1.8p-25f, 0x1, 0x3340}, {0x1.ff8p-15f, 0x3ff, 0x3880},
        {0x1.ffcp-15f, 0x400, 0x3880}, {0x1.002p0f, 0x3c00, 0x3f80}, {0x1.006p0f, 0x3c02, 0x3f80},
        {0x1.01p0f, 0x3c04, 0x3f80}, {0x1.03p0f, 0x3c0c, 0x3f82}, {0x1.018p0f, 0x3c06, 0x3f81},
        {0x1.7fffffp0f, 0x3e00, 0x3fc0}, {INFINITY, 0x7c00, 0x7f80}, {-0.0f, 0x8000, 0x8000},
        {3e38f, 0x7c00, 0x7f62}};
    for (size_t k = 0; k < sizeof KNOWN / sizeof KNOWN[0]; k++) {
        CHECK(ref_f16_nearest(bits_of(KNOWN[k].x)) == KNOWN[k].f16, "f16 reference of %a", (double)KNOWN[k].x);
        CHECK(ref_bf16_nearest(bits_of(KNOWN[k].x)) == KNOWN[k].bf16, "bf16 reference of %a", (double)KNOWN[k].x);
    }
    for (uint32_t h = 0; h < 0x10000u; h++) /* every finite float16 round-trips */
        if ((h & 0x7c00u) != 0x7c00u)
            CHECK(ref_f16_nearest(ref_load_f16(h)) == h, "f16 round trip of %#x", h);
    CHECK(ref_mix32(0) == 0 && ref_mix32(1) == 0x688990c0u, "mix32"); /* fastopt.formats.mix32(1) */
}

/* ---- one mixed call, through the library and the references ---------------- */

#define MAXT 8 /* tensors per test at most */
enum { R_PARAM, R_GRAD, R_STATE, R_MASTER = R_STATE + FO_T_MAX_STATE, NROLES };

/* The tensors of one test: every role's buffers in its format, twice (lib:
 * through the library, ref: through the references); an 8-bit state buffer's
 * codes in lib/ref and its block scales in lib_absmax/ref_absmax. */
typedef struct {
    int count;
    int64_t n[MAXT];
    int format[NROLES]; /* -1: a role the call has not (no master copy, a state buffer it does not use) */
    void *lib[NROLES][MAXT], *ref[NROLES][MAXT];
    float *lib_absmax[FO_T_MAX_STATE][MAXT], *ref_absmax[FO_T_MAX_STATE][MAXT];
    int signed_map[FO_T_MAX_STATE];
} tensors;

static size_t esize(int format) { return format == F32 ? 4 : format == I8 ? 1 : 2; }

/* The formats of a call: param, grad, state buffer 0 (the others none), master copy; -1: none. */
static void roles(int *format, int param, int grad, int state0, int master)
{
    for (int r = 0; r < NROLES; r++)
        format[r] = -1;
    format[R_PARAM] = param, format[R_GRAD] = grad, format[R_STATE] = state0, format[R_MASTER] = master;
}

/* format[r] of param, grad, the state buffers, the master copy (-1 for none). */
static void tensors_init(tensors *T, const int64_t *n, int count, const int *format)
{
    memset(T, 0, sizeof *T);
    T->count = count;
    for (int r = 0; r < NROLES; r++) {
        T->format[r] = format[r];
        for (int t = 0; t < count; t++) {
            T->n[t] = n[t];
            if (format[r] < 0)
                continue;
            const size_t bytes = (size_t)(n[t] > 0 ? n[t] : 1) * esize(format[r]);
            T->lib[r][t] = calloc(1, bytes);
            T->ref[r][t] = calloc(1, bytes);
            if (format[r] == I8) {
                const size_t scales = (size_t)(n[t] > 0 ? nblocks(n[t]) : 1) * sizeof(float);
                T->lib_absmax[r - R_STATE][t] = calloc(1, scales);
                T->ref_absmax[r - R_STATE][t] = calloc(1, scales);
            }
        }
    }
}

static void tensors_free(tensors *T)
{
    for (int r = 0; r < NROLES; r++)
        for (int t = 0; t < T->count; t++)
            free(T->lib[r][t]), free(T->ref[r][t]);
    for (int k = 0; k < FO_T_MAX_STATE; k++)
        for (int t = 0; t < T->count; t++)
            free(T->lib_absmax[k][t]), free(T->ref_absmax[k][t]);
}

static uint32_t get_bits(void *buf, int format, int64_t i)
{
    return format == F32 ? ((uint32_t *)buf)[i] : format == I8 ? ((uint8_t *)buf)[i] : ((uint16_t *)buf)[i];
}

static void put_bits(void *buf, int format, int64_t i, uint32_t b)
{
    if (format == F32)
        ((uint32_t *)buf)[i] = b;
    else if (format == I8)
        ((uint8_t *)buf)[i] = (uint8_t)b;
    else
        ((uint16_t *)buf)[i] = (uint16_t)b;
}

/* An 8-bit state buffer r (of map T->signed_map) of tensor t set to the quantized
 * values x, in both copies. */
static void set_int8(tensors *T, int r, int t, const float *x)
{
    const int k = r - R_STATE, m = T->signed_map[k] != 0;
    ref_quantize(x, T->n[t], m, (uint8_t *)T->ref[r][t], T->ref_absmax[k][t]);
    memcpy(T->lib[r][t], T->ref[r][t], (size_t)T->n[t]);
    memcpy(T->lib_absmax[k][t], T->ref_absmax[k][t], (size_t)nblocks(T->n[t]) * sizeof(float));
}

/* Element i of role r of tensor t: the bits b (in the role's format), in both copies. */
static void set_bits(tensors *T, int r, int t, int64_t i, uint32_t b)
{
    put_bits(T->lib[r][t], T->format[r], i, b);
    put_bits(T->ref[r][t], T->format[r], i, b);
}

/* ... the float32 value x, rounded to the role's format. */
static void set_value(tensors *T, int r, int t, int64_t i, float x)
{
    const int f = T->format[r];
    set_bits(T, r, t, i, f == F32 ? bits_of(x) : f == BF16 ? ref_bf16_nearest(bits_of(x)) : ref_f16_nearest(bits_of(x)));
}

static float *ref_load(const tensors *T, int r, int t)
{
    const int f = T->format[r];
    if (f == F32)
        return (float *)T->ref[r][t]; /* computed in place, as the library does */
    float *out = malloc((size_t)(T->n[t] > 0 ? T->n[t] : 1) * sizeof *out);
    if (f == I8) {
        const int k = r - R_STATE;
        ref_dequantize((const uint8_t *)T->ref[r][t], T->ref_absmax[k][t], T->n[t], T->signed_map[k] != 0, out);
        return out;
    }
    for (int64_t i = 0; i < T->n[t]; i++) {
        const uint32_t h = get_bits(T->ref[r][t], f, i);
        out[i] = float_of(f == BF16 ? ref_load_bf16(h) : ref_load_f16(h));
    }
    return out;
}

/* The reference: per tensor, load, the reference update, flush, store. */
static void ref_call(tensors *T, int rule, const fo_t_scalars *s, unsigned need, uint32_t key, int flush)
{
    for (int t = 0; t < T->count; t++) {
        const int64_t n = T->n[t];
        const int master = T->format[R_MASTER] >= 0;
        float *p = master ? (float *)T->ref[R_MASTER][t] : ref_load(T, R_PARAM, t);
        float *g = ref_load(T, R_GRAD, t);
        float *st[FO_T_MAX_STATE];
        for (int k = 0; k < FO_T_MAX_STATE; k++)
            st[k] = need >> k & 1u ? ref_load(T, R_STATE + k, t) : NULL;
        fo_t_ref_f32(rule, p, g, st, n, s);
        for (int64_t i = 0; i < n && flush; i++) {
            p[i] = ref_flush(p[i]);
            for (int k = 0; k < FO_T_MAX_STATE; k++)
                if (st[k])
                    st[k][i] = ref_flush(st[k][i]);
        }
        const int pf = T->format[R_PARAM];
        for (int64_t i = 0; i < n && pf != F32; i++) {
            const uint32_t b = bits_of(p[i]);
            put_bits(T->ref[R_PARAM][t], pf, i, !master ? ref_bf16_stochastic(b, ref_bits(key, t, 0, i))
                                                : pf == BF16 ? ref_bf16_nearest(b) : ref_f16_nearest(b));
        }
        for (int k = 0; k < FO_T_MAX_STATE; k++)
            for (int64_t i = 0; i < n && st[k] && T->format[R_STATE + k] == BF16; i++)
                put_bits(T->ref[R_STATE + k][t], BF16, i, ref_bf16_stochastic(bits_of(st[k][i]),
                                                                              ref_bits(key, t, 1 + k, i)));
        for (int k = 0; k < FO_T_MAX_STATE; k++)
            if (st[k] && T->format[R_STATE + k] == I8)
                ref_quantize(st[k], n, T->signed_map[k] != 0, (uint8_t *)T->ref[R_STATE + k][t],
                             T->ref_absmax[k][t]);
        if (!master && pf != F32)
            free(p);
        if (T->format[R_GRAD] != F32)
            free(g);
        for (int k = 0; k < FO_T_MAX_STATE; k++)
            if (st[k] && T->format[R_STATE + k] != F32)
                free(st[k]);
    }
}

static fastopt_formats formats_of(const tensors *T, uint32_t key)
{
    fastopt_formats f;
    memset(&f, 0, sizeof f);
    f.param = T->format[R_PARAM];
    f.grad = T->format[R_GRAD];
    for (int k = 0; k < FO_T_MAX_STATE; k++) {
        f.state[k] = T->format[R_STATE + k] < 0 ? F32 : T->format[R_STATE + k];
        if (f.state[k] == I8)
            f.absmax[k] = T->lib_absmax[k], f.signed_map[k] = T->signed_map[k];
    }
    f.key = key;
    return f;
}

static int lib_call(tensors *T, int rule, const fo_t_scalars *s, unsigned need, uint32_t key)
{
    const fastopt_formats f = formats_of(T, key);
    void *const *st[FO_T_MAX_STATE];
    for (int k = 0; k < FO_T_MAX_STATE; k++)
        st[k] = need >> k & 1u ? T->lib[R_STATE + k] : NULL;
    float *const *master = T->format[R_MASTER] >= 0 ? (float *const *)T->lib[R_MASTER] : NULL;
    return fo_t_mixed_list(rule, &f, T->lib[R_PARAM], (const void *const *)T->lib[R_GRAD], st, master, T->n,
                           T->count, s);
}

static int is_nan_bits(uint32_t b, int format)
{
    return format == F32 ? nan32(b) : format == BF16 ? (b & 0x7fffu) > 0x7f80u : (b & 0x7fffu) > 0x7c00u;
}

/* Whether every written buffer of lib equals ref: bitwise, or (exact == 0)
 * with any NaN equal to any NaN; prints the first difference. */
static int same(const tensors *T, unsigned need, int exact, const char *what)
{
    for (int r = 0; r < NROLES; r++) {
        if (T->format[r] < 0 || r == R_GRAD || (r >= R_STATE && r < R_MASTER && !(need >> (r - R_STATE) & 1u)))
            continue;
        for (int t = 0; t < T->count; t++)
            for (int64_t i = 0; i < T->n[t]; i++) {
                const uint32_t a = get_bits(T->lib[r][t], T->format[r], i);
                const uint32_t b = get_bits(T->ref[r][t], T->format[r], i);
                if (a != b && (exact || T->format[r] == I8 || !is_nan_bits(a, T->format[r]) ||
                               !is_nan_bits(b, T->format[r]))) {
                    printf("FAIL %s: role %d (format %d) of tensor %d, element %lld: %#x, reference %#x\n", what,
                           r, T->format[r], t, (long long)i, a, b);
                    return 0;
                }
            }
        for (int t = 0; t < T->count && T->format[r] == I8; t++)
            for (int64_t j = 0; j < nblocks(T->n[t]); j++) {
                const uint32_t a = bits_of(T->lib_absmax[r - R_STATE][t][j]);
                const uint32_t b = bits_of(T->ref_absmax[r - R_STATE][t][j]);
                if (a != b) {
                    printf("FAIL %s: the absmax of role %d of tensor %d, block %lld: %#x, reference %#x\n", what,
                           r, t, (long long)j, a, b);
                    return 0;
                }
            }
    }
    return 1;
}

/* One step of a prepared call through both; 1 when they agree. */
static int step_both(tensors *T, int rule, const fo_t_scalars *s, uint32_t key, int exact, const char *what)
{
    const unsigned need = fo_t_need(rule, s);
    const int rc = lib_call(T, rule, s, need, key);
    ref_call(T, rule, s, need, key, fastopt_get_flush_denormal());
    CHECK(rc == FASTOPT_OK, "%s: return code %d", what, rc);
    const int ok = rc == FASTOPT_OK && same(T, need, exact, what);
    failures += !ok && rc == FASTOPT_OK;
    return ok;
}

/* ---- the conversions, exactly --------------------------------------------------- */

static int rule_named(const char *name)
{
    for (int rule = 0; rule < FO_T_NRULES; rule++)
        if (!strcmp(FO_T_RULES[rule].name, name))
            return rule;
    printf("FAIL: no rule %s in the table\n", name);
    failures++;
    return -1;
}

/* SGD's scalars with lr and momentum (its other hyperparameters 0, no flags) at `step`. */
static fo_t_scalars sgd_scalars(int rule, double lr, double momentum, int64_t step)
{
    double h[FO_T_MAX_HYPER] = {0};
    const fo_t_rule *r = &FO_T_RULES[rule];
    for (int k = 0; k < r->nhyper; k++)
        h[k] = !strcmp(r->hyper[k].name, "lr") ? lr : !strcmp(r->hyper[k].name, "momentum") ? momentum : 0.0;
    fo_t_scalars s;
    CHECK(fo_t_prepare_h(rule, &s, NULL, h, 0u, step) == FASTOPT_OK, "sgd prepare");
    return s;
}

/* Float32 patterns that exercise every rounding: each of the 2^16 high halves
 * with the low halves at and around each bit's half (ties, both neighbours),
 * then random ones. Returns the count written (at most max). */
static int64_t float_patterns(uint32_t *out, int64_t max)
{
    uint32_t low[2 + 4 * 16];
    int nlow = 0;
    low[nlow++] = 0, low[nlow++] = 0xffffu;
    for (int k = 0; k < 16; k++)
        low[nlow++] = 1u << k, low[nlow++] = (1u << k) - 1u, low[nlow++] = ((1u << k) + 1u) & 0xffffu,
        low[nlow++] = (3u << k) & 0xffffu;
    int64_t m = 0;
    for (uint32_t hi = 0; hi < 0x10000u; hi++)
        for (int j = 0; j < nlow && m < max; j++)
            out[m++] = hi << 16 | low[j];
    uint64_t rng = 12345;
    while (m < max)
        out[m++] = (uint32_t)(next64(&rng) >> 32);
    return m;
}

/* Sizes of 3 tensors of `total` elements (uneven, so the streams of 3 tensors are used). */
static int split3(int64_t total, int64_t *n)
{
    n[0] = total / 2, n[1] = total / 3, n[2] = total - n[0] - n[1];
    return 3;
}

static void test_conversions(void)
{
    const int sgd = rule_named("sgd");
    if (sgd < 0)
        return;
    const int64_t total = 6000000; /* (the structured patterns are 4.3 million) */
    uint32_t *pat = malloc((size_t)total * sizeof *pat);
    float_patterns(pat, total);
    int64_t n[MAXT];
    const int count = split3(total, n);
    const uint32_t key = 0xdecafbadu;

    /* round to nearest: the param written from its master copy (lr = 0: the master as it is) */
    for (int pf = BF16; pf <= F16; pf++) {
        tensors T;
        int format[NROLES];
        roles(format, pf, F32, -1, F32);
        tensors_init(&T, n, count, format);
        for (int t = 0, i0 = 0; t < count; i0 += (int)n[t], t++)
            for (int64_t i = 0; i < n[t]; i++)
                set_bits(&T, R_MASTER, t, i, pat[i0 + i]); /* grad: +0 */
        const fo_t_scalars s = sgd_scalars(sgd, 0.0, 0.0, 1);
        step_both(&T, sgd, &s, key, 1, pf == BF16 ? "bfloat16 round to nearest" : "float16 round to nearest");
        tensors_free(&T);
    }

    /* stochastic rounding: the momentum buffer at SGD's first step (the gradient), and a
     * param without a master copy moved by lr = 1 from 0 (0 - g) */
    for (int role = 0; role < 2; role++) {
        tensors T;
        int format[NROLES];
        roles(format, role ? F32 : BF16, F32, role ? BF16 : -1, -1);
        tensors_init(&T, n, count, format);
        for (int t = 0, i0 = 0; t < count; i0 += (int)n[t], t++)
            for (int64_t i = 0; i < n[t]; i++)
                set_bits(&T, R_GRAD, t, i, pat[i0 + i]);
        const fo_t_scalars s = role ? sgd_scalars(sgd, 0.0, 0.5, 1) : sgd_scalars(sgd, 1.0, 0.0, 1);
        step_both(&T, sgd, &s, key, 1, role ? "stochastic rounding of a state buffer" :
                                              "stochastic rounding of a param");
        tensors_free(&T);
    }

    /* loads: every 16-bit pattern of a gradient, copied into the momentum buffer */
    for (int gf = BF16; gf <= F16; gf++) {
        tensors T;
        const int64_t one[1] = {0x10000};
        int format[NROLES];
        roles(format, F32, gf, F32, -1);
        tensors_init(&T, one, 1, format);
        for (uint32_t h = 0; h < 0x10000u; h++)
            set_bits(&T, R_GRAD, 0, h, h);
        const fo_t_scalars s = sgd_scalars(sgd, 0.0, 0.5, 1);
        step_both(&T, sgd, &s, key, 1, gf == BF16 ? "bfloat16 load" : "float16 load");
        tensors_free(&T);
    }
    free(pat);
}

/* ---- every rule and combination of formats -------------------------------------- */

typedef struct {
    int param, master, grad, state; /* state: F32, BF16, or -2: mixed (even k bfloat16, odd float32) */
} combo;

static const combo COMBOS[] = {
    {F32, 0, F32, BF16}, {F32, 0, BF16, F32}, {F32, 0, F16, -2}, {BF16, 0, F32, F32}, {BF16, 0, BF16, BF16},
    {BF16, 0, F16, -2}, {BF16, 1, BF16, F32}, {BF16, 1, F32, BF16}, {BF16, 1, F16, -2}, {F16, 1, F16, F32},
    {F16, 1, BF16, BF16}, {F16, 1, F32, -2}, {F32, 0, F32, F32}};
#define NCOMBOS ((int)(sizeof COMBOS / sizeof COMBOS[0]))

/* `steps` steps of rule (flags; prepare's defaults) in combination c over tensors of
 * sizes n, random values and special gradients; 1 when they agree. */
static int run_rule(int rule, unsigned flags, const combo *c, const int64_t *n, int count, int steps)
{
    int format[NROLES];
    roles(format, c->param, c->grad, -1, c->master ? F32 : -1);
    for (int k = 0; k < FO_T_MAX_STATE; k++)
        format[R_STATE + k] = k < FO_T_RULES[rule].nstate ? (c->state == -2 ? (k % 2 ? F32 : BF16) : c->state) : -1;
    tensors T;
    tensors_init(&T, n, count, format);
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)rule << 40 ^ (uint64_t)flags << 48;
    for (int t = 0; t < count; t++)
        for (int64_t i = 0; i < n[t]; i++) {
            const float p = (float)uniform(&rng);
            set_value(&T, R_PARAM, t, i, p);
            if (c->master)
                set_bits(&T, R_MASTER, t, i, bits_of(p));
            for (int k = 0; k < FO_T_RULES[rule].nstate; k++) /* non-negative: second moments */
                set_value(&T, R_STATE + k, t, i, (float)fabs(uniform(&rng)));
        }
    double carry = FO_T_RULES[rule].carry_init;
    int ok = 1;
    for (int step = 1; step <= steps && ok; step++) {
        for (int t = 0; t < count; t++)
            for (int64_t i = 0; i < n[t]; i++)
                set_value(&T, R_GRAD, t, i, i % 13 == step ? (float)SPECIALS[(i / 13) % NSPECIALS]
                                                           : (float)uniform(&rng));
        fo_t_scalars s;
        if (fo_t_prepare(rule, &s, &carry, flags, step) != FASTOPT_OK)
            break; /* (a flag set prepare refuses: nothing to test) */
        char what[160];
        snprintf(what, sizeof what, "%s flags %u, param %d%s, grad %d, state %d, %d threads, flush %d, step %d",
                 FO_T_RULES[rule].name, flags, c->param, c->master ? " (master)" : "", c->grad, c->state,
                 fastopt_get_num_threads(), fastopt_get_flush_denormal(), step);
        ok = step_both(&T, rule, &s, 0x51ed2701u * (uint32_t)step, 0, what);
    }
    tensors_free(&T);
    return ok;
}

static void test_rules(void)
{
    static const int64_t SMALL[] = {17, 0, 1500, 1, 2100}; /* tails, empty tensors, tiles of 1024 crossed */
    static const int64_t LARGE[] = {40000, 5, 30001};      /* over 2 threads */
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        if (fo_t_two_pass(rule))
            continue;
        const int nf = FO_T_RULES[rule].nflags;
        const unsigned flag_sets[3] = {0u, 1u << nf, (2u << nf) - 1u}; /* defaults; zero defaults on; every flag */
        for (int v = 0; v < 3; v++)
            for (int c = 0; c < NCOMBOS; c++)
                for (int flush = 0; flush < 2; flush++) {
                    fastopt_set_flush_denormal(flush);
                    run_rule(rule, flag_sets[v], &COMBOS[c], SMALL, 5, 3);
                }
        fastopt_set_flush_denormal(0);
        for (int threads = 1; threads <= 2; threads++) {
            fastopt_set_num_threads(threads);
            for (int c = 0; c < NCOMBOS; c++)
                run_rule(rule, 1u << nf, &COMBOS[c], LARGE, 3, 2);
        }
        fastopt_set_num_threads(0);
    }
}

/* ---- argument errors ---------------------------------------------------------------- */

/* Whether the library's buffers of two runs (or of one before and after a refused
 * call) are the same bytes, absmax included. */
static int same_bytes(const tensors *T, const tensors *before)
{
    for (int r = 0; r < NROLES; r++)
        for (int t = 0; t < T->count && T->format[r] >= 0; t++) {
            if (memcmp(T->lib[r][t], before->lib[r][t], (size_t)T->n[t] * esize(T->format[r])))
                return 0;
            if (T->format[r] == I8 && memcmp(T->lib_absmax[r - R_STATE][t], before->lib_absmax[r - R_STATE][t],
                                             (size_t)nblocks(T->n[t]) * sizeof(float)))
                return 0;
        }
    return 1;
}

static void test_errors(void)
{
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        if (fo_t_two_pass(rule))
            continue;
        const fo_t_rule *r = &FO_T_RULES[rule];
        fo_t_scalars s;
        double carry = r->carry_init;
        if (fo_t_prepare(rule, &s, &carry, 1u << r->nflags, 1) != FASTOPT_OK) {
            CHECK(0, "%s: prepare", r->name);
            continue;
        }
        const unsigned need = fo_t_need(rule, &s);
        const int64_t n[2] = {5, 3};
        int format[NROLES];
        roles(format, BF16, F16, BF16, F32);
        for (int k = 1; k < FO_T_MAX_STATE; k++)
            format[R_STATE + k] = BF16;
        tensors T, before;
        tensors_init(&T, n, 2, format);
        tensors_init(&before, n, 2, format);
        for (int x = 0; x < NROLES; x++)
            for (int t = 0; t < 2; t++)
                for (int64_t i = 0; i < n[t]; i++)
                    set_bits(&T, x, t, i, 0x3f80u + (uint32_t)i), set_bits(&before, x, t, i, 0x3f80u + (uint32_t)i);
        void *const *st[FO_T_MAX_STATE];
        for (int k = 0; k < FO_T_MAX_STATE; k++)
            st[k] = need >> k & 1u ? T.lib[R_STATE + k] : NULL;
        float *const *master = (float *const *)T.lib[R_MASTER];
        void *const *param = T.lib[R_PARAM];
        const void *const *grad = (const void *const *)T.lib[R_GRAD];
        const fastopt_formats good = formats_of(&T, 1);
        fastopt_formats f;
#define EXPECT(code, call, what)                                                                          \
    do {                                                                                                  \
        const int rc_ = (call);                                                                           \
        CHECK(rc_ == (code), "%s, %s: returned %d, expected %d", r->name, what, rc_, code);               \
        CHECK(same_bytes(&T, &before), "%s, %s: a buffer was written", r->name, what);                     \
    } while (0)
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, NULL, param, grad, st, master, n, 2, &s), "f NULL");
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, grad, st, master, n, 2, NULL), "s NULL");
        const struct { int param, grad, master; const char *what; } BAD[] = {
            {3, F32, 1, "param format 3"}, {-1, F32, 1, "param format -1"}, {BF16, 3, 1, "grad format 3"},
            {F16, F32, 0, "a float16 param without a master copy"}, {F32, F32, 1, "a master copy of a float32 param"}};
        for (size_t b = 0; b < sizeof BAD / sizeof BAD[0]; b++) {
            f = good, f.param = BAD[b].param, f.grad = BAD[b].grad;
            EXPECT(FASTOPT_ERR_FORMAT, fo_t_mixed_list(rule, &f, param, grad, st, BAD[b].master ? master : NULL, n,
                                                       2, &s), BAD[b].what);
        }
        for (int k = 0; k < FO_T_MAX_STATE; k++) {
            f = good, f.state[k] = F16;
            EXPECT(need >> k & 1u ? FASTOPT_ERR_FORMAT : FASTOPT_OK,
                   fo_t_mixed_list(rule, &f, param, grad, st, master, n, 0, &s), "a float16 state buffer");
        }
        EXPECT(FASTOPT_ERR_LENGTH, fo_t_mixed_list(rule, &good, param, grad, st, master, n, -1, &s), "count -1");
        const int64_t bad_n[2] = {5, -1};
        EXPECT(FASTOPT_ERR_LENGTH, fo_t_mixed_list(rule, &good, param, grad, st, master, bad_n, 2, &s), "n[1] -1");
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, grad, st, master, NULL, 2, &s), "n NULL");
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, NULL, grad, st, master, n, 2, &s), "param NULL");
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, NULL, st, master, n, 2, &s), "grad NULL");
        EXPECT(FASTOPT_OK, fo_t_mixed_list(rule, &good, NULL, NULL, st, NULL, NULL, 0, &s), "count 0");
        void *holes[2] = {T.lib[R_PARAM][0], NULL};
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, holes, grad, st, master, n, 2, &s), "param[1] NULL");
        float *master_holes[2] = {(float *)T.lib[R_MASTER][0], NULL};
        EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, grad, st, master_holes, n, 2, &s),
               "master[1] NULL");
        for (int k = 0; k < FO_T_MAX_STATE; k++) {
            if (!(need >> k & 1u))
                continue;
            void *const *keep = st[k];
            void *state_holes[2] = {T.lib[R_STATE + k][0], NULL};
            st[k] = NULL;
            EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, grad, st, master, n, 2, &s),
                   "a required state table NULL");
            st[k] = state_holes;
            EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, grad, st, master, n, 2, &s),
                   "a required state entry NULL");
            st[k] = keep;
        }
#undef EXPECT
        tensors_free(&T);
        tensors_free(&before);
    }
}

/* ---- 8-bit blockwise state ---------------------------------------------------------- */

/* One SGD step (lr 0, momentum 0.5, the first step: the momentum buffer becomes the
 * gradient) with an 8-bit momentum buffer of map m: the quantization of the
 * gradients x (the tensors' values one after the other), through both. */
static void int8_quantize_case(const float *x, const int64_t *n, int count, int m, const char *what)
{
    const int sgd = rule_named("sgd");
    if (sgd < 0)
        return;
    int format[NROLES];
    roles(format, F32, F32, I8, -1);
    tensors T;
    tensors_init(&T, n, count, format);
    T.signed_map[0] = m;
    for (int t = 0, i0 = 0; t < count; i0 += (int)n[t], t++)
        for (int64_t i = 0; i < n[t]; i++)
            set_bits(&T, R_GRAD, t, i, bits_of(x[i0 + i]));
    const fo_t_scalars s = sgd_scalars(sgd, 0.0, 0.5, 1);
    char label[160];
    snprintf(label, sizeof label, "%s, %s map, flush %d", what, m ? "signed" : "unsigned", fastopt_get_flush_denormal());
    step_both(&T, sgd, &s, 1, 1, label);
    tensors_free(&T);
}

static void test_int8_quantize(void)
{
    enum { N = 120 * BLOCK };
    float *x = calloc(N, sizeof *x);
    uint64_t rng = 7;
    for (int m = 0; m < 2; m++) {
        /* blocks of absmax 1 (their first element +-1) and 3: every midpoint scaled, and its
         * neighbours 1 to 3 units away */
        int64_t at = 0;
        for (int scale = 1; scale <= 3; scale += 2)
            for (int c = 0; c < 255; c++)
                for (int d = -3; d <= 3; d++) {
                    if (at % BLOCK == 0) {
                        x[at] = (at / BLOCK) % 2 ? (float)scale : -(float)scale;
                        at++;
                    }
                    uint32_t b = bits_of(REF_MIDS[m][c] * (float)scale);
                    b = (int32_t)b < 0 ? b - (uint32_t)d : b + (uint32_t)d;
                    x[at++] = fabsf(float_of(b)) <= (float)scale ? float_of(b) : 0.5f;
                }
        at = (at + BLOCK - 1) / BLOCK * BLOCK;
        /* random blocks of magnitudes 2^-30 .. 2^9, some with signs */
        for (int j = 0; j < 40; j++, at += BLOCK) {
            const float scale = float_of((uint32_t)(97 + j) << 23);
            for (int i = 0; i < BLOCK; i++)
                x[at + i] = (float)(j % 3 ? uniform(&rng) : fabs(uniform(&rng))) * scale;
        }
        /* special blocks: zeros (and -0), a NaN, +inf, -inf, inf and NaN, subnormals only,
         * the largest floats */
        static const float SPECIAL_BLOCKS[][3] = {{0.0f, -0.0f, 0.0f}, {NAN, 0.5f, -0.25f}, {INFINITY, 0.5f, 1e30f},
                                                  {-INFINITY, -0.5f, INFINITY}, {INFINITY, NAN, 1.0f},
                                                  {1e-40f, -3e-42f, 1e-45f}, {FLT_MAX, -FLT_MAX, 1e38f}};
        for (size_t j = 0; j < sizeof SPECIAL_BLOCKS / sizeof SPECIAL_BLOCKS[0]; j++, at += BLOCK)
            for (int i = 0; i < BLOCK; i++)
                x[at + i] = i < 3 ? SPECIAL_BLOCKS[j][i] : SPECIAL_BLOCKS[j][2] * (float)uniform(&rng);
        if (at > N) {
            CHECK(0, "test_int8_quantize: %lld values", (long long)at);
            break;
        }
        /* one tensor of everything, then tails: 1000 (a last block of 232) and 1 */
        const int64_t n3[3] = {at - 1001, 1000, 1};
        for (int flush = 0; flush < 2; flush++) {
            fastopt_set_flush_denormal(flush);
            int8_quantize_case(x, n3, 3, m, "8-bit quantization");
        }
        fastopt_set_flush_denormal(0);
    }
    free(x);
}

typedef struct {
    int param, master, grad;
} i8_combo;

static const i8_combo I8_COMBOS[] = {{F32, 0, F32}, {BF16, 1, BF16}, {BF16, 0, F16}, {F16, 1, F32}};
#define NI8COMBOS ((int)(sizeof I8_COMBOS / sizeof I8_COMBOS[0]))

/* Tensors for rule with all its state 8-bit: maps 0: all signed, 1: even buffers
 * signed, odd unsigned. State values non-negative (second moments), at a scale of
 * their block's own, block 3 of a tensor all zero (params and state: an absmax of
 * 0), tensor 0's block 1 (if any) with an infinite absmax. */
static void int8_init(tensors *T, int rule, const i8_combo *c, const int64_t *n, int count, int maps)
{
    int format[NROLES];
    roles(format, c->param, c->grad, -1, c->master ? F32 : -1);
    const int nstate = FO_T_RULES[rule].nstate;
    for (int k = 0; k < nstate; k++)
        format[R_STATE + k] = I8;
    tensors_init(T, n, count, format);
    for (int k = 0; k < nstate; k++)
        T->signed_map[k] = maps == 0 || k % 2 == 0;
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)rule << 40 ^ (uint64_t)maps << 50;
    for (int t = 0; t < count; t++) {
        float *x = malloc((size_t)(n[t] > 0 ? n[t] : 1) * sizeof *x);
        for (int64_t i = 0; i < n[t]; i++) {
            const float p = i / BLOCK == 3 ? 0.0f : (float)uniform(&rng);
            set_value(T, R_PARAM, t, i, p);
            if (c->master)
                set_bits(T, R_MASTER, t, i, bits_of(p));
        }
        for (int k = 0; k < nstate; k++) {
            for (int64_t i = 0; i < n[t]; i++)
                x[i] = i / BLOCK == 3 ? 0.0f : (float)fabs(uniform(&rng)) * float_of((uint32_t)(117 + i / BLOCK % 11) << 23);
            set_int8(T, R_STATE + k, t, x);
            if (t == 0 && n[t] > BLOCK)
                T->lib_absmax[k][0][1] = T->ref_absmax[k][0][1] = INFINITY;
        }
        free(x);
    }
}

/* `steps` steps of rule over T through both (random gradients; at step 2, in the
 * tensor of 1000 elements if there is one, a NaN, +inf and -inf in three blocks,
 * and block 3 of every tensor zero); 1 when they agree. */
static int int8_steps(tensors *T, int rule, unsigned flags, int steps, const char *label)
{
    uint64_t rng = 0x51ed2701u ^ (uint64_t)rule << 32 ^ flags;
    double carry = FO_T_RULES[rule].carry_init;
    int ok = 1;
    for (int step = 1; step <= steps && ok; step++) {
        for (int t = 0; t < T->count; t++)
            for (int64_t i = 0; i < T->n[t]; i++) {
                float g = i / BLOCK == 3 ? 0.0f : (float)uniform(&rng);
                if (step == 2 && T->n[t] == 1000)
                    g = i == 300 ? NAN : i == 600 ? INFINITY : i == 900 ? -INFINITY : g;
                set_value(T, R_GRAD, t, i, g);
            }
        fo_t_scalars s;
        if (fo_t_prepare(rule, &s, &carry, flags, step) != FASTOPT_OK)
            break;
        char what[200];
        snprintf(what, sizeof what, "8-bit state: %s flags %u, %s, %d threads, flush %d, step %d",
                 FO_T_RULES[rule].name, flags, label, fastopt_get_num_threads(), fastopt_get_flush_denormal(), step);
        ok = step_both(T, rule, &s, 0x2545f491u * (uint32_t)step, 0, what);
    }
    return ok;
}

static void test_int8_rules(void)
{
    static const int64_t SIZES[] = {0, 1, 255, 256, 257, 1000, 5000};
    static const int64_t LARGE[] = {40000, 5, 30001, 257, 1000};
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        if (fo_t_two_pass(rule))
            continue;
        const int nf = FO_T_RULES[rule].nflags;
        const unsigned flag_sets[3] = {0u, 1u << nf, (2u << nf) - 1u};
        for (int v = 0; v < 3; v++)
            for (int c = 0; c < NI8COMBOS; c++)
                for (int maps = 0; maps < 2; maps++)
                    for (int flush = 0; flush < 2; flush++) {
                        fastopt_set_flush_denormal(flush);
                        tensors T;
                        int8_init(&T, rule, &I8_COMBOS[c], SIZES, 7, maps);
                        char label[80];
                        snprintf(label, sizeof label, "param %d%s, grad %d, maps %d", I8_COMBOS[c].param,
                                 I8_COMBOS[c].master ? " (master)" : "", I8_COMBOS[c].grad, maps);
                        int8_steps(&T, rule, flag_sets[v], 3, label);
                        tensors_free(&T);
                    }
        fastopt_set_flush_denormal(0);
        /* a large list on 1 and 2 threads: each equal to the reference, and to each other */
        for (int c = 0; c < NI8COMBOS; c += 3) {
            tensors T[2];
            for (int threads = 1; threads <= 2; threads++) {
                fastopt_set_num_threads(threads);
                int8_init(&T[threads - 1], rule, &I8_COMBOS[c], LARGE, 5, 1);
                int8_steps(&T[threads - 1], rule, 1u << nf, 2, "a large list");
            }
            CHECK(same_bytes(&T[0], &T[1]), "8-bit state: %s, 1 and 2 threads differ", FO_T_RULES[rule].name);
            tensors_free(&T[0]);
            tensors_free(&T[1]);
        }
        fastopt_set_num_threads(0);
    }
}

static void test_int8_errors(void)
{
    for (int rule = 0; rule < FO_T_NRULES; rule++) {
        if (fo_t_two_pass(rule))
            continue;
        const fo_t_rule *r = &FO_T_RULES[rule];
        fo_t_scalars s;
        double carry = r->carry_init;
        if (fo_t_prepare(rule, &s, &carry, 1u << r->nflags, 1) != FASTOPT_OK) {
            CHECK(0, "%s: prepare", r->name);
            continue;
        }
        const unsigned need = fo_t_need(rule, &s);
        const int64_t n[2] = {300, 3}, empty[2] = {0, 0};
        int format[NROLES];
        roles(format, BF16, F32, -1, F32);
        for (int k = 0; k < r->nstate; k++)
            format[R_STATE + k] = I8;
        tensors T, before;
        tensors_init(&T, n, 2, format);
        tensors_init(&before, n, 2, format);
        for (int x = 0; x < NROLES; x++)
            for (int t = 0; t < 2 && format[x] >= 0; t++) {
                for (int64_t i = 0; i < n[t]; i++)
                    set_bits(&T, x, t, i, 0x3f80u + (uint32_t)i), set_bits(&before, x, t, i, 0x3f80u + (uint32_t)i);
                if (format[x] == I8)
                    for (int64_t j = 0; j < nblocks(n[t]); j++)
                        T.lib_absmax[x - R_STATE][t][j] = before.lib_absmax[x - R_STATE][t][j] = 0.5f;
            }
        void *const *st[FO_T_MAX_STATE];
        for (int k = 0; k < FO_T_MAX_STATE; k++)
            st[k] = need >> k & 1u ? T.lib[R_STATE + k] : NULL;
        float *const *master = (float *const *)T.lib[R_MASTER];
        void *const *param = T.lib[R_PARAM];
        const void *const *grad = (const void *const *)T.lib[R_GRAD];
        const fastopt_formats good = formats_of(&T, 1);
        fastopt_formats f;
#define EXPECT(code, call, what)                                                                          \
    do {                                                                                                  \
        const int rc_ = (call);                                                                           \
        CHECK(rc_ == (code), "%s, 8-bit state, %s: returned %d, expected %d", r->name, what, rc_, code);  \
        CHECK(same_bytes(&T, &before), "%s, 8-bit state, %s: a buffer was written", r->name, what);        \
    } while (0)
        f = good, f.param = I8;
        EXPECT(FASTOPT_ERR_FORMAT, fo_t_mixed_list(rule, &f, param, grad, st, master, n, 2, &s), "an 8-bit param");
        f = good, f.grad = I8;
        EXPECT(FASTOPT_ERR_FORMAT, fo_t_mixed_list(rule, &f, param, grad, st, master, n, 2, &s), "an 8-bit grad");
        for (int k = 0; k < FO_T_MAX_STATE; k++) {
            f = good, f.state[k] = 4;
            EXPECT(need >> k & 1u ? FASTOPT_ERR_FORMAT : FASTOPT_OK,
                   fo_t_mixed_list(rule, &f, param, grad, st, master, n, 0, &s), "a state buffer of format 4");
            f = good, f.state[k] = I8, f.absmax[k] = NULL;
            EXPECT(FASTOPT_OK, fo_t_mixed_list(rule, &f, param, grad, st, master, n, 0, &s),
                   "no absmax table, count 0");
            if (!(need >> k & 1u)) { /* an unused 8-bit buffer: its absmax is never read */
                f.state[k] = I8, f.absmax[k] = NULL;
                EXPECT(FASTOPT_OK, fo_t_mixed_list(rule, &f, param, grad, st, master, empty, 2, &s),
                       "an unused 8-bit buffer without an absmax table");
                continue;
            }
            EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &f, param, grad, st, master, n, 2, &s),
                   "an absmax table NULL");
            EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &f, param, grad, st, master, empty, 2, &s),
                   "an absmax table NULL (empty tensors)");
            float *holes[2] = {T.lib_absmax[k][0], NULL};
            f.absmax[k] = holes;
            EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &f, param, grad, st, master, n, 2, &s),
                   "an absmax entry NULL");
            float *none[2] = {NULL, NULL};
            f.absmax[k] = none;
            EXPECT(FASTOPT_OK, fo_t_mixed_list(rule, &f, param, grad, st, master, empty, 2, &s),
                   "absmax entries NULL where n[i] is 0");
            void *code_holes[2] = {T.lib[R_STATE + k][0], NULL};
            void *const *keep = st[k];
            st[k] = code_holes;
            EXPECT(FASTOPT_ERR_NULL, fo_t_mixed_list(rule, &good, param, grad, st, master, n, 2, &s),
                   "a codes entry NULL");
            st[k] = keep;
        }
#undef EXPECT
        /* and the good call runs */
        CHECK(fo_t_mixed_list(rule, &good, param, grad, st, master, n, 2, &s) == FASTOPT_OK, "%s, 8-bit state: the "
              "call", r->name);
        tensors_free(&T);
        tensors_free(&before);
    }
}

int main(void)
{
    const char *want = getenv("FASTOPT_ISA");
    printf("fastopt %s mixed formats, CPU path %s (FASTOPT_ISA=%s), %d threads\n", fastopt_version(),
           fastopt_isa(), want ? want : "", fastopt_get_num_threads());
    if (want && strcmp(want, fastopt_isa()))
        printf("note: FASTOPT_ISA=%s is not supported here; testing %s\n", want, fastopt_isa());
    test_references();
    test_conversions();
    test_errors();
    test_rules();
    test_int8_references();
    test_int8_quantize();
    test_int8_errors();
    test_int8_rules();
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures != 0;
}
