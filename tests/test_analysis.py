"""Measurement tools by chapter (dbllm_lab.weights, landscape, costs): sparsity, landscapes, operation / storage
counts, bad input; importing them does not load Triton."""
import pytest
import torch

from dbllm_lab import costs, landscape, weights
from dbllm_lab.quant import dual_binarize, fdb_init


def test_counts_exact_on_small_shape():
    # N = 2 rows, K = 8 inputs, g = 4 -> G = 2 groups per row, NG = 4
    N, K, g = 2, 8, 4
    assert costs.linear_ops(N, K, g, "fp16") == {"format": "fp16", "mults": 16, "adds": 16, "flops": 32,
                                               "bitops": 16 * 272}
    i2 = costs.linear_ops(N, K, g, "int2")
    assert (i2["mults"], i2["adds"]) == (16 + 8, 16 + 8 + 8)
    s = costs.linear_ops(N, K, g, "sign")
    assert (s["mults"], s["adds"]) == (8, 16 + 8 + 8)
    d = costs.linear_ops(N, K, g, "db-dense")
    assert (d["mults"], d["adds"], d["flops"]) == (8, 32 + 8, 48)
    b1 = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    b2 = torch.tensor([[0, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    ones = int(b1.sum() + b2.sum())  # 6
    sp = costs.linear_ops(N, K, g, "db-sparse", ones=ones, tokens=3)
    assert (sp["mults"], sp["adds"], sp["flops"]) == (3 * 8, 3 * (6 + 8), 3 * 22)
    # bytes: fp16 2/weight; db: 2 planes of 16 bits + 4 groups x 2 fp16 scales; int2: 32 bits + 4 x (16 + 2) bits
    assert costs.linear_bytes(N, K, g, "fp16") == 32
    assert costs.linear_bytes(N, K, g, "db-dense") == 4 + 16
    assert costs.linear_bytes(N, K, g, "int2") == 4 + 9
    assert costs.linear_bytes(N, K, g, "sign") == 2 + 16
    st = costs.bitplane_sparsity(b1, b2)
    assert st == {"ones_b1": 2 / 16, "ones_b2": 4 / 16, "both_zero": 10 / 16, "ones_per_weight": 6 / 16}


def test_cost_table_and_llama_shapes():
    shapes, other = costs.llama_shapes("llama-7b")
    assert len(shapes) == 32 * 7
    n_lin = sum(o * i for _, o, i in shapes)
    assert n_lin + other == 6_738_415_616  # LLaMA-7B parameter count (untied embeddings, norms)
    rows = {r["format"]: r for r in costs.cost_table(shapes, 64, ones_fraction=0.7, other_params=other)}
    assert rows["fp16"]["flops"] == 2 * n_lin
    # dense dual-binary: 2 masked adds per weight = as many operations as an fp16 MAC, but 16-bit adds
    assert rows["db-sparse"]["flops"] < rows["fp16"]["flops"] < rows["db-dense"]["flops"]
    assert rows["db-sparse"]["bitops"] < rows["db-dense"]["bitops"] < rows["int2"]["bitops"] < rows["fp16"]["bitops"]
    assert rows["db-sparse"]["flops"] == pytest.approx(0.7 * n_lin + 4 * n_lin / 64, rel=1e-6)
    assert rows["db-dense"]["bytes_linear"] == n_lin * 2.5 / 8
    assert "db-sparse" not in {r["format"] for r in costs.cost_table(shapes[:7], 64)}


def test_bad_input():
    with pytest.raises(ValueError, match="fmt='int3'"):
        costs.linear_ops(4, 8, 4, "int3")
    with pytest.raises(ValueError, match="needs ones"):
        costs.linear_ops(4, 8, 4, "db-sparse")
    with pytest.raises(ValueError, match="group_size=3"):
        costs.linear_bytes(4, 8, 3, "fp16")
    with pytest.raises(ValueError, match="llama-8b"):
        costs.llama_shapes("llama-8b")
    with pytest.raises(ValueError, match="mode"):
        landscape.basin_width([0, 1, 2], [1, 0, 1], mode="x")
    with pytest.raises(ValueError, match="only 0 and 1"):
        costs.bitplane_sparsity(torch.full((2, 2), 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not a decoder linear"):
        weights.layer_type("model.embed_tokens")
    with pytest.raises(ValueError, match="x must be"):
        landscape.output_error(torch.zeros(4, 8), torch.zeros(4, 8), torch.zeros(3, 4))


def test_basin_width_interpolates():
    m = [0.0, 1.0, 2.0, 3.0, 4.0]
    e = [4.0, 1.0, 0.0, 1.0, 4.0]  # (m - 2)^2
    assert landscape.basin_width(m, e, tol=1.0) == pytest.approx(2.0)
    assert landscape.basin_width(m, e, tol=2.5) == pytest.approx(2 * (1 + 1.5 / 3))


def test_weight_stats_gaussian():
    s = weights.weight_stats(torch.randn(200_000, generator=torch.Generator().manual_seed(0)))
    assert abs(s["skew"]) < 0.03 and abs(s["kurtosis"]) < 0.06 and s["std"] == pytest.approx(1, abs=0.01)


TEXT = ("The committee met on Tuesday to discuss the new budget for the city's public libraries. After a long "
        "debate, the members agreed to extend opening hours and to buy more books for children. Critics said the "
        "plan was too expensive, while supporters argued that reading is the cheapest way to improve schools. ") * 8


def test_real_weights_fdb_sparser_than_2bit_code(embedded):
    model, _ = embedded
    for n, m in weights.select_layers(model, blocks=[3], types=["q_proj", "down_proj"]).items():
        w = m.weight.detach()
        fdb = costs.bitplane_sparsity(*dual_binarize(w, *fdb_init(w, 64, "minmax"), 64))
        rtn = costs.rtn2_code_sparsity(w, 64)
        assert fdb["ones_per_weight"] < 0.9 * rtn["ones_per_weight"], n
        assert fdb["both_zero"] > rtn["both_zero"] + 0.1, n


def test_real_layers_fdb_basin_wider_than_sign(embedded):
    """Along a common multiplier of all scales, FDB (clip init) tolerates a wider range than sign binarization
    before the output error rises by 0.05 ||WX||^2: in most layers of a block, and in the median."""
    model, tok = embedded
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :256]
    layers = weights.select_layers(model, blocks=[3])
    xs = landscape.capture_inputs(model, ids, list(layers))
    fdb, sign = [], []
    for n, m in layers.items():
        r = landscape.layer_landscape(m.weight, xs[n], 64, multipliers=torch.linspace(0.25, 1.75, 13), grid=[0.5, 1.0],
                              max_rows=48, init="clip")
        assert min(r["curves"]["fdb_both"]) < min(r["curves"]["sign"]), n
        fdb.append(r["basin"]["fdb_both"])
        sign.append(r["basin"]["sign"])
    assert sum(f > s for f, s in zip(fdb, sign)) >= 5, (fdb, sign)
    assert sorted(fdb)[3] > sorted(sign)[3]


def test_init_choice_table_orientation_never_hurts():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(128, 16, bias=False)
    lin.weight.data = torch.randn(16, 128, generator=g) ** 3 * 0.02  # heavy-tailed
    rows = landscape.init_choice_table({"model.layers.0.mlp.up_proj": lin}, {"model.layers.0.mlp.up_proj": torch.randn(64, 128, generator=g)},
                               32, progress=False)
    err = {r["method"]: r["weight_rel_error"] for r in rows}
    assert set(err) == {"sign", "rtn2 clip"} | {f"fdb {i}/{o}" for i, o in landscape.FDB_CHOICES}
    assert err["fdb clip/per-group"] <= err["fdb clip/fixed"] + 1e-9
    assert err["fdb minmax/per-group"] <= err["fdb minmax/fixed"] + 1e-9
    assert err["fdb clip/per-group"] < err["fdb minmax/per-group"] < err["sign"]


def test_scale_landscape_matches_quantized_model_and_restores(tiny):
    import copy
    from dbllm_lab.quantize import quantize_model
    from dbllm_lab.ppl import window_nll
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    orig = {n: m.weight.detach().clone() for n, m in weights.select_layers(tiny).items()}
    q = copy.deepcopy(tiny)
    quantize_model(q, "fdb", group_size=32, init="minmax", progress=False)
    s, c = window_nll(q, windows, progress=False)
    with landscape.ScaleLandscape(tiny, windows, 32, "minmax", progress=False) as land:
        fp = land.fp_loss()
        grid = land.fdb_grid([-0.2, 0.0], [0.0, 0.2], progress=False)
        assert grid[1][0] == pytest.approx(s / c, rel=2e-3)  # fp16-rounded scales in DualBinaryLinear
        assert grid[0][1] != pytest.approx(grid[1][0], rel=1e-6)
        qs = copy.deepcopy(tiny)
        quantize_model(qs, "sign", group_size=32, progress=False)
        s_sign, c_sign = window_nll(qs, windows, progress=False)
        assert land.sign_curve([0.0], progress=False)[0] == pytest.approx(s_sign / c_sign, rel=1e-5)
    s_fp, c_fp = window_nll(tiny, windows, progress=False)
    assert fp == pytest.approx(s_fp / c_fp, rel=1e-5)
    assert all(torch.equal(m.weight, orig[n]) for n, m in weights.select_layers(tiny).items())
    with pytest.raises(ValueError, match="blocks"):
        landscape.ScaleLandscape(tiny, windows, 32, blocks=[5])


def test_levels_histogram_and_stats_table(tiny):
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    lv = weights.quantizer_levels(w, 32)
    assert lv["fdb"].shape == (8 * 4, 4) and lv["sign"].shape == (32, 2) and lv["rtn2"].shape == (32, 4)
    assert all(0.0 in [round(v, 6) for v in row] for row in lv["fdb"].tolist())  # FDB always has the zero level
    assert torch.all(lv["fdb"][:, 1:] >= lv["fdb"][:, :-1])
    assert weights.thresholds([2.0, -1.0, 0.0, 1.0]) == [-0.5, 0.5, 1.5]
    h = weights.histogram(w, bins=100)
    width = h["centres"][1] - h["centres"][0]
    assert sum(h["density"]) * width == pytest.approx(1.0, abs=1e-3)
    rows = weights.weight_stats_table(weights.select_layers(tiny, blocks=[1], types=["q_proj", "down_proj"]))
    assert [(r["block"], r["type"]) for r in rows] == [(1, "q_proj"), (1, "down_proj")]
    assert {r["type"] for r in weights.stats_by_type(rows)} == {"q_proj", "down_proj"}
    with pytest.raises(ValueError, match="blocks"):
        weights.select_layers(tiny, blocks=[7])
    with pytest.raises(ValueError, match="layer types"):
        weights.select_layers(tiny, types=["qkv"])


def test_chapter_modules_do_not_load_triton():
    """Importing a chapter's measurement module (or the registry it reads) neither imports Triton nor sets
    TRITON_INTERPRET; only the kernel chapter does."""
    import os
    import subprocess
    import sys
    code = ("import os, sys; import dbllm_lab.weights, dbllm_lab.landscape, dbllm_lab.costs, dbllm_lab.timing, "
            "dbllm_lab.quantize; print('triton' in sys.modules, os.environ.get('TRITON_INTERPRET'))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "None"]
