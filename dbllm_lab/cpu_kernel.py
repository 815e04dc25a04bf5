"""CPU dual-bit-plane matmul straight from the packed words: a small C++ kernel, compiled on first use. The same
library holds the FDB rounding in C++ (``fdb_round_cpu``, what training's ``quant.fdb_round`` calls on the CPU).

Computes the DB-LLM inference form (method.md §1) for activations x (M x K) and packed planes p1, p2 (N x K/32
int32 words, ``dbllm_lab.packing`` layout), scales a1, a2 (N x K/g, fp16 or fp32):

    y[m, n] = sum_grp  a1[n, grp] * S1[m, n, grp] + a2[n, grp] * S2[m, n, grp],
    Sj[m, n, grp] = sum_{k in grp} bj[n, k] * x[m, k]

reading every packed word once per call and never forming the dense weight. fp32 accumulation.

How (x86 with AVX-512, the path that is timed in ``bench/kernel_cpu.py``):
  * batch 1 (GEMV): the bits of a word are used as AVX-512 lane masks. Per group, the 16-column chunks of x
    are added into S1 under the mask of plane 1 and into S2 under the mask of plane 2 (``vaddps`` with a
    mask register, 2 vector instructions per 16 weights), then ``acc += a1 * S1 + a2 * S2`` once per group:
    exactly the formula above. Four output rows are interleaved so the dependency chains overlap.
  * batch 2..16: dequantize in registers, ``w = a1 * b1 + a2 * b2`` for 16 columns (one masked move and one
    masked add), then one FMA per activation row; tiles of up to 8 activation rows x 2 output rows, so the
    16 weights decoded once serve every activation row. Larger batches run in blocks of 8 rows.
  * fp16 scales are converted with the F16C instruction (``_cvtsh_ss``) where the compiler targets it: the
    software conversion, kept for other CPUs, cost 16% of the batch-1 time at 4096 x 4096 (0.87 -> 0.73 ms).
  * rows are split over threads with OpenMP in chunks handed out dynamically (a thread that the OS delays on a
    busy machine does not hold the others up); torch's own libgomp, so no second thread pool.
Other CPUs (no AVX-512, e.g. ARM or AVX2-only x86): a portable C++ loop (unpack 32 weights of a word into
registers, then a ``#pragma omp simd`` dot product with each activation row) that the compiler vectorises for
the host. It gives the same results and is tested, but it is slower and is not what the benchmark times.

Candidates timed before choosing (a one-off prototype run, not a committed benchmark: 4096 x 4096, batch 1, fp16
scales, g = 64, one thread, weights rotated through 512 MiB of copies, min of 20 calls, on this project's 2-core
AVX-512 Xeon while other jobs loaded it, load average 5.6-8.2): AVX-512 masked add 1.61 ms (chosen for batch 1),
AVX-512 in-register dequantize 1.77 ms (chosen for batch >= 2: at batch 4 and 16 it decodes the weights once for
all rows; 6.4 and 11.0 ms there against 23.4 and 36.7 ms for the portable loop), a T-MAC-style lookup table of the
256 subset sums of every 8 activations (one table read per packed byte) 3.46 ms, and the portable loop 4.55 ms.
numba was installed for the comparison but not timed (the machine was saturated); it was not kept because it
would add a large dependency for loops that the C++ ones above already cover.

Build: on first use the source below is compiled with the C++ compiler on PATH (``$CXX``, else ``c++``,
``g++``, ``clang++``) into ``$DBLLM_CACHE_DIR`` (default ``~/.cache/dbllm_lab``) and loaded with ctypes; later
imports reuse the cached library (its name hashes the source and flags). ``-march=native -fopenmp`` is tried
first, then without OpenMP (single thread, e.g. Apple clang), then plain ``-O3``. No compiler: ``available()``
is False, ``why_unavailable()`` says why, and ``PackedDualBinaryLinear`` falls back to its torch path.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

from .packing import check_inputs

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && !defined(DBLLM_GENERIC)
#include <immintrin.h>
#define DBLLM_AVX512 1
#endif

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
// scale of (row n, group gi): fp16 or fp32 storage
static inline float scale(const void* a, int64_t i, int half) {
    return half ? half_to_float(((const uint16_t*)a)[i]) : ((const float*)a)[i];
}

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

// portable: unpack the 32 weights of a word, then a dot product with each activation row
static void generic_row(const Args& A, int64_t n) {
    const int64_t KW = A.K / 32, G = A.K / A.g, wpg = A.g / 32;
    float w[32];
    for (int64_t m0 = 0; m0 < A.M; m0 += 16) {
        const int64_t mb = A.M - m0 < 16 ? A.M - m0 : 16;
        float acc[16] = {0};
        for (int64_t wi = 0; wi < KW; wi++) {
            const float s1 = scale(A.a1, n * G + wi / wpg, A.half), s2 = scale(A.a2, n * G + wi / wpg, A.half);
            const uint32_t w1 = A.p1[n * KW + wi], w2 = A.p2[n * KW + wi];
#pragma omp simd
            for (int j = 0; j < 32; j++) w[j] = s1 * (float)((w1 >> j) & 1u) + s2 * (float)((w2 >> j) & 1u);
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
"""

_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir():
    return os.environ.get("DBLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dbllm_lab")


def _compile(cxx, flags, target):
    """Compile ``_SOURCE`` into ``target`` atomically; returns None or the compiler's error text."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "dbllm_cpu_kernel.cpp"), os.path.join(tmp, "lib.so")
        with open(src, "w") as f:
            f.write(_SOURCE)
        cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", src, "-o", out]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)}: {e}"
        if r.returncode:
            return f"{' '.join(cmd)}:\n{r.stderr[-2000:]}"
        os.replace(out, target)  # atomic: concurrent first uses never load a half-written file
    return None


def _library_path(flags, extra):
    key = hashlib.sha256((_SOURCE + " ".join(flags + extra) + platform.machine()).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"cpu_kernel_{key}.so")


@functools.lru_cache(maxsize=None)
def load(generic=False):
    """The compiled library (ctypes.CDLL), building it on first use. ``generic=True`` forces the portable loop
    (used by the tests to check it on an AVX-512 machine). Raises RuntimeError naming the cause on failure."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("the dbllm_lab CPU kernel needs a C++ compiler on PATH (g++ or clang++; or set $CXX), "
                           "e.g. `apt-get install g++` / `xcode-select --install`; without one the packed layer "
                           "falls back to its (slow) torch path")
    extra = ["-DDBLLM_GENERIC"] if generic else []
    errors = []
    for flags in _FLAG_SETS:
        path = _library_path(flags, extra)
        if not os.path.isfile(path):
            err = _compile(cxx, flags + extra, path)
            if err:
                errors.append(err)
                continue
        lib = ctypes.CDLL(path)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.dbl_matmul.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int, ptr, i64, i64, i64, ctypes.c_int]
        lib.dbl_matmul.restype = None
        lib.dbl_fdb_round.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.dbl_fdb_round.restype = None
        lib.dbl_fdb_scale_grads.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.dbl_fdb_scale_grads.restype = None
        lib.flags, lib.path = flags + extra, path
        return lib
    raise RuntimeError("could not compile the dbllm_lab CPU kernel:\n" + "\n".join(errors))


@functools.lru_cache(maxsize=None)
def why_unavailable():
    """None if the kernel can be built and loaded here, else the reason (a string)."""
    if platform.system() == "Windows":
        return "the CPU kernel is built with a Unix C++ compiler; not supported on Windows"
    try:
        load()
    except (RuntimeError, OSError) as e:
        return str(e)
    return None


def available():
    return why_unavailable() is None


def info(generic=False):
    """What was built: ISA path, OpenMP, flags and library file."""
    lib = load(generic)
    return {"isa": "avx512" if lib.dbl_isa() else "portable", "openmp": bool(lib.dbl_openmp()),
            "flags": " ".join(lib.flags), "library": lib.path}


def check_cpu_inputs(x, p1, p2, a1, a2, group_size):
    """``kernel.check_inputs`` plus what this kernel needs: CPU tensors, contiguous operands."""
    M, N, K = check_inputs(x, p1, p2, a1, a2, group_size)
    if x.device.type != "cpu":
        raise ValueError(f"the CPU kernel got tensors on {x.device}; use dbllm_lab.kernel.dual_binary_matmul for "
                         f"CUDA tensors")
    for name, t in (("x", x), ("p1", p1), ("p2", p2), ("a1", a1), ("a2", a2)):
        if not t.is_contiguous():
            raise ValueError(f"{name} is not contiguous (shape {tuple(t.shape)}, strides {t.stride()}); the CPU "
                             f"kernel reads raw memory: pass {name}.contiguous()")
    if a1.dtype != a2.dtype:
        raise TypeError(f"a1 and a2 dtypes differ: {a1.dtype} vs {a2.dtype}")
    return M, N, K


def dual_binary_matmul_cpu(x, p1, p2, a1, a2, group_size, out=None, threads=None, generic=False):
    """``y = x @ w_hat.T`` from the packed planes on the CPU (formula in the module docstring), fp32 accumulation.

    x: (..., K) fp32/fp16/bf16, contiguous (fp16/bf16 are converted to fp32 first); p1, p2: (N, K/32) int32;
    a1, a2: (N, K/g) fp16 or fp32. Returns (..., N) in x.dtype. ``out``: optional (M, N) fp32 buffer (fp32 x
    only). ``threads`` defaults to ``torch.get_num_threads()``.
    """
    M, N, K = check_cpu_inputs(x, p1, p2, a1, a2, group_size)
    return _run(load(generic), x, M, N, K, p1, p2, a1, a2, group_size, out, threads)


def _run(lib, x, M, N, K, p1, p2, a1, a2, group_size, out=None, threads=None):
    """Launch without validation (callers check; ``PackedDualBinaryLinear`` validated its buffers once)."""
    x32 = x if x.dtype == torch.float32 else x.float()
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    elif x.dtype != torch.float32 or out.dtype != torch.float32 or tuple(out.shape) != (M, N) \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({M}, {N}) float32 tensor (and x float32), got "
                         f"{out.dtype} {tuple(out.shape)}")
    if M and N:
        lib.dbl_matmul(x32.data_ptr(), M, p1.data_ptr(), p2.data_ptr(), a1.data_ptr(), a2.data_ptr(),
                       int(a1.dtype == torch.float16), out.data_ptr(), N, K, group_size,
                       threads or torch.get_num_threads())
    y = out if x.dtype == torch.float32 else out.to(x.dtype)
    return y.view(*x.shape[:-1], N)


def fdb_round_cpu(w, a1, a2, dequantize=False, threads=1):
    """``quant.fdb_round_torch``'s rule in C++, bit for bit (``tests/test_cpu_kernel.py``): w (R, G, g), a1, a2
    (R, G), fp32 CPU tensors -> (b1, b2) uint8 (R, G, g), and with ``dequantize`` also w_hat = a1 b1 + a2 b2
    (fp32, equal to torch's). One pass over the weights, no temporaries: training recomputes every FDB layer's
    binaries on every forward, and the torch form was a large share of a block's training step.

    One thread by default: a call takes milliseconds, and on a machine whose other cores are busy an OpenMP team
    spins at its closing barrier for a descheduled member: several times slower than one thread."""
    R, G, g = w.shape
    if w.dtype != torch.float32 or a1.dtype != torch.float32 or a2.dtype != torch.float32:
        raise TypeError(f"fdb_round_cpu takes float32 tensors, got {w.dtype}, {a1.dtype}, {a2.dtype}")
    if tuple(a1.shape) != (R, G) or tuple(a2.shape) != (R, G):
        raise ValueError(f"a1, a2 must have shape {(R, G)}, got {tuple(a1.shape)}, {tuple(a2.shape)}")
    w, a1, a2 = w.contiguous(), a1.contiguous(), a2.contiguous()
    b1, b2 = torch.empty(w.shape, dtype=torch.uint8), torch.empty(w.shape, dtype=torch.uint8)
    w_hat = torch.empty(w.shape, dtype=torch.float32) if dequantize else None
    if w.numel():
        load().dbl_fdb_round(w.data_ptr(), a1.data_ptr(), a2.data_ptr(), b1.data_ptr(), b2.data_ptr(),
                             w_hat.data_ptr() if dequantize else None, R, G, g, threads)
    return (b1, b2, w_hat) if dequantize else (b1, b2)


def fdb_scale_grads_cpu(grad, b1, b2, threads=1):
    """``quant.fdb_scale_grads`` in C++: grad (R, G, g) fp32 and the codes b1, b2 (R, G, g) uint8 -> the sums
    over each group of grad * b1 and grad * b2, (R, G) fp32 each. Same sums as torch's, another summation
    order (equal to rounding, ``tests/test_cpu_kernel.py``). One thread by default, as ``fdb_round_cpu``."""
    R, G, g = grad.shape
    if grad.dtype != torch.float32 or b1.dtype != torch.uint8 or b2.dtype != torch.uint8:
        raise TypeError(f"fdb_scale_grads_cpu takes a float32 gradient and uint8 codes, got {grad.dtype}, "
                        f"{b1.dtype}, {b2.dtype}")
    if b1.shape != grad.shape or b2.shape != grad.shape:
        raise ValueError(f"b1, b2 must have the gradient's shape {tuple(grad.shape)}, got {tuple(b1.shape)}, "
                         f"{tuple(b2.shape)}")
    grad, b1, b2 = grad.contiguous(), b1.contiguous(), b2.contiguous()
    ga1, ga2 = torch.empty(R, G, dtype=torch.float32), torch.empty(R, G, dtype=torch.float32)
    if grad.numel():
        load().dbl_fdb_scale_grads(grad.data_ptr(), b1.data_ptr(), b2.data_ptr(), ga1.data_ptr(), ga2.data_ptr(),
                                   R, G, g, threads)
    return ga1, ga2
