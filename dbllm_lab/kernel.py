"""Dual-bit-plane matmul straight from the packed int32 format (DB-LLM inference form, method.md §1).

A DB-LLM weight is ``w_hat = a1 * b1 + a2 * b2`` with b1, b2 in {0, 1} and one (a1, a2) pair per
(output row, group of ``g`` input columns). For activations x (M x K) the layer output is

    y[m, n] = sum_grp  a1[n, grp] * (B1 x)[m, n, grp] + a2[n, grp] * (B2 x)[m, n, grp]
    (Bx)[m, n, grp] = sum_{k in grp} b[n, k] * x[m, k]

i.e. two binary matrix products whose partial sums are scaled per group and added.

Storage (``dbllm_lab.packing``): p1, p2 are (N, K // 32) int32 words, bit j of word k is column 32k + j;
a1, a2 are (N, K // g) fp16 (fp32 also accepted). Bits per weight = 2 + 2 * 16 / g (2.5 at g = 64).

Entry points
------------
``dual_binary_matmul(x, p1, p2, a1, a2, group_size)``  dispatcher: Triton kernel on CUDA, the C++ kernel of
                           ``dbllm_lab.cpu_kernel`` on CPU (torch dequantize + matmul if it cannot be built).
``dual_binary_gemv(...)``  Triton, decoding (1-8 activation rows); each program owns BLOCK_N output rows
                           and all M rows of x, streams the packed words once.
``dual_binary_gemm(...)``  Triton, prefill; bit-planes unpacked per (BLOCK_K x BLOCK_N) tile into the
                           activation dtype and multiplied with ``tl.dot`` (fp32 accumulation).
``dual_binary_matmul_reference(...)``  pure torch, the literal per-group formula above, in fp32.
``dequantize(...)``  the dense (N, K) ``w_hat`` (the 'torch' fallback path; inspection).

Both kernels require BLOCK_K to divide the group size, so every K tile lies in exactly one group and
its scales are one (BLOCK_N,) vector per tile: the scale is applied once per row per tile, as the
formula reads, and loaded once per tile (not per weight). Hence ``group_size % 32 == 0``.

Without a GPU the kernels still run on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check them);
that environment variable must be set before this module is imported. If no CUDA device is visible and
the variable is unset, this module sets it (so ``import dbllm_lab.kernel`` on a laptop gives runnable, slow,
interpreted kernels instead of kernels that cannot launch).
"""
import functools
import inspect
import os
import sys

import torch

from .packing import ACT_DTYPES, SCALE_DTYPES, WORD_BITS, check_inputs, unpack_bits  # noqa: F401 (re-exported)
from .quant import fdb_bits_per_weight

if not torch.cuda.is_available():  # must precede the @triton.jit decorations below
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the reference and torch paths work without triton
    triton = tl = None
    HAS_TRITON = False

GEMV_MAX_ROWS = 8  # M <= 8 -> GEMV (decoding), else GEMM (prefill)
BACKENDS = ("auto", "triton", "cpu", "torch")


def interpreting():
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def bits_per_weight(group_size, scale_bits=16):
    """Storage cost per weight of the packed format: the FDB rule ``quant.fdb_bits_per_weight`` (two bit-planes
    plus two ``scale_bits`` scales per group of ``group_size`` weights)."""
    return fdb_bits_per_weight(2, group_size, scale_bits)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------



# ----------------------------------------------------------------------------------------------------------
# Pure torch: reference and dense dequantization
# ----------------------------------------------------------------------------------------------------------
def dual_binary_matmul_reference(x, p1, p2, a1, a2, group_size):
    """Literal per-group formula in fp32 (slow, for tests):
    y[m, n] = sum_grp a1[n, grp] * sum_{k in grp} b1[n, k] x[m, k] + a2[n, grp] * sum_{k in grp} b2[n, k] x[m, k].

    Bits come from ``packing.unpack_bits``. Returns float32 of shape (..., out).
    """
    M, N, K = check_inputs(x, p1, p2, a1, a2, group_size)
    G = K // group_size
    xg = x.reshape(M, G, group_size).float()
    b1 = unpack_bits(p1, K).float().view(N, G, group_size)
    b2 = unpack_bits(p2, K).float().view(N, G, group_size)
    s1 = torch.einsum("mgk,ngk->mng", xg, b1)  # (B1 x) per group
    s2 = torch.einsum("mgk,ngk->mng", xg, b2)
    y = (s1 * a1.float()).sum(-1) + (s2 * a2.float()).sum(-1)
    return y.reshape(*x.shape[:-1], N)


_BYTE_LUT = {}


def _byte_lut(device):
    """(256, 8) fp32 table: row v holds bits 0..7 of byte v (LSB first), i.e. 8 consecutive columns."""
    if device not in _BYTE_LUT:
        v = torch.arange(256, dtype=torch.int32, device=device)
        _BYTE_LUT[device] = ((v[:, None] >> torch.arange(8, dtype=torch.int32, device=device)) & 1).float()
    return _BYTE_LUT[device]


def _unpack_f32(words, rows, G, group_size):
    """(rows, KW) int32 -> (rows, G, g) fp32 of {0, 1}: byte lookup on little-endian hosts, shifts otherwise."""
    if sys.byteorder == "little":  # byte j of word k holds columns 32k + 8j .. 32k + 8j + 7
        return torch.nn.functional.embedding(words.contiguous().view(torch.uint8).long(),
                                             _byte_lut(words.device)).view(rows, G, group_size)
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 1).float().view(rows, G, group_size)


def dequantize(p1, p2, a1, a2, group_size, dtype=torch.float32, rows_per_chunk=128):
    """Dense ``w_hat = a1 * b1 + a2 * b2`` of shape (out, in) in ``dtype``; computed in fp32 in chunks of rows
    (byte-table unpacking, per-group scales broadcast, no int64 or repeated-scale temporaries)."""
    if p1.dtype != torch.int32 or p2.dtype != torch.int32 or p1.shape != p2.shape or p1.dim() != 2:
        raise ValueError(f"p1, p2 must be 2-D int32 of one shape, got {p1.dtype} {tuple(p1.shape)} and "
                         f"{p2.dtype} {tuple(p2.shape)}")
    N, KW = p1.shape
    K = KW * WORD_BITS
    check_inputs(torch.empty(0, K, dtype=torch.float32, device=p1.device), p1, p2, a1, a2, group_size)
    G = K // group_size
    w = torch.empty(N, K, dtype=dtype, device=p1.device)
    for r in range(0, N, rows_per_chunk):
        sl = slice(r, r + rows_per_chunk)
        rows = p1[sl].shape[0]
        b1 = _unpack_f32(p1[sl], rows, G, group_size)
        b2 = _unpack_f32(p2[sl], rows, G, group_size)
        out = w[sl].view(rows, G, group_size) if dtype == torch.float32 else torch.empty_like(b1)
        torch.mul(b1, a1[sl].float().unsqueeze(-1), out=out)
        out.addcmul_(b2, a2[sl].float().unsqueeze(-1))
        if dtype != torch.float32:
            w[sl] = out.view(rows, K).to(dtype)
    return w


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(x_ptr, p1_ptr, p2_ptr, a1_ptr, a2_ptr, y_ptr,
                     M, N, K, M_BUCKET,
                     stride_xm, stride_ym,
                     GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """One program: BLOCK_N output rows x all M (<= BLOCK_M <= 8) activation rows.

        Per K tile (inside one group): w = a1*b1 + a2*b2 for the (BLOCK_N, BLOCK_K) tile in fp32, then
        y[m, n] += sum_k w[n, k] * x[m, k] by broadcasting (no tl.dot: M is too small for tensor cores).
        """
        pid_n = tl.program_id(0)
        KW = K // 32
        G = K // GROUP_SIZE
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        shift = offs_k % 32  # BLOCK_K is a multiple of 32 and tiles start at multiples of 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # packed words: column k lives in word k // 32, bit k % 32 (duplicate loads hit L1)
            wofs = offs_n[:, None] * KW + (k0 + offs_k)[None, :] // 32
            w1 = tl.load(p1_ptr + wofs, mask=mask_n[:, None], other=0)
            w2 = tl.load(p2_ptr + wofs, mask=mask_n[:, None], other=0)
            b1 = (w1 >> shift[None, :]) & 1
            b2 = (w2 >> shift[None, :]) & 1
            grp = k0 // GROUP_SIZE  # the whole tile lies in this group (GROUP_SIZE % BLOCK_K == 0)
            s1 = tl.load(a1_ptr + offs_n * G + grp, mask=mask_n, other=0.0).to(tl.float32)
            s2 = tl.load(a2_ptr + offs_n * G + grp, mask=mask_n, other=0.0).to(tl.float32)
            w = tl.where(b1 != 0, s1[:, None], 0.0) + tl.where(b2 != 0, s2[:, None], 0.0)  # (BLOCK_N, BLOCK_K)
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                         mask=mask_m[:, None], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
            acc += tl.sum(xt[:, None, :] * w[None, :, :], axis=2)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _gemm_kernel(x_ptr, p1_ptr, p2_ptr, a1_ptr, a2_ptr, y_ptr,
                     M, N, K, M_BUCKET,
                     stride_xm, stride_ym,
                     GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """One program: a (BLOCK_M, BLOCK_N) output tile. Per K tile, unpack the two bit-planes into
        w = a1*b1 + a2*b2 (BLOCK_K, BLOCK_N) in the activation dtype and accumulate tl.dot(x, w) in fp32.
        Program ids are swizzled in GROUP_M super-rows for L2 reuse of the packed weights."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gm
        pid_n = (pid % width) // gm

        KW = K // 32
        G = K // GROUP_SIZE
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        shift = offs_k % 32
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                         mask=mask_m[:, None], other=0.0)  # (BLOCK_M, BLOCK_K), activation dtype
            wofs = offs_n[None, :] * KW + (k0 + offs_k)[:, None] // 32  # (BLOCK_K, BLOCK_N)
            w1 = tl.load(p1_ptr + wofs, mask=mask_n[None, :], other=0)
            w2 = tl.load(p2_ptr + wofs, mask=mask_n[None, :], other=0)
            b1 = (w1 >> shift[:, None]) & 1
            b2 = (w2 >> shift[:, None]) & 1
            grp = k0 // GROUP_SIZE
            s1 = tl.load(a1_ptr + offs_n * G + grp, mask=mask_n, other=0.0).to(tl.float32)
            s2 = tl.load(a2_ptr + offs_n * G + grp, mask=mask_n, other=0.0).to(tl.float32)
            w = tl.where(b1 != 0, s1[None, :], 0.0) + tl.where(b2 != 0, s2[None, :], 0.0)
            acc = tl.dot(xt, w.to(xt.dtype), acc)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    def _prune(configs, named_args, **kwargs):
        """Keep configs whose BLOCK_K divides the group size (each K tile inside one group)."""
        g = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
        kept = [c for c in configs if g % c.kwargs["BLOCK_K"] == 0]
        # in the interpreter benchmarking configs is meaningless and very slow: keep one
        return kept[:1] if interpreting() else kept

    # Small autotune spaces (GPU). Results are cached per key in-process and on disk (cache_results).
    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                     for bn, bk, w, s in [(16, 32, 2, 4), (16, 64, 2, 3), (32, 64, 4, 3), (64, 64, 4, 3),
                                          (16, 128, 4, 3), (32, 128, 4, 3), (8, 128, 2, 4), (64, 32, 4, 4),
                                          (128, 32, 4, 4)]]
    _GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                   num_warps=w, num_stages=s)
                     for bm, bn, bk, w, s in [(16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (64, 64, 64, 4, 3),
                                              (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 32, 4, 4),
                                              (64, 128, 32, 4, 4), (128, 256, 64, 8, 3)]]
    _autotune_kwargs = {"prune_configs_by": {"early_config_prune": _prune}}
    if not interpreting() and "cache_results" in inspect.signature(triton.autotune).parameters:  # triton >= 3.2
        _autotune_kwargs["cache_results"] = True
    # every list holds BLOCK_K = 32 configs, so any group size that is a multiple of 32 keeps >= 1 config
    _gemv_tuned = triton.autotune(configs=_GEMV_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                                  **_autotune_kwargs)(_gemv_kernel)
    _gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"],
                                  **_autotune_kwargs)(_gemm_kernel)


def _check_triton_device(x):
    if not HAS_TRITON:
        raise RuntimeError("the Triton kernels need the 'triton' package (pip install 'dbllm_lab[kernel]')")
    if x.device.type == "cuda":
        if interpreting():
            raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only; unset it to run "
                               "the compiled kernels on CUDA tensors")
        return
    if x.device.type == "cpu":
        if not interpreting():
            raise RuntimeError("the Triton kernels got CPU tensors: run on CUDA, or set TRITON_INTERPRET=1 before "
                               "importing dbllm_lab.kernel to run them (slowly) in the interpreter")
        return
    raise ValueError(f"device {x.device} is not supported by the Triton kernels; use cuda (or cpu with "
                     f"TRITON_INTERPRET=1)")


def _launch(kind, x, p1, p2, a1, a2, group_size, out=None, config=None):
    M, N, K = check_inputs(x, p1, p2, a1, a2, group_size)
    _check_triton_device(x)
    if kind == "gemv" and M > GEMV_MAX_ROWS:
        raise ValueError(f"dual_binary_gemv handles 1..{GEMV_MAX_ROWS} activation rows, got M={M}; "
                         f"use dual_binary_gemm or dual_binary_matmul")
    x2 = x.reshape(M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    p1, p2, a1, a2 = (t.contiguous() for t in (p1, p2, a1, a2))
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    elif out.shape != (M, N) or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a ({M}, {N}) {x.dtype} tensor on {x.device} with unit last stride, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if M == 0 or N == 0:
        return out.reshape(*x.shape[:-1], N)
    m_bucket = triton.next_power_of_2(M)
    args = (x2, p1, p2, a1, a2, out, M, N, K, min(m_bucket, 256), x2.stride(0), out.stride(0))
    meta = {"GROUP_SIZE": group_size}
    if kind == "gemv":
        meta["BLOCK_M"] = max(1, m_bucket)
        kernel, tuned = _gemv_kernel, _gemv_tuned
        grid = lambda c: (triton.cdiv(N, c["BLOCK_N"]),)  # noqa: E731
    else:
        kernel, tuned = _gemm_kernel, _gemm_tuned
        grid = lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),)  # noqa: E731
    if config is None:
        tuned[grid](*args, **meta)
    else:
        config = dict(config)
        if group_size % config["BLOCK_K"] or config["BLOCK_K"] % WORD_BITS:
            raise ValueError(f"BLOCK_K={config['BLOCK_K']} must be a multiple of 32 dividing group_size={group_size}")
        if kind == "gemm":
            config.setdefault("GROUP_M", 8)
        launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
        kernel[grid({**meta, **config})](*args, **meta, **config, **launch)
    return out.reshape(*x.shape[:-1], N)


def dual_binary_gemv(x, p1, p2, a1, a2, group_size, out=None, config=None):
    """Decoding path (1..8 activation rows): y = sum_grp a1*(B1 x) + a2*(B2 x), fp32 accumulation.

    ``x`` (..., K) fp16/bf16/fp32; returns (..., N) in x.dtype. ``config`` (dict with BLOCK_N, BLOCK_K and
    optionally num_warps/num_stages) bypasses autotuning; BLOCK_K must be a multiple of 32 dividing group_size.
    """
    return _launch("gemv", x, p1, p2, a1, a2, group_size, out=out, config=config)


def dual_binary_gemm(x, p1, p2, a1, a2, group_size, out=None, config=None):
    """Prefill path (any number of rows): per-tile unpack of both bit-planes + ``tl.dot``, fp32 accumulation.

    Same operands as ``dual_binary_gemv``; ``config`` takes BLOCK_M, BLOCK_N, BLOCK_K (>= 16 each), GROUP_M.
    With fp32 activations tl.dot may use TF32 on GPU.
    """
    return _launch("gemm", x, p1, p2, a1, a2, group_size, out=out, config=config)


def dual_binary_matmul(x, p1, p2, a1, a2, group_size, backend="auto"):
    """``x @ w_hat.T`` with ``w_hat = a1*b1 + a2*b2`` per group, from the packed bit-planes.

    backend: 'auto' (Triton on CUDA tensors, the C++ CPU kernel on CPU tensors when it builds here, else
    torch), 'triton' (also on CPU under TRITON_INTERPRET=1), 'cpu' (``cpu_kernel.dual_binary_matmul_cpu``),
    or 'torch' (dequantize then matmul in x.dtype). Triton picks the GEMV kernel for <= 8 activation rows
    and the GEMM kernel otherwise. Returns (..., out) in x.dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    M, N, K = check_inputs(x, p1, p2, a1, a2, group_size)
    if backend == "auto":
        from . import cpu_kernel
        if x.is_cuda:
            backend = "triton" if HAS_TRITON and not interpreting() else "torch"
        else:
            backend = "cpu" if x.device.type == "cpu" and cpu_kernel.available() else "torch"
    if backend == "cpu":
        from .cpu_kernel import dual_binary_matmul_cpu
        return dual_binary_matmul_cpu(x, p1, p2, a1, a2, group_size)
    if backend == "torch":
        w = dequantize(p1, p2, a1, a2, group_size, dtype=x.dtype)
        return torch.nn.functional.linear(x, w)
    if M <= GEMV_MAX_ROWS:
        return dual_binary_gemv(x, p1, p2, a1, a2, group_size)
    return dual_binary_gemm(x, p1, p2, a1, a2, group_size)


@functools.lru_cache(maxsize=None)
def triton_available_on(device_type):
    """Whether dual_binary_matmul(backend='triton') can run on tensors of this device type here."""
    if not HAS_TRITON:
        return False
    return (device_type == "cuda" and not interpreting()) or (device_type == "cpu" and interpreting())
