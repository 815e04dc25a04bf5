// dbllm_lab CPU kernel, integer path (backends "cpu" for 1-4 activation rows and "cpu-int8"): activations
// quantized to int8 once per call, bit-plane group sums in integers, FDB scales applied per group in fp32.
// Two layouts of the repacked planes (cpu_kernel.repack_int8), both blocks of 32 output rows: "lut" (AVX2 table
// lookups) and "vnni" (AVX-512 VNNI byte dot products); each has a portable loop giving the same bits.
// Formula, layouts and the measurements behind the choices: dbllm_lab/cpu_kernel.py's docstring.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "cpu_kernel.h"
#if (defined(__x86_64__) || defined(__i386__)) && !defined(DBLLM_GENERIC)
#include <immintrin.h>
#define DBLLM_X86 1
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")))
#endif


// Byte position, inside a 32-byte vector of the repacked layout, of row r of a block of 32 output rows. Rows
// 8-15 and 16-23 swap places so that the AVX2 byte unpacks below give rows 0-15 and 16-31 in order.
static const int POS[32] = {0,  1,  2,  3,  4,  5,  6,  7,  16, 17, 18, 19, 20, 21, 22, 23,
                            8,  9,  10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};

// One activation row, per group of g: d = max|x| / 127, q = rint(x / d) clamped to [-127, 127]; q = 0 where d = 0
static void quantize_row(const float* x, int64_t K, int64_t g, int8_t* q, float* d) {
    for (int64_t gi = 0; gi < K / g; gi++) {
        const float* xg = x + gi * g;
        float amax = 0.0f;
        for (int64_t k = 0; k < g; k++) amax = fmaxf(amax, fabsf(xg[k]));
        const float dg = amax / 127.0f;
        d[gi] = dg;
        for (int64_t k = 0; k < g; k++) {
            const float r = dg > 0.0f ? rintf(xg[k] / dg) : 0.0f;  // rintf: ties to even, as torch.round
            q[gi * g + k] = (int8_t)(r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r));
        }
    }
}

// The 16 subset sums of every 4 activations, T[i] = sum of q[4j + b] over the set bits b of i (T-MAC's table),
// as int16 split into a low-byte and a high-byte table: 32 bytes per quad j, lo[16] then hi[16]
static void build_tables(const int8_t* q, int64_t K, uint8_t* tab) {
    for (int64_t j = 0; j < K / 4; j++) {
        int16_t t[16];
        t[0] = 0;
        for (int b = 0; b < 4; b++)
            for (int i = 0; i < (1 << b); i++) t[(1 << b) + i] = (int16_t)(t[i] + q[4 * j + b]);
        uint8_t* o = tab + 32 * j;
        for (int i = 0; i < 16; i++) { o[i] = (uint8_t)(t[i] & 0xff); o[16 + i] = (uint8_t)((uint16_t)t[i] >> 8); }
    }
}

static inline int32_t lookup(const uint8_t* t, int i) { return (int16_t)(t[i] | (t[16 + i] << 8)); }

// Portable lookup path over one block of 32 rows: w1, w2 the block's (K/8) x 32 plane bytes, scales at element
// so + gi * 32 + r, tab / d the activation row's tables and group factors; out[r] = row r of the block.
// Per group: o = fma(fma(S1, a1, S2 * a2), d, o), the same fp32 operations as the AVX2 paths (equal bits).
static void lut_block_portable(const uint8_t* w1, const uint8_t* w2, const void* s1, const void* s2, int64_t so,
                               int half, const uint8_t* tab, const float* d, int64_t K, int64_t g, float* out) {
    const int64_t cpg = g / 8;  // column bytes per group
    for (int r = 0; r < 32; r++) {
        float o = 0.0f;
        for (int64_t gi = 0; gi < K / g; gi++) {
            int32_t S1 = 0, S2 = 0;
            for (int64_t c = gi * cpg; c < (gi + 1) * cpg; c++) {
                const uint8_t b1 = w1[32 * c + POS[r]], b2 = w2[32 * c + POS[r]];
                const uint8_t* t = tab + 64 * c;  // quads 2c (low nibble) and 2c + 1 (high nibble)
                S1 += lookup(t, b1 & 15) + lookup(t + 32, b1 >> 4);
                S2 += lookup(t, b2 & 15) + lookup(t + 32, b2 >> 4);
            }
            const int64_t i = so + gi * 32 + r;
            o = fmaf(fmaf((float)S1, scale(s1, i, half), (float)S2 * scale(s2, i, half)), d[gi], o);
        }
        out[r] = o;
    }
}

// Portable loop over one block of the "vnni" layout: per quad c of columns (4c .. 4c + 3) and half h of the rows
// (16h .. 16h + 15) a 64-bit word whose bit 4i + j is row 16h + i, column 4c + j; words in (c, h) order. Integer
// group sums, then the lookup paths' fp32 operations in their order (equal bits).
static void vnni_block_portable(const uint8_t* w1, const uint8_t* w2, const void* s1, const void* s2, int64_t so,
                                int half, const int8_t* q, const float* d, int64_t K, int64_t g, float* out) {
    for (int r = 0; r < 32; r++) {
        float o = 0.0f;
        for (int64_t gi = 0; gi < K / g; gi++) {
            int32_t S1 = 0, S2 = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k++) {
                const int64_t bit = 64 * (2 * (k / 4) + r / 16) + 4 * (r % 16) + k % 4;
                S1 += ((w1[bit >> 3] >> (bit & 7)) & 1) ? q[k] : 0;
                S2 += ((w2[bit >> 3] >> (bit & 7)) & 1) ? q[k] : 0;
            }
            const int64_t i = so + gi * 32 + r;
            o = fmaf(fmaf((float)S1, scale(s1, i, half), (float)S2 * scale(s2, i, half)), d[gi], o);
        }
        out[r] = o;
    }
}

#ifdef DBLLM_X86
AVX2_FN static inline __m256 scales8(const void* s, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)s + i)))
                : _mm256_loadu_ps((const float*)s + i);
}

// 32 table lookups (one per row) with vpshufb; low and high bytes interleave into int16 sums of rows 0-15, 16-31
AVX2_FN static inline void lookup32(__m256i idx, __m256i tlo, __m256i thi, __m256i& rows0, __m256i& rows16) {
    const __m256i lo = _mm256_shuffle_epi8(tlo, idx), hi = _mm256_shuffle_epi8(thi, idx);
    rows0 = _mm256_add_epi16(rows0, _mm256_unpacklo_epi8(lo, hi));
    rows16 = _mm256_add_epi16(rows16, _mm256_unpackhi_epi8(lo, hi));
}

// int16 sums of rows 8h .. 8h + 7 as fp32
AVX2_FN static inline __m256 rows8(__m256i rows0, __m256i rows16, int h) {
    const __m256i v = h < 2 ? rows0 : rows16;
    const __m128i q = (h & 1) ? _mm256_extracti128_si256(v, 1) : _mm256_castsi256_si128(v);
    return _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(q));
}

// AVX2 lookup path, candidate (b): lut_block_portable's operands and result. Per 8 columns and plane: 4 shuffles
// do 128 lookups (32 rows x 2 quads), int16 sums within a group (g <= 256: g / 4 * 4 * 127 < 2^15)
AVX2_FN static void lut_block_avx2(const uint8_t* w1, const uint8_t* w2, const void* s1, const void* s2, int64_t so,
                                   int half, const uint8_t* tab, const float* d, int64_t K, int64_t g, float* out) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const int64_t cpg = g / 8;
    __m256 o[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t gi = 0; gi < K / g; gi++) {
        __m256i p1a = _mm256_setzero_si256(), p1b = p1a, p2a = p1a, p2b = p1a;
        for (int64_t c = gi * cpg; c < (gi + 1) * cpg; c++) {
            if (!(c & 1)) {  // one line of each plane per 2 column bytes
                _mm_prefetch((const char*)w1 + 32 * c + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char*)w2 + 32 * c + PREFETCH_BYTES, _MM_HINT_T0);
            }
            const __m256i b1 = _mm256_loadu_si256((const __m256i*)(w1 + 32 * c));
            const __m256i b2 = _mm256_loadu_si256((const __m256i*)(w2 + 32 * c));
            const __m128i* t = (const __m128i*)(tab + 64 * c);
            const __m256i lo0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t));
            const __m256i hi0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t + 1));
            const __m256i lo1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t + 2));
            const __m256i hi1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(t + 3));
            lookup32(_mm256_and_si256(b1, low4), lo0, hi0, p1a, p1b);
            lookup32(_mm256_and_si256(_mm256_srli_epi16(b1, 4), low4), lo1, hi1, p1a, p1b);
            lookup32(_mm256_and_si256(b2, low4), lo0, hi0, p2a, p2b);
            lookup32(_mm256_and_si256(_mm256_srli_epi16(b2, 4), low4), lo1, hi1, p2a, p2b);
        }
        const __m256 dv = _mm256_set1_ps(d[gi]);
        for (int h = 0; h < 4; h++) {
            const int64_t i = so + gi * 32 + 8 * h;
            const __m256 t = _mm256_fmadd_ps(rows8(p1a, p1b, h), scales8(s1, i, half),
                                             _mm256_mul_ps(rows8(p2a, p2b, h), scales8(s2, i, half)));
            o[h] = _mm256_fmadd_ps(t, dv, o[h]);
        }
    }
    for (int h = 0; h < 4; h++) _mm256_storeu_ps(out + 8 * h, o[h]);
}

// 32 plane bits -> 32 bytes of 0/1 (byte k = bit k): spread byte k/8 over 8 lanes, pick bit k%8, clamp to 1
AVX2_FN static inline __m256i expand_bits(uint32_t w) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread);
    return _mm256_min_epu8(_mm256_and_si256(v, _mm256_set1_epi64x(0x8040201008040201LL)), _mm256_set1_epi8(1));
}

AVX2_FN static inline int32_t hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

// Candidate (a) on AVX2, one output row n from the checkpoint layout: bits expanded to 0/1 bytes, vpmaddubsw
// (0/1 unsigned x int8 signed, pairs summed to int16) and vpmaddwd (to int32); AVX-512 VNNI's vpdpbusd fuses both
AVX2_FN static float expand_row_avx2(const uint32_t* p1, const uint32_t* p2, const void* a1, const void* a2,
                                     int half, const int8_t* q, const float* d, int64_t n, int64_t K, int64_t g) {
    const __m256i ones16 = _mm256_set1_epi16(1);
    const int64_t G = K / g, wpg = g / 32, KW = K / 32;
    float o = 0.0f;
    for (int64_t gi = 0; gi < G; gi++) {
        __m256i acc1 = _mm256_setzero_si256(), acc2 = acc1;
        for (int64_t w = gi * wpg; w < (gi + 1) * wpg; w++) {
            const __m256i x = _mm256_loadu_si256((const __m256i*)(q + 32 * w));
            acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(_mm256_maddubs_epi16(expand_bits(p1[n * KW + w]), x), ones16));
            acc2 = _mm256_add_epi32(acc2, _mm256_madd_epi16(_mm256_maddubs_epi16(expand_bits(p2[n * KW + w]), x), ones16));
        }
        const int64_t i = n * G + gi;
        o = fmaf(fmaf((float)hsum8(acc1), scale(a1, i, half), (float)hsum8(acc2) * scale(a2, i, half)), d[gi], o);
    }
    return o;
}

VNNI_FN static inline __m512 scales16(const void* s, int64_t i, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)s + i)))
                : _mm512_loadu_ps((const float*)s + i);
}

// acc (16 int32 lanes, one per row) += the sums, per row, of the 4 activations x (the same 4 int8 in every lane)
// under the row's 4 bits of the mask word: a masked byte move and one vpdpbusd (ones x bytes, 4 per lane)
VNNI_FN static inline __m512i masked_sums(__m512i acc, uint64_t bits, __m512i x, __m512i ones) {
    const __m512i b = _mm512_maskz_mov_epi8((__mmask64)bits, x);
    // the intrinsic, _mm512_dpbusd_epi32(acc, ones, b), made GCC 12 copy every accumulator first (an extra
    // vector move per vpdpbusd); in place:
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(ones), "v"(b));
    return acc;
}

// AVX-512 VNNI path over one block of the "vnni" layout, vnni_block_portable's operands and result: the row
// sums land in the lanes, so no horizontal reduction; per 4 columns, plane and 16 rows one mask load, one masked
// move and one vpdpbusd. Two quads per step into separate accumulators (vpdpbusd's latency)
VNNI_FN static void vnni_block(const uint64_t* w1, const uint64_t* w2, const void* s1, const void* s2, int64_t so,
                               int half, const int8_t* q, const float* d, int64_t K, int64_t g, float* out) {
    __m512 o0 = _mm512_setzero_ps(), o1 = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi8(1);
    const int64_t qpg = g / 4;  // quads per group, a multiple of 8
    for (int64_t gi = 0; gi < K / g; gi++) {
        __m512i e10 = _mm512_setzero_si512(), e11 = e10, e20 = e10, e21 = e10, f10 = e10, f11 = e10, f20 = e10,
                f21 = e10;
        for (int64_t c = gi * qpg; c < (gi + 1) * qpg; c += 2) {
            int32_t xa, xb;
            memcpy(&xa, q + 4 * c, 4);
            memcpy(&xb, q + 4 * c + 4, 4);
            const __m512i x0 = _mm512_set1_epi32(xa), x1 = _mm512_set1_epi32(xb);
            const uint64_t *a = w1 + 2 * c, *b = w2 + 2 * c;
            if (!(c & 3)) {  // one line of each plane per 4 quads
                _mm_prefetch((const char*)a + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char*)b + PREFETCH_BYTES, _MM_HINT_T0);
            }
            e10 = masked_sums(e10, a[0], x0, ones); e11 = masked_sums(e11, a[1], x0, ones);
            e20 = masked_sums(e20, b[0], x0, ones); e21 = masked_sums(e21, b[1], x0, ones);
            f10 = masked_sums(f10, a[2], x1, ones); f11 = masked_sums(f11, a[3], x1, ones);
            f20 = masked_sums(f20, b[2], x1, ones); f21 = masked_sums(f21, b[3], x1, ones);
        }
        const __m512 dv = _mm512_set1_ps(d[gi]);
        const int64_t i = so + gi * 32;
        const __m512 t0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(e10, f10)), scales16(s1, i, half),
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(e20, f20)),
                                                        scales16(s2, i, half)));
        const __m512 t1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(e11, f11)),
                                          scales16(s1, i + 16, half),
                                          _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(e21, f21)),
                                                        scales16(s2, i + 16, half)));
        o0 = _mm512_fmadd_ps(t0, dv, o0);
        o1 = _mm512_fmadd_ps(t1, dv, o1);
    }
    _mm512_storeu_ps(out, o0);
    _mm512_storeu_ps(out + 16, o1);
}
#endif

extern "C" {
// What runs here (checked at run time): 1 when the AVX2 paths can (AVX2, FMA, F16C), + 2 when the AVX-512 VNNI path
// can (AVX-512 F, BW, VL, VNNI); 0 in a portable build or elsewhere (the portable loops)
int dbl_int8_isa(void) {
#ifdef DBLLM_X86
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const int vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return avx2 + 2 * vnni;
#else
    return 0;
#endif
}
}

// One activation row prepared for the integer path: its int8 codes q (K), group factors d (K/g) and, for the "lut"
// layout, tables tab (K * 8 bytes; null: none made)
void int8_prepare_row(const float* x, int64_t K, int64_t g, int8_t* q, float* d, uint8_t* tab) {
    quantize_row(x, K, g, q, d);
    if (tab) build_tables(q, K, tab);
}

// 1 when the SIMD path of `layout` runs here (unless portable), else 0 (its portable loop)
int int8_simd(int portable, int layout) { return !portable && (dbl_int8_isa() & (layout == LAYOUT_VNNI ? 2 : 1)); }

// Rows 32 rb .. min(N, 32 rb + 32) - 1 of y = W x for one prepared row (q, tab, d), from the repacked layout
void int8_block(const uint8_t* w1, const uint8_t* w2, const void* s1, const void* s2, int half, const int8_t* q,
                const uint8_t* tab, const float* d, int64_t N, int64_t K, int64_t g, int64_t rb, int layout, int simd,
                float* y) {
    float out[32];
    const int64_t rows = N - 32 * rb < 32 ? N - 32 * rb : 32, wo = rb * (K / 8) * 32, so = rb * (K / g) * 32;
    if (layout == LAYOUT_VNNI) {
#ifdef DBLLM_X86
        if (simd) vnni_block((const uint64_t*)(w1 + wo), (const uint64_t*)(w2 + wo), s1, s2, so, half, q, d, K, g, out);
        else
#endif
        vnni_block_portable(w1 + wo, w2 + wo, s1, s2, so, half, q, d, K, g, out);
    } else {
#ifdef DBLLM_X86
        if (simd) lut_block_avx2(w1 + wo, w2 + wo, s1, s2, so, half, tab, d, K, g, out);
        else
#endif
        lut_block_portable(w1 + wo, w2 + wo, s1, s2, so, half, tab, d, K, g, out);
    }
    (void)simd;
    memcpy(y + 32 * rb, out, rows * sizeof(float));
}

extern "C" {
// y (M x N, fp32) from the repacked layout (cpu_kernel.repack_int8): w1, w2 (ceil(N/32) x K/8 x 32 bytes, `layout`
// 0 "lut" or 1 "vnni"), scales s1, s2 (ceil(N/32) x K/g x 32, fp16 or fp32). portable = 1 forces the portable loop.
// Returns 0, or -1 when out of memory. The weights of a block of 32 rows are read from memory once and reused from
// cache for every row of x.
int dbl_matmul_int8(const float* x, int64_t M, const uint8_t* w1, const uint8_t* w2, const void* s1, const void* s2,
                    int half, float* y, int64_t N, int64_t K, int64_t g, int threads, int layout, int portable) {
    const int64_t G = K / g, NB = (N + 31) / 32;
    const int lut = layout == LAYOUT_LUT;
    int8_t* q = (int8_t*)malloc(M * K);
    float* d = (float*)malloc(M * G * sizeof(float));
    uint8_t* tab = lut ? (uint8_t*)malloc(M * K * 8) : nullptr;  // 32 bytes per 4 activations
    if (!q || !d || (lut && !tab)) { free(q); free(d); free(tab); return -1; }
    for (int64_t m = 0; m < M; m++)
        int8_prepare_row(x + m * K, K, g, q + m * K, d + m * G, lut ? tab + m * K * 8 : nullptr);
    const int simd = int8_simd(portable, layout);
#pragma omp parallel for schedule(dynamic, 2) num_threads(threads)
    for (int64_t rb = 0; rb < NB; rb++)
        for (int64_t m = 0; m < M; m++)
            int8_block(w1, w2, s1, s2, half, q + m * K, lut ? tab + m * K * 8 : nullptr, d + m * G, N, K, g, rb,
                       layout, simd, y + m * N);
    free(q); free(d); free(tab);
    return 0;
}

// Candidate (a), for the benchmark: y (M x N) from the checkpoint layout (p1, p2 N x K/32 words; a1, a2 N x K/g).
// Needs AVX2: returns -2 where it is absent, -1 when out of memory, else 0. Same results as the lookup path.
int dbl_matmul_int8_expand(const float* x, int64_t M, const int32_t* p1, const int32_t* p2, const void* a1,
                           const void* a2, int half, float* y, int64_t N, int64_t K, int64_t g, int threads) {
#ifdef DBLLM_X86
    if (!(dbl_int8_isa() & 1)) return -2;
    const int64_t G = K / g;
    int8_t* q = (int8_t*)malloc(M * K);
    float* d = (float*)malloc(M * G * sizeof(float));
    if (!q || !d) { free(q); free(d); return -1; }
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, g, q + m * K, d + m * G);
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = expand_row_avx2((const uint32_t*)p1, (const uint32_t*)p2, a1, a2, half, q + m * K,
                                           d + m * G, n, K, g);
    free(q); free(d);
    return 0;
#else
    return -2;
#endif
}
}
