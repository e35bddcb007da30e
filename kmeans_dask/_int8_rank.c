/* Nearest-centre ranking of uint8 rows on integer dot-product units: Intel
 * AMX tiles (kd_amx_rank) or AVX-512 VNNI (kd_vnni_rank), whichever the CPU
 * has; the caller picks.
 *
 * Built and loaded by kmeans_dask/_native.py, which states the rule it
 * serves.  Each centre is held as two int8 levels (h, l) with a scale each,
 * so x.w is a (x.h) + b (x.l): both products are exact int32 sums (TDPBUSD
 * and VPDPBUSD multiply unsigned rows by signed centres), and what is left
 * is the second level's rounding and the float32 combination, which the
 * caller bounds.  Both kernels read the same packed centres and combine the
 * same exact sums by the same float32 operations, so they give the same
 * values, bit for bit.
 *
 * The library is built without CPU-specific flags; each kernel carries its
 * instruction set as a target attribute, so it loads on any x86-64 CPU and
 * only the kernel the CPU has is called.
 *
 * AMX: one fused pass per block of 32 rows, as oneDAL and FAISS do it: the rows
 * are copied once into a zero-padded buffer whose rows start on cache lines
 * (which also gathers rows by index; read in place, each 64-byte piece of a
 * 784-byte row would straddle two lines, on every pair of centre tiles),
 * every pair of centre tiles is multiplied over the whole row while the
 * buffer sits in L1, and each row's values are folded into per-lane running
 * minima held in registers, so no (rows x centres) matrix is written unless
 * asked for.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROWS 32

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Asks the kernel for the tile state; 0 when AMX may be used. */
int kd_amx_init(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return -1;
    return 0;
}

#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512dq")))
#define VNNI_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vnni")))
/* What both kernels' CPUs have, for the code they share. */
#define COMMON_TARGET __attribute__((target("avx512f,avx512dq")))

AMX_TARGET static void configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

/* What both kernels share: the float32 combination of one row's two exact
 * sums for 16 centres (pair p), folded into the row's running per-lane best,
 * second best and column; and the row's result from those. */
#define FOLD_TARGET COMMON_TARGET __attribute__((always_inline))

typedef struct { __m512 b1, b2; __m512i q; } lanes;

static inline FOLD_TARGET lanes lanes_start(void) {
    lanes s = {_mm512_set1_ps(INFINITY), _mm512_set1_ps(INFINITY), _mm512_setzero_si512()};
    return s;
}

static inline FOLD_TARGET void fold(lanes *s, __m512i hs, __m512i ls, int64_t p,
                                    const float *ch, const float *cl, const float *csq,
                                    int64_t k, float *grow) {
    const __m512 h = _mm512_cvtepi32_ps(hs);
    const __m512 l = _mm512_cvtepi32_ps(ls);
    const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(ch + p * 16), h,
                     _mm512_fmadd_ps(_mm512_loadu_ps(cl + p * 16), l,
                                     _mm512_loadu_ps(csq + p * 16)));
    if (grow) {
        const int64_t w = k - p * 16;
        const __mmask16 m = w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1);
        _mm512_mask_storeu_ps(grow + p * 16, m, v);
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __mmask16 lt = _mm512_cmp_ps_mask(v, s->b1, _CMP_LT_OQ);
    s->b2 = _mm512_min_ps(s->b2, _mm512_max_ps(s->b1, v));
    s->b1 = _mm512_min_ps(s->b1, v);
    s->q = _mm512_mask_mov_epi32(s->q, lt, _mm512_add_epi32(lane, _mm512_set1_epi32((int)(p * 16))));
}

static inline FOLD_TARGET void finish(const lanes *s, int64_t *pos, double *best, double *second) {
    const float lo = _mm512_reduce_min_ps(s->b1);
    const __mmask16 eq = _mm512_cmp_ps_mask(s->b1, _mm512_set1_ps(lo), _CMP_EQ_OQ);
    const int col = _mm512_mask_reduce_min_epi32(eq, s->q);
    const __mmask16 at = _mm512_mask_cmpeq_epi32_mask(eq, s->q, _mm512_set1_epi32(col));
    const __mmask16 first = at & (__mmask16)(-(int)at);  /* one lane */
    const __m512 rest = _mm512_mask_mov_ps(s->b1, first, _mm512_set1_ps(INFINITY));
    *pos = col;
    *best = lo;
    *second = _mm512_reduce_min_ps(_mm512_min_ps(s->b2, rest));
}

/* Ranked values v[i, j] = csq[j] + ch[j] (x_i.h_j) + cl[j] (x_i.l_j), in float32.
 *
 * X: rows of d uint8 values, ldx bytes apart; rows: indices into X, or NULL
 * for rows 0..n-1.  packed: the centres' tiles, pair p (16 centres), level
 * L, K-step b at ((p * 2 + L) * kb + b) * 1024 bytes, in TDPBUSD's B layout
 * (zero past d).  ch, cl, csq: np * 16 values, csq = +inf past k.
 * Optional outputs (NULL to skip): g (row stride ldg, columns < k), and
 * pos/best/second (the column of the smallest value per row, the smallest
 * and the second smallest).
 */
AMX_TARGET int kd_amx_rank(const uint8_t *X, int64_t ldx, const int64_t *rows, int64_t n, int64_t d,
                const int8_t *packed, int64_t np_, int64_t kb,
                const float *ch, const float *cl, const float *csq, int64_t k,
                float *g, int64_t ldg, int64_t *pos, double *best, double *second) {
    const int64_t dp = kb * 64;
    if (dp < d || ldx < d) return -1;
    uint8_t *a = aligned_alloc(64, (size_t)ROWS * dp);
    int32_t *c = aligned_alloc(64, (size_t)np_ * 4 * 1024);
    if (!a || !c) { free(a); free(c); return -2; }
    configure();
    memset(a, 0, (size_t)ROWS * dp);
    for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
        const int nr = (int)(n - r0 < ROWS ? n - r0 : ROWS);
        for (int i = 0; i < nr; i++) {
            const int64_t src = rows ? rows[r0 + i] : r0 + i;
            memcpy(a + (size_t)i * dp, X + src * ldx, (size_t)d);
        }
        const uint8_t *base = a;
        const int64_t stride = dp;
        for (int64_t p = 0; p < np_; p++) {
            const int8_t *bh = packed + (p * 2) * kb * 1024;
            const int8_t *bl = packed + (p * 2 + 1) * kb * 1024;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t b = 0; b < kb; b++) {
                _tile_loadd(4, base + b * 64, stride);
                _tile_loadd(5, base + 16 * stride + b * 64, stride);
                _tile_loadd(6, bh + b * 1024, 64);
                _tile_loadd(7, bl + b * 1024, 64);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 4, 7);
                _tile_dpbusd(2, 5, 6);
                _tile_dpbusd(3, 5, 7);
            }
            int32_t *cp = c + p * 4 * 256;
            _tile_stored(0, cp, 64);
            _tile_stored(1, cp + 256, 64);
            _tile_stored(2, cp + 512, 64);
            _tile_stored(3, cp + 768, 64);
        }
        for (int i = 0; i < nr; i++) {
            const int32_t *hi = c + (i < 16 ? 0 : 512) + (i & 15) * 16;
            float *grow = g ? g + (r0 + i) * ldg : NULL;
            lanes s = lanes_start();
            for (int64_t p = 0; p < np_; p++)
                fold(&s, _mm512_load_si512(hi + p * 1024), _mm512_load_si512(hi + p * 1024 + 256),
                     p, ch, cl, csq, k, grow);
            if (pos) finish(&s, pos + r0 + i, best + r0 + i, second + r0 + i);
        }
    }
    _tile_release();
    free(a);
    free(c);
    return 0;
}

/* kd_amx_rank's values on AVX-512 VNNI, with the same arguments.
 *
 * VPDPBUSD multiplies four unsigned bytes of a row, broadcast to every lane,
 * by one 64-byte row of a centre tile (16 centres, four columns each) and adds
 * the four products to the 16 lanes' int32 sums: the tile layout AMX reads is
 * already the one this needs.  Register blocking, as a GEMM's micro-kernel:
 * R rows by P pairs of 16 centres by two levels of running sums (24 of the 32
 * registers), so each loaded centre vector serves R rows and each broadcast
 * row piece 2 P products.  Rows are read in place (a row's last, partial group
 * of four columns from a zero-padded copy); a block of VROWS rows keeps its
 * running minima in L1 while every pair of centres passes over it.
 */
#define VROWS 24

static inline int32_t piece(const uint8_t *x) {
    int32_t v;
    memcpy(&v, x, 4);
    return v;
}

/* The VROWS rows of the block starting at r0 (nr of them real): where each
 * starts, and its last, partial group of four columns zero-padded.  Rows past
 * the end repeat the block's first; their sums are dropped. */
static inline void block_rows(const uint8_t *X, int64_t ldx, const int64_t *rows, int64_t r0,
                              int nr, int64_t d, int64_t nfull, int has_tail,
                              const uint8_t **xr, uint32_t *tail) {
    for (int i = 0; i < VROWS; i++) {
        const int64_t src = i < nr ? (rows ? rows[r0 + i] : r0 + i) : (rows ? rows[r0] : r0);
        xr[i] = X + src * ldx;
        tail[i] = 0;
        if (has_tail) memcpy(&tail[i], xr[i] + 4 * nfull, (size_t)(d - 4 * nfull));
    }
}

/* R rows by P pairs: the sums of every column group into out (row by row,
 * then pair, then level): per group of four columns, 2 P centre vectors
 * loaded, one broadcast per row, 2 P products with it.  The sizes are
 * literals and the loops unrolled, so the R x P x 2 sums stay in registers
 * (with sizes only known after inlining, GCC kept them in memory). */
#define VNNI_BLOCK(NAME, R, P)                                                         \
static VNNI_TARGET void NAME(const uint8_t *const *xr, const uint32_t *tail,           \
                             int64_t nfull, int has_tail, const int8_t *packed,        \
                             int64_t kb, int64_t p, __m512i *out) {                    \
    const int64_t level = kb * 1024;                                                   \
    const int8_t *b0 = packed + p * 2 * level;                                         \
    __m512i acc[R * P * 2];                                                            \
    _Pragma("GCC unroll 64")                                                           \
    for (int t = 0; t < R * P * 2; t++) acc[t] = _mm512_setzero_si512();               \
    for (int64_t gi = 0; gi < nfull + has_tail; gi++) {                                \
        const int8_t *bp = b0 + (gi >> 4) * 1024 + (gi & 15) * 64;                     \
        __m512i B[P * 2];                                                              \
        _Pragma("GCC unroll 8")                                                        \
        for (int t = 0; t < P * 2; t++) B[t] = _mm512_loadu_si512(bp + t * level);     \
        _Pragma("GCC unroll 16")                                                       \
        for (int r = 0; r < R; r++) {                                                  \
            const __m512i xb = _mm512_set1_epi32(gi < nfull ? piece(xr[r] + 4 * gi)    \
                                                            : (int32_t)tail[r]);       \
            _Pragma("GCC unroll 8")                                                    \
            for (int t = 0; t < P * 2; t++)                                            \
                acc[r * P * 2 + t] = _mm512_dpbusd_epi32(acc[r * P * 2 + t], xb, B[t]); \
        }                                                                              \
    }                                                                                  \
    _Pragma("GCC unroll 64")                                                           \
    for (int t = 0; t < R * P * 2; t++) _mm512_store_si512(out + t, acc[t]);           \
}

VNNI_BLOCK(vnni_6x2, 6, 2)
VNNI_BLOCK(vnni_12x1, 12, 1)

VNNI_TARGET int kd_vnni_rank(const uint8_t *X, int64_t ldx, const int64_t *rows, int64_t n,
                             int64_t d, const int8_t *packed, int64_t np_, int64_t kb,
                             const float *ch, const float *cl, const float *csq, int64_t k,
                             float *g, int64_t ldg, int64_t *pos, double *best,
                             double *second) {
    if (kb * 64 < d || ldx < d) return -1;
    const int64_t nfull = d / 4;
    const int has_tail = (d % 4) != 0;
    lanes *state = aligned_alloc(64, sizeof(lanes) * VROWS);
    if (!state) return -2;
    const uint8_t *xr[VROWS];
    uint32_t tail[VROWS];
    __m512i out[24] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < n; r0 += VROWS) {
        const int nr = (int)(n - r0 < VROWS ? n - r0 : VROWS);
        block_rows(X, ldx, rows, r0, nr, d, nfull, has_tail, xr, tail);
        for (int i = 0; i < VROWS; i++) state[i] = lanes_start();
        for (int64_t p = 0; p < np_;) {
            /* Two pairs of centres at a time on 6 rows; a last odd pair on 12. */
            const int P = np_ - p >= 2 ? 2 : 1, R = 12 / P;
            for (int i0 = 0; i0 < nr; i0 += R) {
                if (P == 2) vnni_6x2(xr + i0, tail + i0, nfull, has_tail, packed, kb, p, out);
                else vnni_12x1(xr + i0, tail + i0, nfull, has_tail, packed, kb, p, out);
                for (int r = 0; r < R && i0 + r < nr; r++) {
                    float *grow = g ? g + (r0 + i0 + r) * ldg : NULL;
                    for (int t = 0; t < P; t++)
                        fold(&state[i0 + r], out[(r * P + t) * 2], out[(r * P + t) * 2 + 1],
                             p + t, ch, cl, csq, k, grow);
                }
            }
            p += P;
        }
        if (pos)
            for (int i = 0; i < nr; i++)
                finish(&state[i], pos + r0 + i, best + r0 + i, second + r0 + i);
    }
    free(state);
    return 0;
}

/* kd_vnni_rank's best column, smallest and second smallest values, from one
 * level first: the first level's products alone rank every centre (half
 * the work), and only the centres they cannot rule out get the second.
 *
 * The first-level value u = csq + ch (x.h) is within e1[i] of the exact
 * ranked value, so a centre whose u exceeds the row's smallest u by more
 * than 2 e1[i] is not the nearest; on MNIST's K=256 about 1.4 centres a row
 * are left.  Each of those gets x.l from lrow (the second level, row by row,
 * dp bytes a centre, zero past d) and the value kd_vnni_rank gives it, from
 * the same exact sums by the same float32 operations.  best and pos are the
 * smallest of those values and its column; second is the second smallest,
 * or for a ruled-out centre u - e1[i] + e[i] if lower (e[i]: the two-level
 * value's bound), so that second - e[i] still bounds every other centre's
 * exact value from below.  Where kd_vnni_rank would pick a ruled-out centre
 * (within its bounds of a tie), second - best <= 2 e[i] here, so the
 * caller settles the row by the exact comparison either way.
 */
#define VNNI1_BLOCK(NAME, R, P)                                                        \
static VNNI_TARGET void NAME(const uint8_t *const *xr, const uint32_t *tail,           \
                             int64_t nfull, int has_tail, const int8_t *packed,        \
                             int64_t kb, int64_t p, __m512i *out) {                    \
    const int64_t pair = kb * 2048;                                                    \
    const int8_t *b0 = packed + p * pair;                                              \
    __m512i acc[R * P];                                                                \
    _Pragma("GCC unroll 64")                                                           \
    for (int t = 0; t < R * P; t++) acc[t] = _mm512_setzero_si512();                   \
    for (int64_t gi = 0; gi < nfull + has_tail; gi++) {                                \
        const int8_t *bp = b0 + (gi >> 4) * 1024 + (gi & 15) * 64;                     \
        __m512i B[P];                                                                  \
        _Pragma("GCC unroll 8")                                                        \
        for (int t = 0; t < P; t++) B[t] = _mm512_loadu_si512(bp + t * pair);          \
        _Pragma("GCC unroll 32")                                                       \
        for (int r = 0; r < R; r++) {                                                  \
            const __m512i xb = _mm512_set1_epi32(gi < nfull ? piece(xr[r] + 4 * gi)    \
                                                            : (int32_t)tail[r]);       \
            _Pragma("GCC unroll 8")                                                    \
            for (int t = 0; t < P; t++)                                                \
                acc[r * P + t] = _mm512_dpbusd_epi32(acc[r * P + t], xb, B[t]);        \
        }                                                                              \
    }                                                                                  \
    _Pragma("GCC unroll 64")                                                           \
    for (int t = 0; t < R * P; t++) _mm512_store_si512(out + t, acc[t]);               \
}

VNNI1_BLOCK(vnni1_6x4, 6, 4)
VNNI1_BLOCK(vnni1_12x2, 12, 2)
VNNI1_BLOCK(vnni1_24x1, 24, 1)

/* x.l for one centre's second level (row-major, zero past d). */
static inline VNNI_TARGET int32_t level_dot(const uint8_t *x, const int8_t *l, int64_t d) {
    __m512i acc = _mm512_setzero_si512();
    int64_t q = 0;
    for (; q + 64 <= d; q += 64)
        acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(x + q), _mm512_loadu_si512(l + q));
    if (q < d) {
        const __mmask64 m = ((__mmask64)1 << (d - q)) - 1;
        acc = _mm512_dpbusd_epi32(acc, _mm512_maskz_loadu_epi8(m, x + q),
                                  _mm512_maskz_loadu_epi8(m, l + q));
    }
    return _mm512_reduce_add_epi32(acc);
}

VNNI_TARGET int kd_vnni_rank1(const uint8_t *X, int64_t ldx, const int64_t *rows, int64_t n,
                              int64_t d, const int8_t *packed, int64_t np_, int64_t kb,
                              const float *ch, const float *cl, const float *csq, int64_t k,
                              const int8_t *lrow, const double *e1, const double *e,
                              int64_t *pos, double *best, double *second) {
    if (kb * 64 < d || ldx < d) return -1;
    const int64_t nfull = d / 4, dp = kb * 64, kp = np_ * 16;
    const int has_tail = (d % 4) != 0;
    int32_t *hs = aligned_alloc(64, sizeof(int32_t) * VROWS * kp);
    float *u = aligned_alloc(64, sizeof(float) * kp);
    if (!hs || !u) { free(hs); free(u); return -2; }
    const uint8_t *xr[VROWS];
    uint32_t tail[VROWS];
    __m512i out[24] __attribute__((aligned(64)));
    for (int64_t r0 = 0; r0 < n; r0 += VROWS) {
        const int nr = (int)(n - r0 < VROWS ? n - r0 : VROWS);
        block_rows(X, ldx, rows, r0, nr, d, nfull, has_tail, xr, tail);
        /* The first level's sums of the block's rows against every centre. */
        for (int64_t p = 0; p < np_;) {
            const int P = np_ - p >= 4 ? 4 : (np_ - p >= 2 ? 2 : 1), R = 24 / P;
            for (int i0 = 0; i0 < nr; i0 += R) {
                if (P == 4) vnni1_6x4(xr + i0, tail + i0, nfull, has_tail, packed, kb, p, out);
                else if (P == 2) vnni1_12x2(xr + i0, tail + i0, nfull, has_tail, packed, kb, p, out);
                else vnni1_24x1(xr + i0, tail + i0, nfull, has_tail, packed, kb, p, out);
                for (int r = 0; r < R && i0 + r < nr; r++)
                    for (int t = 0; t < P; t++)
                        _mm512_store_si512(hs + (int64_t)(i0 + r) * kp + (p + t) * 16,
                                           out[r * P + t]);
            }
            p += P;
        }
        for (int i = 0; i < nr; i++) {
            const int32_t *hi = hs + (int64_t)i * kp;
            __m512 lo = _mm512_set1_ps(INFINITY);
            for (int64_t p = 0; p < np_; p++) {
                const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(ch + p * 16),
                                                 _mm512_cvtepi32_ps(_mm512_load_si512(hi + p * 16)),
                                                 _mm512_loadu_ps(csq + p * 16));
                _mm512_store_ps(u + p * 16, v);
                lo = _mm512_min_ps(lo, v);
            }
            const double ei = e1[r0 + i], limit = (double)_mm512_reduce_min_ps(lo) + 2.0 * ei;
            float lim = (float)limit;
            if ((double)lim < limit) lim = nextafterf(lim, INFINITY);
            const __m512 vlim = _mm512_set1_ps(lim);
            float b1 = INFINITY, b2 = INFINITY, rest = INFINITY;
            int64_t col = 0;
            for (int64_t p = 0; p < np_; p++) {
                const __m512 v = _mm512_load_ps(u + p * 16);
                __mmask16 m = _mm512_cmp_ps_mask(v, vlim, _CMP_LE_OQ);
                rest = fminf(rest, _mm512_mask_reduce_min_ps((__mmask16)~m, v));
                while (m) {
                    const int t = __builtin_ctz(m);
                    m &= m - 1;
                    const int64_t j = p * 16 + t;
                    if (j >= k) break;
                    const float l = (float)level_dot(xr[i], lrow + j * dp, d);
                    const float val = fmaf(ch[j], (float)hi[j], fmaf(cl[j], l, csq[j]));
                    if (val < b1) { b2 = b1; b1 = val; col = j; }
                    else if (val < b2) b2 = val;
                }
            }
            pos[r0 + i] = col;
            best[r0 + i] = b1;
            const double other = (double)rest - ei + e[r0 + i];
            second[r0 + i] = other < (double)b2 ? other : (double)b2;
        }
    }
    free(hs);
    free(u);
    return 0;
}

/* The centres' two int8 levels in stored units, c / scale ~ a h + b l, in the
 * layout both kernels read: level L of centre 16 p + col at column 64 s + 4 r + t
 * is byte ((((p * 2 + L) * kb + s) * 16 + r) * 16 + col) * 4 + t of packed,
 * which the caller zeroes.  Each level rounds what is left to 127 steps of its
 * largest absolute value.  e2, h2, l2: per centre, the squared norm of the
 * second level's rounding error and of the two integer levels (their order of
 * summation does not matter: the caller bounds with them, with margin); e1,
 * the squared norm of what the first level leaves (kd_vnni_rank1's bound).
 * lrow (NULL to skip): the second level again, row by row, kb * 64 bytes a
 * centre, for kd_vnni_rank1 (the caller zeroes it).  A mini-batch step prepares new centres every batch, so this is compiled.
 * Only called where one of the kernels runs, so it may use their instruction
 * set (without it, rint is a library call per value: ten times slower).
 */
COMMON_TARGET int kd_int8_levels(const double *c, int64_t k, int64_t d, double scale, int8_t *packed,
                  int64_t kb, double *a, double *b, double *e2, double *h2, double *l2,
                  double *e1, int8_t *lrow) {
    double *restrict v = malloc((size_t)(d > 0 ? d : 1) * sizeof(double));
    int32_t *restrict h = malloc((size_t)(d > 0 ? d : 1) * sizeof(int32_t));
    if (!v || !h) { free(v); free(h); return -2; }
    const double inv_scale = 1.0 / scale;
    for (int64_t j = 0; j < k; j++) {
        const double *restrict cj = c + j * d;
        double top = 0.0;
        #pragma omp simd reduction(max:top)
        for (int64_t q = 0; q < d; q++) {
            const double x = cj[q] * inv_scale;
            v[q] = x;
            const double m = x < 0 ? -x : x;
            top = m > top ? m : top;
        }
        for (int level = 0; level < 2; level++) {
            /* NaN or infinite centres give NaN steps here; the caller finds
             * their |c|^2 or coefficients not finite and does not use them. */
            const double s = top > 0 ? top / 127.0 : 1.0, inv = 1.0 / s;
            double sq = 0.0, err = 0.0;
            top = 0.0;
            #pragma omp simd reduction(+:sq, err) reduction(max:top)
            for (int64_t q = 0; q < d; q++) {
                double z = __builtin_rint(v[q] * inv);
                z = z < -127.0 ? -127.0 : z;
                z = z > 127.0 ? 127.0 : z;
                const double r = v[q] - z * s;
                h[q] = (int32_t)z;  /* narrowed below: narrowing here kept the loop scalar */
                v[q] = r;
                sq += z * z;
                err += r * r;
                const double m = r < 0 ? -r : r;
                top = m > top ? m : top;
            }
            int8_t *dst = packed + (((j / 16) * 2 + level) * kb) * 1024 + (j % 16) * 4;
            int64_t q = 0;
            for (; q + 4 <= d; q += 4) {  /* four columns, one 4-byte store */
                const uint32_t w = (uint32_t)(uint8_t)h[q] | (uint32_t)(uint8_t)h[q + 1] << 8
                                 | (uint32_t)(uint8_t)h[q + 2] << 16
                                 | (uint32_t)(uint8_t)h[q + 3] << 24;
                memcpy(dst + (q >> 6) * 1024 + ((q & 63) >> 2) * 64, &w, 4);
            }
            for (; q < d; q++)
                dst[(q >> 6) * 1024 + ((q & 63) >> 2) * 64 + (q & 3)] = (int8_t)h[q];
            if (level == 0) { a[j] = s; h2[j] = sq; e1[j] = err; }
            else {
                b[j] = s; l2[j] = sq; e2[j] = err;
                if (lrow)
                    for (int64_t q2 = 0; q2 < d; q2++) lrow[j * kb * 64 + q2] = (int8_t)h[q2];
            }
        }
    }
    free(v);
    free(h);
    return 0;
}
