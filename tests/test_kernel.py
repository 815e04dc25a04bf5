"""Dual-bit-plane Triton kernels vs the pure per-group reference, on the CPU under TRITON_INTERPRET=1.

Fresh random data every run (the seed is printed in each failure message to replay it with
DBLLM_TEST_SEED=<seed>); the output is poisoned with NaN before every launch, so an element the kernel
fails to write fails the comparison. Shapes are small because the interpreter is slow (whole file ~10 s
on 2 cores); the larger embedded-model shapes are marked slow.

Interpreter limits: bf16 activations run through the GEMV kernel, but the interpreter's tl.dot on bf16
(numpy has no bfloat16) returns garbage, so bf16 GEMM is checked only on a GPU (skipped here).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

from dbllm_lab import kernel as K  # noqa: E402
from dbllm_lab.packing import pack_bits  # noqa: E402

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
ON_GPU = torch.cuda.is_available() and not K.interpreting()
DEVICE = "cuda" if ON_GPU else "cpu"
SEED = int(os.environ.get("DBLLM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def make(N, Kin, g, density=0.5, scale_dtype=torch.float16, seed=0, device=DEVICE):
    """Random bit-planes (given density of ones), packed, and random signed fp16 scales of FDB size."""
    gen = torch.Generator().manual_seed(SEED + seed)
    b1 = (torch.rand(N, Kin, generator=gen) < density).to(torch.uint8)
    b2 = (torch.rand(N, Kin, generator=gen) < density).to(torch.uint8)
    a1 = (torch.rand(N, Kin // g, generator=gen) * 0.2 + 0.01).to(scale_dtype)  # a1 = 2s > 0
    a2 = (-torch.rand(N, Kin // g, generator=gen) * 0.1 - 0.005).to(scale_dtype)  # a2 = -s < 0
    flip = torch.rand(N, Kin // g, generator=gen) < 0.3  # mirrored orientation in some groups
    a1, a2 = torch.where(flip, -a1, a1), torch.where(flip, -a2, a2)
    dev = lambda t: t.to(device)  # noqa: E731
    return dev(b1), dev(b2), dev(pack_bits(b1)), dev(pack_bits(b2)), dev(a1), dev(a2)


def acts(M, Kin, dtype, seed=1, lead=None):
    gen = torch.Generator().manual_seed(SEED + seed)
    shape = (*lead, Kin) if lead else (M, Kin)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def poisoned(M, N, dtype):
    return torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)


def check(y, ref, x_dtype, what):
    """|y - ref| <= atol + rtol |ref|: output rounding of x.dtype (plus the fp16/bf16 rounding of a1 + a2 in
    the GEMM tile) over fp32 accumulation of up to a few hundred terms."""
    assert torch.isfinite(y).all(), f"{what}: unwritten (NaN-poisoned) or non-finite output, seed={SEED}"
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[x_dtype]
    scale = ref.abs().max().item() + 1e-6
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what} seed={SEED}: {m}")


# -------------------------------------------------------------------------------------------------------
# GEMV: decoding, 1..8 activation rows
# -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("N,Kin,g", [(72, 128, 64), (100, 96, 32), (130, 256, 128), (64, 192, 96)])
def test_gemv_matches_reference(M, N, Kin, g):
    _, _, p1, p2, a1, a2 = make(N, Kin, g, seed=M)
    x = acts(M, Kin, torch.float16, seed=M)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    y = K.dual_binary_gemv(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.float16))
    check(y, ref, torch.float16, f"gemv M={M} N={N} K={Kin} g={g}")


@pytest.mark.parametrize("config", [dict(BLOCK_N=16, BLOCK_K=32, num_warps=2), dict(BLOCK_N=64, BLOCK_K=64),
                                    dict(BLOCK_N=8, BLOCK_K=128)])
def test_gemv_explicit_configs(config):
    """Tiles smaller than a group (several K tiles per group), equal to it, and ragged N tails."""
    N, Kin, g, M = 90, 256, 128, 3
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    x = acts(M, Kin, torch.float16)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    y = K.dual_binary_gemv(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.float16), config=config)
    check(y, ref, torch.float16, f"gemv {config}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_other_dtypes(dtype):
    N, Kin, g, M = 48, 128, 64, 4
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    x = acts(M, Kin, dtype)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    y = K.dual_binary_gemv(x, p1, p2, a1, a2, g, out=poisoned(M, N, dtype))
    assert y.dtype == dtype
    check(y, ref, dtype, f"gemv {dtype}")


# -------------------------------------------------------------------------------------------------------
# GEMM: prefill, tl.dot on per-tile unpacked bit-planes
# -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [9, 16, 23, 40])
@pytest.mark.parametrize("N,Kin,g", [(72, 128, 64), (100, 96, 32), (130, 256, 128)])
def test_gemm_matches_reference(M, N, Kin, g):
    _, _, p1, p2, a1, a2 = make(N, Kin, g, seed=M)
    x = acts(M, Kin, torch.float16, seed=M)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    y = K.dual_binary_gemm(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.float16))
    check(y, ref, torch.float16, f"gemm M={M} N={N} K={Kin} g={g}")


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2),
                                    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)])
def test_gemm_explicit_configs(config):
    """Several M and N tiles (exercises the GROUP_M swizzle), several K tiles per group, ragged edges."""
    N, Kin, g, M = 70, 192, 64, 37
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    x = acts(M, Kin, torch.float16)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    y = K.dual_binary_gemm(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.float16), config=config)
    check(y, ref, torch.float16, f"gemm {config}")


def test_gemm_fp32_and_fp32_scales():
    N, Kin, g, M = 48, 128, 32, 19
    _, _, p1, p2, a1, a2 = make(N, Kin, g, scale_dtype=torch.float32)
    x = acts(M, Kin, torch.float32)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    y = K.dual_binary_gemm(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.float32))
    # TF32 on a GPU: looser there
    check(y, ref, torch.float16 if ON_GPU else torch.float32, "gemm fp32")


def test_gemm_bf16():
    if K.interpreting():
        pytest.skip("the Triton interpreter computes tl.dot on bf16 wrongly (numpy has no bfloat16); GPU only")
    N, Kin, g, M = 64, 128, 64, 20
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    x = acts(M, Kin, torch.bfloat16)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    check(K.dual_binary_gemm(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.bfloat16)), ref, torch.bfloat16, "bf16")


# -------------------------------------------------------------------------------------------------------
# Dispatcher, edge cases, reference itself
# -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead", [(1,), (2, 3), (3, 7)])
def test_dispatcher_leading_dims(lead):
    """(batch, seq, in) input; <= 8 rows go to GEMV, more to GEMM; torch backend agrees."""
    N, Kin, g = 40, 64, 32
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    x = acts(None, Kin, torch.float16, lead=lead)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    assert ref.shape == (*lead, N)
    for backend in ("triton", "torch", "auto"):
        y = K.dual_binary_matmul(x, p1, p2, a1, a2, g, backend=backend)
        assert y.shape == (*lead, N) and y.dtype == torch.float16
        check(y, ref, torch.float16, f"dispatch {backend} {lead}")


def test_non_contiguous_activations():
    N, Kin, g = 40, 64, 64
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    big = acts(6, 2 * Kin, torch.float16)
    x = big[:, ::2]  # stride 2 along K
    ref = K.dual_binary_matmul_reference(x.contiguous(), p1, p2, a1, a2, g)
    check(K.dual_binary_gemv(x, p1, p2, a1, a2, g), ref, torch.float16, "strided x")
    xs = acts(24, 2 * Kin, torch.float16)[:, :Kin]  # row stride 2K, unit column stride
    ref = K.dual_binary_matmul_reference(xs.contiguous(), p1, p2, a1, a2, g)
    check(K.dual_binary_gemm(xs, p1, p2, a1, a2, g), ref, torch.float16, "row-strided x")


@pytest.mark.parametrize("density", [0.0, 1.0, 0.1])
def test_extreme_sparsity(density):
    """All-zero planes give y = 0; all-one planes give (a1 + a2) * group sums of x; 10 % ones (sparse)."""
    N, Kin, g, M = 33, 128, 64, 2
    _, _, p1, p2, a1, a2 = make(N, Kin, g, density=density)
    x = acts(M, Kin, torch.float16)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    if density == 0.0:
        assert (ref == 0).all()
    if density == 1.0:
        gs = x.float().view(M, 1, Kin // g, g).sum(-1)
        torch.testing.assert_close(ref, (gs * (a1.float() + a2.float())).sum(-1))
    for fn, rows in ((K.dual_binary_gemv, M), (K.dual_binary_gemm, 17)):
        xx = acts(rows, Kin, torch.float16, seed=5)
        r = K.dual_binary_matmul_reference(xx, p1, p2, a1, a2, g)
        check(fn(xx, p1, p2, a1, a2, g, out=poisoned(rows, N, torch.float16)), r, torch.float16, f"density {density}")


def test_reference_equals_dense_dequantize():
    """The per-group formula equals x @ (a1*b1 + a2*b2).T built from the unpacked bit-planes."""
    N, Kin, g, M = 50, 160, 32, 5
    b1, b2, p1, p2, a1, a2 = make(N, Kin, g)
    x = acts(M, Kin, torch.float32)
    s1 = a1.float().repeat_interleave(g, 1)
    s2 = a2.float().repeat_interleave(g, 1)
    w = s1 * b1.float() + s2 * b2.float()
    torch.testing.assert_close(K.dequantize(p1, p2, a1, a2, g, rows_per_chunk=16), w)
    torch.testing.assert_close(K.dequantize(p1, p2, a1, a2, g, dtype=torch.float16), w.half())
    torch.testing.assert_close(K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g), x @ w.T, rtol=1e-5, atol=1e-5)


def test_dequantize_without_byte_table(monkeypatch):
    """The shift-based unpacking (used on big-endian hosts) agrees with the byte-table one."""
    _, _, p1, p2, a1, a2 = make(20, 96, 32)
    w = K.dequantize(p1, p2, a1, a2, 32)
    monkeypatch.setattr(K.sys, "byteorder", "big")
    torch.testing.assert_close(K.dequantize(p1, p2, a1, a2, 32, rows_per_chunk=7), w)


def test_bits_per_weight():
    assert K.bits_per_weight(64) == 2.5 and K.bits_per_weight(128) == 2.25


# -------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# -------------------------------------------------------------------------------------------------------
def _ok(N=32, Kin=128, g=64):
    _, _, p1, p2, a1, a2 = make(N, Kin, g)
    return acts(3, Kin, torch.float16), p1, p2, a1, a2, g


@pytest.mark.parametrize("fn", [K.dual_binary_gemv, K.dual_binary_gemm, K.dual_binary_matmul,
                                K.dual_binary_matmul_reference])
def test_bad_dtypes(fn):
    x, p1, p2, a1, a2, g = _ok()
    with pytest.raises(TypeError, match="float64.*activations must be one of float16, bfloat16, float32"):
        fn(x.double(), p1, p2, a1, a2, g)
    with pytest.raises(TypeError, match="p1 has dtype torch.int64.*int32"):
        fn(x, p1.long(), p2, a1, a2, g)
    with pytest.raises(TypeError, match="a2 has dtype torch.bfloat16.*scales must be one of float16, float32"):
        fn(x, p1, p2, a1, a2.bfloat16(), g)
    with pytest.raises(TypeError, match="group_size must be an int"):
        fn(x, p1, p2, a1, a2, 64.0)


@pytest.mark.parametrize("fn", [K.dual_binary_gemv, K.dual_binary_gemm, K.dual_binary_matmul])
def test_bad_shapes_and_group_sizes(fn):
    x, p1, p2, a1, a2, g = _ok()
    with pytest.raises(ValueError, match="in_features=96 but the bit-planes hold 4 words x 32 = 128"):
        fn(x[:, :96], p1, p2, a1, a2, g)
    with pytest.raises(ValueError, match="p1 and p2 shapes differ"):
        fn(x, p1, p2[:-1], a1, a2, g)
    with pytest.raises(ValueError, match=r"group_size=48 is not supported.*multiple of 32"):
        fn(x, p1, p2, a1, a2, 48)
    with pytest.raises(ValueError, match=r"in_features=128 is not a multiple of group_size=96"):
        fn(x, p1, p2, a1, a2, 96)
    with pytest.raises(ValueError, match=r"scales have shape \(32, 2\), expected .* \(32, 4\) for group_size=32"):
        fn(x, p1, p2, a1, a2, 32)  # scales made for g=64 passed with g=32
    with pytest.raises(ValueError, match="p1 must be 2-D"):
        fn(x, p1.flatten(), p2.flatten(), a1, a2, g)


def test_bad_devices_and_misc():
    x, p1, p2, a1, a2, g = _ok()
    with pytest.raises(ValueError, match="all operands must be on one device"):
        K.dual_binary_matmul(x.to("meta"), p1, p2, a1, a2, g)
    meta = [t.to("meta") for t in (x, p1, p2, a1, a2)]
    with pytest.raises(ValueError, match="device meta is not supported by the Triton kernels"):
        K.dual_binary_gemv(*meta, g)
    with pytest.raises(ValueError, match="dual_binary_gemv handles 1..8 activation rows, got M=9"):
        K.dual_binary_gemv(acts(9, 128, torch.float16), p1, p2, a1, a2, g)
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        K.dual_binary_matmul(x, p1, p2, a1, a2, g, backend="cuda")
    with pytest.raises(ValueError, match=r"out must be a \(3, 32\)"):
        K.dual_binary_gemv(x, p1, p2, a1, a2, g, out=poisoned(3, 31, torch.float16))
    with pytest.raises(ValueError, match="BLOCK_K=128 must be a multiple of 32 dividing group_size=64"):
        K.dual_binary_gemv(x, p1, p2, a1, a2, g, config=dict(BLOCK_N=16, BLOCK_K=128))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        K.dual_binary_matmul(x.tolist(), p1, p2, a1, a2, g)


# -------------------------------------------------------------------------------------------------------
# Embedded-model shapes (slow in the interpreter)
# -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("N,Kin", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_embedded_shapes(N, Kin, M):
    g = 64
    _, _, p1, p2, a1, a2 = make(N, Kin, g, density=0.3)
    x = acts(M, Kin, torch.float16)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
    fn = K.dual_binary_gemv if M <= K.GEMV_MAX_ROWS else K.dual_binary_gemm
    check(fn(x, p1, p2, a1, a2, g, out=poisoned(M, N, torch.float16)), ref, torch.float16, f"{N}x{Kin} M={M}")
