"""Packed model folders (dbllm_lab/checkpoint.py): exact round trips, the folder's files and card, bad input,
format_version 1 folders and their conversion."""
import copy
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dbllm_lab.checkpoint import (CARD, HEADER, WEIGHTS, convert, load_quantized, read_header, record_perplexity,
                                  save_quantized)
from dbllm_lab.quantize import quantize_model


def test_save_load_identical_logits_on_embedded_model(embedded, tmp_path):
    base = embedded[0]
    model = copy.deepcopy(base)
    quantize_model(model, "fdb", group_size=64, init="minmax", progress=False)  # the fastest init: any is exact
    x = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))  # fixed: no flaky tolerance
    header = save_quantized(model, str(tmp_path), tokenizer=False)
    assert header["group_size"] == 64 and len(header["layers"]) == 210
    # the stored format is exact: the "torch" backend (dequantize, dense matmul) gives identical logits
    loaded = load_quantized(str(tmp_path), backend="torch")
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(ref, loaded(x).logits)
        # the CPU kernel sums in another order: same logits within float rounding through 30 blocks (measured:
        # 6.7e-5 of the largest logit), same greedy tokens
        for m in loaded.modules():
            if hasattr(m, "backend"):
                m.backend = "auto"
        out = loaded(x).logits
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max() and torch.equal(out.argmax(-1), ref.argmax(-1))
    # 2 bit-planes + 2 fp16 scales per 64 weights = 2.5 bits per weight; the rest is full precision, counted too
    size = header["size"]
    n = sum(s["in_features"] * s["out_features"] for s in header["layers"])
    assert size["packed_weights"] == n and size["packed_bytes"] == n * 2.5 / 8
    assert size["full_precision_params"] == sum(p.numel() for p in base.parameters()) - n  # tied lm_head once
    total = size["packed_bytes"] + size["full_precision_bytes"]
    assert total < os.path.getsize(tmp_path / WEIGHTS) == size["file_bytes"] < total * 1.001


def _saved(tiny, path, **kwargs):
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    return save_quantized(tiny, str(path), tokenizer=False, **kwargs)


def test_tiny_roundtrip_with_and_without_a_base_model(tiny, tmp_path):
    from dbllm_lab.model import tiny_llama
    _saved(tiny, tmp_path)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = tiny(x).logits
        for base in (None, tiny_llama(seed=1)):  # a base model's own weights are all replaced
            loaded = load_quantized(str(tmp_path), base_model=base, backend="torch")
            assert torch.equal(ref, loaded(x).logits)
            assert not any(t.is_meta for t in loaded.state_dict().values())
            assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, as in the base


def test_folder_holds_config_generation_config_and_card(tiny, tmp_path):
    recipe = {"name": "quick", "seed": 3, "stage": "both", "text": {"samples": 8, "tokens": 128, "set_size": 8},
              "blockwise": {"epochs": 1}, "e2e": {"steps": 8}, "cpu_minutes": 3.5}
    header = _saved(tiny, tmp_path, recipe=recipe)
    files = set(os.listdir(tmp_path))
    assert {WEIGHTS, HEADER, CARD, "config.json", "generation_config.json"} <= files
    assert not any(f.endswith(".tmp") for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "dbllm", "method": "fdb", "bits": 2, "group_size": 32, "packing_version": 1,
        "scale_dtype": "float16", "modules_to_not_convert": ["lm_head"],
        "linear_names": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    assert config["use_cache"] is True and config["architectures"] == ["LlamaForCausalLM"]
    assert header["recipe"] == recipe and header["tokenizer"] is False
    card = (tmp_path / CARD).read_text()
    assert "3.000 bits per weight" in card  # g = 32: 2 + 2 * 16 / 32
    assert "8 samples x 128 tokens = 1,024 tokens" in card and "`quick`, seed 3" in card
    assert "Compute: 3.5 CPU-minutes, text generation included" in card
    assert "Held-out perplexity: **not measured**" in card
    # a measured perplexity goes into the header and the card with the command that measured it
    from dbllm_lab.ppl import PPLResult
    res = PPLResult(ppl=31.5, nll=3.45, dataset="wikitext2", split="test", seqlen=512, windows=589, tokens=301568,
                    dtype="float32", ppl_dev=30.25, ppl_heldout=31.75)
    record_perplexity(str(tmp_path), res, "dbllm-lab eval-ppl --checkpoint DIR")
    assert read_header(str(tmp_path))["perplexity"]["ppl_heldout"] == 31.75
    card = (tmp_path / CARD).read_text()
    assert "Held-out perplexity: **31.75**, dev (windows 1-40) 30.25" in card
    assert "`dbllm-lab eval-ppl --checkpoint DIR`" in card


def test_embedded_base_card_names_model_and_license(tiny, tmp_path):
    tiny.name_or_path = "smollm2-135m"  # the card is written from the header's base model name
    _saved(tiny, tmp_path)
    card = (tmp_path / CARD).read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert "licensed Apache-2.0" in card and "Q4_1 GGUF" in card
    assert "no training (post-training quantization)" in card


def test_trained_norms_are_stored_and_restored(tiny, tmp_path):
    from dbllm_lab.model import norm_weights
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    with torch.no_grad():  # as after train(..., TrainConfig(train_norms=True))
        for i, p in enumerate(norm_weights(tiny).values()):
            p.mul_(1.0 + 0.1 * (i + 1))
    save_quantized(tiny, str(tmp_path), tokenizer=False)
    loaded = load_quantized(str(tmp_path), backend="torch")
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny(x).logits, loaded(x).logits)


def test_corrupt_and_truncated_files_are_detected(tiny, tmp_path):
    _saved(tiny, tmp_path)
    good = (tmp_path / WEIGHTS).read_bytes()
    raw = bytearray(good)
    raw[-5] ^= 0xFF
    (tmp_path / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256 checksum"):
        load_quantized(str(tmp_path))
    (tmp_path / WEIGHTS).write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        load_quantized(str(tmp_path))


def _rehash(path):
    header = json.loads((path / HEADER).read_text())
    header["sha256"] = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    (path / HEADER).write_text(json.dumps(header))


def test_version_group_size_and_shape_mismatch(tiny, tmp_path):
    from dbllm_lab.model import tiny_llama
    _saved(tiny, tmp_path)
    with pytest.raises(ValueError, match="wrong base model"):
        load_quantized(str(tmp_path), base_model=tiny_llama(hidden=128, intermediate=256))
    header = json.loads((tmp_path / HEADER).read_text())
    for field, value, message in (("group_size", 64, r"a1 has shape \(64, 2\), expected \(64, 1\).*group_size"),
                                  ("packing_version", 2, "packing_version=2 is not supported"),
                                  ("format_version", 99, "format_version 99")):
        (tmp_path / HEADER).write_text(json.dumps({**header, field: value}))
        with pytest.raises(ValueError, match=message):
            load_quantized(str(tmp_path))
    (tmp_path / HEADER).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a dbllm_lab checkpoint"):
        load_quantized(str(tmp_path / "nothing"))


def test_wrong_tensor_shape_names_the_tensor(tiny, tmp_path):
    from safetensors.torch import load_file
    _saved(tiny, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    tensors["model.layers.1.mlp.down_proj.p2"] = tensors["model.layers.1.mlp.down_proj.p2"][:, :2].contiguous()
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    _rehash(tmp_path)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.p2 has shape \(64, 2\), expected \(64, 4\)"):
        load_quantized(str(tmp_path))


def write_v1(model, path):
    """A format_version 1 checkpoint as dbllm_lab wrote it before model folders: packed layers + ``norm.{name}``
    RMSNorm weights in model.safetensors, and the header."""
    from dbllm_lab.model import norm_weights, quantizable_linears
    from dbllm_lab.packed_linear import PackedDualBinaryLinear
    tensors, layers = {}, []
    for name, m in quantizable_linears(model).items():
        m = PackedDualBinaryLinear.from_dual_binary(m)
        tensors.update({f"{name}.{k}": t.contiguous() for k, t in m.state_dict().items()})
        layers.append({"name": name, "in_features": m.in_features, "out_features": m.out_features, "bias": False})
    norms = norm_weights(model)
    tensors.update({f"norm.{k}": p.detach().contiguous() for k, p in norms.items()})
    os.makedirs(path)
    save_file(tensors, os.path.join(path, WEIGHTS), metadata={"format": "dbllm-dual-binary", "format_version": "1"})
    header = {"format": "dbllm-dual-binary", "format_version": 1, "method": "fdb", "bits": 2, "group_size": 32,
              "scale_dtype": "float16", "base_model": "tiny-llama-random", "layers": layers, "norms": list(norms),
              "recipe": {"name": "quick", "seed": 0},
              "sha256": hashlib.sha256(open(os.path.join(path, WEIGHTS), "rb").read()).hexdigest()}
    with open(os.path.join(path, HEADER), "w") as f:
        json.dump(header, f)


def test_v1_folder_names_convert_and_converts_exactly(tiny, tmp_path):
    from dbllm_lab.cli import main
    from dbllm_lab.model import norm_weights, tiny_llama
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    with torch.no_grad():
        for p in norm_weights(tiny).values():
            p.mul_(1.5)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    write_v1(tiny, old)
    with pytest.raises(ValueError, match=f"format_version 1 .* dbllm-lab convert {old} NEW_FOLDER"):
        load_quantized(old)
    header = convert(old, new, base_model=tiny_llama(), tokenizer=False)
    assert header["format_version"] == 2 and header["recipe"] == {"name": "quick", "seed": 0}
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny(x).logits, load_quantized(new, backend="torch")(x).logits)
    # the command line: a v1 folder of an unknown base model fails with the loader's message, exit status 2
    assert main(["convert", old, str(tmp_path / "other")]) == 2


def test_only_fdb_models_are_packed(tiny, tmp_path):
    quantize_model(tiny, "rtn", bits=2, group_size=32, progress=False)
    with pytest.raises(ValueError, match="FDB models"):
        save_quantized(tiny, str(tmp_path))
