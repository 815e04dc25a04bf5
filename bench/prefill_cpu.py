"""Prefill on the CPU: a prompt of T tokens through the trained packed student, on the C++ kernel's paths, against
the dense model in fp32 and bf16 and against llama.cpp's prompt processing of the same model.

    python bench/prefill_cpu.py                                  # build/models/best; T = 128, 512; threads 2, 1
    python bench/prefill_cpu.py --tokens 512 --threads 2 --ppl-windows 0

Rows (model, engine, threads, tokens; prompt: the first T tokens of WikiText-2 test, dev window 1):
  * engine ``lean``: ``LeanDecoder.forward(ids, 0)``, a generation's prompt: every layer on T rows, the LM head on
    the last row only (what llama-bench's pp test computes); engine ``hf``: ``model(ids).logits``, all T rows
    through the LM head (what perplexity runs);
  * ``packed cpu``: backend 'cpu', which from ``DENSE_MIN_ROWS`` rows on takes the prefill path (each layer's
    ``w_hat`` dequantized in C++ for the call, then ``F.linear``); ``packed cpu-exact``: the exact fp32 kernel at
    every batch (what 'cpu' ran above 4 rows before the prefill path); ``packed-bf16 cpu``: the packed model moved
    to bf16 (``.to(torch.bfloat16)``: activations, norms and embedding in bf16, planes and fp16 scales unchanged; its
    prefill path writes ``w_hat`` in bf16 for a bf16 GEMM); ``fp`` / ``fp-bf16``: the dense model (dequantized
    Q4_1) in fp32 / bf16;
  * ``llama.cpp FMT``: ``llama-bench -p T -n 0 -t THREADS --repack 0``. Its default repacks Q4_0 / Q2_K weights
    into the AMX buffer; on the AMX Xeon of this project prompt processing then crashes (SIGSEGV; decoding runs),
    so ``repack_1_exit`` records that try and the rows are without the repack.
Timing: one warm-up, then ``--rounds`` rounds, each method once per round in turn (a background load hits them
alike); the median is reported, with the 1-min load average sampled every second. ``layer_sweep`` (settings): one
packed layer of each SmolLM2 shape and 4096x4096 at batch M, exact kernel against the prefill path, medians of
``--rounds`` calls: the measurement behind ``DENSE_MIN_ROWS``. Also the prefill path's numerical change: max
|logits(cpu) - logits(cpu-exact)| / max |logits| per T, and the dev PPL (``--ppl-windows``) of both and of the
bf16 model.
Writes bench/results/prefill_cpu.json.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_results  # noqa: E402

from dbllm_lab import cpu_kernel  # noqa: E402
from dbllm_lab.decode import LeanDecoder  # noqa: E402
from dbllm_lab.generate import set_backend  # noqa: E402
from dbllm_lab.packed_linear import DENSE_MIN_ROWS, PackedDualBinaryLinear  # noqa: E402
from dbllm_lab.timing import LoadSampler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINED = os.path.join(ROOT, "build", "models", "best")
LLAMACPP_FORMATS = ("F16", "Q4_0", "Q2_K")
SWEEP_SHAPES = ((192, 576), (576, 576), (1536, 576), (576, 1536), (4096, 4096))
SWEEP_ROWS = (8, 16, 32, 64, 128, 256, 512)


def interleaved(fns, rounds):
    """{name: median seconds}: one warm-up call each, then ``rounds`` rounds of one call each, in turn."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def model_methods(models, ids):
    """(model, engine) -> a call that runs the prompt ``ids``; packed backends are set on each call."""
    fns = {}
    for name, (model, backend) in models.items():
        lean = LeanDecoder(set_model(model, backend))

        def hf(m=model, b=backend):
            set_model(m, b)(ids[None])

        fns[(name, "lean")] = lambda d=lean: d.forward(ids, 0)
        fns[(name, "hf")] = hf
    return fns


def set_model(model, backend):
    if backend:
        set_backend(model, backend)
    return model


def layer_sweep(rounds):
    """Exact kernel vs prefill path per shape and batch (random FDB planes; the time does not depend on the bits)."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for N, K in SWEEP_SHAPES:
        b1, b2 = (torch.rand(N, K, generator=gen) < 0.3 for _ in range(2))
        layer = PackedDualBinaryLinear.from_bitplanes(b1, b2, torch.rand(N, K // 64) + 0.5,
                                                      torch.rand(N, K // 64) * 0.5, 64)
        for M in SWEEP_ROWS:
            x = torch.randn(M, K, generator=gen)
            ms = interleaved({"exact": lambda: layer.matmul_cpu(x, "cpu-exact"),
                              "prefill": lambda: F.linear(x, cpu_kernel.dequantize_cpu(
                                  layer.p1, layer.p2, layer.a1, layer.a2, 64))}, rounds)
            rows.append({"shape": f"{N}x{K}", "rows": M, "exact_ms": ms["exact"] * 1e3,
                         "prefill_path_ms": ms["prefill"] * 1e3, "prefill_speedup": ms["exact"] / ms["prefill"]})
            print(rows[-1], flush=True)
    return rows


def llamacpp_rows(tokens_list, threads_list, repetitions):
    """llama.cpp prompt processing rows, [] with a note when llama.cpp is not built (``bench/llamacpp.py --build``)."""
    import llamacpp
    if not os.path.isfile(llamacpp.binary("llama-bench")):
        print("note: llama.cpp is not built (python bench/llamacpp.py --build): no llama.cpp rows")
        return []
    info, paths = llamacpp.build(), llamacpp.make_ggufs(LLAMACPP_FORMATS)
    rows = []
    for fmt in LLAMACPP_FORMATS:
        try:  # the default (repack on): record whether it runs here
            llamacpp.llama_bench(paths[fmt], 1, "pp", 64, 1)
            repack_exit = 0
        except RuntimeError as e:
            repack_exit = str(e).split("(exit ", 1)[1].split(")", 1)[0] if "(exit " in str(e) else str(e)[:80]
        for threads in threads_list:
            for T in tokens_list:
                pp = llamacpp.llama_bench(paths[fmt], threads, "pp", T, repetitions, extra=("--repack", "0"))
                rows.append({"model": f"llama.cpp {fmt}", "engine": f"llama.cpp {info['llama_cpp_commit']}",
                             "threads": threads, "tokens": T, "prefill_ms": 1e3 * T / pp["mean"],
                             "prefill_tokens_per_s": pp["mean"], "prefill_tokens_per_s_sd": pp["sd"],
                             "repack_1_exit": repack_exit})
                print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=TRAINED, help="packed model folder (default build/models/best)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ppl-windows", type=int, default=40, help="dev windows scored on both packed paths (0: none)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "prefill_cpu.json"))
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        raise SystemExit(f"{args.checkpoint} is not a packed model folder: train one with "
                         f"`dbllm-lab train --recipe best --save {TRAINED}` or pass --checkpoint")
    from dbllm_lab.checkpoint import load_quantized
    from dbllm_lab.model import load_model
    from dbllm_lab.ppl import eval_windows, perplexity
    base, tok = load_model()
    packed = load_quantized(args.checkpoint, base_model=copy.deepcopy(base))
    packed_bf16 = copy.deepcopy(packed).to(torch.bfloat16)  # activations bf16; planes and fp16 scales unchanged
    models = {"packed cpu": (packed, "cpu"), "packed cpu-exact": (packed, "cpu-exact"),
              "packed-bf16 cpu": (packed_bf16, "cpu"), "fp": (base, None),
              "fp-bf16": (copy.deepcopy(base).to(torch.bfloat16), None)}
    window = eval_windows(base, tok, max_windows=1)[0]
    load_before, rows, check = os.getloadavg(), [], {}
    with LoadSampler() as sampler, torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for T in args.tokens:
                ids = window[:T]
                s = interleaved(model_methods(models, ids), args.rounds)
                for (name, engine), sec in s.items():
                    rows.append({"model": name, "engine": engine, "threads": threads, "tokens": T,
                                 "prefill_ms": sec * 1e3, "prefill_tokens_per_s": T / sec})
                    print(rows[-1], flush=True)
                if threads == args.threads[0]:
                    y = {b: set_model(packed, b)(ids[None]).logits.float() for b in ("cpu", "cpu-exact")}
                    check[T] = ((y["cpu"] - y["cpu-exact"]).abs().max() / y["cpu-exact"].abs().max()).item()
        torch.set_num_threads(args.threads[0])
        sweep = layer_sweep(args.rounds)
    ppl = {}
    if args.ppl_windows:
        for key, model, b in (("cpu", packed, "cpu"), ("cpu-exact", packed, "cpu-exact"),
                              ("bf16 cpu", packed_bf16, "cpu")):
            r = perplexity(set_model(model, b), tok, max_windows=args.ppl_windows, progress=False)
            ppl[key] = {"ppl": r.ppl, "windows": r.windows, "seconds": r.seconds}
            print(key, ppl[key], flush=True)
    peers = [] if args.no_llamacpp else llamacpp_rows(args.tokens, args.threads, 5)
    for r in rows + peers:
        engine = r["engine"] if r["engine"] in ("lean", "hf") else "lean"
        ref = next(x for x in rows if (x["model"], x["engine"], x["threads"], x["tokens"]) ==
                   ("fp", engine, r["threads"], r["tokens"]))
        r["speedup_vs_fp32"] = ref["prefill_ms"] / r["prefill_ms"]
    settings = {"checkpoint": args.checkpoint, "tokens": args.tokens, "threads": args.threads, "rounds": args.rounds,
                "dense_min_rows": DENSE_MIN_ROWS, "int8_max_rows": 4, "kernel": cpu_kernel.info(),
                "prompt": "the first T tokens of WikiText-2 test window 1 (dev)",
                "speedup_vs_fp32": "the fp32 model's time on the same engine (llama.cpp rows: on the lean engine), "
                                   "threads and T, over the row's",
                "prefill_path_max_rel_logit_change": check, "dev_ppl": ppl, "layer_sweep": sweep,
                "loadavg_before": load_before, "load_during_run": sampler.summary()}
    write_results(args.out, rows + peers, settings,
                  columns=["model", "engine", "threads", "tokens", "prefill_ms", "prefill_tokens_per_s",
                           "speedup_vs_fp32"])


if __name__ == "__main__":
    main()
