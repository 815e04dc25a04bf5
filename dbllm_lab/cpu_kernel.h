// Shared helpers of the dbllm_lab CPU kernel sources (cpu_kernel.cpp: exact fp32 path and FDB rounding;
// cpu_kernel_int8.cpp: integer path). Compiled and loaded by dbllm_lab/cpu_kernel.py.
#pragma once
// Software prefetch distance of the SIMD loops (integer path and int8 rows), in bytes ahead in each stream: a page
// (from memory the hardware prefetchers alone left the loops well short of the stream; 1-4 KiB gave the same times)
#define PREFETCH_BYTES 4096
// Layouts of the integer path's repacked planes (cpu_kernel.INT8_LAYOUTS) and the int8-rows loops
// (cpu_kernel.INT8_ROWS_LOOPS), as the Python side numbers them
enum { LAYOUT_LUT = 0, LAYOUT_VNNI = 1 };
enum { ROWS_PORTABLE = 0, ROWS_AVX2 = 1, ROWS_AVX512 = 2 };
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

// IEEE fp16 -> fp32 (F16C instruction where the compiler targets it, else the bit-level conversion)
static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);  // hardware conversion
#endif
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        if (m == 0) f = s;
        else { e = 113; while (!(m & 0x400)) { m <<= 1; e--; } m &= 0x3ff; f = s | (e << 23) | (m << 13); }
    } else if (e == 31) f = s | 0x7f800000u | (m << 13);
    else f = s | ((e + 112) << 23) | (m << 13);
    float r; memcpy(&r, &f, 4); return r;
}

// scale number i of an fp16 (half = 1) or fp32 (half = 0) array
static inline float scale(const void* a, int64_t i, int half) {
    return half ? half_to_float(((const uint16_t*)a)[i]) : ((const float*)a)[i];
}

// Building blocks shared by the matmul entry points and the lean decoder's one-call step (cpu_kernel_decode.cpp).
// cpu_kernel_int8.cpp, the integer path: one activation row's int8 codes q (K), group factors d (K/g) and, for the
// "lut" layout (0), lookup tables tab (K * 8 bytes; null for the "vnni" layout, 1); rows 32 rb .. of y = W x from
// the repacked layout (cpu_kernel.repack_int8); int8_simd says whether the layout's SIMD code runs here
void int8_prepare_row(const float* x, int64_t K, int64_t g, int8_t* q, float* d, uint8_t* tab);
int int8_simd(int portable, int layout);
void int8_block(const uint8_t* w1, const uint8_t* w2, const void* s1, const void* s2, int half, const int8_t* q,
                const uint8_t* tab, const float* d, int64_t N, int64_t K, int64_t g, int64_t rb, int layout, int simd,
                float* y);
// cpu_kernel_head.cpp, int8 weight rows: rows 4 b .. of y = s * (w x), one activation row x
int int8_rows_isa(int cap);
void int8_rows_block(const int8_t* w, const float* s, const float* x, int64_t N, int64_t K, int64_t b, int isa,
                     float* y);
// cpu_kernel_decode.cpp
extern "C" void dbl_add_rms_norm(float* h, const float* delta, const float* w, float eps, float* out, int64_t rows,
                                 int64_t H);
extern "C" void dbl_rope(float* x, int64_t T, int64_t heads, int64_t D, int64_t stride, const float* cos,
                         const float* sin);
