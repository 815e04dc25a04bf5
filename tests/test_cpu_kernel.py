"""The C++ CPU kernel (dbllm_lab.cpu_kernel) vs the pure per-group reference, and the packed model on the CPU.
Its integer path vs ``int8_matmul_reference`` (the same int8 activation rule in torch), its exact integer sums and
its error against the exact fp32 path.

Fresh random data every run (seed in each failure message; replay with DBLLM_TEST_SEED=<seed>); outputs are
poisoned with NaN first, so an element the kernel fails to write fails the comparison. Both builds are checked
on this machine: the native one (AVX-512 where the CPU has it) and the portable loop (forced with
``generic=True``), on ragged shapes (out not a multiple of the 4-row blocks, in = 1..8 words, batch 1..33).

Tolerances (stated): the integer path's group sums are integers (exact); only its fp32 scaling and the fp32 sum over
groups round, so it agrees with the float64 reference to 2e-6 of max |reference|, and all its builds (AVX2 lookups,
AVX2 bit expansion, portable loop) give the same bits. The exact path accumulates in fp32 in a different order than the reference, so results agree to
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
from dbllm_lab import quant as Q
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


@pytest.mark.parametrize("N,Kin,g", [(1, 32, 32), (45, 192, 64), (130, 256, 128)])
def test_dequantize_cpu_is_the_reference_bit_for_bit(N, Kin, g):
    """The prefill path's weight: kernel.dequantize's fp32 values exactly (either scale dtype, either sign, -0 kept),
    and in bf16 / fp16 those values rounded to nearest even, as torch casts them; threads change nothing."""
    for scale_dtype in (torch.float16, torch.float32):
        p1, p2, a1, a2 = make(N, Kin, g, scale_dtype)
        ref = K.dequantize(p1, p2, a1, a2, g)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for threads in (1, 2):
                w = C.dequantize_cpu(p1, p2, a1, a2, g, dtype, threads=threads)
                assert w.dtype == dtype and w.shape == (N, Kin)
                bits = torch.int32 if dtype == torch.float32 else torch.int16
                assert torch.equal(w.view(bits), ref.to(dtype).view(bits)), \
                    f"N={N} K={Kin} g={g} scales={scale_dtype} {dtype} threads={threads}"
    with pytest.raises(ValueError, match="dtype=torch.int8 is not one of"):
        C.dequantize_cpu(p1, p2, a1, a2, g, torch.int8)
    p1, p2, a1, a2 = make(4, 64, 32)
    with pytest.raises(ValueError, match="p1 is not contiguous"):
        C.dequantize_cpu(p1.t().contiguous().t(), p2, a1, a2, 32)


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
    layer = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, 64, backend="cpu-exact")
    gen = torch.Generator().manual_seed(SEED)
    for M in (1, 4, 16):
        x = torch.randn(M, w.shape[1], generator=gen)
        ref = K.dual_binary_matmul_reference(x, layer.p1, layer.p2, layer.a1, layer.a2, 64)
        with torch.no_grad():
            close(layer(x), ref, f"down_proj M={M}")
            close(x @ layer.dequantize().T, ref, f"dense M={M}", rtol=1e-4)


INT8_BUILDS = [("lut", False), ("lut-portable", False), ("vnni", False), ("vnni-portable", False),
               ("expand", False), ("lut", True), ("vnni", True)]
INT8_IDS = ["avx2-lut", "portable-lut", "avx512-vnni", "portable-vnni", "avx2-expand", "generic-build-lut",
            "generic-build-vnni"]


def int8_run(x, p1, p2, a1, a2, g, variant, generic, **kw):
    if variant == "expand" and not C.load().dbl_int8_isa():
        pytest.skip("variant 'expand' needs AVX2")
    return C.int8_matmul_cpu(x, p1, p2, a1, a2, g, variant=variant, generic=generic, **kw)


@pytest.mark.parametrize("variant,generic", INT8_BUILDS, ids=INT8_IDS)
@pytest.mark.parametrize("N,Kin,g", [(1, 32, 32), (7, 96, 32), (45, 192, 64), (130, 256, 128), (33, 512, 256),
                                     (64, 128, 64)])
def test_int8_matches_its_reference_on_ragged_shapes(N, Kin, g, variant, generic):
    """Batch 1-4 (the decode path) and above, out not a multiple of the 32-row blocks, every group size allowed;
    every build and layout gives the same bits (those of this CPU's default variant)."""
    for M in (1, 2, 3, 4, 5, 9, 17):
        for scale_dtype in (torch.float16, torch.float32):
            p1, p2, a1, a2 = make(N, Kin, g, scale_dtype, seed=M)
            x = torch.randn(M, Kin, generator=torch.Generator().manual_seed(SEED + 7 * M))
            x[0, :g] = 0.0  # a group of zeros: d = 0
            ref = C.int8_matmul_reference(x, p1, p2, a1, a2, g)
            out = torch.full((M, N), float("nan"))
            y = int8_run(x, p1, p2, a1, a2, g, variant, generic, out=out)
            assert y.data_ptr() == out.data_ptr()
            what = f"N={N} K={Kin} g={g} M={M} scales={scale_dtype} {variant} generic={generic}"
            close(y, ref, what, rtol=2e-6)
            assert torch.equal(y, C.int8_matmul_cpu(x, p1, p2, a1, a2, g)), f"{what}: other bits than the default variant"


@pytest.mark.parametrize("variant,generic", INT8_BUILDS, ids=INT8_IDS)
def test_int8_group_sums_are_exact(variant, generic):
    """Integer activations with 127 or -127 in every group (d = 1 exactly) and scales 1 and 256: the output is the
    integer S1 + 256 S2 of the bit-plane sums, compared bit for bit."""
    N, Kin, g = 70, 512, 64
    gen = torch.Generator().manual_seed(SEED)
    b1 = (torch.rand(N, Kin, generator=gen) < 0.5).to(torch.uint8)
    b2 = (torch.rand(N, Kin, generator=gen) < 0.5).to(torch.uint8)
    for M in (1, 4, 6):
        x = torch.randint(-127, 128, (M, Kin), generator=gen)
        x.view(M, -1, g)[:, :, 0] = 127 * (2 * torch.randint(0, 2, (M, Kin // g), generator=gen) - 1)
        ones = torch.ones(N, Kin // g, dtype=torch.float16)
        y = int8_run(x.float(), pack_bits(b1), pack_bits(b2), ones, 256 * ones, g, variant, generic)
        want = (x @ b1.long().T + 256 * (x @ b2.long().T)).float()
        assert torch.equal(y, want), f"M={M}: {(y - want).abs().max().item()} off, seed={SEED}"


def test_int8_layouts_put_each_bit_where_documented():
    """repack_int8's two layouts, read back bit by bit as their docstring (and the portable C++ loops) index them:
    'lut' byte c of row POS[r] at [block, c, r]; 'vnni' bit 4i + j of word (c, h) = row 16h + i, column 4c + j.
    Padding rows (N = 45 -> 64) are zero."""
    N, Kin, g = 45, 96, 32
    b = (torch.rand(2, N, Kin, generator=torch.Generator().manual_seed(SEED)) < 0.5).to(torch.uint8)
    p1, p2 = pack_bits(b[0]), pack_bits(b[1])
    a = torch.randn(N, Kin // g, generator=torch.Generator().manual_seed(SEED)).half()
    full = torch.cat([b, b.new_zeros(2, 64 - N, Kin)], 1)  # the planes with the zero padding rows
    lut, vnni = C.repack_int8(p1, p2, a, a, g, "lut"), C.repack_int8(p1, p2, a, a, g, "vnni")
    assert lut.w1.shape == vnni.w1.shape == (2, Kin // 8, 32) and lut.layout == "lut" and vnni.layout == "vnni"
    for plane, (wl, wv) in enumerate(((lut.w1, vnni.w1), (lut.w2, vnni.w2))):
        lut_bits = (wl.view(2, Kin // 8, 32, 1).long() >> torch.arange(8)) & 1  # block, byte c, slot, bit
        vnni_bits = (wv.reshape(2, -1, 1).long() >> torch.arange(8)) & 1  # block, byte, bit
        for n in range(64):
            rb, r = divmod(n, 32)
            want = full[plane, n]
            got_lut = lut_bits[rb, :, C._POS.index(r)].reshape(-1)  # columns 8c + i in order
            k = torch.arange(Kin)
            bit = 64 * (2 * (k // 4) + r // 16) + 4 * (r % 16) + k % 4
            got_vnni = vnni_bits[rb].reshape(-1)[bit]
            assert torch.equal(got_lut.to(torch.uint8), want), f"lut plane {plane + 1} row {n}"
            assert torch.equal(got_vnni.to(torch.uint8), want), f"vnni plane {plane + 1} row {n}"
    assert torch.equal(lut.s1, vnni.s1) and torch.equal(lut.s1[1, :, 13:], torch.zeros(Kin // g, 19).half())


def test_int8_error_against_the_exact_path():
    """Random N(0, 1) activations, 256 x 1024, batch 4: relative RMS error of the integer path against the exact
    fp32 path 0.54-0.67% over 30 seeds (measured), as int8 rounding predicts: max|x| / 127 / sqrt(12) ~ 0.55% of
    a group's RMS for 64 Gaussian values. Bound 0.75%."""
    p1, p2, a1, a2 = make(256, 1024, 64)
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(SEED))
    exact = C.dual_binary_matmul_cpu(x, p1, p2, a1, a2, 64)
    err = ((C.int8_matmul_cpu(x, p1, p2, a1, a2, 64) - exact).norm() / exact.norm()).item()
    assert err < 7.5e-3, f"relative RMS error {err:.2e} >= 7.5e-3, seed={SEED}"


def test_int8_error_on_real_activations(embedded):
    """The embedded model's layer-0 q_proj and down_proj (FDB clip init, g = 64) on their real inputs for a fixed
    prompt (deterministic): relative RMS error against the exact path measured 4.28e-3 and 9.52e-3 (down_proj's
    inputs have outliers: coarser int8 steps); bounds 1.25x those."""
    from dbllm_lab.packed_linear import PackedDualBinaryLinear
    from dbllm_lab.quant import dual_binarize, fdb_init
    model, tok = embedded
    block, inputs = model.model.layers[0], {}
    hooks = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0][0]))
             for n in ("self_attn.q_proj", "mlp.down_proj")]
    ids = tok("The history of the city of Paris begins with a small settlement on an island in the river Seine.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for name, bound in (("self_attn.q_proj", 4.28e-3 * 1.25), ("mlp.down_proj", 9.52e-3 * 1.25)):
        w = block.get_submodule(name).weight.detach().float()
        a1, a2 = fdb_init(w, 64)
        layer = PackedDualBinaryLinear.from_bitplanes(*dual_binarize(w, a1, a2, 64), a1, a2, 64)
        x = inputs[name].float().contiguous()
        with torch.no_grad():
            layer.backend = "cpu-exact"
            exact = layer(x)
            layer.backend = "cpu-int8"
            err = ((layer(x) - exact).norm() / exact.norm()).item()
        assert err < bound, f"{name}: relative RMS error {err:.3e} >= {bound:.3e}"


def test_int8_bad_input():
    p1, p2, a1, a2 = make(16, 512, 64)
    x = torch.randn(2, 512)
    with pytest.raises(ValueError, match="variant='avx512' is not one of"):
        C.int8_matmul_cpu(x, p1, p2, a1, a2, 64, variant="avx512")
    with pytest.raises(ValueError, match="layout='vnni512' is not one of"):
        C.repack_int8(p1, p2, a1, a2, 64, layout="vnni512")
    with pytest.raises(ValueError, match="packed is in layout 'lut'; variant 'vnni' reads 'vnni'"):
        C.int8_matmul_cpu(x, p1, p2, a1, a2, 64, variant="vnni", packed=C.repack_int8(p1, p2, a1, a2, 64, "lut"))
    p1, p2, a1, a2 = make(16, 512, 512)
    with pytest.raises(ValueError, match="group_size=512 is too large for the integer path"):
        C.int8_matmul_cpu(x, p1, p2, a1, a2, 512)


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
        assert all(torch.equal(x, y) for x, y in zip(Q.fdb_round_cpu(w, a1, a2, threads=threads), want))
        b1, b2, w_hat = Q.fdb_round_cpu(w, a1, a2, dequantize=True, threads=threads)
        assert torch.equal(b1, want[0]) and torch.equal(b2, want[1])
        assert torch.equal(w_hat.view(torch.int32), want_hat.view(torch.int32))  # bits, signed zeros included
    got = fdb_round(w, a1[..., None], a2[..., None], dequantize=True)  # dispatches to the C++ form
    assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(got, (*want, want_hat)))


def test_fdb_round_cpu_bad_input():
    w = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match="float32"):
        Q.fdb_round_cpu(w.double(), torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        Q.fdb_round_cpu(w, torch.ones(3, 2), torch.ones(3, 2))


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
        got = Q.fdb_scale_grads_cpu(grad, b1, b2, threads=threads)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * g ** 0.5)
        assert got[0][0, 0].item() == 0.0
    for x, y in zip(fdb_scale_grads(grad, b1, b2), want):  # dispatches to the C++ form
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * g ** 0.5)


def test_fdb_scale_grads_cpu_bad_input():
    g, b = torch.randn(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="float32"):
        Q.fdb_scale_grads_cpu(g.double(), b, b)
    with pytest.raises(TypeError, match="uint8"):
        Q.fdb_scale_grads_cpu(g, b.bool(), b)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        Q.fdb_scale_grads_cpu(g, b[:, :, :2], b)


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


def test_cache_key_tells_cpus_with_one_model_name_apart(monkeypatch):
    """Virtual machines report one model name ('AMD EPYC') for different CPUs; a -march=native library built on
    one must not be loaded on another, so the cache path follows the whole signature (family, model, ISA)."""
    sig = C.cpu_signature()
    assert C.cpu_model() in sig
    here = C._library_path(["-O3"], [])
    monkeypatch.setattr(C, "cpu_signature", lambda: sig.replace("avx512f", "") + " another model")
    assert C._library_path(["-O3"], []) != here
    monkeypatch.setattr(C, "cpu_signature", lambda: sig)
    assert C._library_path(["-O3"], []) == here
