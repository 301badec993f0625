/* Timing of every fp32 kernel against a roofline loop with the same bytes
 * (reads k buffers, writes k-1: p+=g; m+=g; ...), measured in alternation in
 * the same run so that a noisy machine moves both alike.
 *
 *   fastopt_bench [threads] [rounds] [offset]   FASTOPT_ISA=avx2 fastopt_bench  (force a path)
 *   fastopt_bench [threads] [rounds] [offset] subnormal
 * offset: buffers start this many floats past a 64-byte boundary (default 0).
 * subnormal: instead, AdamW fp32 at 2^20 with normal values and with subnormal
 * state (m, v = 1e-39, zero gradient), flush denormals off and on (see
 * bench_subnormal).
 *
 * Prints ns/element, GB/s and % of roofline (best batch of each; and the
 * median of the per-round ratio) for N = 2^10, 2^20, 2^24. The roofline loops use the same thread
 * split as the library (static chunks, serial below 64 KiB of p per thread) and
 * are compiled per ISA with target_clones, so they are as vectorized as the
 * kernels. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fastopt.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#  define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#  define CLONES
#endif

/* Roofline: k buffers read, the k-1 after the gradient written. */
CLONES static void roof_chunk(float *restrict p, const float *restrict g, float *restrict a,
                              float *restrict b, float *restrict c, int64_t n, int k)
{
    switch (k) {
    case 2: for (int64_t i = 0; i < n; i++) p[i] += g[i]; break;
    case 3: for (int64_t i = 0; i < n; i++) p[i] += g[i], a[i] += g[i]; break;
    case 4: for (int64_t i = 0; i < n; i++) p[i] += g[i], a[i] += g[i], b[i] += g[i]; break;
    default: for (int64_t i = 0; i < n; i++) p[i] += g[i], a[i] += g[i], b[i] += g[i], c[i] += g[i]; break;
    }
}

static void roofline(float *p, const float *g, float *a, float *b, float *c, int64_t n, int k, int threads)
{
    /* the library's split: the head up to p's 64-byte boundary first */
    int64_t head = (int64_t)((64 - (uintptr_t)p % 64) % 64) / 4;
    if (head > n) head = n;
    roof_chunk(p, g, a, b, c, head, k);
    p += head, g += head, a += head, b += head, c += head, n -= head;
    int64_t useful = n * 4 / (64 * 1024);
    int nt = threads < useful ? threads : (int)(useful > 1 ? useful : 1);
    if (nt <= 1) {
        roof_chunk(p, g, a, b, c, n, k);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        int64_t T = omp_get_num_threads(), chunk = ((n + T - 1) / T + 15) / 16 * 16;
        int64_t lo = omp_get_thread_num() * chunk;
        if (lo < n) {
            int64_t len = n - lo < chunk ? n - lo : chunk;
            roof_chunk(p + lo, g + lo, a + lo, b + lo, c + lo, len, k);
        }
    }
}

typedef struct {
    const char *name;
    int k; /* buffers touched: the roofline that moves the same bytes */
} bench_case;

static const bench_case CASES[] = {
    {"sgd", 2}, {"sgd momentum", 3}, {"adagrad", 3}, {"rmsprop", 3}, {"rmsprop centered mom", 5},
    {"adadelta", 4}, {"adam", 4}, {"adamw", 4}, {"adamw amsgrad", 5}, {"adamax", 4}, {"nadam", 4},
    {"lion", 3},
};
#define NCASES ((int)(sizeof(CASES) / sizeof(CASES[0])))

static void run_kernel(int which, float *p, const float *g, float *a, float *b, float *c, int64_t n)
{
    int rc = 0;
    switch (which) {
    case 0: { fastopt_sgd_scalars s; fastopt_sgd_prepare(&s, 1e-3, 0, 0, 0, 0, 0, 2); rc = fastopt_sgd_f32(p, g, NULL, n, &s); break; }
    case 1: { fastopt_sgd_scalars s; fastopt_sgd_prepare(&s, 1e-3, 0.9, 0, 0, 0, 0, 2); rc = fastopt_sgd_f32(p, g, a, n, &s); break; }
    case 2: { fastopt_adagrad_scalars s; fastopt_adagrad_prepare(&s, 1e-2, 0, 0, 1e-10, 0, 2); rc = fastopt_adagrad_f32(p, g, a, n, &s); break; }
    case 3: { fastopt_rmsprop_scalars s; fastopt_rmsprop_prepare(&s, 1e-2, 0.99, 1e-8, 0, 0, 0, 0, 2); rc = fastopt_rmsprop_f32(p, g, a, NULL, NULL, n, &s); break; }
    case 4: { fastopt_rmsprop_scalars s; fastopt_rmsprop_prepare(&s, 1e-2, 0.99, 1e-8, 0, 0.9, 1, 0, 2); rc = fastopt_rmsprop_f32(p, g, a, b, c, n, &s); break; }
    case 5: { fastopt_adadelta_scalars s; fastopt_adadelta_prepare(&s, 1.0, 0.9, 1e-6, 0, 0, 2); rc = fastopt_adadelta_f32(p, g, a, b, n, &s); break; }
    case 6: { fastopt_adam_scalars s; fastopt_adam_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 0, 0, 0, 2); rc = fastopt_adam_f32(p, g, a, b, NULL, n, &s); break; }
    case 7: { fastopt_adam_scalars s; fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 0, 0, 2); rc = fastopt_adamw_f32(p, g, a, b, NULL, n, &s); break; }
    case 8: { fastopt_adam_scalars s; fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, 0, 2); rc = fastopt_adamw_f32(p, g, a, b, c, n, &s); break; }
    case 9: { fastopt_adamax_scalars s; fastopt_adamax_prepare(&s, 2e-3, 0.9, 0.999, 1e-8, 0, 0, 2); rc = fastopt_adamax_f32(p, g, a, b, n, &s); break; }
    case 10: { fastopt_nadam_scalars s; double mu = 0.9; fastopt_nadam_prepare(&s, &mu, 2e-3, 0.9, 0.999, 1e-8, 0, 4e-3, 0, 0, 2); rc = fastopt_nadam_f32(p, g, a, b, n, &s); break; }
    case 11: { fastopt_lion_scalars s; fastopt_lion_prepare(&s, 1e-4, 0.9, 0.99, 0, 0); rc = fastopt_lion_f32(p, g, a, n, &s); break; }
    }
    if (rc) {
        fprintf(stderr, "kernel %d failed: %s\n", which, fastopt_strerror(rc));
        exit(1);
    }
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

/* AdamW fp32, 2^20 elements, step 2: normal values (random param, grad, m,
 * v > 0) or subnormal state (random param, zero grad, m = v = 1e-39), each
 * with flush denormals off and on. Before every call the buffers are restored
 * from templates (untimed), so each call sees the same inputs (with flush on,
 * a second call would otherwise see zeros); the four variants alternate
 * within each round. Prints the best and the median ns/element. */
static void bench_subnormal(int threads, int rounds, int offset)
{
    const int64_t n = (int64_t)1 << 20;
    float *mem[8], *buf[8]; /* 0-3: param, grad, m, v; 4-7: their templates */
    for (int k = 0; k < 8; k++) {
        mem[k] = aligned_alloc(64, (size_t)(n + 16) * sizeof(float));
        buf[k] = mem[k] + offset;
    }
    static const char *names[4] = {"normal, flush off", "subnormal, flush off", "normal, flush on",
                                   "subnormal, flush on"};
    double t[4][256];
    fastopt_adam_scalars s;
    fastopt_adamw_prepare(&s, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 0, 0, 2);
    for (int r = -2; r < rounds; r++)
        for (int v = 0; v < 4; v++) {
            const int subnormal = v & 1;
            uint64_t x = 12345;
            for (int64_t i = 0; i < n; i++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                const float u = (float)((double)(x >> 40) / (1 << 24) - 0.5);
                buf[4][i] = u;
                buf[5][i] = subnormal ? 0.0f : 0.5f * u;
                buf[6][i] = subnormal ? 1e-39f : 1e-2f * u;
                buf[7][i] = subnormal ? 1e-39f : 1e-4f * u * u;
            }
            fastopt_set_flush_denormal(v >= 2);
            double best = 1e30;
            for (int call = 0; call < 4; call++) {
                for (int k = 0; k < 4; k++) memcpy(buf[k], buf[4 + k], (size_t)n * sizeof(float));
                const double t0 = omp_get_wtime();
                int rc = fastopt_adamw_f32(buf[0], buf[1], buf[2], buf[3], NULL, n, &s);
                const double t1 = omp_get_wtime();
                if (rc) {
                    fprintf(stderr, "adamw failed: %s\n", fastopt_strerror(rc));
                    exit(1);
                }
                if (t1 - t0 < best) best = t1 - t0;
            }
            if (r >= 0) t[v][r] = best / n * 1e9;
        }
    fastopt_set_flush_denormal(0);
    printf("adamw fp32, N = 2^20, %d threads, state restored before each call; ns/elem best / median of %d rounds\n",
           threads, rounds);
    for (int v = 0; v < 4; v++) {
        qsort(t[v], rounds, sizeof(double), cmp_double);
        printf("  %-22s %8.3f %8.3f\n", names[v], t[v][0], t[v][rounds / 2]);
    }
    for (int k = 0; k < 8; k++) free(mem[k]);
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2, rounds = argc > 2 ? atoi(argv[2]) : 31;
    if (rounds < 1 || rounds > 256) rounds = 31;
    const int offset = argc > 3 ? atoi(argv[3]) & 15 : 0;
    fastopt_set_num_threads(threads);
    if (argc > 4 && !strcmp(argv[4], "subnormal")) {
        printf("fastopt %s, CPU path %s, buffers at 64-byte boundary + %d B\n", fastopt_version(), fastopt_isa(),
               4 * offset);
        bench_subnormal(threads, rounds, offset);
        return 0;
    }
    printf("fastopt %s, CPU path %s, %d threads, fp32, best of %d rounds, buffers at 64-byte boundary + %d B\n",
           fastopt_version(), fastopt_isa(), threads, rounds, 4 * offset);
    printf("%-22s %10s %9s %8s %10s %7s %7s\n", "kernel", "N", "ns/elem", "GB/s", "roof ns", "%roof", "median");
    static const int log2n[] = {10, 20, 24};
    for (int si = 0; si < 3; si++) {
        const int64_t n = (int64_t)1 << log2n[si];
        float *buf[5], *mem[5];
        for (int k = 0; k < 5; k++) {
            /* offset (in floats) from a 64-byte boundary: NumPy's large arrays
             * start 16 bytes past a page boundary (offset 4) */
            mem[k] = aligned_alloc(64, (size_t)(n + 16) * sizeof(float));
            buf[k] = mem[k] + offset;
            uint64_t x = 12345 + k;
            for (int64_t i = 0; i < n; i++) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                buf[k][i] = k == 0 || k == 1 ? (float)((double)(x >> 40) / (1 << 24) - 0.5) : 0.0f;
            }
        }
        /* A batch is ~0.1-20 ms of work; kernel and roofline batches alternate,
         * and the best batch of each is kept: on a shared machine interference
         * only ever adds time. The median ratio is printed too. */
        const int64_t calls = n >= (1 << 24) ? 1 : (n >= (1 << 20) ? 4 : 400);
        for (int c = 0; c < NCASES; c++) {
            double tk[256], tr[256], ratio[256];
            for (int r = -2; r < rounds; r++) { /* two warm-up rounds */
                double t0 = omp_get_wtime();
                for (int64_t i = 0; i < calls; i++) run_kernel(c, buf[0], buf[1], buf[2], buf[3], buf[4], n);
                double t1 = omp_get_wtime();
                for (int64_t i = 0; i < calls; i++) roofline(buf[0], buf[1], buf[2], buf[3], buf[4], n, CASES[c].k, threads);
                double t2 = omp_get_wtime();
                if (r >= 0) {
                    tk[r] = (t1 - t0) / calls / n * 1e9;
                    tr[r] = (t2 - t1) / calls / n * 1e9;
                    ratio[r] = tr[r] / tk[r];
                }
            }
            /* the roofline grew the state: bring it back to sane values */
            for (int k = 2; k < 5; k++) memset(buf[k], 0, (size_t)n * sizeof(float));
            qsort(tk, rounds, sizeof(double), cmp_double);
            qsort(tr, rounds, sizeof(double), cmp_double);
            qsort(ratio, rounds, sizeof(double), cmp_double);
            const double ns = tk[0], bytes = 4.0 * (2 * CASES[c].k - 1);
            printf("%-22s %10lld %9.3f %8.1f %10.3f %6.1f%% %6.1f%%\n", CASES[c].name, (long long)n, ns, bytes / ns,
                   tr[0], 100.0 * tr[0] / ns, 100.0 * ratio[rounds / 2]);
            fflush(stdout);
        }
        for (int k = 0; k < 5; k++) free(mem[k]);
    }
    return 0;
}
