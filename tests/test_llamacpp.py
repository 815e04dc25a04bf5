"""bench/llamacpp.py without the llama.cpp build: llama-bench JSON parsing and bits per weight from a GGUF tensor table."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import llamacpp  # noqa: E402


def test_parse_llama_bench_reads_token_generation():
    text = json.dumps([{"n_prompt": 0, "n_gen": 64, "n_threads": 2, "avg_ts": 101.5, "stddev_ts": 1.25,
                        "samples_ts": [100.0, 103.0]}])
    assert llamacpp.parse_llama_bench(text) == {"mean": 101.5, "sd": 1.25, "samples": [100.0, 103.0],
                                                "n_gen": 64, "threads": 2}
    with pytest.raises(ValueError, match="one token-generation test in llama-bench's JSON, found 0"):
        llamacpp.parse_llama_bench(json.dumps([{"n_prompt": 512, "n_gen": 0}]))


def test_parse_llama_bench_reads_prompt_processing():
    runs = [{"n_prompt": 512, "n_gen": 0, "n_threads": 1, "avg_ts": 640.0, "stddev_ts": 7.0, "samples_ts": [633, 647]},
            {"n_prompt": 0, "n_gen": 64, "n_threads": 1, "avg_ts": 99.0, "stddev_ts": 1.0, "samples_ts": [98, 100]}]
    assert llamacpp.parse_llama_bench(json.dumps(runs), "pp") == {"mean": 640.0, "sd": 7.0, "samples": [633.0, 647.0],
                                                                 "n_prompt": 512, "threads": 1}
    assert llamacpp.parse_llama_bench(json.dumps(runs), "tg")["n_gen"] == 64
    with pytest.raises(ValueError, match="one prompt-processing test in llama-bench's JSON, found 2"):
        llamacpp.parse_llama_bench(json.dumps([runs[0], runs[0]]), "pp")
    with pytest.raises(ValueError, match="test='pg' is not 'tg' or 'pp'"):
        llamacpp.parse_llama_bench(json.dumps(runs), "pg")


def test_tensor_bits_from_a_tiny_gguf(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "tiny.gguf")
    w = gguf.GGUFWriter(path, "llama")
    q = gguf.quants.quantize(np.ones((4, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # 34 bytes / 32 weights
    w.add_tensor("blk.0.ffn_down.weight", np.ones((4, 64), dtype=np.float16))          # 16 bits
    w.add_tensor("token_embd.weight", np.ones((8, 64), dtype=np.float32))              # not a decoder linear
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    bits = llamacpp.tensor_bits(path)
    assert bits["bits_per_decoder_weight"] == pytest.approx((8.5 + 16) / 2)
    assert bits["decoder_types"] == {"Q8_0": 1, "F16": 1} and bits["embedding_type"] == "F32"
    assert bits["bits_per_weight_all"] == pytest.approx((256 * 8.5 + 256 * 16 + 512 * 32) / 1024)
