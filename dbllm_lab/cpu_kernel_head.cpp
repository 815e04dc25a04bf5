// dbllm_lab CPU kernel, int8 weight rows (the lean decoder's optional LM head, dbllm_lab/decode.py lm_head="int8"):
//     y[m, n] = s[n] * sum_k w[n, k] * x[m, k]
// w: N x K int8 codes (one symmetric fp32 scale s[n] per row), x: M x K fp32 activations, kept exact (weight-only
// quantization). A 49,152 x 576 head is 28 MB this way against 113 MB in fp32: decoding reads it once per token.
#include <stdint.h>
#include "cpu_kernel.h"
#if (defined(__x86_64__) || defined(__i386__)) && !defined(DBLLM_GENERIC)
#include <immintrin.h>
#define DBLLM_HEAD_X86 1
#endif

static float row_dot_portable(const int8_t* w, const float* x, int64_t K) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; k++) acc += (float)w[k] * x[k];
    return acc;
}

#ifdef DBLLM_HEAD_X86
__attribute__((target("avx2,fma"))) static inline float hsum8_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Four rows n .. n+3 against one activation row: 8 int8 weights widened to fp32 per FMA; K % 8 columns in scalar
__attribute__((target("avx2,fma"))) static void rows4_avx2(const int8_t* w, const float* x, int64_t K, float* out) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
#define DBLLM_ROW(r, acc) \
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + (r) * K + k)))), xv, acc)
        DBLLM_ROW(0, acc0); DBLLM_ROW(1, acc1); DBLLM_ROW(2, acc2); DBLLM_ROW(3, acc3);
#undef DBLLM_ROW
    }
    out[0] = hsum8_ps(acc0); out[1] = hsum8_ps(acc1); out[2] = hsum8_ps(acc2); out[3] = hsum8_ps(acc3);
    for (; k < K; k++)
        for (int r = 0; r < 4; r++) out[r] += (float)w[r * K + k] * x[k];
}

// rows4_avx2 with 16 weights per FMA (AVX-512F), and a software prefetch: the 4 rows are 4K contiguous bytes, one
// line of them PREFETCH_BYTES ahead per step (the step reads 64 of them). Both loops timed side by side:
// bench/decode_profile.py (int8_head_ms, int8_head_avx2_ms)
__attribute__((target("avx512f,fma"))) static void rows4_avx512(const int8_t* w, const float* x, int64_t K,
                                                                float* out) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char*)w + 4 * k + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + k);
#define DBLLM_ROW(r, acc) \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (r) * K + k)))), xv, acc)
        DBLLM_ROW(0, acc0); DBLLM_ROW(1, acc1); DBLLM_ROW(2, acc2); DBLLM_ROW(3, acc3);
#undef DBLLM_ROW
    }
    out[0] = _mm512_reduce_add_ps(acc0); out[1] = _mm512_reduce_add_ps(acc1);
    out[2] = _mm512_reduce_add_ps(acc2); out[3] = _mm512_reduce_add_ps(acc3);
    for (; k < K; k++)
        for (int r = 0; r < 4; r++) out[r] += (float)w[r * K + k] * x[k];
}
#endif

// The loop that runs here (ROWS_*, checked at run time), at most `cap`
int int8_rows_isa(int cap) {
#ifdef DBLLM_HEAD_X86
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int level = !avx2 ? ROWS_PORTABLE : __builtin_cpu_supports("avx512f") ? ROWS_AVX512 : ROWS_AVX2;
    return level < cap ? level : cap;
#else
    (void)cap;
    return 0;
#endif
}

// Rows 4 b .. min(N, 4 b + 4) - 1 of y = s * (w x) for one activation row x (K)
void int8_rows_block(const int8_t* w, const float* s, const float* x, int64_t N, int64_t K, int64_t b, int isa,
                     float* y) {
    const int64_t n0 = 4 * b, rows = N - n0 < 4 ? N - n0 : 4;
    float out[4];
#ifdef DBLLM_HEAD_X86
    if (isa == ROWS_AVX512 && rows == 4) rows4_avx512(w + n0 * K, x, K, out);
    else if (isa == ROWS_AVX2 && rows == 4) rows4_avx2(w + n0 * K, x, K, out);
    else
#else
    (void)isa;
#endif
    for (int64_t r = 0; r < rows; r++) out[r] = row_dot_portable(w + (n0 + r) * K, x, K);
    for (int64_t r = 0; r < rows; r++) y[n0 + r] = out[r] * s[n0 + r];
}

extern "C" {
// y (M x N, fp32) = x (M x K, fp32) times the int8 rows w (N x K) scaled by s (N, fp32). isa_cap: the fastest loop
// allowed (int8_rows_isa; tests force the lower ones). Rows are split over threads in blocks of 4; each block's
// weights serve every row of x.
void dbl_int8_rows_matmul(const float* x, int64_t M, const int8_t* w, const float* s, float* y, int64_t N,
                          int64_t K, int threads, int isa_cap) {
    const int isa = int8_rows_isa(isa_cap);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < (N + 3) / 4; b++)
        for (int64_t m = 0; m < M; m++) int8_rows_block(w, s, x + m * K, N, K, b, isa, y + m * N);
}
}
