"""Greedy text generation with timing: what ``dbllm-lab generate`` and ``bench/generate_cpu.py`` run.

Two engines give the same tokens: ``'hf'``, transformers' ``model.generate``, and ``'lean'``, the static-cache loop
of ``dbllm_lab.decode`` (LLaMA-family models; ``lm_head='int8'`` there is an optional cheaper LM head).
Decode speed is measured apart from the prompt: one call generates a single token (prefill, cold), a second call
the full ``max_new_tokens`` (forced: the end-of-text token does not stop it), and decode tokens/s =
(max_new_tokens - 1) / decode seconds: 'hf' takes t_full - t_prefill, 'lean' times its own steps after the first
token of the second call.
"""
import time

import torch

ENGINES = ("hf", "lean")
DEFAULT_ENGINE = "hf"
DEFAULT_LM_HEAD = "exact"  # dbllm_lab.decode.LM_HEADS; 'int8' only with engine 'lean'


def set_backend(model, backend):
    """Set the ``backend`` switch of every ``PackedDualBinaryLinear`` in ``model``; returns how many were set."""
    from .packed_linear import BACKENDS, PackedDualBinaryLinear
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    layers = [m for m in model.modules() if isinstance(m, PackedDualBinaryLinear)]
    for m in layers:
        m.backend = backend
    return len(layers)


def greedy_generate(model, tok, prompt, max_new_tokens=128, engine=DEFAULT_ENGINE, lm_head=DEFAULT_LM_HEAD):
    """Greedy continuation of ``prompt``: {text, new_tokens, prefill_s, total_s, decode_tokens_per_s, ...}.
    ``engine``: 'hf' or 'lean' (module docstring); ``lm_head``: 'exact' or, with 'lean', 'int8'."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 2 (one prefill token + decoding)")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not one of {ENGINES}")
    if engine == "hf" and lm_head != "exact":
        raise ValueError(f"lm_head={lm_head!r} needs engine='lean'; engine='hf' runs the model's own head ('exact')")
    device = next(model.parameters()).device
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    if engine == "lean":
        return _lean_generate(model, tok, ids[0], max_new_tokens, lm_head)
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    kw = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
        t2 = time.perf_counter()
    new = out[0, ids.shape[1]:].tolist()
    return _result(tok, ids.shape[1], new, prefill=t1 - t0, total=t2 - t1, decode=(t2 - t1) - (t1 - t0),
                   engine="hf", lm_head="exact")


def _lean_generate(model, tok, ids, max_new_tokens, lm_head):
    from .decode import LeanDecoder
    t0 = time.perf_counter()
    decoder = LeanDecoder(model, lm_head=lm_head)  # the fused layouts, the int8 head
    decoder.reserve(len(ids) + max_new_tokens)  # the KV cache and rotary table
    t1 = time.perf_counter()
    decoder.generate(ids, 1)
    t2 = time.perf_counter()
    first = []
    new = decoder.generate(ids, max_new_tokens, on_first_token=lambda: first.append(time.perf_counter()))
    t3 = time.perf_counter()
    return _result(tok, len(ids), new, prefill=t2 - t1, total=t3 - t2, decode=t3 - first[0], engine="lean",
                   lm_head=lm_head, setup_s=t1 - t0)


def _result(tok, prompt_tokens, new, prefill, total, decode, **extra):
    return {"prompt_tokens": prompt_tokens, "new_tokens": len(new), "prefill_s": prefill, "total_s": total,
            "decode_tokens_per_s": (len(new) - 1) / max(decode, 1e-9), "tokens_per_s": len(new) / total,
            "text": tok.decode(new, skip_special_tokens=True), "token_ids": new, **extra}
