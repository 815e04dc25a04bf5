// dbllm_lab CPU kernel, the lean decoder's fp32 steps (dbllm_lab/decode.py): a residual add fused with the RMSNorm
// that follows it, RoPE in place (both used by the prompt's path), and dbl_decode_step: a whole one-token decode
// step of a LLaMA model whose projections all run the integer path, in one call (no Python or torch per op).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cpu_kernel.h"

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

// Per layer, the pointer table of dbl_decode_step: the two norms' weights, then (w1, w2, s1, s2) of the repacked
// integer-path layout (cpu_kernel.repack_int8) of q/k/v fused, o, gate/up fused and down
enum { IN_NORM, POST_NORM, QKV, O = QKV + 4, GATE_UP = O + 4, DOWN = GATE_UP + 4, LAYER_PTRS = DOWN + 4 };
// dims of dbl_decode_step (LAYOUT: the repacked planes' layout, 0 "lut" or 1 "vnni")
enum { LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, GROUP, HALF, CACHE_LEN, VOCAB, LAYOUT, NDIMS };

static inline float dot(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// The integer path's settings of one step: scales' dtype, layout, whether its SIMD code runs, group size
struct Int8Path { int half, layout, simd; int64_t g; };

// Block rb of y = W x for the matrix at p (4 pointers) and a prepared activation row (q, tab, d)
static inline void mat_block(const void* const* p, const Int8Path& ip, const int8_t* q, const uint8_t* tab,
                             const float* d, int64_t N, int64_t K, int64_t rb, float* y) {
    int8_block((const uint8_t*)p[0], (const uint8_t*)p[1], p[2], p[3], ip.half, q, tab, d, N, K, ip.g, rb, ip.layout,
               ip.simd, y);
}

// Query head hq of the new token at position pos over the cache (K, V: its KV head's (cache_len x D) rows) and the
// new key and value: RoPE on q and k (the rows of qkv, left as they are), softmax(q K^T * scaling) V into out.
// The first query head of a KV group writes the rotated key and the value into cache row pos; every head uses
// its own rotated copy for that row, so no head reads a row another is writing.
static void attend(const float* qkv, const int64_t* dims, int64_t hq, float* K, float* V, int64_t pos,
                   const float* cos, const float* sin, float scaling, float* qr, float* kr, float* scores, float* out) {
    const int64_t H = dims[HEADS], KV = dims[KV_HEADS], D = dims[HEAD_DIM], j = hq / (H / KV);
    const float* vnew = qkv + (H + KV + j) * D;
    memcpy(qr, qkv + hq * D, D * sizeof(float));
    memcpy(kr, qkv + (H + j) * D, D * sizeof(float));
    dbl_rope(qr, 1, 1, D, D, cos, sin);
    dbl_rope(kr, 1, 1, D, D, cos, sin);
    if (hq % (H / KV) == 0) {
        memcpy(K + pos * D, kr, D * sizeof(float));
        memcpy(V + pos * D, vnew, D * sizeof(float));
    }
    float m = scores[pos] = dot(qr, kr, D) * scaling;
    for (int64_t t = 0; t < pos; t++) m = fmaxf(m, scores[t] = dot(qr, K + t * D, D) * scaling);
    float sum = 0.0f;
    for (int64_t t = 0; t <= pos; t++) sum += scores[t] = expf(scores[t] - m);
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t t = 0; t <= pos; t++) {
        const float* v = t < pos ? V + t * D : vnew;
        const float p = scores[t];
#pragma omp simd
        for (int64_t i = 0; i < D; i++) out[i] += p * v[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < D; i++) out[i] *= inv;
}

extern "C" {
// One decode step of a LLaMA model, token `token` at position `pos` (cache rows 0 .. pos - 1 filled): embedding row,
// then per layer x = norm(h); q, k, v = W x; RoPE (cos / sin: the position's rows, rotate_half's sign baked into
// sin); attention over the cache (GQA), whose row pos gets k and v; h += o(attn); x = norm(h); h += down(silu(gate x)
// * up x); finally x = norm(h). Every projection runs the integer path (int8_prepare_row, int8_block) on the
// repacked layout; norms and RoPE are dbl_add_rms_norm and dbl_rope, as the Python path calls them. out gets the
// logits s * (codes x) when head_codes is not null (vocab values), else x (hidden values). kc, vc: (layers,
// kv_heads, cache_len, head_dim). One parallel region: every thread keeps its own copy of the residual h and of the
// prepared activations (cheap, no barrier), the projections' row blocks and the query heads are split among the
// threads. Returns 0, or -1 when out of memory.
int dbl_decode_step(const int64_t* dims, const void* const* layers, const float* embed, const float* final_norm,
                    const int8_t* head_codes, const float* head_scales, float* kc, float* vc, const float* cos,
                    const float* sin, int64_t token, int64_t pos, float eps, float scaling, float* out, int threads) {
    const int64_t L = dims[LAYERS], E = dims[HIDDEN], H = dims[HEADS], KV = dims[KV_HEADS], D = dims[HEAD_DIM],
                  I = dims[INTER], g = dims[GROUP], CL = dims[CACHE_LEN], NQKV = (H + 2 * KV) * D;
    const int layout = (int)dims[LAYOUT], head_isa = int8_rows_isa(ROWS_AVX512);
    const Int8Path ip = {(int)dims[HALF], layout, int8_simd(0, layout), dims[GROUP]};
    int64_t kmax = E > H * D ? E : H * D;
    kmax = kmax > I ? kmax : I;
    // per thread, in floats: h (E), x (kmax), d (kmax), q and k rotated (D each), scores (pos + 1), then the bytes
    // of tab (8 kmax) and q (kmax); rounded up to 64 bytes
    const int64_t local = (E + 2 * kmax + 2 * D + pos + 1 + 3 * kmax + 15) / 16 * 16;
    float* shared = (float*)malloc((NQKV + H * D + E + 3 * I) * sizeof(float));
    float* locals = (float*)malloc(threads * local * sizeof(float));
    if (!shared || !locals) { free(shared); free(locals); return -1; }
    float *qkv = shared, *attn = qkv + NQKV, *y = attn + H * D, *gu = y + E, *act = gu + 2 * I;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float* me = locals + omp_get_thread_num() * local;
#else
        float* me = locals;
#endif
        float *h = me, *x = h + E, *d = x + kmax, *qr = d + kmax, *kr = qr + D, *scores = kr + D;
        uint8_t* tab_bytes = (uint8_t*)(scores + pos + 1);
        int8_t* q = (int8_t*)(tab_bytes + 8 * kmax);
        uint8_t* tab = layout == LAYOUT_LUT ? tab_bytes : nullptr;  // the "vnni" layout needs no tables
        memcpy(h, embed + token * E, E * sizeof(float));
        dbl_add_rms_norm(h, nullptr, (const float*)layers[IN_NORM], eps, x, 1, E);
        for (int64_t l = 0; l < L; l++) {
            const void* const* P = layers + l * LAYER_PTRS;
            int8_prepare_row(x, E, g, q, d, tab);
#pragma omp for schedule(dynamic, 2)
            for (int64_t rb = 0; rb < (NQKV + 31) / 32; rb++) mat_block(P + QKV, ip, q, tab, d, NQKV, E, rb, qkv);
            float *K = kc + l * KV * CL * D, *V = vc + l * KV * CL * D;
#pragma omp for schedule(dynamic, 1)
            for (int64_t hq = 0; hq < H; hq++) {
                const int64_t off = hq / (H / KV) * CL * D;
                attend(qkv, dims, hq, K + off, V + off, pos, cos, sin, scaling, qr, kr, scores, attn + hq * D);
            }
            int8_prepare_row(attn, H * D, g, q, d, tab);
#pragma omp for schedule(dynamic, 2)
            for (int64_t rb = 0; rb < (E + 31) / 32; rb++) mat_block(P + O, ip, q, tab, d, E, H * D, rb, y);
            dbl_add_rms_norm(h, y, (const float*)P[POST_NORM], eps, x, 1, E);
            int8_prepare_row(x, E, g, q, d, tab);
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < I / 32; b++) {  // gate rows 32 b .. and the up rows beside them, then the product
                mat_block(P + GATE_UP, ip, q, tab, d, 2 * I, E, b, gu);
                mat_block(P + GATE_UP, ip, q, tab, d, 2 * I, E, b + I / 32, gu);
                for (int64_t r = 32 * b; r < 32 * b + 32; r++) act[r] = gu[r] / (1.0f + expf(-gu[r])) * gu[I + r];
            }
            int8_prepare_row(act, I, g, q, d, tab);
#pragma omp for schedule(dynamic, 2)
            for (int64_t rb = 0; rb < (E + 31) / 32; rb++) mat_block(P + DOWN, ip, q, tab, d, E, I, rb, y);
            const float* next = l + 1 < L ? (const float*)layers[(l + 1) * LAYER_PTRS + IN_NORM] : final_norm;
            dbl_add_rms_norm(h, y, next, eps, x, 1, E);
        }
        if (head_codes) {
#pragma omp for schedule(dynamic, 64)
            for (int64_t b = 0; b < (dims[VOCAB] + 3) / 4; b++)
                int8_rows_block(head_codes, head_scales, x, dims[VOCAB], E, b, head_isa, out);
        } else {
#pragma omp single
            memcpy(out, x, E * sizeof(float));
        }
    }
    free(shared); free(locals);
    return 0;
}
}
