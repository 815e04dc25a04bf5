"""PackedDualBinaryLinear: automatic path choice, agreement with the simulated (dense w_hat) layer on every CPU
path, the integer and exact paths of the CPU backends, no dense weight held, state_dict round trip, bad input, and whole models (tiny random LLaMA; the embedded SmolLM2 quantized
with FDB, saved as a packed checkpoint, reloaded) whose logits match the simulated-quantization model.

Tolerances (stated): fp32 scales -> logits within 1e-4 relative to their max |value| (only summation
order differs) and identical greedy tokens; fp16 scales (the packed format) -> the scales themselves are
rounded to fp16 (relative error <= 2^-11), so logits agree to 2e-2 of their max |value|.
"""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from dbllm_lab import cpu_kernel  # noqa: E402
from dbllm_lab import kernel as K  # noqa: E402
from dbllm_lab.packed_linear import DENSE_MIN_ROWS, PackedDualBinaryLinear, pack_model  # noqa: E402
from conftest import packed_checkpoints  # noqa: E402

SEED = int(os.environ.get("DBLLM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def planes(N, Kin, g, seed=0):
    gen = torch.Generator().manual_seed(SEED + seed)
    b1 = torch.randint(0, 2, (N, Kin), generator=gen, dtype=torch.uint8)
    b2 = torch.randint(0, 2, (N, Kin), generator=gen, dtype=torch.uint8)
    a1 = torch.rand(N, Kin // g, generator=gen) * 0.1 + 0.01
    a2 = -torch.rand(N, Kin // g, generator=gen) * 0.05
    return b1, b2, a1, a2


def dense(b1, b2, a1, a2, g):
    return a1.repeat_interleave(g, 1) * b1.float() + a2.repeat_interleave(g, 1) * b2.float()


class SimDualBinaryLinear(nn.Module):
    """Minimal stand-in for layers.DualBinaryLinear at inference: fixed bit-planes and fp32 scales."""

    def __init__(self, b1, b2, a1, a2, g, bias=None):
        super().__init__()
        self.b1, self.b2, self.group_size, self.bias = b1, b2, g, bias
        self.a1, self.a2 = nn.Parameter(a1.clone()), nn.Parameter(a2.clone())

    def bitplanes(self):
        return self.b1, self.b2

    def forward(self, x):
        return F.linear(x, dense(self.b1, self.b2, self.a1, self.a2, self.group_size).to(x.dtype), self.bias)


# -------------------------------------------------------------------------------------------------------
def test_cpu_paths_match_simulated_layer_and_hold_no_dense_weight():
    g = 64
    b1, b2, a1, a2 = planes(48, 128, g)
    bias = torch.randn(48)
    sim = SimDualBinaryLinear(b1, b2, a1, a2, g, bias=bias)
    x = torch.randn(2, 5, 128)
    for backend in ("auto", "cpu", "torch"):
        lin = PackedDualBinaryLinear.from_dual_binary(sim, scale_dtype=torch.float32, backend=backend)
        assert lin.path(x) == ("cpu" if backend == "auto" and cpu_kernel.available() else backend)
        torch.testing.assert_close(lin(x), sim(x), rtol=1e-5, atol=1e-5)
        dense_shaped = [n for n, v in list(lin.state_dict().items()) + list(vars(lin).items())
                        if torch.is_tensor(v) and tuple(v.shape) == (48, 128)]
        assert dense_shaped == [], f"backend={backend}: dense weight held in {dense_shaped}"
    with torch.no_grad():
        lin.a1.mul_(2)  # the packed buffers are the only state: a change shows in the next call
    torch.testing.assert_close(lin.dequantize(), dense(b1, b2, 2 * a1, a2, g))
    torch.testing.assert_close(lin(x), F.linear(x, dense(b1, b2, 2 * a1, a2, g), bias), rtol=1e-5, atol=1e-5)
    assert "bits_per_weight=3" in repr(lin) and "bits_per_weight=2.5" in repr(PackedDualBinaryLinear(128, 8))


def test_cpu_backends_run_their_paths():
    """'cpu': the integer path for 1-4 activation rows, the exact path above; 'cpu-int8' / 'cpu-exact' at every batch;
    a group over cpu_kernel.INT8_MAX_GROUP stays exact on 'cpu'; the integer layout follows in-place changes."""
    if not cpu_kernel.available():
        pytest.skip(f"CPU kernel unavailable: {cpu_kernel.why_unavailable()}")
    g = 64
    lin = PackedDualBinaryLinear.from_bitplanes(*planes(40, 256, g), g)

    def want(x, kind):
        f = cpu_kernel.int8_matmul_reference if kind == "int8" else K.dual_binary_matmul_reference
        return f(x.reshape(-1, 256), lin.p1, lin.p2, lin.a1, lin.a2, g).view(*x.shape[:-1], 40)

    dense = DENSE_MIN_ROWS
    for backend, rows, kind in (("cpu", 1, "int8"), ("cpu", 4, "int8"), ("cpu", 5, "exact"), ("cpu", dense - 1, "exact"),
                                ("cpu", dense, "prefill"), ("cpu-int8", 9, "int8"), ("cpu-exact", 1, "exact"),
                                ("cpu-exact", dense, "exact"), ("auto", 2, "int8")):
        lin.backend = backend
        x = torch.randn(1, rows, 256)
        with torch.no_grad():
            y = lin(x)
            torch.testing.assert_close(y, want(x, kind), rtol=2e-6, atol=2e-6, msg=f"{backend} rows={rows}")
            if kind != "int8":  # which of the two fp32 paths ran, bit for bit
                x2 = x.reshape(rows, 256)
                w = cpu_kernel.dequantize_cpu(lin.p1, lin.p2, lin.a1, lin.a2, g)
                taken = F.linear(x2, w) if kind == "prefill" else \
                    cpu_kernel.dual_binary_matmul_cpu(x2, lin.p1, lin.p2, lin.a1, lin.a2, g)
                assert torch.equal(y.view(rows, 40), taken), f"{backend} rows={rows} did not run the {kind} path"
    lin.backend = "cpu"
    x = torch.randn(1, 256)
    with torch.no_grad():
        lin.a1.mul_(2)  # the integer layout is remade from the changed buffer
        torch.testing.assert_close(lin(x), want(x, "int8"), rtol=2e-6, atol=2e-6)
    wide = PackedDualBinaryLinear.from_bitplanes(*planes(8, 512, 512), 512, backend="cpu")
    xw = torch.randn(1, 512)
    torch.testing.assert_close(wide(xw), K.dual_binary_matmul_reference(xw, wide.p1, wide.p2, wide.a1, wide.a2, 512),
                               rtol=1e-5, atol=1e-5)
    wide.backend = "cpu-int8"
    with pytest.raises(ValueError, match="group_size=512 is too large for the integer path"):
        wide(xw)


def test_fp16_scales_and_dtypes():
    g = 32
    b1, b2, a1, a2 = planes(40, 96, g)
    lin = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g)
    assert lin.a1.dtype == torch.float16 and lin.p1.dtype == torch.int32 and lin.p1.shape == (40, 3)
    ref = F.linear(torch.ones(1, 96), dense(b1, b2, a1.half().float(), a2.half().float(), g))
    torch.testing.assert_close(lin(torch.ones(1, 96)), ref)
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(3, 96).to(dt)
        y = lin(x)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), lin(x.float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_dtype_casts_leave_the_packed_format_alone(scale_dtype):
    """``.to(torch.bfloat16)`` / ``.half()`` / ``.double()`` cast the bias and leave the planes and the scales bit for bit
    (a scale is never rounded to the activations' dtype); a bf16 layer's prefill path multiplies a bf16 ``w_hat``."""
    g = 64
    b1, b2, a1, a2 = planes(24, 128, g)
    lin = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, bias=torch.randn(24), scale_dtype=scale_dtype)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(), lambda m: m.float()):
        cast(lin)
        for k in ("p1", "p2", "a1", "a2"):
            t = getattr(lin, k)
            assert t.dtype == before[k].dtype and torch.equal(t, before[k]), k
    lin.to(torch.bfloat16)
    assert lin.bias.dtype == torch.bfloat16
    if cpu_kernel.available():
        x = torch.randn(DENSE_MIN_ROWS, 128).bfloat16()
        w = cpu_kernel.dequantize_cpu(lin.p1, lin.p2, lin.a1, lin.a2, g, torch.bfloat16)
        assert torch.equal(lin(x), F.linear(x, w) + lin.bias)


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("rows", [3, 12])
def test_kernel_backend_matches_torch_backend(rows):
    """backend='triton' (interpreter here, compiled on CUDA) equals the torch path; GEMV and GEMM sizes."""
    g = 64
    b1, b2, a1, a2 = planes(40, 128, g, seed=rows)
    tri = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, backend="triton")
    ref = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, backend="torch")
    x = torch.randn(rows, 128).half()
    assert tri.path(x) == "triton" and ref.path(x) == "torch"
    torch.testing.assert_close(tri(x).float(), ref(x.float()), rtol=3e-3, atol=3e-3)


def test_state_dict_round_trip():
    g = 64
    b1, b2, a1, a2 = planes(16, 64, g)
    lin = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, bias=torch.randn(16))
    x = torch.randn(4, 64)
    y = lin(x)
    other = PackedDualBinaryLinear(64, 16, group_size=g, bias=True)
    other(x)
    other.load_state_dict(lin.state_dict())
    torch.testing.assert_close(other(x), y)
    assert set(lin.state_dict()) == {"p1", "p2", "a1", "a2", "bias"}
    assert lin.packed_bytes() == 2 * 16 * 2 * 4 + 2 * 16 * 1 * 2


def test_bad_input():
    g = 64
    b1, b2, a1, a2 = planes(16, 128, g)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, 48)
    with pytest.raises(ValueError, match="in_features=128 is not a multiple of group_size=96"):
        PackedDualBinaryLinear(128, 16, group_size=96)
    with pytest.raises(ValueError, match=r"scales have shape \(16, 2\), expected .* \(16, 4\) for group_size=32"):
        PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, 32)
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of 32"):
        PackedDualBinaryLinear.from_bitplanes(b1[:, :100], b2[:, :100], a1, a2, g)
    with pytest.raises(ValueError, match="pack_bits expects only 0/1"):
        PackedDualBinaryLinear.from_bitplanes(b1 * 2, b2, a1, a2, g)
    with pytest.raises(ValueError, match="backend='gpu' is not one of .*'cpu-exact', 'cpu-int8'"):
        PackedDualBinaryLinear(128, 16, backend="gpu")
    with pytest.raises(ValueError, match="scale_dtype=torch.bfloat16 is not one of"):
        PackedDualBinaryLinear(128, 16, scale_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="Linear has no 'bitplanes'"):
        PackedDualBinaryLinear.from_dual_binary(nn.Linear(128, 16))
    lin = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g)
    with pytest.raises(ValueError, match="input has 64 features, PackedDualBinaryLinear expects 128"):
        lin(torch.randn(2, 64))
    with pytest.raises(ValueError, match="input is on meta but the packed weights are on cpu"):
        lin(torch.randn(2, 128, device="meta"))
    with pytest.raises(TypeError, match="activations must be one of"):
        PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, backend="triton")(torch.randn(2, 128).double())
    with pytest.raises(TypeError, match="input has dtype torch.float64; the CPU kernel takes float32"):
        PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, backend="cpu")(torch.randn(2, 128).double())


# -------------------------------------------------------------------------------------------------------
# Whole models
# -------------------------------------------------------------------------------------------------------
def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_tiny_llama_packed_matches_simulated(tiny):
    """Every linear of a random LLaMA -> random dual-binary layer (simulated), then packed: same logits and
    the same greedy generation."""
    from dbllm_lab.model import quantizable_linears, set_module
    g = 32
    sim = tiny
    for i, (name, lin) in enumerate(quantizable_linears(sim).items()):
        out_f, in_f = lin.weight.shape
        set_module(sim, name, SimDualBinaryLinear(*planes(out_f, in_f, g, seed=100 + i), g))
    packed = copy.deepcopy(sim)
    assert len(pack_model(packed, scale_dtype=torch.float32)) == 14
    assert all(isinstance(m, PackedDualBinaryLinear) for m in quantizable_linears(packed).values())
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        ls, lp = sim(ids).logits, packed(ids).logits
    assert _max_rel(lp, ls) < 1e-4
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(packed.generate(ids[:1], **gen), sim.generate(ids[:1], **gen))


@pytest.mark.slow
def test_embedded_model_packed_matches_simulated(embedded, tmp_path):
    """Embedded SmolLM2-135M, FDB g = 64 -> simulated model; packed copies -> logits match and (fp32 scales)
    the greedy continuation is identical. fp32 scales: 1e-4 of max |logit|; fp16 scales (the packed checkpoint
    format): 2e-2 of max |logit|. ~80 s on 2 loaded cores, hence slow. Through the packed checkpoint
    (save_quantized / load_quantized)."""
    from dbllm_lab.model import quantizable_linears
    from dbllm_lab.quantize import quantize_model
    model, tok = embedded
    sim = copy.deepcopy(model)
    quantize_model(sim, method="fdb", group_size=64, progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    for scale_dtype, packed, _ in packed_checkpoints(sim, model, ids, gen, tmp_path):
        assert all(isinstance(m, PackedDualBinaryLinear) and m.a1.dtype == scale_dtype
                   for m in quantizable_linears(packed).values())


