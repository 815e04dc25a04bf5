import copy
import json
import os

import pytest
import torch

from dbllm_lab.checkpoint import HEADER, WEIGHTS, load_quantized, save_quantized
from dbllm_lab.quantize import quantize_model


def test_save_load_identical_logits_on_embedded_model(embedded, tmp_path):
    base = embedded[0]
    model = copy.deepcopy(base)
    quantize_model(model, "fdb", group_size=64, init="clip", progress=False)
    x = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))  # fixed: no flaky tolerance
    header = save_quantized(model, str(tmp_path))
    assert header["group_size"] == 64 and len(header["layers"]) == 210
    # the stored format is exact: the "torch" backend (dequantize, dense matmul) gives identical logits
    loaded = load_quantized(str(tmp_path), base_model=copy.deepcopy(base), backend="torch")
    with torch.no_grad():
        ref = model(x).logits
        assert torch.equal(ref, loaded(x).logits)
        # the CPU kernel sums in another order: same logits within float rounding, same greedy tokens
        for m in loaded.modules():
            if hasattr(m, "backend"):
                m.backend = "auto"
        out = loaded(x).logits
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-3) and torch.equal(out.argmax(-1), ref.argmax(-1))
    # 2 bit-planes + 2 fp16 scales per 64 weights = 2.5 bits per weight, plus the safetensors header
    n = sum(s["in_features"] * s["out_features"] for s in header["layers"])
    assert os.path.getsize(tmp_path / WEIGHTS) == pytest.approx(n * 2.5 / 8, rel=0.01)


def _saved(tiny, path):
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    save_quantized(tiny, str(path))
    return tiny


def test_tiny_roundtrip(tiny, tmp_path):
    from dbllm_lab.model import tiny_llama
    model = _saved(tiny, tmp_path)
    loaded = load_quantized(str(tmp_path), base_model=tiny_llama(), backend="torch")  # exact storage
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_trained_norms_are_stored_and_restored(tiny, tmp_path):
    from dbllm_lab.model import norm_weights, tiny_llama
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    with torch.no_grad():  # as after train(..., TrainConfig(train_norms=True))
        for i, p in enumerate(norm_weights(tiny).values()):
            p.mul_(1.0 + 0.1 * (i + 1))
    header = save_quantized(tiny, str(tmp_path))
    assert sorted(header["norms"]) == sorted(norm_weights(tiny))
    loaded = load_quantized(str(tmp_path), base_model=tiny_llama(), backend="torch")
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(tiny(x).logits, loaded(x).logits)
    # a header without "norms" (written before they were stored) keeps the base model's norms
    hp = tmp_path / HEADER
    h = json.loads(hp.read_text())
    del h["norms"]
    hp.write_text(json.dumps(h))
    old = load_quantized(str(tmp_path), base_model=tiny_llama(), backend="torch")
    assert all(torch.equal(p, q) for p, q in zip(norm_weights(old).values(), norm_weights(tiny_llama()).values()))


def test_corrupt_file_is_detected(tiny, tmp_path):
    from dbllm_lab.model import tiny_llama
    _saved(tiny, tmp_path)
    raw = bytearray((tmp_path / WEIGHTS).read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        load_quantized(str(tmp_path), base_model=tiny_llama())


def test_version_and_shape_mismatch(tiny, tmp_path):
    from dbllm_lab.model import tiny_llama
    _saved(tiny, tmp_path)
    with pytest.raises(ValueError, match="wrong base model"):
        load_quantized(str(tmp_path), base_model=tiny_llama(hidden=128, intermediate=256))
    header = json.loads((tmp_path / HEADER).read_text())
    header["format_version"] = 99
    (tmp_path / HEADER).write_text(json.dumps(header))
    with pytest.raises(ValueError, match="format_version 99"):
        load_quantized(str(tmp_path), base_model=tiny_llama())
    (tmp_path / HEADER).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_quantized(str(tmp_path), base_model=tiny_llama())
    with pytest.raises(FileNotFoundError, match="not a dbllm_lab checkpoint"):
        load_quantized(str(tmp_path / "nothing"))


def test_only_fdb_models_are_packed(tiny, tmp_path):
    quantize_model(tiny, "rtn", bits=2, group_size=32, progress=False)
    with pytest.raises(ValueError, match="FDB models"):
        save_quantized(tiny, str(tmp_path))
