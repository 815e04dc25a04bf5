// Shared helpers of the dbllm_lab CPU kernel sources (cpu_kernel.cpp: exact fp32 path and FDB rounding;
// cpu_kernel_int8.cpp: integer path). Compiled and loaded by dbllm_lab/cpu_kernel.py.
#pragma once
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
