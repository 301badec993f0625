/* Mixed-format updates (fastopt_<rule>_mixed_list; the contract is in
 * fastopt.h): bfloat16 and float16 params and grads, a float32 master copy of
 * the param, bfloat16 state with stochastic rounding, 8-bit blockwise state.
 *
 * Every rule's math stays in its generated float32 loop: this file only moves
 * data around it. The threads split the call's elements as a float32 list call
 * does (fo_threads_for on the total, one contiguous range per thread), and
 * each thread walks its range in tiles of FO_TILE elements. Per tile, a role
 * held in float32 goes to the loop in place (a master copy is the param); any
 * other is converted into the thread's float32 scratch, small enough to stay
 * in L1 from the load through the loop to the store; the loop runs on the
 * tile; then each converted role it writes is stored back in its format. The
 * conversions are the CPU path's (convert.inc, via fo_kernels.convert).
 *
 * The random bits of element j of tensor i, role r, are
 * fo_mix32(stream(key, i, r) + j): they depend neither on the tiles nor on the
 * threads, so any split gives the same bits, and every element's result is
 * that of the reference (load, float32 update, store) on its own.
 *
 * 8-bit state is quantized per block of FO_I8_BLOCK (256) elements of a
 * tensor, so a block must be in one thread's range and one tile: each thread's
 * range is cut, within each tensor, at multiples of 256 (both ends rounded up,
 * to at most the tensor's size: the ranges of consecutive threads still meet),
 * and FO_TILE is a multiple of 256, so every tile starts on a block. Elementwise
 * formats give the same results for any cut, so the cut is made in every call. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

/* The tables of 8-bit state (generated: int8_maps.inc), defined here once. */
#define FO_I8_DEFINE_TABLES
#if defined(__GNUC__)
#define FO_I8_TABLE __attribute__((aligned(64)))
#endif
#include "int8_maps.inc"

/* Elements per tile. The scratch is (2 + FO_MAX_STATE) * FO_TILE floats per
 * thread (20 KiB at 1024, on its stack): tiles so large that a loop call and a
 * conversion call per role are a small part of each, yet the scratch stays in
 * L1 (32 KiB or more) beside the streaming buffers. Measured (AdamW at 2^24,
 * 2 threads, a 2-core AVX2 VM): 256 to 4096 all within the noise, the update
 * being bound by the conversions' arithmetic there (docs/design.md, 5). */
#ifndef FO_TILE /* a -D on the compiler command line can tune it */
#define FO_TILE 1024
#endif

/* Roles per tensor in a stream's index (fastopt.formats.ROLES_PER_TENSOR):
 * role 0 the param, 1 + k state buffer k. */
#define FO_ROLES_PER_TENSOR 16

/* fastopt_formats has a format for each state buffer of every rule. */
typedef char fo_formats_hold_every_state[FO_MAX_STATE <= FASTOPT_FORMATS_MAX_STATE ? 1 : -1];
typedef char fo_roles_fit_a_stream[1 + FO_MAX_STATE <= FO_ROLES_PER_TENSOR ? 1 : -1];
/* A tile holds whole blocks of 8-bit state. */
typedef char fo_tiles_hold_whole_blocks[FO_TILE % FO_I8_BLOCK == 0 ? 1 : -1];

#if defined(__GNUC__)
#define FO_ALIGN64 __attribute__((aligned(64)))
#else
#define FO_ALIGN64
#endif

/* The stream of role `role` of tensor t: mix32(key ^ mix32(t * 16 + role)), mod 2^32. */
static uint32_t fo_stream(uint32_t key, int64_t t, int role)
{
    return fo_mix32(key ^ fo_mix32((uint32_t)((uint64_t)t * FO_ROLES_PER_TENSOR + (uint64_t)role)));
}

/* One call: its arguments, checked, and what every tile needs. */
typedef struct {
    fo_loop loop;         /* the kernel's float32 loop */
    const fo_convert *cv; /* the conversions of the same CPU path */
    const fastopt_formats *f;
    void *const *param;
    const void *const *grad;
    void *const *state[FO_MAX_STATE];   /* NULL: a buffer the update does not use */
    float *const *absmax[FO_MAX_STATE]; /* an 8-bit buffer's table of absmax arrays (else NULL) */
    fo_i8_tables i8[FO_MAX_STATE];      /* an 8-bit buffer's map */
    float *const *master;               /* NULL: no master copy */
    const int64_t *n;
    int64_t count;
    const void *scalars;
    int flush; /* fastopt_get_flush_denormal(), read once per call */
} fo_mixed;

/* Tensor t's buffers and the streams of its stochastically rounded roles. */
typedef struct {
    void *param;
    const void *grad;
    void *state[FO_MAX_STATE];
    float *absmax[FO_MAX_STATE]; /* an 8-bit buffer's, else NULL */
    float *master;
    uint32_t stream[1 + FO_MAX_STATE]; /* by role */
} fo_tensor;

/* A thread's float32 tiles of the roles it may convert. */
typedef struct {
    float param[FO_TILE], grad[FO_TILE], state[FO_MAX_STATE][FO_TILE];
} fo_scratch;

static fo_tensor fo_tensor_at(const fo_mixed *M, int64_t t)
{
    fo_tensor T;
    T.param = M->param[t];
    T.grad = M->grad[t];
    T.master = M->master ? M->master[t] : NULL;
    for (int k = 0; k < FO_MAX_STATE; k++) {
        T.state[k] = M->state[k] ? M->state[k][t] : NULL;
        T.absmax[k] = M->absmax[k] ? M->absmax[k][t] : NULL;
    }
    for (int r = 0; r < 1 + FO_MAX_STATE; r++)
        T.stream[r] = fo_stream(M->f->key, t, r);
    return T;
}

/* The float32 values of elements [lo, lo + len) of a buffer of `format`: the
 * buffer itself when it is float32 (the loop then reads and writes it in
 * place), else its values converted into `scratch`. */
static float *fo_load(const fo_convert *cv, int format, const void *buf, int64_t lo, int64_t len, float *scratch)
{
    if (format == FASTOPT_FORMAT_F32)
        return (float *)buf + lo;
    const uint16_t *in = (const uint16_t *)buf + lo;
    if (format == FASTOPT_FORMAT_BF16)
        cv->load_bf16(scratch, in, len);
    else
        cv->load_f16(scratch, in, len);
    return scratch;
}

/* Elements [lo, lo + len) of tensor T (len <= FO_TILE): load, update, store. */
static void fo_mixed_tile(const fo_mixed *M, const fo_tensor *T, int64_t lo, int64_t len, fo_scratch *w)
{
    const fo_convert *cv = M->cv;
    const fastopt_formats *f = M->f;
    float *p = T->master ? T->master + lo : fo_load(cv, f->param, T->param, lo, len, w->param);
    const float *g = fo_load(cv, f->grad, T->grad, lo, len, w->grad);
    void *st[FO_MAX_STATE];
    for (int k = 0; k < FO_MAX_STATE; k++) {
        if (!T->state[k])
            st[k] = NULL;
        else if (f->state[k] == FASTOPT_FORMAT_I8) { /* (lo: a block's start) */
            cv->load_i8(w->state[k], (const uint8_t *)T->state[k] + lo, T->absmax[k] + lo / FO_I8_BLOCK, len,
                        M->i8[k].map);
            st[k] = w->state[k];
        } else
            st[k] = fo_load(cv, f->state[k], T->state[k], lo, len, w->state[k]);
    }

    M->loop(p, g, st, len, M->scalars, M->flush);

    if (f->param != FASTOPT_FORMAT_F32) {
        uint16_t *out = (uint16_t *)T->param + lo;
        if (!T->master) /* (a bfloat16 param: checked) */
            cv->store_bf16_stochastic(out, p, len, T->stream[0] + (uint32_t)lo);
        else if (f->param == FASTOPT_FORMAT_BF16)
            cv->store_bf16_nearest(out, p, len);
        else
            cv->store_f16_nearest(out, p, len);
    }
    for (int k = 0; k < FO_MAX_STATE; k++) {
        if (!T->state[k])
            continue;
        if (f->state[k] == FASTOPT_FORMAT_BF16)
            cv->store_bf16_stochastic((uint16_t *)T->state[k] + lo, st[k], len, T->stream[1 + k] + (uint32_t)lo);
        else if (f->state[k] == FASTOPT_FORMAT_I8)
            cv->store_i8((uint8_t *)T->state[k] + lo, T->absmax[k] + lo / FO_I8_BLOCK, st[k], len, &M->i8[k]);
    }
}

/* x rounded up to a multiple of FO_I8_BLOCK, at most n (a cut between threads). */
static int64_t fo_block_cut(int64_t x, int64_t n)
{
    const int64_t up = (x + FO_I8_BLOCK - 1) / FO_I8_BLOCK * FO_I8_BLOCK;
    return up < n ? up : n;
}

/* The elements [lo, hi) of the concatenation of the tensors, each tensor's part
 * cut at blocks of 8-bit state (fo_block_cut: the part a thread takes from a
 * tensor is [cut(lo), cut(hi)) in the tensor's coordinates). */
static void fo_mixed_range(const fo_mixed *M, int64_t lo, int64_t hi)
{
    FO_ALIGN64 fo_scratch w;
    int64_t offset = 0;
    for (int64_t t = 0; t < M->count && offset < hi; offset += M->n[t], t++) {
        const int64_t n = M->n[t];
        if (n == 0 || offset + n <= lo)
            continue;
        const fo_tensor T = fo_tensor_at(M, t);
        const int64_t a = lo > offset ? fo_block_cut(lo - offset, n) : 0;
        const int64_t b = hi - offset < n ? fo_block_cut(hi - offset, n) : n;
        for (int64_t x = a; x < b; x += FO_TILE)
            fo_mixed_tile(M, &T, x, b - x < FO_TILE ? b - x : FO_TILE, &w);
    }
}

/* fo_mixed_range as a fo_range. */
static void fo_mixed_range_of(const void *ctx, int64_t lo, int64_t hi) { fo_mixed_range((const fo_mixed *)ctx, lo, hi); }

/* A format of param and grad. */
static int fo_format_known(int format)
{
    return format == FASTOPT_FORMAT_F32 || format == FASTOPT_FORMAT_BF16 || format == FASTOPT_FORMAT_F16;
}

/* The formats fastopt.h allows (fastopt.formats.call_formats in Python). */
static int fo_formats_ok(const fastopt_formats *f, int master, unsigned need)
{
    if (!fo_format_known(f->param) || !fo_format_known(f->grad))
        return 0;
    if (master ? f->param == FASTOPT_FORMAT_F32 : f->param == FASTOPT_FORMAT_F16)
        return 0;
    for (int k = 0; k < FO_MAX_STATE; k++)
        if ((need >> k & 1u) && f->state[k] != FASTOPT_FORMAT_F32 && f->state[k] != FASTOPT_FORMAT_BF16 &&
            f->state[k] != FASTOPT_FORMAT_I8)
            return 0;
    return 1;
}

/* Every check of fastopt.h's contract, before anything is written: FASTOPT_OK
 * with *total the element count, or the error. Only M's tables are read. */
static int fo_mixed_check(const fo_mixed *M, int64_t *total)
{
    *total = 0;
    if (M->count < 0)
        return FASTOPT_ERR_LENGTH;
    if (M->count == 0)
        return FASTOPT_OK;
    if (!M->n || !M->param || !M->grad)
        return FASTOPT_ERR_NULL;
    for (int k = 0; k < FO_MAX_STATE; k++)
        if (M->state[k] && M->f->state[k] == FASTOPT_FORMAT_I8 && !M->absmax[k])
            return FASTOPT_ERR_NULL;
    int64_t sum = 0;
    for (int64_t i = 0; i < M->count; i++) {
        const int64_t n = M->n[i];
        if (n < 0 || n > INT64_MAX / 4 - sum)
            return FASTOPT_ERR_LENGTH;
        if (n == 0)
            continue;
        if (!M->param[i] || !M->grad[i] || (M->master && !M->master[i]))
            return FASTOPT_ERR_NULL;
        for (int k = 0; k < FO_MAX_STATE; k++)
            if (M->state[k] && (!M->state[k][i] || (M->absmax[k] && !M->absmax[k][i])))
                return FASTOPT_ERR_NULL;
        sum += n;
    }
    *total = sum;
    return FASTOPT_OK;
}

int fo_run_mixed(int kernel, const fastopt_formats *f, void *const *param, const void *const *grad,
                 void *const *const *state, float *const *master, unsigned need, const int64_t *n, int64_t count,
                 const void *scalars)
{
    if (!f || !scalars)
        return FASTOPT_ERR_NULL;
    if (!fo_formats_ok(f, master != NULL, need))
        return FASTOPT_ERR_FORMAT;
    const fo_kernels *kernels = fo_kernels_selected();
    fo_mixed M;
    memset(&M, 0, sizeof M);
    M.loop = kernels->loop[kernel][FO_F32], M.cv = &kernels->convert, M.f = f;
    M.param = param, M.grad = grad, M.master = master, M.n = n, M.count = count, M.scalars = scalars;
    M.flush = fastopt_get_flush_denormal();
    for (int k = 0; k < FO_MAX_STATE; k++) {
        if ((need >> k & 1u) && !state[k])
            return FASTOPT_ERR_NULL;
        M.state[k] = need >> k & 1u ? state[k] : NULL; /* a buffer the update does not use is never read */
        if (M.state[k] && f->state[k] == FASTOPT_FORMAT_I8) {
            const int m = f->signed_map[k] != 0;
            M.absmax[k] = f->absmax[k]; /* (checked in fo_mixed_check) */
            M.i8[k].map = fo_i8_map[m], M.i8[k].mids = fo_i8_mids[m], M.i8[k].first = fo_i8_first[m];
            M.i8[k].fused = fo_i8_fused[m];
            M.i8[k].zero = m ? FO_I8_ZERO_SIGNED : FO_I8_ZERO_UNSIGNED;
        }
    }
    int64_t total;
    const int rc = fo_mixed_check(&M, &total);
    if (rc != FASTOPT_OK || total == 0)
        return rc;
    fo_split(total, 4, fo_mixed_range_of, &M);
    return FASTOPT_OK;
}
