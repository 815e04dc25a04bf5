import copy

import pytest
import torch

from dbllm_lab.gptq import gptq_layer
from dbllm_lab.layers import DualBinaryLinear
from dbllm_lab.quantize import quantize_model
from dbllm_lab.packing import pack_bits, unpack_bits
from dbllm_lab.quant import (dequantize_rtn, dual_binarize, dual_binarize_heaviside, dual_binary_dequantize,
                             fake_quantize, fdb_from_rtn, fdb_init, fdb_round, quantize_rtn, round_half_to_zero,
                             sign_binarize)


def _weights():
    torch.manual_seed(0)
    return [torch.randn(48, 256), torch.randn(16, 128) * 0.02 + 0.01, torch.rand(8, 64) - 0.8]


@pytest.mark.parametrize("clip", [False, True])
def test_fdb_from_2bit_grid_reproduces_the_grid_bit_for_bit(clip):
    for w in _weights():
        q, s, z = quantize_rtn(w, 2, 64 if w.shape[1] >= 64 else 32, clip)
        g = 64 if w.shape[1] >= 64 else 32
        a1, a2 = fdb_from_rtn(s, z)
        b1, b2 = dual_binarize(w, a1, a2, g)
        assert torch.equal(dual_binary_dequantize(b1, b2, a1, a2, g), dequantize_rtn(q, s, z, g))


@pytest.mark.parametrize("clip", [False, True])
def test_fdb_from_real_layer_grid_bit_for_bit(embedded, clip):
    """Every layer of blocks 0 and 3: the GGUF weights sit on a grid, so exact half-step ties occur; they must be
    broken the same way as RTN's."""
    from dbllm_lab.model import quantizable_linears
    for i in (0, 3):
        for name, lin in quantizable_linears(embedded[0].model.layers[i]).items():
            w = lin.weight.detach()
            q, s, z = quantize_rtn(w, 2, 64, clip_search=clip)
            a1, a2 = fdb_from_rtn(s, z)
            b1, b2 = dual_binarize(w, a1, a2, 64)
            assert torch.equal(dual_binary_dequantize(b1, b2, a1, a2, 64), dequantize_rtn(q, s, z, 64)), (i, name)


def test_heaviside_formulas_equal_nearest_level_when_levels_are_ordered():
    torch.manual_seed(1)
    w = torch.randn(32, 128)
    a1 = torch.rand(32, 2) + 0.5                  # a1 > 0
    a2 = -torch.rand(32, 2) * a1 * 0.99           # 0 > a2 > -a1  (so a1 + a2 > 0)
    assert all(torch.equal(x, y) for x, y in zip(dual_binarize_heaviside(w, a1, a2, 64), dual_binarize(w, a1, a2, 64)))
    # the initialisation's own scales (a1 = 2s, a2 = -s) are of that kind
    a1, a2 = fdb_init(w, 64, "clip", "fixed")
    assert all(torch.equal(x, y) for x, y in zip(dual_binarize_heaviside(w, a1, a2, 64), dual_binarize(w, a1, a2, 64)))


def test_heaviside_formulas_fail_when_a1_plus_a2_is_negative():
    # a1 > 0 > a2 alone is not enough: a1 = 1, a2 = -3 gives levels -3 < -2 < 0 < 1 and w = -1.9 -> -2
    w, a1, a2 = torch.full((1, 32), -1.9), torch.ones(1, 1), torch.full((1, 1), -3.0)
    b1, b2 = dual_binarize(w, a1, a2, 32)
    assert (dual_binary_dequantize(b1, b2, a1, a2, 32) == -2).all()
    h1, h2 = dual_binarize_heaviside(w, a1, a2, 32)
    assert (dual_binary_dequantize(h1, h2, a1, a2, 32) == -3).all()


def test_nearest_level_is_optimal_against_brute_force():
    torch.manual_seed(2)
    w, a1, a2 = torch.randn(4, 64), torch.randn(4, 2), torch.randn(4, 2)
    b1, b2 = dual_binarize(w, a1, a2, 32)
    err = (dual_binary_dequantize(b1, b2, a1, a2, 32) - w).abs()
    for c1 in (0, 1):
        for c2 in (0, 1):
            other = dual_binary_dequantize(torch.full_like(b1, c1), torch.full_like(b2, c2), a1, a2, 32)
            assert (err <= (other - w).abs() + 1e-7).all()


def _argmin_round(w, a1, a2):
    """The literal rule: nearest of (0, a2, a1, a1 + a2) by |w - l|, ties to the smaller |l|, then the first code."""
    levels = torch.stack(torch.broadcast_tensors(torch.zeros_like(a1), a2, a1, a1 + a2), -1)
    dist = (w[..., None] - levels).abs()
    tied = dist == dist.amin(-1, keepdim=True)
    idx = torch.where(tied, levels.abs().expand_as(dist), torch.inf).argmin(-1)
    return (idx >> 1).to(torch.uint8), (idx & 1).to(torch.uint8)


def _dyadic_case(seed, grid=False):
    """Scales that are small integers times 2^-6, so every level and midpoint is exact in fp32 and fp64; weights
    exactly on every midpoint and level, plus random ones; equal levels (a2 = 0, a1 = -a2, a1 = a2) included."""
    g = torch.Generator().manual_seed(seed)
    G = 64
    a1 = torch.randint(-12, 13, (G, 1), generator=g).double() / 64
    a2 = torch.randint(-12, 13, (G, 1), generator=g).double() / 64
    a2[:4], a1[4:8], a1[8:12] = 0, -a2[4:8], a2[8:12]
    if grid:
        a2 = torch.randint(1, 12, (G, 1), generator=g).double() / 64 * (torch.randint(0, 2, (G, 1), generator=g) * 2 - 1)
        a1 = 2 * a2.abs() * (torch.randint(0, 2, (G, 1), generator=g) * 2 - 1)
    levels = torch.stack(torch.broadcast_tensors(torch.zeros_like(a1), a2, a1, a1 + a2), -1)[:, 0]
    srt = levels.sort(-1).values
    w = torch.cat([srt, (srt[:, 1:] + srt[:, :-1]) / 2, srt[:, :1] - 0.5 + (srt[:, -1:] - srt[:, :1] + 1)
                   * torch.rand(G, 57, generator=g, dtype=torch.float64)], 1)
    return w, a1, a2


@pytest.mark.parametrize("seed", range(4))
def test_fdb_round_is_the_nearest_level_bit_for_bit_including_ties(seed):
    """Exact arithmetic (dyadic scales): weights on every midpoint go to the level nearer zero, equal levels take
    the first code, everything else the nearest level, exactly as the literal argmin in fp64."""
    w, a1, a2 = _dyadic_case(seed)
    b1, b2 = fdb_round(w.float(), a1.float(), a2.float())
    r1, r2 = _argmin_round(w, a1, a2)
    assert torch.equal(b1, r1) and torch.equal(b2, r2)
    ties = w[:, 4:7]  # the midpoints themselves
    assert ties.numel() == 192 and torch.equal(b1[:, 4:7], r1[:, 4:7])


@pytest.mark.parametrize("seed", range(4))
def test_fdb_round_on_a_grid_is_rtn_including_half_steps(seed):
    """2-bit-grid groups: RTN's arithmetic, so half steps round toward zero like round_half_to_zero."""
    w, a1, a2 = _dyadic_case(seed, grid=True)
    b1, b2 = fdb_round(w.float(), a1.float(), a2.float())
    s = a2.abs().float()
    lo = torch.minimum(torch.minimum(a1, a2), a1 + a2).clamp(max=0).float()
    hi = torch.maximum(torch.maximum(a1, a2), a1 + a2).clamp(min=0).float()
    k = torch.maximum(torch.minimum(round_half_to_zero(w.float() / s), hi / s), lo / s)
    assert torch.equal(a1.float() * b1 + a2.float() * b2, k * s)


def test_fdb_round_equals_the_argmin_form_on_real_and_moved_scales(embedded):
    """On real weights (GGUF values: many exact repeats) with the clip init and scales moved off it, in both
    orientations, the single rounding gives the literal argmin's bits, bit for bit."""
    from dbllm_lab.model import quantizable_linears
    g = torch.Generator().manual_seed(0)
    for name, lin in list(quantizable_linears(embedded[0].model.layers[0]).items())[:3]:
        w = lin.weight.detach().float()
        wg = w.reshape(w.shape[0], -1, 64)
        a1, a2 = fdb_init(w, 64)
        for s1, s2 in ((a1 * 1.01, a2 * 0.97), (a1 * (1 + 0.3 * torch.randn(a1.shape, generator=g)),
                                                   a2 * (1 + 0.3 * torch.randn(a2.shape, generator=g)))):
            b = fdb_round(wg, s1[..., None], s2[..., None])
            r = _argmin_round(wg, s1[..., None], s2[..., None])
            assert torch.equal(b[0], r[0]) and torch.equal(b[1], r[1]), name


def test_every_fdb_path_uses_the_one_rounding(tiny):
    """dual_binarize, the layer's forward (training and inference), its bit-planes and the packed format all give
    fdb_round's levels."""
    from dbllm_lab.kernel import dequantize
    from dbllm_lab.layers import fdb_layers
    from dbllm_lab.quantize import quantize_model
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    for m in fdb_layers(tiny).values():
        with torch.no_grad():
            m.a1.mul_(1.1)  # off the grid, as after training
        w = m.weight.detach()
        b1, b2 = fdb_round(w.reshape(w.shape[0], -1, 32), m.a1.detach()[..., None], m.a2.detach()[..., None])
        b1, b2 = b1.reshape(w.shape), b2.reshape(w.shape)
        ref = dual_binary_dequantize(b1, b2, m.a1.detach(), m.a2.detach(), 32)
        assert all(torch.equal(x, y) for x, y in zip(dual_binarize(w, m.a1, m.a2, 32), (b1, b2)))
        assert all(torch.equal(x, y) for x, y in zip(m.bitplanes(), (b1, b2)))
        assert torch.equal(m.dequantized_weight().detach(), ref)
        p1, p2 = pack_bits(b1), pack_bits(b2)
        assert torch.equal(dequantize(p1, p2, m.a1.detach(), m.a2.detach(), 32), ref)


def test_init_options_order_and_sparsity():
    w = _weights()[0]
    err = {}
    for init in ("minmax", "clip"):
        for o in ("fixed", "per-group"):
            a1, a2 = fdb_init(w, 64, init, o)
            b1, b2 = dual_binarize(w, a1, a2, 64)
            err[init, o] = (dual_binary_dequantize(b1, b2, a1, a2, 64) - w).pow(2).sum().item()
    assert err["clip", "fixed"] <= err["minmax", "fixed"]
    assert err["clip", "per-group"] <= err["clip", "fixed"]
    assert err["minmax", "per-group"] <= err["minmax", "fixed"]


def test_rtn_error_shrinks_with_bits_and_clip_search_never_hurts():
    w = _weights()[0]
    errs = [(fake_quantize(w, b, 64) - w).pow(2).mean().item() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    for b in (2, 3, 4):
        assert (fake_quantize(w, b, 64, True) - w).pow(2).sum() <= (fake_quantize(w, b, 64) - w).pow(2).sum() + 1e-6
    assert torch.unique(sign_binarize(w, 64)[0, :64]).numel() == 2


@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 256), (128, 64)])
def test_pack_unpack_roundtrip(shape):
    bits = torch.randint(0, 2, shape, dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(bits), shape[1]), bits)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_bits(torch.zeros(2, 40))


def test_dual_binary_linear_gradients():
    torch.manual_seed(3)
    lin = torch.nn.Linear(128, 16, bias=False)
    layer = DualBinaryLinear.from_linear(lin, 64)
    x = torch.randn(5, 128)
    g = torch.randn(5, 16)
    (layer(x) * g).sum().backward()
    b1, b2 = layer.bitplanes()
    gw = g.T @ x  # dL/dw_hat
    assert torch.allclose(layer.a1.grad, (gw * b1).reshape(16, 2, 64).sum(-1), atol=1e-5)
    assert torch.allclose(layer.a2.grad, (gw * b2).reshape(16, 2, 64).sum(-1), atol=1e-5)
    assert layer.weight.grad is None
    lat = DualBinaryLinear.from_linear(lin, 64, train_latent=True)
    (lat(x) * g).sum().backward()
    assert torch.allclose(lat.weight.grad, gw, atol=1e-5)  # straight-through


def test_gptq_beats_rtn_on_real_layers(embedded):
    torch.manual_seed(0)
    model = embedded[0]
    from dbllm_lab.calib import capture_block0_inputs
    x = capture_block0_inputs(model, torch.randint(0, 49152, (4, 128)))[0]
    x = torch.cat(x).reshape(-1, 576)
    x = model.model.layers[0].input_layernorm(x).detach()
    for name in ("q_proj", "v_proj"):
        W = getattr(model.model.layers[0].self_attn, name).weight.detach()
        H = 2 * x.T @ x / len(x)
        Wg, _, _ = gptq_layer(W, H, 2, 64)
        Wr = fake_quantize(W, 2, 64)
        assert ((Wg - W) @ x.T).pow(2).sum() < ((Wr - W) @ x.T).pow(2).sum()


@pytest.mark.parametrize("kw, match", [
    (dict(method="fdb", group_size=0), "group_size=0"),
    (dict(method="fdb", group_size=100), "does not divide"),
    (dict(method="rtn", bits=5), "bits=5"),
    (dict(method="int3"), "method='int3'"),
    (dict(method="fdb", init="random"), "init='random'"),
    (dict(method="fdb", orientation="up"), "orientation='up'"),
    (dict(method="gptq"), "needs calib_windows"),
])
def test_bad_arguments_are_clear_errors(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_model(copy.deepcopy(tiny), progress=False, **kw)


@pytest.mark.parametrize("method, kw", [("rtn", {"bits": 2}), ("sign", {}), ("fdb", {"init": "minmax"}),
                                        ("gptq", {"bits": 2}), ("fdb", {"init": "gptq"})])
def test_quantize_model_swaps_layers_and_reports_bits(tiny, method, kw):
    x = torch.randint(0, 256, (2, 16))
    calib = x if "gptq" in (method, kw.get("init")) else None
    report = quantize_model(tiny, method, group_size=32, calib_windows=calib, progress=False, **kw)
    assert report["n_layers"] == 14 and report["bits_per_weight"] > 1
    assert tiny.lm_head.__class__.__name__ == "Linear"
    assert torch.isfinite(tiny(x).logits).all()


def test_dual_binary_linear_inference_cache_follows_the_scales(tiny):
    """Under no_grad the binarized weight is cached; changing a scale in place invalidates it, and the cached
    output equals the autograd path's."""
    from dbllm_lab.layers import fdb_layers
    from dbllm_lab.quantize import quantize_model
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny(ids).logits
        next(iter(fdb_layers(tiny).values())).a1.mul_(1.5)
        after = tiny(ids).logits
    assert not torch.equal(before, after)
    assert torch.equal(after, tiny(ids).logits.detach())
