// dbllm_lab CPU kernel, exact fp32 path (backend "cpu-exact") and the FDB rounding used by training.
// The formula, the paths and the measurements behind them: dbllm_lab/cpu_kernel.py's docstring.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "cpu_kernel.h"
#if defined(__AVX512F__) && !defined(DBLLM_GENERIC)
#include <immintrin.h>
#define DBLLM_AVX512 1
#endif

struct Args {
    const float* x; int64_t M; const uint32_t* p1; const uint32_t* p2; const void* a1; const void* a2;
    int half; float* y; int64_t N, K, g;
};

#ifdef DBLLM_AVX512
// batch 1: per group S1 += x under the bits of plane 1, S2 += x under plane 2; acc += a1*S1 + a2*S2. NR rows.
template <int NR>
static void gemv_rows(const Args& A, int64_t n0) {
    const int64_t KH = A.K / 16, G = A.K / A.g, hpg = A.g / 16;  // 16-bit halves of the words
    const uint16_t* h1 = (const uint16_t*)A.p1 + n0 * KH;
    const uint16_t* h2 = (const uint16_t*)A.p2 + n0 * KH;
    __m512 acc[NR];
    for (int r = 0; r < NR; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512 s1[NR], s2[NR];
        for (int r = 0; r < NR; r++) { s1[r] = _mm512_setzero_ps(); s2[r] = _mm512_setzero_ps(); }
        for (int64_t h = gi * hpg; h < (gi + 1) * hpg; h++) {
            const __m512 xv = _mm512_loadu_ps(A.x + 16 * h);
            for (int r = 0; r < NR; r++) {
                s1[r] = _mm512_mask_add_ps(s1[r], (__mmask16)h1[r * KH + h], s1[r], xv);
                s2[r] = _mm512_mask_add_ps(s2[r], (__mmask16)h2[r * KH + h], s2[r], xv);
            }
        }
        for (int r = 0; r < NR; r++) {
            acc[r] = _mm512_fmadd_ps(s1[r], _mm512_set1_ps(scale(A.a1, (n0 + r) * G + gi, A.half)), acc[r]);
            acc[r] = _mm512_fmadd_ps(s2[r], _mm512_set1_ps(scale(A.a2, (n0 + r) * G + gi, A.half)), acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) A.y[n0 + r] = _mm512_reduce_add_ps(acc[r]);
}

// batch >= 2: w = a1*b1 + a2*b2 for 16 columns in a register, then one FMA per activation row. MR x NR tile.
template <int MR, int NR>
static void gemm_tile(const Args& A, int64_t m0, int64_t n0) {
    const int64_t KH = A.K / 16, G = A.K / A.g, hpg = A.g / 16;
    const uint16_t* h1 = (const uint16_t*)A.p1 + n0 * KH;
    const uint16_t* h2 = (const uint16_t*)A.p2 + n0 * KH;
    const float* x = A.x + m0 * A.K;
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; r++) for (int m = 0; m < MR; m++) acc[r][m] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512 s1[NR], s2[NR];
        for (int r = 0; r < NR; r++) {
            s1[r] = _mm512_set1_ps(scale(A.a1, (n0 + r) * G + gi, A.half));
            s2[r] = _mm512_set1_ps(scale(A.a2, (n0 + r) * G + gi, A.half));
        }
        for (int64_t h = gi * hpg; h < (gi + 1) * hpg; h++) {
            __m512 xv[MR];
            for (int m = 0; m < MR; m++) xv[m] = _mm512_loadu_ps(x + m * A.K + 16 * h);
            for (int r = 0; r < NR; r++) {
                __m512 w = _mm512_maskz_mov_ps((__mmask16)h1[r * KH + h], s1[r]);
                w = _mm512_mask_add_ps(w, (__mmask16)h2[r * KH + h], w, s2[r]);
                for (int m = 0; m < MR; m++) acc[r][m] = _mm512_fmadd_ps(w, xv[m], acc[r][m]);
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MR; m++) A.y[(m0 + m) * A.N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int NR>
static void gemm_rows(const Args& A, int64_t n0) {
    for (int64_t m0 = 0; m0 < A.M; m0 += 8) {
        switch (A.M - m0 < 8 ? A.M - m0 : 8) {
            case 1: gemm_tile<1, NR>(A, m0, n0); break;
            case 2: gemm_tile<2, NR>(A, m0, n0); break;
            case 3: gemm_tile<3, NR>(A, m0, n0); break;
            case 4: gemm_tile<4, NR>(A, m0, n0); break;
            case 5: gemm_tile<5, NR>(A, m0, n0); break;
            case 6: gemm_tile<6, NR>(A, m0, n0); break;
            case 7: gemm_tile<7, NR>(A, m0, n0); break;
            default: gemm_tile<8, NR>(A, m0, n0); break;
        }
    }
}
#endif

// the 32 weights of one word of each plane: w[j] = s1 * bit j of w1 + s2 * bit j of w2 (kernel.dequantize's values)
static inline void dequantize_word(uint32_t w1, uint32_t w2, float s1, float s2, float* w) {
#pragma omp simd
    for (int j = 0; j < 32; j++) w[j] = s1 * (float)((w1 >> j) & 1u) + s2 * (float)((w2 >> j) & 1u);
}

// portable: unpack the 32 weights of a word, then a dot product with each activation row
static void generic_row(const Args& A, int64_t n) {
    const int64_t KW = A.K / 32, G = A.K / A.g, wpg = A.g / 32;
    float w[32];
    for (int64_t m0 = 0; m0 < A.M; m0 += 16) {
        const int64_t mb = A.M - m0 < 16 ? A.M - m0 : 16;
        float acc[16] = {0};
        for (int64_t wi = 0; wi < KW; wi++) {
            const float s1 = scale(A.a1, n * G + wi / wpg, A.half), s2 = scale(A.a2, n * G + wi / wpg, A.half);
            dequantize_word(A.p1[n * KW + wi], A.p2[n * KW + wi], s1, s2, w);
            for (int64_t m = 0; m < mb; m++) {
                const float* xm = A.x + (m0 + m) * A.K + wi * 32;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int j = 0; j < 32; j++) s += w[j] * xm[j];
                acc[m] += s;
            }
        }
        for (int64_t m = 0; m < mb; m++) A.y[(m0 + m) * A.N + n] = acc[m];
    }
}

// FDB rounding, quant.fdb_round_torch's rule bit for bit (see its docstring): per group, the levels
// {0, a2, a1, a1 + a2} (code = index: b1 = code >> 1, b2 = code & 1) sorted stably; on a 2-bit grid
// (|a1| = 2|a2| != 0) the rank is clamp(round_half_to_zero(w / s) - round(lowest / s), 0, 3), s = |a2|;
// otherwise the number of thresholds t_k (the midpoints; the next float below for a negative one) w exceeds.
static inline float round_half_to_zero(float x) {
    float c = ceilf(fabsf(x) - 0.5f);
    return x > 0 ? c : (x < 0 ? -c : 0.0f);
}

static void fdb_round_group(const float* w, float a1, float a2, int64_t g, uint8_t* b1, uint8_t* b2,
                            float* w_hat) {
    float lv[4] = {0.0f, a2, a1, a1 + a2};
    int idx[4] = {0, 1, 2, 3};
    for (int i = 1; i < 4; i++)  // stable insertion sort, ascending
        for (int j = i; j > 0 && lv[idx[j - 1]] > lv[idx[j]]; j--) {
            const int t = idx[j]; idx[j] = idx[j - 1]; idx[j - 1] = t;
        }
    float srt[4];
    uint8_t code[4];
    for (int r = 0; r < 4; r++) { srt[r] = lv[idx[r]]; code[r] = (uint8_t)idx[r]; }
    for (int r = 1; r < 4; r++) if (srt[r] == srt[r - 1]) code[r] = code[r - 1];  // equal levels: first code
    if (fabsf(a1) == 2.0f * fabsf(a2) && a2 != 0.0f) {
        const float s = fabsf(a2), lo = rintf(srt[0] / s);  // rintf: ties to even, as torch.round
        for (int64_t k = 0; k < g; k++) {
            float q = round_half_to_zero(w[k] / s) - lo;
            q = q < 0.0f ? 0.0f : (q > 3.0f ? 3.0f : q);
            const uint8_t c = code[(int)q];
            b1[k] = c >> 1; b2[k] = c & 1;
            if (w_hat) w_hat[k] = a1 * (float)(c >> 1) + a2 * (float)(c & 1);
        }
        return;
    }
    float t[3];
    for (int r = 0; r < 3; r++) {
        const float m = (srt[r + 1] + srt[r]) / 2.0f;
        t[r] = m < 0.0f ? nextafterf(m, -INFINITY) : m;
    }
    for (int64_t k = 0; k < g; k++) {
        const float x = w[k];
        const uint8_t c = code[(x > t[0]) + (x > t[1]) + (x > t[2])];
        b1[k] = c >> 1; b2[k] = c & 1;
        if (w_hat) w_hat[k] = a1 * (float)(c >> 1) + a2 * (float)(c & 1);
    }
}

extern "C" {
// b1, b2 (R x G x g, uint8) = FDB rounding of w (R x G x g, fp32) with scales a1, a2 (R x G, fp32); when
// w_hat is not null it also gets a1 * b1 + a2 * b2 (fp32; the products are exact, so this is torch's value)
void dbl_fdb_round(const float* w, const float* a1, const float* a2, uint8_t* b1, uint8_t* b2, float* w_hat,
                   int64_t R, int64_t G, int64_t g, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < G; j++) {
            const int64_t o = (r * G + j) * g;
            fdb_round_group(w + o, a1[r * G + j], a2[r * G + j], g, b1 + o, b2 + o, w_hat ? w_hat + o : nullptr);
        }
}

// ga1 (R x G, fp32) = sum over each group of grad * b1, ga2 likewise with b2: the scales' gradients of
// w_hat = a1 * b1 + a2 * b2, in one pass over the gradient and the codes (torch: two casts, two products, two sums)
void dbl_fdb_scale_grads(const float* grad, const uint8_t* b1, const uint8_t* b2, float* ga1, float* ga2,
                         int64_t R, int64_t G, int64_t g, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < G; j++) {
            const int64_t o = (r * G + j) * g;
            float s1 = 0.0f, s2 = 0.0f;
#pragma omp simd reduction(+ : s1, s2)
            for (int64_t k = 0; k < g; k++) {
                s1 += b1[o + k] ? grad[o + k] : 0.0f;
                s2 += b2[o + k] ? grad[o + k] : 0.0f;
            }
            ga1[r * G + j] = s1;
            ga2[r * G + j] = s2;
        }
}

// w (N x K) = a1 * b1 + a2 * b2 from the packed planes (method.md §1; kernel.dequantize's values), written as
// fp32 (out_bf16 = 0) or as bf16 rounded to nearest even from the fp32 value (out_bf16 = 1): the weight of the
// prefill path (dense GEMM above cpu_kernel.DENSE_MIN_ROWS rows), which lives only for one call
void dbl_dequantize(const int32_t* p1, const int32_t* p2, const void* a1, const void* a2, int scales_half,
                    void* out, int out_bf16, int64_t N, int64_t K, int64_t g, int threads) {
    const int64_t KW = K / 32, G = K / g, wpg = g / 32;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        float w[32];
        for (int64_t wi = 0; wi < KW; wi++) {
            const float s1 = scale(a1, n * G + wi / wpg, scales_half), s2 = scale(a2, n * G + wi / wpg, scales_half);
            dequantize_word((uint32_t)p1[n * KW + wi], (uint32_t)p2[n * KW + wi], s1, s2, w);
            if (!out_bf16) { memcpy((float*)out + n * K + wi * 32, w, sizeof w); continue; }
            uint16_t* o = (uint16_t*)out + n * K + wi * 32;
#pragma omp simd
            for (int j = 0; j < 32; j++) {  // finite values: round to nearest even on the dropped 16 bits
                uint32_t u; memcpy(&u, &w[j], 4);
                o[j] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            }
        }
    }
}

int dbl_isa(void) {
#ifdef DBLLM_AVX512
    return 1;
#else
    return 0;
#endif
}

int dbl_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// y (M x N, fp32) = dual-binary matmul of x (M x K, fp32, contiguous) with the packed planes and scales
void dbl_matmul(const float* x, int64_t M, const int32_t* p1, const int32_t* p2, const void* a1, const void* a2,
                int scales_half, float* y, int64_t N, int64_t K, int64_t g, int threads) {
    Args A = {x, M, (const uint32_t*)p1, (const uint32_t*)p2, a1, a2, scales_half, y, N, K, g};
#ifdef DBLLM_AVX512
    const int64_t NR = M == 1 ? 4 : 2, nblocks = N / NR;
#pragma omp parallel for schedule(dynamic, 8) num_threads(threads)
    for (int64_t b = 0; b <= nblocks; b++) {
        if (b < nblocks) {
            if (M == 1) gemv_rows<4>(A, b * NR); else gemm_rows<2>(A, b * NR);
        } else {
            for (int64_t n = nblocks * NR; n < N; n++) { if (M == 1) gemv_rows<1>(A, n); else gemm_rows<1>(A, n); }
        }
    }
#else
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t n = 0; n < N; n++) generic_row(A, n);
#endif
}
}
