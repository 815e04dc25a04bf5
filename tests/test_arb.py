"""ARB-LLM family (dbllm_lab/arb.py, method.md §4): monotone refinement, exact sign-pair choice, ARB-X output error,
ARB-RC form, bits counting rule, model-level quantize_model, bad input."""
import copy
import itertools

import pytest
import torch

from dbllm_lab.arb import (VARIANTS, arb_first, arb_layer, arb_rc, arb_second, binarize_first, fit_block,
                           nearest_sign_pair, output_error, partition_block, rc_reconstruct)
from dbllm_lab.gptq import inverse_hessian_cholesky
from dbllm_lab.model import quantizable_linears
from dbllm_lab.layers import FakeQuantLinear
from dbllm_lab.quantize import quantize_model


def _monotone(errs):
    return all(b <= a * (1 + 1e-6) + 1e-9 for a, b in zip(errs, errs[1:]))


def _real_weight(embedded, name="model.layers.3.mlp.gate_proj", rows=256):
    model, _ = embedded
    return quantizable_linears(model)[name].weight.detach()[:rows].clone().float()


def _random(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * 0.02 + 0.003 * torch.randn(rows, 1, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
def test_arb_error_never_increases_random(seed):
    W = _random(seed=seed)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    for m in (None, mask):
        errs = arb_first(W, m, iters=15, trace=True)[-1]
        assert len(errs) == 16 and _monotone(errs) and errs[-1] < errs[0]
        errs2 = arb_second(W, m, iters=15, trace=True)[-1]
        assert _monotone(errs2) and errs2[-1] < errs2[0]
        assert errs2[-1] < errs[-1]  # second order is finer
        for order in (1, 2):
            assert _monotone(arb_rc(W, m, order, iters=15, trace=True)[-1])


def test_arb_error_never_increases_real_layer(embedded):
    W = _real_weight(embedded)
    for fn in (lambda: arb_first(W, trace=True), lambda: arb_second(W, trace=True),
               lambda: arb_rc(W, order=1, trace=True), lambda: arb_rc(W, order=2, trace=True)):
        errs = fn()[-1]
        assert _monotone(errs) and errs[-1] < errs[0], errs


def test_nearest_sign_pair_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 6
    R = torch.randn(20, n, generator=g)
    a1, a2 = torch.randn(20, generator=g), torch.randn(20, generator=g)
    a2[:5] = a1[:5]  # ties between levels
    a2[5:8] = 0.0
    B1, B2 = nearest_sign_pair(R, a1, a2)
    assert set(B1.unique().tolist()) <= {-1.0, 1.0} and set(B2.unique().tolist()) <= {-1.0, 1.0}
    err = ((R - a1[:, None] * B1 - a2[:, None] * B2) ** 2).sum(1)
    # brute force over every joint sign assignment of the row (4^n)
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=2 * n)))      # (4^n, 2n)
    S1, S2 = combos[:, :n], combos[:, n:]
    brute = ((R[:, None, :] - a1[:, None, None] * S1 - a2[:, None, None] * S2) ** 2).sum(-1).min(1).values
    torch.testing.assert_close(err, brute, rtol=1e-6, atol=1e-7)


def test_arb_rc_reconstruction_is_row_times_column_scale_times_sign():
    W = _random(48, 128, seed=3)
    ar, ac, Bs = arb_rc(W, None, order=1, iters=15)
    assert set(Bs[0].unique().tolist()) <= {-1.0, 1.0}
    expected = torch.outer(ar[0], ac[0]) * Bs[0]
    torch.testing.assert_close(rc_reconstruct(ar, ac, Bs), expected)
    # the layer pipeline uses exactly this form: one all-true first-order group, no mean anywhere
    W_hat, n_params = fit_block(W, [(torch.ones_like(W, dtype=torch.bool), 1)], "arb-rc", iters=15)
    torch.testing.assert_close(W_hat, expected)
    assert n_params == 48 + 128


def _correlated_inputs(cols, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return X * torch.linspace(0.2, 3.0, cols)  # uneven channel scales, as in real activations


def test_arb_x_lowers_block_output_error():
    W = _random(64, 128, seed=4)
    X = _correlated_inputs(128)
    S = X.T @ X
    U, _ = inverse_hessian_cholesky(2 / len(X) * S)
    for cgb in (False, True):
        groups, _ = partition_block(W, torch.diag(U), cgb)
        Q_arb, _ = fit_block(W, groups, "arb")
        Q_x, _ = fit_block(W, groups, "arb-x", S=S)
        assert output_error(W, Q_x, S) < 0.95 * output_error(W, Q_arb, S)


def test_arb_x_lowers_layer_output_error_on_real_calibration_inputs(embedded):
    model, _ = embedded
    lin = quantizable_linears(model)["model.layers.2.self_attn.q_proj"]
    xs = []
    h = lin.register_forward_hook(lambda m, a, o: xs.append(a[0].reshape(-1, a[0].shape[-1]).float()))
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    h.remove()
    X = torch.cat(xs)
    H = 2 / len(X) * X.T @ X
    W = lin.weight.detach().float()
    out = {m: ((W - arb_layer(W, H, m)[0]) @ X.T).norm() for m in ("billm", "arb", "arb-x")}
    assert out["arb-x"] < out["arb"] < out["billm"], out


def test_bits_counting_rule_single_block():
    W, H = _random(8, 128, seed=5), torch.eye(128)
    for method, cgb in (("arb", False), ("arb", True), ("arb-rc", False)):
        _, info = arb_layer(W, H, method, cgb)
        k = info["salient_columns"]
        assert 1 <= k <= 30
        assert info["sign_bits"] == 8 * 128 + 8 * k
        assert info["bitmap_bits"] == 128 + 8 * (128 - k) + (8 * k if cgb else 0)
        if method == "arb":  # mu + alpha per row for two first-order groups, mu + a1 + a2 per salient group
            assert info["fp16_params"] == 8 * (2 + 2 + 3 + (3 if cgb else 0))
        bpw = (info["sign_bits"] + info["bitmap_bits"] + 16 * info["fp16_params"]) / W.numel()
        assert info["bits_per_weight"] == pytest.approx(bpw)


@pytest.mark.parametrize("method", VARIANTS)
@pytest.mark.parametrize("cgb", [False, True])
def test_quantize_model_tiny(tiny, method, cgb):
    model = copy.deepcopy(tiny)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    W0 = {n: m.weight.detach().clone() for n, m in quantizable_linears(model).items()}
    rep = quantize_model(model, method, calib_windows=windows, progress=False, cgb=cgb)
    layers = quantizable_linears(model)
    assert all(isinstance(m, FakeQuantLinear) for m in layers.values()) and rep["n_layers"] == len(layers) == 14
    assert rep["method"] == method and rep["cgb"] is cgb and "bitmap" in rep["bits_rule"]
    assert rep["bits_per_weight"] == pytest.approx(rep["sign_bits_per_weight"] + rep["bitmap_bits_per_weight"]
                                                   + rep["scale_bits_per_weight"])
    assert 2.0 < rep["bits_per_weight"] < 6.0 and rep["seconds"] > 0
    for n, m in layers.items():
        assert torch.isfinite(m.weight).all() and not torch.equal(m.weight, W0[n])
        if method != "arb-rc":  # per row and group at most 4 distinct values in a first-order block... loosely:
            assert m.weight[0, :64].unique().numel() <= 12  # 2 first-order groups x 2 + second order x 4
    assert torch.isfinite(model(windows).logits).all()


def test_bad_input():
    W, H = _random(8, 128), torch.eye(128)
    with pytest.raises(ValueError, match="arb-y"):
        arb_layer(W, H, "arb-y")
    with pytest.raises(ValueError, match="arb-y"):
        quantize_model(None, "arb-y", calib_windows=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="iters"):
        arb_layer(W, H, "arb", iters=-1)
    with pytest.raises(ValueError, match="Hessian shape"):
        arb_layer(W, torch.eye(64))


@pytest.mark.parametrize("windows", [None, torch.zeros(0, 32, dtype=torch.long), torch.zeros(32, dtype=torch.long)])
def test_too_few_calibration_samples(tiny, windows):
    with pytest.raises(ValueError, match="calib_windows"):
        quantize_model(copy.deepcopy(tiny), "arb", calib_windows=windows, progress=False)


def test_singular_hessians_are_damped():
    W = _random(16, 128, seed=6)
    x = torch.randn(1, 128)
    rank1 = 2 * x.T @ x                       # one token: rank 1, singular without damping
    dead = torch.eye(128)
    dead[5, 5] = dead[70, 70] = 0.0           # input channels that never fire
    for H in (rank1, dead, torch.zeros(128, 128)):
        for method in VARIANTS:
            Q, info = arb_layer(W, H, method)
            assert torch.isfinite(Q).all() and info["bits_per_weight"] > 1
    with pytest.raises(ValueError, match="percdamp"):
        arb_layer(W, rank1, "arb", percdamp=0.0)
