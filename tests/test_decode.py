"""The lean decoder (dbllm_lab.decode) against HF's forward / generate on the same model: same greedy tokens, logits
equal to fp tolerance, for FP models and packed models on each C++ kernel path."""
import copy

import pytest
import torch

from dbllm_lab import cpu_kernel, decode
from dbllm_lab.decode import Int8LMHead, LeanDecoder
from dbllm_lab.decode_step import why_not
from dbllm_lab.generate import greedy_generate, set_backend

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="the C++ CPU kernel does not build here")


def hf_greedy(model, ids, n):
    """HF generate's greedy tokens and the (n, vocab) logits that chose them."""
    with torch.inference_mode():
        out = model.generate(ids[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), torch.cat(out.logits).float()


def assert_matches_hf(model, ids, n, rel_tol, int8_steps=False):
    """Lean vs HF: the prompt's logits (one forward), then n greedy steps (tokens equal, logits within tolerance).

    ``int8_steps``: the steps run the integer path, whose int8 activation codes can flip by one where an activation
    lies on a rounding boundary and the two loops' fp32 reassociation (~3e-7) moves it across; the flip then stays in
    the KV cache. Whether and when that happens depends on the machine, so the steps are bounded instead by the
    integer path's own distance from the exact fp32 forward of the same tokens (the prompt still to ``rel_tol``)."""
    decoder = LeanDecoder(model)
    with torch.inference_mode():
        full_ref = model(ids[None]).logits[0].float()
    full = decoder.forward(ids, 0, all_logits=True).float()
    assert (full - full_ref).abs().max() <= rel_tol * full_ref.abs().max()
    tokens_ref, logits_ref = hf_greedy(model, ids, n)
    tokens, logits = decoder.generate(ids, n, return_logits=True)
    assert tokens == tokens_ref
    if not int8_steps:
        assert (logits - logits_ref).abs().max() <= rel_tol * logits_ref.abs().max()
        return
    scale = logits_ref.abs().amax(1)
    rel = (logits - logits_ref).abs().amax(1) / scale
    assert rel[0] <= rel_tol and rel.max() <= int8_distance_from_exact(model, ids, tokens_ref, logits_ref).max()


def int8_distance_from_exact(model, ids, tokens, logits):
    """Per step, max |logits - exact| / max |logits|, exact: one forward over the same tokens on 'cpu-exact'."""
    backend = next(m for m in model.modules() if hasattr(m, "backend")).backend
    set_backend(model, "cpu-exact")
    try:
        with torch.inference_mode():
            exact = model(torch.cat([ids, torch.tensor(tokens[:-1])])[None]).logits[0, len(ids) - 1:].float()
    finally:
        set_backend(model, backend)
    return (logits - exact).abs().amax(1) / logits.abs().amax(1)


def packed_tiny(tiny):
    from dbllm_lab.packed_linear import pack_model
    from dbllm_lab.quantize import quantize_model
    model = copy.deepcopy(tiny)
    quantize_model(model, "fdb", group_size=64, init="clip", progress=False)
    assert len(pack_model(model)) == 14
    return model


def test_step_by_step_forward_grows_the_cache_and_keeps_it(tiny):
    """forward() one token at a time, with no reserve() ahead (the cache grows on every call), gives the logits of
    one forward over the whole sequence."""
    ids = torch.arange(3, 15)
    decoder = LeanDecoder(tiny)
    steps = torch.stack([decoder.forward(ids[:4], 0)] + [decoder.forward(ids[n:n + 1], n) for n in range(4, len(ids))])
    with torch.inference_mode():
        ref = tiny(ids[None]).logits[0, 3:]
    assert (steps - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype,rel_tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fp_tiny_matches_hf(tiny, dtype, rel_tol):
    assert_matches_hf(tiny.to(dtype), torch.arange(3, 12), 6, rel_tol)


@needs_kernel
@pytest.mark.parametrize("backend", ["cpu", "cpu-exact", "cpu-int8"])
def test_packed_tiny_matches_hf(tiny, backend):
    """Packed layers on each kernel path; on 'cpu' the prompt runs the exact path and the steps the integer path
    (q/k/v and gate/up fused there: the same bits as separate calls)."""
    model = packed_tiny(tiny)
    set_backend(model, backend)
    assert_matches_hf(model, torch.arange(3, 12), 6, 1e-5)


@needs_kernel
def test_packed_tiny_long_prompt_runs_the_prefill_path(tiny, monkeypatch):
    """A prompt of DENSE_MIN_ROWS tokens: on 'cpu' the lean decoder's projections take each layer's prefill path
    (dequantize + F.linear), as HF's forward does; logits as HF's, greedy steps after it on the integer path."""
    from dbllm_lab import cpu_kernel
    from dbllm_lab.packed_linear import DENSE_MIN_ROWS
    model = packed_tiny(tiny)
    set_backend(model, "cpu")
    calls, dequantize = [], cpu_kernel.dequantize_cpu
    monkeypatch.setattr(cpu_kernel, "dequantize_cpu", lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    ids = torch.arange(3, 3 + DENSE_MIN_ROWS) % model.config.vocab_size
    LeanDecoder(model).forward(ids, 0)
    assert len(calls) == 14  # every packed layer once
    assert_matches_hf(model, ids, 4, 1e-5, int8_steps=True)


@needs_kernel
def test_embedded_two_blocks_fp_and_packed_match_hf(embedded):
    """The embedded SmolLM2 (GQA 9 / 3 heads, head_dim 64, tied 49,152-row head) cut to 2 blocks: FP, then packed
    on backend 'cpu' (fused integer path for the steps)."""
    from dbllm_lab.packed_linear import pack_model
    from dbllm_lab.quantize import quantize_model
    model, tok = embedded
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:2]
    small.config.num_hidden_layers = 2
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
    assert_matches_hf(small, ids, 4, 1e-5)
    quantize_model(small, "fdb", group_size=64, init="clip", progress=False)
    pack_model(small)
    set_backend(small, "cpu")
    assert_matches_hf(small, ids, 8, 1e-5, int8_steps=True)
    lean = greedy_generate(small, tok, "The capital of France is", 4, engine="lean")
    hf = greedy_generate(small, tok, "The capital of France is", 4, engine="hf")
    assert lean["token_ids"] == hf["token_ids"] and lean["engine"] == "lean" and lean["decode_tokens_per_s"] > 0


def python_path_twin(model, lm_head):
    """Two decoders of ``model``: one taking the one-call C++ step for one-token steps, one the Python path."""
    native, python = LeanDecoder(model, lm_head=lm_head), LeanDecoder(model, lm_head=lm_head)
    assert native.native is not None, why_not(native)
    python.native = None
    return native, python


@needs_kernel
@pytest.mark.parametrize("lm_head,layout", [("exact", "lut"), ("int8", "lut"), ("int8", "vnni")])
def test_native_step_is_the_python_path_on_the_embedded_model(embedded, lm_head, layout, monkeypatch):
    """The one-call C++ decode step (dbllm_lab.decode_step) against the Python path on the embedded SmolLM2 (GQA,
    cut to 6 blocks) packed on backend 'cpu': the same integer kernel on the same bits; attention and SiLU are C++
    loops in place of torch's, so a step's logits differ by fp32 reassociation (~3e-7 of max |logit|), unless an
    activation lies on an int8 rounding boundary: then one code differs by 1 and the difference (~3e-3) stays in the
    KV cache, less than the integer path's own distance from the exact fp32 forward of the same tokens. When the first
    flip comes depends on the machine (the last 2 of 12 steps on an AVX2 Zen 2, the last 6 on an AVX-512 Zen 4), so
    only the prompt's logits are held to 1e-5. Same greedy tokens. Both integer layouts (each runs its SIMD code
    where the CPU has it, else its portable loop)."""
    from dbllm_lab import cpu_kernel
    from dbllm_lab.packed_linear import pack_model
    monkeypatch.setattr(cpu_kernel, "int8_layout", lambda generic=False: layout)
    from dbllm_lab.quantize import quantize_model
    model, tok = embedded
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:6]
    small.config.num_hidden_layers = 6
    quantize_model(small, "fdb", group_size=64, init="clip", progress=False)
    pack_model(small)
    set_backend(small, "cpu")
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0]
    native, python = python_path_twin(small, lm_head)
    assert native.blocks[0].qkv.int8.layout == layout
    tokens, logits = native.generate(ids, 12, return_logits=True)
    tokens_ref, logits_ref = python.generate(ids, 12, return_logits=True)
    assert tokens == tokens_ref
    rel = (logits - logits_ref).abs().amax(1) / logits_ref.abs().amax(1)
    assert rel[0] <= 1e-5 and rel.max() <= int8_distance_from_exact(small, ids, tokens_ref, logits_ref).max()


@needs_kernel
def test_native_step_grows_the_cache_and_falls_back(tiny):
    """Packed tiny on 'cpu': one token at a time with no reserve() ahead (the cache, which the C++ step indexes by
    its length, grows on every call) gives the Python path's logits. Models it does not cover keep the Python path:
    the exact kernel path, bf16."""
    model = packed_tiny(tiny)
    set_backend(model, "cpu")
    ids = torch.arange(3, 15)
    native, python = python_path_twin(model, "exact")
    steps = [torch.stack([d.forward(ids[:4], 0)] + [d.forward(ids[n:n + 1], n) for n in range(4, len(ids))])
             for d in (native, python)]
    assert (steps[0] - steps[1]).abs().max() <= 1e-5 * steps[1].abs().max()
    set_backend(model, "cpu-exact")
    assert "fused integer path" in why_not(LeanDecoder(model))
    assert "bfloat16" in why_not(LeanDecoder(tiny.to(torch.bfloat16)))


@needs_kernel
def test_int8_head_is_its_dequantized_weight():
    """The int8 rows kernel (each of its loops, K = 72 not a multiple of their widths) and the prefill path equal
    x @ (s * codes).T; the codes are within half a step of the weight."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(203, 72, generator=gen)
    w[5] = 0  # an all-zero row: scale 0, codes 0
    head = Int8LMHead(w)
    deq = head.codes.float() * head.scales[:, None]
    assert ((deq - w).abs() <= head.scales[:, None] / 2 + 1e-7).all() and (head.codes[5] == 0).all()
    for rows in (1, 3, 9):
        x = torch.randn(rows, 72, generator=gen)
        ref = x @ deq.T
        assert torch.allclose(head(x), ref, atol=1e-5, rtol=1e-5)
        for loop in decode.INT8_ROWS_LOOPS:
            assert torch.allclose(decode.int8_rows_matmul_cpu(x, head.codes, head.scales, loop=loop), ref,
                                  atol=1e-5, rtol=1e-5), loop
    with pytest.raises(ValueError, match="loop='avx1024' is not one of"):
        decode.int8_rows_matmul_cpu(x, head.codes, head.scales, loop="avx1024")


@needs_kernel
def test_int8_head_decoding_runs(tiny):
    tokens = LeanDecoder(tiny, lm_head="int8").generate(torch.arange(3, 9), 4)
    assert len(tokens) == 4 and all(0 <= t < tiny.config.vocab_size for t in tokens)


def test_bad_arguments_name_the_value(tiny):
    with pytest.raises(ValueError, match="lm_head='fp8'"):
        LeanDecoder(tiny, lm_head="fp8")
    with pytest.raises(ValueError, match="engine='fast'"):
        greedy_generate(tiny, None, "hi", 4, engine="fast")
    with pytest.raises(ValueError, match="needs engine='lean'"):
        greedy_generate(tiny, None, "hi", 4, engine="hf", lm_head="int8")
    other = copy.deepcopy(tiny)
    other.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type"):
        LeanDecoder(other)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        LeanDecoder(tiny).generate(torch.tensor([[1, 2]]), 2)
