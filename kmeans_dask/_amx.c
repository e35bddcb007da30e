/* Nearest-centre ranking of uint8 rows with Intel AMX integer tiles.
 *
 * Built and loaded by kmeans_dask/_native.py; see there for the rule it
 * serves.  Each centre is held as two int8 levels (h, l) with a scale each,
 * so x.w is a(x.h) + b(x.l): both products are exact int32 sums (TDPBUSD:
 * unsigned rows times signed centres), and the only error left is the
 * second level's rounding, which the caller bounds per centre.
 *
 * One fused pass per block of 32 rows, as oneDAL and FAISS do it: the rows
 * are copied once into a zero-padded tile buffer (which also gathers rows by
 * index), every pair of centre tiles is multiplied over the whole row while
 * the buffer sits in L1, and the ranked values are folded into per-lane
 * running minima at once, so no (rows x centres) matrix is written unless
 * the caller asks for one.
 */
#include <immintrin.h>
#include <stdlib.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROWS 32
#define MAX_DP (1 << 20)

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

static void configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}

/* Ranked values v[i, j] = csq[j] + ch[j] (x_i.h_j) + cl[j] (x_i.l_j).
 *
 * X: rows of d uint8 values, ldx bytes apart; rows: indices into X, or NULL
 * for rows 0..n-1.  packed: the centres' tiles, pair p (16 centres), level
 * L, K-step b at ((p * 2 + L) * kb + b) * 1024 bytes, in TDPBUSD's B layout.
 * Centre columns at or past k must have csq = +inf.
 * Optional outputs (NULL to skip): g (float32, row stride ldg, columns < k),
 * pos/best/second (the smallest and second smallest value per row, float64,
 * and the column of the smallest).
 */
int kd_amx_rank(const uint8_t *X, int64_t ldx, const int64_t *rows, int64_t n, int64_t d,
                const int8_t *packed, int64_t np_, int64_t kb,
                const double *ch, const double *cl, const double *csq, int64_t k,
                float *g, int64_t ldg, int64_t *pos, double *best, double *second) {
    const int64_t dp = kb * 64;
    if (dp > MAX_DP || dp < d) return -1;
    int32_t c[4][16 * 16] __attribute__((aligned(64)));
    /* Per row and lane (16 lanes = one centre tile): best, runner-up, best's column. */
    double b1[ROWS][16] __attribute__((aligned(64)));
    double b2[ROWS][16] __attribute__((aligned(64)));
    int64_t p1[ROWS][16] __attribute__((aligned(64)));
    const int fold = pos != NULL;
    uint8_t *a = aligned_alloc(64, (size_t)ROWS * dp);
    if (!a) return -2;
    configure();
    memset(a, 0, (size_t)ROWS * dp);
    for (int64_t r0 = 0; r0 < n; r0 += ROWS) {
        const int nr = (int)(n - r0 < ROWS ? n - r0 : ROWS);
        for (int i = 0; i < nr; i++) {
            const int64_t src = rows ? rows[r0 + i] : r0 + i;
            memcpy(a + (size_t)i * dp, X + src * ldx, (size_t)d);
        }
        if (fold) {
            for (int i = 0; i < nr; i++)
                for (int l = 0; l < 16; l++) { b1[i][l] = INFINITY; b2[i][l] = INFINITY; p1[i][l] = 0; }
        }
        for (int64_t p = 0; p < np_; p++) {
            const int8_t *bh = packed + (p * 2) * kb * 1024;
            const int8_t *bl = packed + (p * 2 + 1) * kb * 1024;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t b = 0; b < kb; b++) {
                _tile_loadd(4, a + b * 64, dp);
                _tile_loadd(5, a + 16 * dp + b * 64, dp);
                _tile_loadd(6, bh + b * 1024, 64);
                _tile_loadd(7, bl + b * 1024, 64);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 4, 7);
                _tile_dpbusd(2, 5, 6);
                _tile_dpbusd(3, 5, 7);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            const int64_t j0 = p * 16;
            const __m512d ch0 = _mm512_loadu_pd(ch + j0), ch1 = _mm512_loadu_pd(ch + j0 + 8);
            const __m512d cl0 = _mm512_loadu_pd(cl + j0), cl1 = _mm512_loadu_pd(cl + j0 + 8);
            const __m512d cs0 = _mm512_loadu_pd(csq + j0), cs1 = _mm512_loadu_pd(csq + j0 + 8);
            const __m512i col0 = _mm512_add_epi64(_mm512_set1_epi64(j0),
                                                  _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
            const __m512i col1 = _mm512_add_epi64(col0, _mm512_set1_epi64(8));
            for (int i = 0; i < nr; i++) {
                const int32_t *hi = i < 16 ? c[0] + i * 16 : c[2] + (i - 16) * 16;
                const int32_t *lo = i < 16 ? c[1] + i * 16 : c[3] + (i - 16) * 16;
                const __m512i h = _mm512_loadu_si512(hi), l = _mm512_loadu_si512(lo);
                const __m512d h0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(h));
                const __m512d h1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1));
                const __m512d l0 = _mm512_cvtepi32_pd(_mm512_castsi512_si256(l));
                const __m512d l1 = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1));
                const __m512d v0 = _mm512_fmadd_pd(ch0, h0, _mm512_fmadd_pd(cl0, l0, cs0));
                const __m512d v1 = _mm512_fmadd_pd(ch1, h1, _mm512_fmadd_pd(cl1, l1, cs1));
                if (g) {
                    float tmp[16];
                    _mm256_storeu_ps(tmp, _mm512_cvtpd_ps(v0));
                    _mm256_storeu_ps(tmp + 8, _mm512_cvtpd_ps(v1));
                    const int64_t w = k - j0 < 16 ? k - j0 : 16;
                    memcpy(g + (r0 + i) * ldg + j0, tmp, (size_t)w * sizeof(float));
                }
                if (fold) {
                    __m512d a1 = _mm512_load_pd(b1[i]), a2 = _mm512_load_pd(b1[i] + 8);
                    __m512d s1 = _mm512_load_pd(b2[i]), s2 = _mm512_load_pd(b2[i] + 8);
                    __m512i q1 = _mm512_load_si512(p1[i]), q2 = _mm512_load_si512(p1[i] + 8);
                    const __mmask8 m1 = _mm512_cmp_pd_mask(v0, a1, _CMP_LT_OQ);
                    const __mmask8 m2 = _mm512_cmp_pd_mask(v1, a2, _CMP_LT_OQ);
                    s1 = _mm512_min_pd(s1, _mm512_max_pd(a1, v0));
                    s2 = _mm512_min_pd(s2, _mm512_max_pd(a2, v1));
                    a1 = _mm512_min_pd(a1, v0);
                    a2 = _mm512_min_pd(a2, v1);
                    q1 = _mm512_mask_mov_epi64(q1, m1, col0);
                    q2 = _mm512_mask_mov_epi64(q2, m2, col1);
                    _mm512_store_pd(b1[i], a1); _mm512_store_pd(b1[i] + 8, a2);
                    _mm512_store_pd(b2[i], s1); _mm512_store_pd(b2[i] + 8, s2);
                    _mm512_store_si512(p1[i], q1); _mm512_store_si512(p1[i] + 8, q2);
                }
            }
        }
        if (fold) {
            for (int i = 0; i < nr; i++) {
                int at = 0;
                for (int l = 1; l < 16; l++)
                    if (b1[i][l] < b1[i][at] || (b1[i][l] == b1[i][at] && p1[i][l] < p1[i][at])) at = l;
                double s = b2[i][at];
                for (int l = 0; l < 16; l++) {
                    if (l == at) continue;
                    if (b1[i][l] < s) s = b1[i][l];
                }
                pos[r0 + i] = p1[i][at];
                best[r0 + i] = b1[i][at];
                second[r0 + i] = s;
            }
        }
    }
    _tile_release();
    free(a);
    return 0;
}
