"""The C++ CPU kernel (dbllm_lab.cpu_kernel) vs the pure per-group reference, and the packed model on the CPU.

Fresh random data every run (seed in each failure message; replay with DBLLM_TEST_SEED=<seed>); outputs are
poisoned with NaN first, so an element the kernel fails to write fails the comparison. Both builds are checked
on this machine: the native one (AVX-512 where the CPU has it) and the portable loop (forced with
``generic=True``), on ragged shapes (out not a multiple of the 4-row blocks, in = 1..8 words, batch 1..33).

Tolerances (stated): the kernel accumulates in fp32 in a different order than the reference, so results agree to
1e-5 of max |reference|. The packed embedded model (1 decoder block, FDB g = 64, through a packed checkpoint)
matches the DualBinaryLinear model it was saved from to 1e-4 of max |logit| with fp32 scales and 2e-2 with fp16
scales (the packed format: scales rounded to fp16, relative error <= 2^-11 each).
"""
import copy
import os

import pytest
import torch

from dbllm_lab import cpu_kernel as C
from dbllm_lab import kernel as K
from dbllm_lab.packing import pack_bits
from conftest import packed_checkpoints  # noqa: E402

pytestmark = pytest.mark.skipif(not C.available(), reason=f"CPU kernel unavailable: {C.why_unavailable()}")
SEED = int(os.environ.get("DBLLM_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
BUILDS = [False, True]  # native, portable


def make(N, Kin, g, scale_dtype=torch.float16, seed=0):
    gen = torch.Generator().manual_seed(SEED + seed)
    b1 = (torch.rand(N, Kin, generator=gen) < 0.3).to(torch.uint8)
    b2 = (torch.rand(N, Kin, generator=gen) < 0.5).to(torch.uint8)
    a1 = (torch.randn(N, Kin // g, generator=gen) * 0.1).to(scale_dtype)  # either sign: mirrored groups too
    a2 = (torch.randn(N, Kin // g, generator=gen) * 0.05).to(scale_dtype)
    return pack_bits(b1), pack_bits(b2), a1, a2


def close(y, ref, what, rtol=1e-5):
    assert torch.isfinite(y).all(), f"{what}: unwritten (NaN-poisoned) or non-finite output, seed={SEED}"
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    assert err < rtol, f"{what}: max |y - ref| / max |ref| = {err:.2e} >= {rtol}, seed={SEED}"


@pytest.mark.parametrize("generic", BUILDS, ids=["native", "portable"])
@pytest.mark.parametrize("N,Kin,g", [(1, 32, 32), (7, 96, 32), (130, 256, 128), (45, 192, 64), (6, 64, 64)])
def test_matches_reference_on_ragged_shapes(N, Kin, g, generic):
    for M in (1, 2, 3, 5, 8, 9, 13, 16, 17, 33):
        for scale_dtype in (torch.float16, torch.float32):
            p1, p2, a1, a2 = make(N, Kin, g, scale_dtype, seed=M)
            x = torch.randn(M, Kin, generator=torch.Generator().manual_seed(SEED + 7 * M))
            ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, g)
            out = torch.full((M, N), float("nan"))
            y = C.dual_binary_matmul_cpu(x, p1, p2, a1, a2, g, out=out, generic=generic)
            assert y.data_ptr() == out.data_ptr()
            close(y, ref, f"N={N} K={Kin} g={g} M={M} scales={scale_dtype} generic={generic}")


@pytest.mark.parametrize("generic", BUILDS, ids=["native", "portable"])
def test_activation_dtypes_leading_dims_and_threads(generic):
    p1, p2, a1, a2 = make(40, 128, 64)
    x = torch.randn(2, 3, 128)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, 64)
    y = C.dual_binary_matmul_cpu(x, p1, p2, a1, a2, 64, generic=generic)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    close(y, ref, "leading dims")
    close(C.dual_binary_matmul_cpu(x, p1, p2, a1, a2, 64, threads=1, generic=generic), ref, "1 thread")
    for dt, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):  # output rounding of x.dtype
        xd = x.to(dt)
        y = C.dual_binary_matmul_cpu(xd, p1, p2, a1, a2, 64, generic=generic)
        assert y.dtype == dt
        close(y, K.dual_binary_matmul_reference(xd, p1, p2, a1, a2, 64), f"{dt}", rtol=tol)
    assert C.dual_binary_matmul_cpu(torch.randn(0, 128), p1, p2, a1, a2, 64).shape == (0, 40)


def test_generate_arguments():
    from dbllm_lab.generate import greedy_generate, set_backend
    with pytest.raises(ValueError, match="max_new_tokens=1 must be an int >= 2"):
        greedy_generate(None, None, "hi", max_new_tokens=1)
    with pytest.raises(ValueError, match="backend='gpu' is not one of"):
        set_backend(torch.nn.Linear(2, 2), "gpu")


def test_dispatcher_picks_the_cpu_kernel():
    p1, p2, a1, a2 = make(24, 64, 32)
    x = torch.randn(3, 64)
    ref = K.dual_binary_matmul_reference(x, p1, p2, a1, a2, 32)
    for backend in ("auto", "cpu", "torch"):
        close(K.dual_binary_matmul(x, p1, p2, a1, a2, 32, backend=backend), ref, backend)


def test_bad_input():
    p1, p2, a1, a2 = make(16, 128, 64)
    x = torch.randn(2, 128)
    run = C.dual_binary_matmul_cpu
    with pytest.raises(TypeError, match="x has dtype torch.float64; activations must be one of"):
        run(x.double(), p1, p2, a1, a2, 64)
    with pytest.raises(TypeError, match="p1 has dtype torch.int64; packed bit-planes must be int32"):
        run(x, p1.long(), p2, a1, a2, 64)
    with pytest.raises(TypeError, match="a1 has dtype torch.bfloat16; scales must be one of"):
        run(x, p1, p2, a1.bfloat16(), a2, 64)
    with pytest.raises(TypeError, match="a1 and a2 dtypes differ"):
        run(x, p1, p2, a1.float(), a2, 64)
    with pytest.raises(ValueError, match=r"x has in_features=96 but the bit-planes hold 4 words x 32 = 128"):
        run(torch.randn(2, 96), p1, p2, a1, a2, 64)
    with pytest.raises(ValueError, match=r"scales have shape \(16, 2\), expected .* \(16, 4\) for group_size=32"):
        run(x, p1, p2, a1, a2, 32)
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        run(x, p1, p2, a1, a2, 48)
    with pytest.raises(ValueError, match=r"x is not contiguous .* pass x.contiguous\(\)"):
        run(torch.randn(128, 2).t(), p1, p2, a1, a2, 64)
    with pytest.raises(ValueError, match="p1 is not contiguous"):
        run(x, torch.randint(0, 9, (4, 16), dtype=torch.int32).t(), p2, a1, a2, 64)
    with pytest.raises(ValueError, match="the CPU kernel got tensors on meta"):
        run(*(t.to("meta") for t in (x, p1, p2, a1, a2)), 64)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 16\) float32"):
        run(x, p1, p2, a1, a2, 64, out=torch.empty(2, 15))


def test_real_embedded_layer(embedded):
    """FDB bit-planes of the embedded model's layer-0 down_proj (576 x 1536): kernel == reference == dense."""
    from dbllm_lab.packed_linear import PackedDualBinaryLinear
    from dbllm_lab.quant import dual_binarize, fdb_init
    model, _ = embedded
    w = model.model.layers[0].mlp.down_proj.weight.detach().float()
    a1, a2 = fdb_init(w, 64)
    b1, b2 = dual_binarize(w, a1, a2, 64)
    layer = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, 64, backend="cpu")
    gen = torch.Generator().manual_seed(SEED)
    for M in (1, 4, 16):
        x = torch.randn(M, w.shape[1], generator=gen)
        ref = K.dual_binary_matmul_reference(x, layer.p1, layer.p2, layer.a1, layer.a2, 64)
        with torch.no_grad():
            close(layer(x), ref, f"down_proj M={M}")
            close(x @ layer.dequantize().T, ref, f"dense M={M}", rtol=1e-4)


def _dense_tensors(module):
    """Floating tensors of shape (out, in) anywhere on a packed layer (buffers, parameters, attributes)."""
    shape = (module.out_features, module.in_features)
    found = [n for n, t in list(module.named_buffers()) + list(module.named_parameters())
             if t is not None and t.is_floating_point() and tuple(t.shape) == shape]
    found += [n for n, v in vars(module).items() if torch.is_tensor(v) and tuple(v.shape) == shape]
    return found


def test_packed_embedded_checkpoint_matches_dual_binary_model(embedded, tmp_path):
    """1 decoder block of the embedded model, FDB (clip init, g = 64) -> DualBinaryLinear model -> packed checkpoint
    -> reloaded on the CPU kernel: logits within the stated tolerance, identical greedy tokens with fp32 scales,
    and no dense weight anywhere in the packed layers (before and after a forward)."""
    from dbllm_lab.generate import greedy_generate, set_backend
    from dbllm_lab.model import quantizable_linears
    from dbllm_lab.packed_linear import PackedDualBinaryLinear
    from dbllm_lab.quantize import quantize_model
    model, tok = embedded
    base = copy.deepcopy(model)
    base.model.layers = base.model.layers[:1]
    base.config.num_hidden_layers = 1
    sim = copy.deepcopy(base)
    quantize_model(sim, "fdb", group_size=64, init="clip", progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    for scale_dtype, packed, lp in packed_checkpoints(sim, base, ids, gen, tmp_path):
        layers = quantizable_linears(packed)
        assert len(layers) == 7 and all(isinstance(m, PackedDualBinaryLinear) for m in layers.values())
        assert all(m.path(ids.float()) == "cpu" for m in layers.values())
        if scale_dtype == torch.float32:
            with torch.no_grad():
                out_s = sim.generate(ids, **gen)
            res = greedy_generate(packed, tok, "The capital of France is", max_new_tokens=6)  # the CLI's path
            assert res["token_ids"] == out_s[0, ids.shape[1]:].tolist() and res["decode_tokens_per_s"] > 0
            assert set_backend(packed, "torch") == 7
            with torch.no_grad():
                assert ((packed(ids).logits - lp).abs().max() / lp.abs().max()).item() < 1e-5
            set_backend(packed, "auto")
        for name, m in layers.items():
            assert _dense_tensors(m) == [], f"{name} holds a dense weight: {_dense_tensors(m)}"
            assert {n for n, _ in m.named_buffers()} == {"p1", "p2", "a1", "a2"}
            assert list(m.parameters()) == []


def _hard_scales(R, G, gen):
    """Scales of every kind fdb_round must handle: random signs and sizes, 2-bit grids of both orientations,
    and degenerate levels (a2 = 0, a1 = 0, a1 = -a2, a1 = a2, both zero, -0.0)."""
    a1, a2 = torch.randn(R, G, generator=gen), torch.randn(R, G, generator=gen) * 0.5
    kind = torch.randint(0, 8, (R, G), generator=gen)
    s = a2.abs() + 0.01
    a1 = torch.where(kind == 1, 2 * s, a1)
    a2 = torch.where(kind == 1, -s, a2)
    a1 = torch.where(kind == 2, -2 * s, a1)
    a2 = torch.where(kind == 2, s, a2)
    a2 = torch.where(kind == 3, torch.zeros_like(a2), a2)
    a1 = torch.where(kind == 4, torch.zeros_like(a1), a1)
    a1 = torch.where(kind == 5, -a2, a1)
    a1 = torch.where(kind == 6, a2, a1)
    a1 = torch.where(kind == 7, torch.full_like(a1, -0.0), a1)
    a2 = torch.where(kind == 7, torch.full_like(a2, -0.0), a2)
    return a1, a2


@pytest.mark.parametrize("R,G,g", [(1, 1, 1), (3, 5, 7), (64, 9, 64), (17, 2, 128)])
def test_fdb_round_cpu_equals_the_torch_rule(R, G, g):
    """The C++ FDB rounding gives the torch rule's codes bit for bit: random weights, weights exactly on every
    midpoint and grid tie, and every kind of degenerate scale."""
    from dbllm_lab.quant import fdb_round, fdb_round_torch
    gen = torch.Generator().manual_seed(R * 1000 + g)
    a1, a2 = _hard_scales(R, G, gen)
    levels = torch.stack([torch.zeros_like(a1), a2, a1, a1 + a2], -1).sort(-1).values
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    s = a2.abs()[..., None]
    ties = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                      (torch.arange(-4, 5) + 0.5) * s, levels], -1)  # (R, G, 20)
    pick = torch.randint(0, ties.shape[-1], (R, G, g), generator=gen)
    w = torch.where(torch.rand(R, G, g, generator=gen) < 0.5, ties.gather(-1, pick),
                    torch.randn(R, G, g, generator=gen))
    want = fdb_round_torch(w, a1[..., None], a2[..., None])
    want_hat = a1[..., None] * want[0].float() + a2[..., None] * want[1].float()
    for threads in (1, 2):
        assert all(torch.equal(x, y) for x, y in zip(C.fdb_round_cpu(w, a1, a2, threads=threads), want))
        b1, b2, w_hat = C.fdb_round_cpu(w, a1, a2, dequantize=True, threads=threads)
        assert torch.equal(b1, want[0]) and torch.equal(b2, want[1])
        assert torch.equal(w_hat.view(torch.int32), want_hat.view(torch.int32))  # bits, signed zeros included
    got = fdb_round(w, a1[..., None], a2[..., None], dequantize=True)  # dispatches to the C++ form
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(got, (*want, want_hat)))


def test_fdb_round_cpu_bad_input():
    w = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="float32"):
        C.fdb_round_cpu(w.double(), torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        C.fdb_round_cpu(w, torch.ones(3, 2), torch.ones(3, 2))


@pytest.mark.parametrize("R,G,g", [(1, 1, 1), (3, 5, 7), (64, 9, 64), (17, 2, 128)])
def test_fdb_scale_grads_cpu_equals_torch_sums(R, G, g):
    """The C++ scale gradients are torch's sums over each group of grad * b1 and grad * b2, to fp32 rounding (another
    summation order); a group whose codes are all 0 gets exactly 0."""
    from dbllm_lab.quant import fdb_scale_grads
    gen = torch.Generator().manual_seed(R * 100 + g)
    grad = torch.randn(R, G, g, generator=gen)
    b1 = (torch.rand(R, G, g, generator=gen) < 0.5).to(torch.uint8)
    b2 = (torch.rand(R, G, g, generator=gen) < 0.5).to(torch.uint8)
    b1[0, 0] = 0
    want = ((grad * b1.float()).sum(-1), (grad * b2.float()).sum(-1))
    for threads in (1, 2):
        got = C.fdb_scale_grads_cpu(grad, b1, b2, threads=threads)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * g ** 0.5)
        assert got[0][0, 0].item() == 0.0
    for x, y in zip(fdb_scale_grads(grad, b1, b2), want):  # dispatches to the C++ form
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * g ** 0.5)


def test_fdb_scale_grads_cpu_bad_input():
    g, b = torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="float32"):
        C.fdb_scale_grads_cpu(g.double(), b, b)
    with pytest.raises(TypeError, match="uint8"):
        C.fdb_scale_grads_cpu(g, b.bool(), b)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        C.fdb_scale_grads_cpu(g, b[:, :, :2], b)


def test_training_step_is_the_same_with_either_rounding(monkeypatch):
    """A DualBinaryLinear's forward and the latent weight's gradient (what training runs) are bit for bit the same
    whether the binaries and the scale gradients come from the C++ forms or the torch forms; the scale gradients
    agree to fp32 rounding (the C++ sums run in another order)."""
    from dbllm_lab import quant
    from dbllm_lab.layers import DualBinaryLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 40, bias=False)
    x = torch.randn(3, 192)
    res = []
    for cpp in (True, False):
        monkeypatch.setattr(quant, "FDB_ROUND_CPP", cpp)
        layer = DualBinaryLinear.from_linear(lin, group_size=64, train_latent=True)
        with torch.no_grad():  # off the 2-bit grid, as after training
            layer.a1.mul_(1.1)
        y = layer(x)
        y.pow(2).sum().backward()
        res.append([y, layer.weight.grad, layer.a1.grad, layer.a2.grad])
    assert all(torch.equal(p, q) for p, q in zip(res[0][:2], res[1][:2]))
    for p, q in zip(res[0][2:], res[1][2:]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-4)
