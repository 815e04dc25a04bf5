"""Packed model folders as ordinary transformers models (dbllm_lab/hf_quantizer.py): ``from_pretrained`` after
``import dbllm_lab`` gives exactly the model ``checkpoint.load_quantized`` builds; generate, pipeline and
lm-eval's own ``hf`` model use it; bad folders are refused naming the field."""
import copy
import json
import os

import pytest
import torch

import dbllm_lab  # noqa: F401  (registers the quantizer)
from dbllm_lab.checkpoint import HEADER, WEIGHTS, load_quantized, save_quantized
from dbllm_lab.hf_quantizer import DbllmConfig, DbllmHfQuantizer, register
from dbllm_lab.packed_linear import PackedDualBinaryLinear
from dbllm_lab.quantize import quantize_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # 4 documents per zero-shot task
PROMPT = "The capital of France is"


def from_pretrained(path, **kwargs):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


@pytest.fixture(scope="module")
def folder(embedded, tmp_path_factory):
    """A packed FDB W2g64 folder of the embedded model (FDB init, untrained), with its tokenizer."""
    base, tok = embedded
    model = copy.deepcopy(base)
    quantize_model(model, "fdb", group_size=64, init="minmax", progress=False)  # the fastest init
    path = str(tmp_path_factory.mktemp("fdb-w2g64"))
    save_quantized(model, path, tokenizer=tok)
    return path


def test_from_pretrained_equals_load_quantized_on_embedded_model(folder, embedded):
    tok = embedded[1]
    ours = load_quantized(folder)
    hf = from_pretrained(folder)
    layers = [m for m in hf.modules() if isinstance(m, PackedDualBinaryLinear)]
    assert len(layers) == 210 and not any(isinstance(m, torch.nn.Linear) for m in hf.model.layers.modules())
    assert isinstance(hf.config.quantization_config, DbllmConfig) and hf.is_quantized
    x = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, hf(x).logits)
    # greedy tokens with the KV cache (generate's default): the same from both models
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = {"max_new_tokens": 8, "do_sample": False}
    assert torch.equal(hf.generate(ids, **gen), ours.generate(ids, use_cache=True, **gen))


def test_folder_is_a_complete_model_folder(folder, embedded):
    from transformers import AutoTokenizer, GenerationConfig
    files = set(os.listdir(folder))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", WEIGHTS, HEADER,
            "README.md"} <= files
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok(PROMPT).input_ids == embedded[1](PROMPT).input_ids
    assert GenerationConfig.from_pretrained(folder).eos_token_id == embedded[0].generation_config.eos_token_id
    card = open(os.path.join(folder, "README.md")).read()
    assert "2.500 bits per weight" in card and "license: apache-2.0" in card and "**not measured**" in card


def test_pipeline_generates_from_the_folder(folder):
    from transformers import AutoTokenizer, pipeline
    tok = AutoTokenizer.from_pretrained(folder)
    ids = from_pretrained(folder).generate(tok(PROMPT, return_tensors="pt").input_ids, max_new_tokens=6,
                                           do_sample=False)
    text = pipeline("text-generation", model=folder)(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith(PROMPT) and len(text) > len(PROMPT)
    assert text == tok.decode(ids[0], skip_special_tokens=True)


def lm_eval_agrees(folder, tasks, data_dir, limit=None):
    """lm-eval's own ``hf`` model, given the folder's path, and ``dbllm-lab eval-zeroshot --checkpoint`` score the
    same documents: the same acc and acc_norm per task. Returns the per-task results."""
    pytest.importorskip("lm_eval")
    import lm_eval

    from dbllm_lab import zeroshot
    from dbllm_lab.cli import main
    out = os.path.join(folder, "..", "zs.json")
    args = ["eval-zeroshot", "--checkpoint", folder, "--tasks", tasks, "--data-dir", data_dir, "--batch-size", "8",
            "--out", out] + ([] if limit is None else ["--limit", str(limit)])
    assert main(args) == 0
    ours = json.load(open(out))["tasks"]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # HFLM's default is cuda
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": folder, "batch_size": 8, "device": device},
                                  tasks=list(zeroshot.build_tasks(tasks, data_dir).values()), num_fewshot=0,
                                  limit=limit, bootstrap_iters=0)
    assert sorted(res["results"]) == sorted(ours)
    for name, r in ours.items():
        theirs = res["results"][name]
        assert theirs["acc,none"] == r["acc"] and theirs.get("acc_norm,none") == r["acc_norm"], name
    return ours


@pytest.mark.slow
def test_lm_eval_hf_model_agrees_with_eval_zeroshot(folder):
    """The shipped fixtures: 4 documents of three tasks (slow: two scorings and three model loads, minutes on a
    busy 2-core machine)."""
    ours = lm_eval_agrees(folder, "piqa,arc_easy,winogrande", FIXTURES)
    assert all(r["n"] == 4 for r in ours.values())


@pytest.mark.slow
def test_lm_eval_hf_model_agrees_on_the_task_data(folder, tmp_path):
    """The first 20 documents of each of the five tasks, from the real task files (DBLLM_DATA_DIR or
    ../shared/data)."""
    from conftest import _data_dir
    from dbllm_lab.zeroshot import TASKS
    data_dir = _data_dir()
    if not data_dir or not all(os.path.isdir(os.path.join(data_dir, "zeroshot", t)) for t in TASKS):
        pytest.skip("zero-shot task files not found: set DBLLM_DATA_DIR to a folder holding zeroshot/<task>/")
    ours = lm_eval_agrees(folder, ",".join(TASKS), data_dir, limit=20)
    assert all(r["n"] == 20 for r in ours.values())


def test_save_pretrained_round_trip(tiny, tmp_path):
    """``model.save_pretrained`` of a loaded packed model writes a folder ``from_pretrained`` loads back."""
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    save_quantized(tiny, str(tmp_path / "a"), tokenizer=False)
    first = from_pretrained(str(tmp_path / "a"))
    first.save_pretrained(str(tmp_path / "b"))
    second = from_pretrained(str(tmp_path / "b"))
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(first(x).logits, second(x).logits)
        assert torch.equal(tiny(x).logits, load_quantized(str(tmp_path / "a"), backend="torch")(x).logits)


def test_generate_with_kv_cache_on_a_loaded_folder(tiny, tmp_path):
    """generate's KV cache on a from_pretrained packed model: the same greedy tokens as without it, and the
    cached next-token logits equal a full forward's."""
    from dbllm_lab.generate import set_backend
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    save_quantized(tiny, str(tmp_path), tokenizer=False)
    hf = from_pretrained(str(tmp_path))
    assert hf.config.use_cache and hf.generation_config.use_cache
    set_backend(hf, "torch")  # one arithmetic at every number of rows (the CPU kernel picks its path by rows)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    gen = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(hf.generate(ids, **gen), hf.generate(ids, use_cache=False, **gen))
    with torch.no_grad():
        prefix = hf(ids[:, :-1], use_cache=True)
        assert prefix.past_key_values is not None
        step = hf(ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[0, -1]
        assert torch.allclose(step, hf(ids).logits[0, -1], atol=1e-5, rtol=1e-5)


def test_from_pretrained_in_bf16_keeps_the_packed_format(tiny_folder):
    """``dtype=torch.bfloat16`` makes the activations, norms and embedding bf16 and leaves every packed tensor as
    stored (int32 planes, the folder's fp16 scales bit for bit). Its logits are the fp32 model's within 1e-2 of their
    largest (measured 4.0e-3, bf16's rounding step; not ``.to(bfloat16)``'s bits: transformers keeps e.g. RoPE's
    buffer in fp32)."""
    from dbllm_lab.packed_linear import PackedDualBinaryLinear
    hf = from_pretrained(str(tiny_folder), dtype=torch.bfloat16)
    ref = load_quantized(str(tiny_folder))
    packed = {n: m for n, m in hf.named_modules() if isinstance(m, PackedDualBinaryLinear)}
    assert len(packed) == 14 and hf.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, m in packed.items():
        r = ref.get_submodule(name)
        for k in ("p1", "p2", "a1", "a2"):
            assert getattr(m, k).dtype == getattr(r, k).dtype and torch.equal(getattr(m, k), getattr(r, k)), (name, k)
    x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, y_ref = hf(x).logits.float(), ref(x).logits
        assert (y - y_ref).abs().max() <= 1e-2 * y_ref.abs().max(), ((y - y_ref).abs().max(), y_ref.abs().max())


def test_cli_checkpoint_runs_in_the_dtype_asked(folder):
    """``--dtype bfloat16`` with ``--checkpoint`` (eval-ppl, eval-zeroshot, generate): the model runs in bf16, the
    packed tensors stay as stored; a bad dtype is refused by name."""
    import argparse
    from dbllm_lab.cli import _model
    from dbllm_lab.packed_linear import PackedDualBinaryLinear
    model, _ = _model(argparse.Namespace(checkpoint=folder, model=None, dtype="bfloat16"))
    layers = [m for m in model.modules() if isinstance(m, PackedDualBinaryLinear)]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and len(layers) == 210
    assert all(m.a1.dtype == torch.float16 and m.p1.dtype == torch.int32 for m in layers)
    with pytest.raises(ValueError, match="dtype='float8' is not supported"):
        _model(argparse.Namespace(checkpoint=folder, model=None, dtype="float8"))


def test_registration_is_idempotent_and_config_round_trips():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig
    register()
    assert AUTO_QUANTIZER_MAPPING["dbllm"] is DbllmHfQuantizer
    cfg = AutoQuantizationConfig.from_dict(DbllmConfig(group_size=128).to_dict())
    assert isinstance(cfg, DbllmConfig) and cfg.group_size == 128 and cfg.modules_to_not_convert == ["lm_head"]


# ---- bad folders ----------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_folder(tiny, tmp_path):
    quantize_model(tiny, "fdb", group_size=32, progress=False)
    save_quantized(tiny, str(tmp_path), tokenizer=False)
    return tmp_path


def _edit_config(path, **fields):
    cp = path / "config.json"
    config = json.loads(cp.read_text())
    config["quantization_config"].update(fields.pop("quantization_config", {}))
    config.update(fields)
    cp.write_text(json.dumps(config))


@pytest.mark.parametrize("field, value, message", [
    ("packing_version", 2, r"quantization_config.packing_version=2 is not supported"),
    ("method", "uniform", r"quantization_config.method='uniform' is not stored in the packed format"),
    ("group_size", 48, r"quantization_config.group_size=48 must be a positive multiple of 32"),
    ("group_size", 64, r"quantization_config.group_size=64 in config.json but group_size=32 in quant_config.json"),
])
def test_bad_quantization_config_names_the_field(tiny_folder, field, value, message):
    _edit_config(tiny_folder, quantization_config={field: value})
    with pytest.raises(ValueError, match=message):
        from_pretrained(str(tiny_folder))


def test_group_size_and_shape_mismatch_without_header_names_the_field(tiny_folder):
    os.remove(tiny_folder / HEADER)  # as a folder written by model.save_pretrained: no header, no checksum
    _edit_config(tiny_folder, quantization_config={"group_size": 64})
    with pytest.raises(ValueError, match=r"q_proj.a1 has shape \(64, 2\), expected \(64, 1\).*group_size"):
        from_pretrained(str(tiny_folder))
    _edit_config(tiny_folder, quantization_config={"group_size": 32}, intermediate_size=256)
    with pytest.raises(ValueError, match=r"gate_proj.p1 has shape \(128, 2\), expected \(256, 2\).*packing_version"):
        from_pretrained(str(tiny_folder))


def test_corrupt_or_truncated_weights_are_refused(tiny_folder):
    wp = tiny_folder / WEIGHTS
    good = wp.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0x01  # one bit inside the tensor data: only the checksum sees it
    wp.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the sha256"):
        from_pretrained(str(tiny_folder))
    wp.write_bytes(good[: len(good) - 1000])
    with pytest.raises(ValueError, match="does not match the sha256"):
        from_pretrained(str(tiny_folder))
    os.remove(tiny_folder / HEADER)  # without the header a truncated file is still refused, by its own layout
    with pytest.raises(ValueError, match="truncated or corrupt"):
        from_pretrained(str(tiny_folder))
    wp.write_bytes(good)  # the intact file loads again
    assert from_pretrained(str(tiny_folder)) is not None
