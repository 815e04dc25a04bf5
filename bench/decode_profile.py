"""Where a decode step's time goes, HF generate against the lean loop (``dbllm_lab.decode``), and what the optional
int8 LM head costs in perplexity.

    python bench/decode_profile.py --checkpoint build/models/best-quarter           # packed 'cpu' + FP32, 2 threads
    python bench/decode_profile.py --checkpoint DIR --ppl-windows 0                 # timings only

Per model (the packed checkpoint on backend 'cpu', the FP32 model) and thread count, milliseconds per token:
  * ``hf_generate_ms``: ``greedy_generate(engine='hf')`` decode time per token;
  * ``hf_forward_ms``: one-token ``model(...)`` calls on a DynamicCache, as generate makes them, so
    ``hf_generate_overhead_ms`` = hf_generate_ms - hf_forward_ms is generate's own machinery;
  * ``linear_ms``: the 210 decoder linear layers called one by one on a random 1-token input (what HF's forward
    calls), ``lm_head_ms``: the model's LM head on one token, ``hf_rest_ms`` = hf_forward_ms - both: attention,
    norms, RoPE, residuals, cache updates and Python module calls;
  * ``lean_ms`` / ``lean_int8_head_ms``: ``greedy_generate(engine='lean')`` per token, exact and int8 head: the
    one-call C++ step (``dbllm_lab.decode_step``) where it applies (``native_step``: the packed model);
    ``python_int8_head_ms``: the same loop with the int8 head and that step switched off (the Python path: one
    call per operation); ``lean_projections_ms``: the Python path's projection calls alone (q/k/v and gate/up fused
    where packed), ``int8_head_ms``: the int8 head on one token (``int8_head_avx2_ms``: on its AVX2 loop, where the
    CPU has a faster one; ``decode.INT8_ROWS_LOOPS``), ``python_rest_ms`` = python_int8_head_ms -
    projections - int8 head: the norms, RoPE, attention, SiLU * up and residuals as Python and torch calls.
Components are timed apart, each as a loop of repeated calls (warm caches), so the parts are estimates that need
not add up exactly. Perplexity (``--ppl-windows``, default the 40 dev windows of WikiText-2 test at seqlen 512): the
packed model's final hidden states once per window, scored with the exact head and with the int8 head (the
``dbllm_lab.ppl`` protocol: exp of the mean next-token NLL). Writes bench/results/decode_profile.json.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The history of the city of Paris begins"


def per_call_ms(fn, reps):
    """Mean milliseconds of ``fn()`` over ``reps`` calls, after two warm-up calls."""
    fn(), fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def hf_forward_ms(model, ids, steps):
    """One-token forward calls on a DynamicCache after the prompt, as ``generate`` makes them (ms per call)."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    out = model(ids, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / steps * 1e3


def lean_step_ms(model, ids, tokens, native):
    """Per-token milliseconds of ``LeanDecoder`` with the int8 head, timed as ``greedy_generate`` times it, with or
    without the one-call C++ step."""
    from dbllm_lab.decode import LeanDecoder
    decoder = LeanDecoder(model, lm_head="int8")
    if not native:
        decoder.native = None
    decoder.reserve(len(ids) + tokens)
    decoder.generate(ids, 1)
    first = []
    decoder.generate(ids, tokens, on_first_token=lambda: first.append(time.perf_counter()))
    return (time.perf_counter() - first[0]) / (tokens - 1) * 1e3


def profile(model, tok, label, tokens, reps):
    """The row of one model (module docstring)."""
    from dbllm_lab.decode import Int8LMHead, LeanDecoder, int8_rows_matmul_cpu
    from dbllm_lab.generate import greedy_generate
    from dbllm_lab.model import quantizable_linears
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        hf = greedy_generate(model, tok, PROMPT, tokens, engine="hf")
        lean = greedy_generate(model, tok, PROMPT, tokens, engine="lean")
        lean8 = greedy_generate(model, tok, PROMPT, tokens, engine="lean", lm_head="int8")
        forward = hf_forward_ms(model, ids, tokens)
        python_ms = lean_step_ms(model, ids[0], tokens, native=False)
        linears = list(quantizable_linears(model).values())
        inputs = [torch.randn(1, 1, m.in_features) for m in linears]
        linear = per_call_ms(lambda: [m(x) for m, x in zip(linears, inputs)], reps)
        head = model.get_output_embeddings()
        h = torch.randn(1, 1, head.in_features)
        head_ms = per_call_ms(lambda: head(h), reps * 4)
        int8_head = Int8LMHead(head.weight)
        int8_ms = per_call_ms(lambda: int8_head(h[0]), reps * 4)
        int8_avx2_ms = per_call_ms(lambda: int8_rows_matmul_cpu(h[0], int8_head.codes, int8_head.scales, loop="avx2"),
                                   reps * 4)
        decoder = LeanDecoder(model)
        native = decoder.native is not None
        calls = [(p, torch.randn(1, p.modules[0].in_features)) for b in decoder.blocks
                 for p in (b.qkv, b.o, b.gate_up, b.down)]
        projections = per_call_ms(lambda: [p(x) for p, x in calls], reps)
    per_token = {k: 1e3 / r["decode_tokens_per_s"] for k, r in (("hf", hf), ("lean", lean), ("lean8", lean8))}
    return {"model": label, "threads": torch.get_num_threads(),
            "hf_tokens_per_s": hf["decode_tokens_per_s"], "lean_tokens_per_s": lean["decode_tokens_per_s"],
            "lean_int8_head_tokens_per_s": lean8["decode_tokens_per_s"],
            "hf_generate_ms": per_token["hf"], "hf_forward_ms": forward,
            "hf_generate_overhead_ms": per_token["hf"] - forward, "linear_calls": len(linears), "linear_ms": linear,
            "lm_head_ms": head_ms, "hf_rest_ms": forward - linear - head_ms,
            "lean_ms": per_token["lean"], "lean_projection_calls": len(calls), "lean_projections_ms": projections,
            "lean_int8_head_ms": per_token["lean8"], "int8_head_ms": int8_ms, "int8_head_avx2_ms": int8_avx2_ms,
            "native_step": native,
            "python_int8_head_ms": python_ms, "python_int8_head_tokens_per_s": 1e3 / python_ms,
            "python_rest_ms": python_ms - projections - int8_ms,
            "same_tokens_hf_lean": hf["token_ids"] == lean["token_ids"],
            "same_tokens_int8_head": sum(a == b for a, b in zip(hf["token_ids"], lean8["token_ids"]))}


def head_perplexity(model, tok, windows_n):
    """Dev perplexity of ``model`` with its exact LM head and with the int8 head, from one pass per window."""
    from dbllm_lab.decode import Int8LMHead
    from dbllm_lab.ppl import eval_windows
    windows = eval_windows(model, tok, max_windows=windows_n)
    heads = {"exact": model.get_output_embeddings(), "int8": Int8LMHead(model.get_output_embeddings().weight)}
    nll = dict.fromkeys(heads, 0.0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            hidden = model.model(w[None]).last_hidden_state[0, :-1]
            for name, head in heads.items():
                nll[name] += F.cross_entropy(head(hidden).float(), w[1:], reduction="sum").item()
    count = len(windows) * (windows.shape[1] - 1)
    ppl = {name: math.exp(v / count) for name, v in nll.items()}
    return {"windows": len(windows), "seqlen": windows.shape[1], "ppl_exact_head": ppl["exact"],
            "ppl_int8_head": ppl["int8"], "ppl_change": ppl["int8"] - ppl["exact"],
            "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="packed model folder")
    ap.add_argument("--checkpoint-note", default="", help="what the --checkpoint folder is (stored in the JSON)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of each timed component")
    ap.add_argument("--ppl-windows", type=int, default=40, help="dev windows for the int8-head perplexity; 0: none")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode_profile.json"))
    args = ap.parse_args()
    from dbllm_lab.checkpoint import load_quantized
    from dbllm_lab.generate import set_backend
    from dbllm_lab.model import load_model
    fp, tok = load_model(None)
    packed = load_quantized(args.checkpoint)
    set_backend(packed, "cpu")
    load_before, rows = os.getloadavg(), []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for label, model in (("packed cpu", packed), ("fp32", fp)):
            rows.append(profile(model, tok, label, args.tokens, args.reps))
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    ppl = head_perplexity(packed, tok, args.ppl_windows) if args.ppl_windows else None
    print("int8 LM head perplexity (packed model):", ppl)
    settings = {"checkpoint": args.checkpoint, "checkpoint_is": args.checkpoint_note or "no note",
                "prompt": PROMPT, "new_tokens": args.tokens, "reps": args.reps,
                "int8_head_perplexity_packed_model": ppl, "loadavg_before": load_before,
                "loadavg_after": os.getloadavg()}
    write_results(args.out, rows, settings,
                  columns=["model", "threads", "hf_tokens_per_s", "lean_tokens_per_s", "lean_int8_head_tokens_per_s",
                           "hf_generate_overhead_ms", "hf_forward_ms", "linear_ms", "lm_head_ms", "hf_rest_ms",
                           "lean_ms", "native_step", "python_int8_head_tokens_per_s", "python_int8_head_ms",
                           "lean_projections_ms", "python_rest_ms", "int8_head_ms", "int8_head_avx2_ms"])


if __name__ == "__main__":
    main()
