"""Greedy text generation with timing: what ``dbllm-lab generate`` and ``bench/generate_cpu.py`` run.

Decode speed is measured apart from the prompt: one call generates a single token (prefill), a second call the
full ``max_new_tokens`` (forced: the end-of-text token does not stop it), and
decode tokens/s = (max_new_tokens - 1) / (t_full - t_prefill).
"""
import time

import torch


def set_backend(model, backend):
    """Set the ``backend`` switch of every ``PackedDualBinaryLinear`` in ``model``; returns how many were set."""
    from .packed_linear import BACKENDS, PackedDualBinaryLinear
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    layers = [m for m in model.modules() if isinstance(m, PackedDualBinaryLinear)]
    for m in layers:
        m.backend = backend
    return len(layers)


def greedy_generate(model, tok, prompt, max_new_tokens=128):
    """Greedy continuation of ``prompt``: {text, new_tokens, prefill_s, total_s, decode_tokens_per_s, ...}."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 2 (one prefill token + decoding)")
    device = next(model.parameters()).device
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    kw = dict(do_sample=False, pad_token_id=pad, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
        t2 = time.perf_counter()
    new = out[0, ids.shape[1]:]
    prefill, total = t1 - t0, t2 - t1
    return {"prompt_tokens": ids.shape[1], "new_tokens": len(new), "prefill_s": prefill, "total_s": total,
            "decode_tokens_per_s": (len(new) - 1) / max(total - prefill, 1e-9),
            "tokens_per_s": len(new) / total, "text": tok.decode(new, skip_special_tokens=True),
            "token_ids": new.tolist()}
