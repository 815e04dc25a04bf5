"""CPU dual-bit-plane matmul straight from the packed words: a small C++ kernel (``cpu_kernel.cpp``,
``cpu_kernel_int8.cpp`` and ``cpu_kernel.h`` beside this file), compiled on first use. The same library holds the
FDB rounding in C++ (``quant.fdb_round_cpu``, what training's ``quant.fdb_round`` calls on the CPU) and a matmul with
int8 weight rows (``decode.int8_rows_matmul_cpu``, ``cpu_kernel_head.cpp``: the lean decoder's optional int8 LM head),
whose Python wrappers live beside their users, and the
lean decoder's fused residual-add + RMSNorm, in-place RoPE and one-call decode step (``cpu_kernel_decode.cpp``,
called by ``decode.py`` and ``decode_step.py``).

Computes the DB-LLM inference form (method.md §1) for activations x (M x K) and packed planes p1, p2 (N x K/32
int32 words, ``dbllm_lab.packing`` layout), scales a1, a2 (N x K/g, fp16 or fp32):

    y[m, n] = sum_grp  a1[n, grp] * S1[m, n, grp] + a2[n, grp] * S2[m, n, grp],
    Sj[m, n, grp] = sum_{k in grp} bj[n, k] * x[m, k]

never forming the dense weight. Two paths (``PackedDualBinaryLinear``'s backends choose between them):

Exact fp32 path (``dual_binary_matmul_cpu``; backend 'cpu-exact', and 'cpu' above 4 rows), fp32 accumulation:
  * x86 with AVX-512, batch 1 (GEMV): the bits of a word are AVX-512 lane masks. Per group, the 16-column chunks
    of x are added into S1 under the mask of plane 1 and into S2 under the mask of plane 2 (``vaddps`` with a mask
    register), then ``acc += a1 * S1 + a2 * S2`` once per group. Four output rows are interleaved.
  * AVX-512, batch 2..16: dequantize in registers, ``w = a1 * b1 + a2 * b2`` for 16 columns, then one FMA per
    activation row; tiles of up to 8 activation rows x 2 output rows. Larger batches run in blocks of 8 rows.
  * fp16 scales are converted with F16C (``_cvtsh_ss``) where the compiler targets it (16% of the batch-1 time at
    4096 x 4096 against the software conversion, kept for other CPUs).
  * other CPUs (no AVX-512 at compile time, e.g. ARM or AVX2-only x86 such as AMD Zen 2): a portable loop (unpack
    32 weights of a word, then a ``#pragma omp simd`` dot product with each activation row), same results.
  Candidates timed for it (one-off prototype on an AVX-512 Xeon, 4096 x 4096, batch 1, one thread, load 5.6-8.2):
  masked add 1.61 ms (chosen), in-register dequantize 1.77 ms (chosen for batch >= 2), a float table of the 256
  subset sums of every 8 activations 3.46 ms, the portable loop 4.55 ms.

Integer path (``int8_matmul_cpu``; backend 'cpu' for 1-4 rows, 'cpu-int8' at any batch; g <= 256):
  * the activations are quantized once per call, per row and group of g (the weight group, 64 by default, as
    llama.cpp's Q8 blocks): d = max |x| / 127, q = rint(x / d) in [-127, 127] (``quantize_activations_int8``);
  * Sj = sum over the group of bj * q in integers (exact), then y = sum_grp d * fma(S1, a1, S2 * a2) in fp32, the
    operations in one fixed order, so every build gives the same bits (``int8_matmul_reference``: float64 torch).
  * the planes are repacked once (``repack_int8``) into one of two layouts, both blocks of 32 output rows of the
    same size as the checkpoint's planes; ``int8_layout()`` picks the one this CPU runs fastest.
  * x86 with AVX-512 F/BW/VL and VNNI (checked at run time, ``__builtin_cpu_supports``), layout 'vnni': per 4
    columns and 16 rows one 64-bit word, bit 4i + j = row i, column j, used as a byte mask. The 4 int8 activations
    are broadcast to every 32-bit lane, a masked byte move keeps those under each row's bits, and ``vpdpbusd``
    (ones x bytes) adds them into that row's lane: the row sums land in the lanes, no horizontal reduction; per
    4 columns, plane and 16 rows one mask load, one masked move, one ``vpdpbusd`` (written in inline asm: GCC 12
    copied the accumulator before every intrinsic call).
  * x86 with AVX2, layout 'lut', candidate (b), T-MAC's lookup: per 4 activations the 16 subset sums, as int16
    split into a low-byte and a high-byte 16-entry table (no table requantization: exact). One 32-byte vector holds
    byte c of 32 output rows: its low nibbles index quad 2c, its high nibbles quad 2c + 1. ``vpshufb`` on the two
    tables gives 32 lookups each and the byte unpacks join them into the int16 sums of the 32 rows: per 8 columns
    and plane 4 shuffles, 4 unpacks and 4 adds for 256 weight bits. Per group the int16 sums turn fp32 and are
    scaled.
  * both SIMD loops prefetch each plane a page (4 KiB) ahead (``PREFETCH_BYTES``): from memory the hardware
    prefetchers alone left the loops well short of the stream (``bench/results/kernel_cpu_xeon.json`` before and
    after, findings §7).
  * candidate (a), kept for the benchmark (``variant='expand'``): each plane word expanded to 0/1 bytes
    (broadcast, ``vpshufb``, and, min) then ``vpmaddubsw`` (0/1 unsigned x int8 signed) and ``vpmaddwd``.
  * other CPUs, or a ``-portable`` variant: a portable loop over either layout (scalar lookups / bit tests), same
    bits.
  Measured side by side (``bench/kernel_cpu.py``; its JSON in bench/results/): columns int8_call_ms (this CPU's
  layout), int8_lut_call_ms (the 'lut' layout where that is not this CPU's), expand_call_ms (a), exact_call_ms,
  and torch fp32 / bf16.
Prefill path (``dequantize_cpu``; backend 'cpu' from ``packed_linear.DENSE_MIN_ROWS`` rows): at that batch a GEMM
is compute-bound, so ``w_hat`` is written dense (fp32 or bf16, one layer, for one call) and torch's GEMM multiplies.
Rows are split over threads with OpenMP in chunks handed out dynamically; torch's own libgomp.

Build: on first use the sources are compiled with the C++ compiler on PATH (``$CXX``, else ``c++``, ``g++``,
``clang++``) into ``$DBLLM_CACHE_DIR`` (default ``~/.cache/dbllm_lab``) and loaded with ctypes; later imports reuse
the cached library (its name hashes the sources, flags and CPU model). ``-march=native -fopenmp`` is tried first,
then without OpenMP (single thread, e.g. Apple clang), then plain ``-O3``. No compiler: ``available()`` is False,
``why_unavailable()`` says why, and ``PackedDualBinaryLinear`` falls back to its torch path.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import NamedTuple

import torch

from .packing import check_inputs, unpack_bits

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
HERE = os.path.dirname(os.path.abspath(__file__))
# compiled together into one library
SOURCES = ("cpu_kernel.cpp", "cpu_kernel_int8.cpp", "cpu_kernel_head.cpp", "cpu_kernel_decode.cpp")
HEADERS = ("cpu_kernel.h",)


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir():
    return os.environ.get("DBLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dbllm_lab")


def _source_text():
    """The C++ sources and header, concatenated (the cache key); RuntimeError naming a missing file."""
    texts = []
    for name in SOURCES + HEADERS:
        path = os.path.join(HERE, name)
        if not os.path.isfile(path):
            raise RuntimeError(f"the dbllm_lab CPU kernel source {path} is missing: the package was installed "
                               f"without its C++ files (pyproject.toml package-data); reinstall it")
        with open(path) as f:
            texts.append(f.read())
    return "\n".join(texts)


def _first_cpu():
    """The first processor's fields of /proc/cpuinfo (Linux; {} elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in block.splitlines() if ":" in ln)}


def cpu_model():
    """The CPU's model name (Linux), e.g. 'AMD EPYC'; "" where unknown."""
    return _first_cpu().get("model name", "")


def cpu_signature():
    """'AMD EPYC (family 25 model 17; avx2 avx512f avx512_vnni avx512_bf16)': virtual machines often report one
    model name for different CPUs, so the family, model and the vector extensions that change speed say which.
    Part of the kernel cache key (-march=native builds differ between CPUs) and of every result row."""
    info = _first_cpu()
    if not info:
        return platform.processor()
    isa = [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if x in info.get("flags", "").split()]
    return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; {' '.join(isa)})"



def cpu_name(signature):
    """'Intel(R) Xeon(R) Processor (family 6 ...)' -> 'Intel Xeon Processor': a ``cpu_signature``'s short name."""
    return signature.split(" (")[0].replace("(R)", "")

def _compile(cxx, flags, target):
    """Compile ``SOURCES`` into ``target`` atomically; returns None or the compiler's error text."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "lib.so")
        cmd = [cxx, *flags, "-std=c++17", "-shared", "-fPIC", *(os.path.join(HERE, n) for n in SOURCES), "-o", out]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd)}: {e}"
        if r.returncode:
            return f"{' '.join(cmd)}:\n{r.stderr[-2000:]}"
        os.replace(out, target)  # atomic: concurrent first uses never load a half-written file
    return None


def _library_path(flags, extra):
    key = _source_text() + " ".join(flags + extra) + platform.machine() + cpu_signature()
    return os.path.join(cache_dir(), f"cpu_kernel_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so")


@functools.lru_cache(maxsize=None)
def load(generic=False):
    """The compiled library (ctypes.CDLL), building it on first use. ``generic=True`` forces the portable loops
    (used by the tests to check them on an AVX-512 / AVX2 machine). Raises RuntimeError naming the cause."""
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
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.dbl_matmul.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, i64, cint]
        lib.dbl_matmul.restype = None
        lib.dbl_dequantize.argtypes = [ptr, ptr, ptr, ptr, cint, ptr, cint, i64, i64, i64, cint]
        lib.dbl_dequantize.restype = None
        lib.dbl_matmul_int8.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, i64, cint, cint, cint]
        lib.dbl_matmul_int8_expand.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, cint, ptr, i64, i64, i64, cint]
        lib.dbl_fdb_round.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, cint]
        lib.dbl_fdb_round.restype = None
        lib.dbl_fdb_scale_grads.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, cint]
        lib.dbl_fdb_scale_grads.restype = None
        lib.dbl_int8_rows_matmul.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, cint, cint]
        lib.dbl_int8_rows_matmul.restype = None
        lib.dbl_add_rms_norm.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, i64, i64]
        lib.dbl_add_rms_norm.restype = None
        lib.dbl_rope.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr]
        lib.dbl_rope.restype = None
        lib.dbl_matmul_int8.restype = ctypes.c_int
        lib.dbl_decode_step.argtypes = [ptr] * 10 + [i64, i64, ctypes.c_float, ctypes.c_float, ptr, cint]
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
    """What was built: ISA of the exact path and of the integer path (of its layout here), OpenMP, flags, library
    file, CPU."""
    lib = load(generic)
    layout = int8_layout(generic)
    simd = {"lut": "avx2", "vnni": "avx512-vnni"}[layout] if lib.dbl_int8_isa() & (2 if layout == "vnni" else 1) \
        else "portable"
    return {"isa": "avx512" if lib.dbl_isa() else "portable", "int8_isa": simd, "int8_layout": layout,
            "openmp": bool(lib.dbl_openmp()), "flags": " ".join(lib.flags), "library": lib.path, "cpu": cpu_model()}


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


def _fp32_out(x, M, N, out):
    """x as fp32 and the (M, N) fp32 output buffer (``out`` checked, or a new one)."""
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
    elif x.dtype != torch.float32 or out.dtype != torch.float32 or tuple(out.shape) != (M, N) \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({M}, {N}) float32 tensor (and x float32), got "
                         f"{out.dtype} {tuple(out.shape)}")
    return (x if x.dtype == torch.float32 else x.float()), out


def _result(x, out, N):
    y = out if x.dtype == torch.float32 else out.to(x.dtype)
    return y.view(*x.shape[:-1], N)


def _run(lib, x, M, N, K, p1, p2, a1, a2, group_size, out=None, threads=None):
    """Launch without validation (callers check; ``PackedDualBinaryLinear`` validated its buffers once)."""
    x32, out = _fp32_out(x, M, N, out)
    if M and N:
        lib.dbl_matmul(x32.data_ptr(), M, p1.data_ptr(), p2.data_ptr(), a1.data_ptr(), a2.data_ptr(),
                       int(a1.dtype == torch.float16), out.data_ptr(), N, K, group_size,
                       threads or torch.get_num_threads())
    return _result(x, out, N)


def dequantize_cpu(p1, p2, a1, a2, group_size, dtype=torch.float32, threads=None):
    """Dense (N, K) ``w_hat = a1 * b1 + a2 * b2`` from the packed planes in C++ (``dbl_dequantize``): the values of
    ``kernel.dequantize`` (bit for bit in fp32; bf16 rounds each fp32 value to nearest even; fp16 is cast from fp32
    by torch). The prefill path's weight: ``PackedDualBinaryLinear`` multiplies it with ``F.linear`` from
    ``DENSE_MIN_ROWS`` activation rows on, and drops it after the call."""
    if dtype not in ACT_DTYPES:
        raise ValueError(f"dtype={dtype} is not one of {ACT_DTYPES}")
    N, K = p1.shape[0], p1.shape[1] * 32
    check_cpu_inputs(torch.empty(0, K), p1, p2, a1, a2, group_size)
    w = torch.empty(N, K, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32)
    if N and K:
        load().dbl_dequantize(p1.data_ptr(), p2.data_ptr(), a1.data_ptr(), a2.data_ptr(), int(a1.dtype == torch.float16),
                              w.data_ptr(), int(dtype == torch.bfloat16), N, K, group_size,
                              threads or torch.get_num_threads())
    return w.to(dtype)


# ---- integer path ------------------------------------------------------------------------------------------------
INT8_MAX_GROUP = 256  # int16 sums inside a group: g / 4 lookups of at most 4 * 127 each stay below 2**15
INT8_LAYOUTS = ("lut", "vnni")  # the repacked planes' layouts (repack_int8); their numbers in the C++ code
INT8_VARIANTS = ("lut", "lut-portable", "vnni", "vnni-portable", "expand")
BLOCK_ROWS = 32
_POS = [*range(8), *range(16, 24), *range(8, 16), *range(24, 32)]  # POS of cpu_kernel_int8.cpp (its own inverse)


class Int8Weights(NamedTuple):
    """Planes and scales in the layout the integer path reads (``repack_int8``)."""
    w1: torch.Tensor  # (ceil(N / 32), K / 8, 32) uint8: the block's bytes in ``layout``'s order
    w2: torch.Tensor
    s1: torch.Tensor  # (ceil(N / 32), K / g, 32), the scales' dtype
    s2: torch.Tensor
    N: int
    K: int
    group_size: int
    ptrs: tuple  # (w1, w2, s1, s2) data pointers and 1 for fp16 scales: what each call passes
    layout: str = "lut"


def check_int8_group(group_size):
    if group_size > INT8_MAX_GROUP:
        raise ValueError(f"group_size={group_size} is too large for the integer path (at most {INT8_MAX_GROUP}: its "
                         f"int16 group sums would overflow); use backend 'cpu-exact'")


def int8_layout(generic=False):
    """The layout this CPU's integer path runs fastest: 'vnni' where the AVX-512 VNNI code runs (checked at run
    time), else 'lut' (AVX2 lookups, or the portable loop)."""
    return "vnni" if load(generic).dbl_int8_isa() & 2 else "lut"


def repack_int8(p1, p2, a1, a2, group_size, layout=None):
    """The integer path's layout of the packed planes, per block of 32 output rows (rows past N are zero); the scales
    per block as (K/g, 32). The same bytes as the checkpoint's, so a second copy (2.5 bits per weight).

    ``layout`` (default ``int8_layout()``):
      * 'lut': per byte c of the words (the row's columns 8c .. 8c+7, bit i = column 8c + i, as ``packing`` stores
        them on a little-endian CPU), the 32 rows' bytes side by side, in the row order ``POS`` of
        cpu_kernel_int8.cpp;
      * 'vnni': per quad c of columns (4c .. 4c+3) and half h of the block (rows 16h .. 16h+15), one 64-bit word
        whose bit 4i + j is row 16h + i, column 4c + j: one AVX-512 byte mask per 16 rows and 4 columns."""
    layout = int8_layout() if layout is None else layout
    if layout not in INT8_LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {INT8_LAYOUTS}")
    if sys.byteorder != "little":
        raise RuntimeError("the integer CPU path reads the packed int32 words as little-endian bytes")
    (N, KW), pad = p1.shape, -p1.shape[0] % BLOCK_ROWS
    NB = (N + pad) // BLOCK_ROWS

    def rows_padded(t):
        return torch.cat([t.contiguous(), t.new_zeros(pad, t.shape[1])]) if pad else t.contiguous()

    def planes(p):
        if layout == "lut":
            return rows_padded(p.view(torch.uint8)).view(NB, BLOCK_ROWS, KW * 4)[:, _POS].transpose(1, 2).contiguous()
        # a row's 4 bits of quad c are a nibble of its byte c // 2; byte b of a word holds rows 2b and 2b + 1
        rows = rows_padded(p).view(torch.uint8).view(NB, 2, 8, 2, KW * 4)  # block, half, b, row of the pair, byte
        nibbles = torch.stack((rows & 15, rows >> 4), -1).view(NB, 2, 8, 2, KW * 8)  # ..., quad c
        words = nibbles[:, :, :, 0] | (nibbles[:, :, :, 1] << 4)  # block, half, b, quad c
        return words.permute(0, 3, 1, 2).contiguous().view(NB, KW * 4, BLOCK_ROWS)

    def scales(a):
        return rows_padded(a).view(NB, BLOCK_ROWS, -1).transpose(1, 2).contiguous()
    w1, w2, s1, s2 = planes(p1), planes(p2), scales(a1), scales(a2)
    ptrs = (w1.data_ptr(), w2.data_ptr(), s1.data_ptr(), s2.data_ptr(), int(s1.dtype == torch.float16))
    return Int8Weights(w1, w2, s1, s2, N, KW * 32, group_size, ptrs, layout)


def int8_matmul_cpu(x, p1, p2, a1, a2, group_size, out=None, threads=None, variant=None, packed=None,
                    generic=False):
    """The integer path, ``int8_matmul_reference``'s result (module docstring): activations quantized to int8 per
    group once per call, bit-plane group sums in integers, fp32 scaling. Operands as ``dual_binary_matmul_cpu``.
    ``variant``: 'vnni' (AVX-512 VNNI where the CPU has it, else its portable loop), 'lut' (AVX2 byte-shuffle
    lookups where the CPU has AVX2, else its portable loop), 'vnni-portable', 'lut-portable', or 'expand'
    (candidate (a), AVX2 only; for the benchmark); default: ``int8_layout()``'s. Every variant gives the same bits.
    ``packed``: ``repack_int8``'s result in the variant's layout, else made here."""
    M, N, K = check_cpu_inputs(x, p1, p2, a1, a2, group_size)
    check_int8_group(group_size)
    variant = int8_layout(generic) if variant is None else variant
    if variant not in INT8_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {INT8_VARIANTS}")
    lib = load(generic)
    if variant != "expand":
        layout = variant.split("-")[0]
        if packed is not None and packed.layout != layout:
            raise ValueError(f"packed is in layout {packed.layout!r}; variant {variant!r} reads {layout!r}")
        return _run_int8(lib, x, M, packed or repack_int8(p1, p2, a1, a2, group_size, layout), out, threads,
                         portable=variant.endswith("-portable"))
    x32, out = _fp32_out(x, M, N, out)
    if M and N:
        rc = lib.dbl_matmul_int8_expand(x32.data_ptr(), M, p1.data_ptr(), p2.data_ptr(), a1.data_ptr(),
                                        a2.data_ptr(), int(a1.dtype == torch.float16), out.data_ptr(), N, K,
                                        group_size, threads or torch.get_num_threads())
        if rc == -2:
            raise RuntimeError("variant 'expand' needs AVX2 (with FMA and F16C), which this CPU or build lacks")
        if rc:
            raise MemoryError(f"the integer CPU path could not allocate its buffers for {M} x {K} activations")
    return _result(x, out, N)


def _run_int8(lib, x, M, packed, out=None, threads=None, portable=False):
    """Launch the integer path on ``packed`` (its layout) without validation (callers check)."""
    x32, out = _fp32_out(x, M, packed.N, out)
    if M and packed.N:
        rc = lib.dbl_matmul_int8(x32.data_ptr(), M, *packed.ptrs, out.data_ptr(), packed.N, packed.K,
                                 packed.group_size, threads or torch.get_num_threads(),
                                 INT8_LAYOUTS.index(packed.layout), int(portable))
        if rc:
            raise MemoryError(f"the integer CPU path could not allocate its buffers for {M} x {packed.K} activations")
    return _result(x, out, packed.N)


def quantize_activations_int8(x, group_size):
    """The integer path's activation rule in torch: x (M, K) -> codes q (M, K/g, g) (integers, as fp32) and factors
    d (M, K/g): d = max |x| / 127 per group, q = round(x / d) (ties to even) clamped to [-127, 127], 0 where d = 0."""
    M, K = x.shape
    xg = x.float().reshape(M, K // group_size, group_size)
    d = xg.abs().amax(-1) / 127
    q = torch.where(d[..., None] > 0, torch.round(xg / d[..., None]), torch.zeros_like(xg)).clamp(-127, 127)
    return q, d


def int8_matmul_reference(x, p1, p2, a1, a2, group_size):
    """Pure torch (slow, for tests): y[m, n] = sum_grp d[m, grp] * (a1 * S1 + a2 * S2)[n, grp], Sj = the integer sums
    of the int8 codes under plane j, exact in float64; returns fp32 (..., N)."""
    M, N, K = check_inputs(x, p1, p2, a1, a2, group_size)
    G = K // group_size
    q, d = quantize_activations_int8(x.reshape(M, K), group_size)
    y = torch.zeros(M, N, dtype=torch.float64)
    for p, a in ((p1, a1), (p2, a2)):
        b = unpack_bits(p).view(N, G, group_size).double()
        y += (torch.einsum("mgk,ngk->mng", q.double(), b) * a.double() * d.double()[:, None, :]).sum(-1)
    return y.float().view(*x.shape[:-1], N)
