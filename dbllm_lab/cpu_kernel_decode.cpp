// dbllm_lab CPU kernel, the lean decoder's small fp32 steps (dbllm_lab/decode.py): a residual add fused with the
// RMSNorm that follows it, and RoPE in place. Each replaces several torch calls of a few microseconds apiece, which
// add up over a decode step's 61 norms and 30 rotations (one token, 576 values: call overhead, not arithmetic).
#include <math.h>
#include <stdint.h>

extern "C" {
// Per row r of h (rows x H): h += delta (when delta is not null), then out = w * (h / sqrt(mean(h^2) + eps)),
// LlamaRMSNorm's formula in fp32.
void dbl_add_rms_norm(float* h, const float* delta, const float* w, float eps, float* out, int64_t rows, int64_t H) {
    for (int64_t r = 0; r < rows; r++) {
        float* hr = h + r * H;
        if (delta) {
#pragma omp simd
            for (int64_t k = 0; k < H; k++) hr[k] += delta[r * H + k];
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t k = 0; k < H; k++) ss += hr[k] * hr[k];
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
#pragma omp simd
        for (int64_t k = 0; k < H; k++) out[r * H + k] = w[k] * (hr[k] * inv);
    }
}

// RoPE in place on the first `heads` vectors of D values of each of T rows (row stride `stride` floats): with
// half = D / 2, v[i] <- v[i] * cos[i] + v[i + half] * sin[i] and v[i + half] <- v[i + half] * cos[i + half] +
// v[i] * sin[i + half], cos / sin rows (T x D) of the rows' positions, sin with rotate_half's sign (-sin on the
// first half): modeling_llama's x * cos + rotate_half(x) * sin.
void dbl_rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t stride, const float* cos, const float* sin) {
    const int64_t half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        const float* c = cos + t * D;
        const float* s = sin + t * D;
        for (int64_t h = 0; h < heads; h++) {
            float* v = x + t * stride + h * D;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] + b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}
}
