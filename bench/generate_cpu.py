"""End-to-end CPU generation: the embedded model in FP32 and BF16 vs its packed FDB checkpoint on the C++ kernel's
integer path (backend 'cpu': int8 activations for the 1-row decode steps) and exact fp32 path ('cpu-exact'), each
decoded by HF generate (engine 'hf') and by the lean loop of ``dbllm_lab.decode`` (engine 'lean', same tokens),
plus the packed 'cpu' model on the lean loop with the optional int8 LM head; at each of ``--threads`` (default 2
and 1). llama.cpp's rows (F16, Q4_0, Q4_K_M, Q2_K of the same model, ``bench/llamacpp.py``) join the table when
that file and its llama.cpp build are present (else a printed note; ``--no-llamacpp`` skips them).

    python bench/generate_cpu.py                                 # build/models/best if trained, else an FDB init
    python bench/generate_cpu.py --checkpoint DIR --tokens 32    # another packed folder, shorter run

Without ``--checkpoint``: the trained ``build/models/best`` (``dbllm-lab train --recipe best``) when it exists,
else an untrained FDB init (clip, g = 64) quantized once into checkpoints/fdb_clip_g64; the JSON says which.
Each model runs in a fresh Python process (so its memory is its own): load, then greedy generation of
``--tokens`` new tokens (``dbllm_lab.generate.greedy_generate``: decode tokens/s measured apart from the prompt).
Rows: model (fp, fp-bf16, packed cpu, packed cpu-exact), engine (hf, lean), lm_head (exact, int8).
Memory: the resident set right after loading and the peak resident set during generation (Linux VmHWM, reset
after loading through /proc/self/clear_refs, so loading the FP base model that the packed checkpoint builds on
is not counted). Bytes: of the decoder's linear layers (FP: its dtype; packed: bit-planes + fp16 scales) and of
all weights one decode step reads (every parameter and buffer once; the tied 576 x 49,152 embedding is read
whole as the LM head). Disk: the packed folder vs the FP model saved as fp32 safetensors. Writes
bench/results/generate_cpu.json.
"""
import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The history of the city of Paris begins"
TRAINED = os.path.join(ROOT, "build", "models", "best")
# (kind, backend, engine, lm_head): every model on both engines, and the lean packed 'cpu' model with the int8 head
RUNS = [(kind, backend, engine, "exact") for kind, backend in (("fp", "-"), ("fp-bf16", "-"), ("packed", "cpu"),
                                                                ("packed", "cpu-exact")) for engine in ("hf", "lean")]
RUNS.append(("packed", "cpu", "lean", "int8"))


def status_mib(key):
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def release_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is live
    except OSError:
        pass


def child(args):
    """One model in this process: load, measure, generate; prints one JSON line."""
    from dbllm_lab.generate import greedy_generate
    from dbllm_lab.model import load_model, quantizable_linears
    from dbllm_lab.generate import set_backend
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    if args.child == "packed":
        from dbllm_lab.checkpoint import load_quantized
        model = load_quantized(args.checkpoint, base_model=model)
        set_backend(model, args.backend)
    elif args.child == "fp-bf16":
        model = model.to(torch.bfloat16)
    load_s = time.perf_counter() - t0
    release_memory()
    rss_loaded = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    linear_bytes = sum(t.numel() * t.element_size() for m in quantizable_linears(model).values()
                       for t in list(m.parameters()) + list(m.buffers()))
    tensors = {t.data_ptr(): t for t in list(model.parameters()) + list(model.buffers()) if t is not None}
    step_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    head = model.get_output_embeddings().weight
    res = greedy_generate(model, tok, args.prompt, args.tokens, engine=args.engine, lm_head=args.lm_head)
    res.update({"model": args.child if args.child != "packed" else f"packed {args.backend}", "load_s": load_s,
                "rss_after_load_MiB": rss_loaded, "peak_rss_generate_MiB": status_mib("VmHWM"),
                "linear_layers_MiB": linear_bytes / 2**20, "weights_read_per_token_MiB": step_bytes / 2**20,
                "lm_head_MiB": head.numel() * head.element_size() / 2**20, "threads": torch.get_num_threads()})
    print("RESULT " + json.dumps(res))


def run_child(kind, backend, engine, lm_head, threads, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--backend", backend, "--checkpoint",
           args.checkpoint, "--tokens", str(args.tokens), "--threads", str(threads), "--prompt", args.prompt,
           "--engine", engine, "--lm-head", lm_head]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def llamacpp_rows(args):
    """The hook for llama.cpp's rows: ``bench/llamacpp.py``'s ``llamacpp_rows(threads, tokens)`` when that file and
    its build (llama-bench) exist, else [] and a printed note saying why."""
    if args.no_llamacpp:
        return []
    if not os.path.isfile(os.path.join(ROOT, "bench", "llamacpp.py")):
        print("note: no bench/llamacpp.py here, so no llama.cpp rows")
        return []
    import llamacpp
    if not os.path.isfile(llamacpp.binary("llama-bench")):
        print(f"note: llama.cpp is not built ({llamacpp.binary('llama-bench')} is missing; `python bench/llamacpp.py "
              f"--build`), so no llama.cpp rows")
        return []
    return llamacpp.llamacpp_rows(args.threads, args.tokens)


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def ensure_checkpoint(args):
    """The packed FDB checkpoint (quantize once: FDB, clip init, g = 64) and the FP32 safetensors size."""
    from safetensors.torch import save_model
    from dbllm_lab.checkpoint import read_header, save_quantized
    from dbllm_lab.model import load_model
    from dbllm_lab.quantize import quantize_model
    model, _ = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, os.path.join(tmp, "model.safetensors"))
        fp_bytes = os.path.getsize(os.path.join(tmp, "model.safetensors"))
    if not os.path.isfile(os.path.join(args.checkpoint, "quant_config.json")):
        report = quantize_model(model, "fdb", group_size=args.group_size, init="clip")
        save_quantized(model, args.checkpoint)
        print(f"quantized in {report['seconds']:.0f} s, saved {args.checkpoint}")
    return read_header(args.checkpoint), fp_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M-Instruct")
    ap.add_argument("--checkpoint", default=None,
                    help="packed model folder (default: build/models/best if it exists, else checkpoints/fdb_clip_g64, "
                         "made here if missing)")
    ap.add_argument("--checkpoint-note", default="", help="what the --checkpoint folder is (stored in the JSON)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--backend", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--no-llamacpp", action="store_true", help="leave out llama.cpp's rows")
    ap.add_argument("--engine", default="hf", help=argparse.SUPPRESS)  # a child's engine and LM head (RUNS)
    ap.add_argument("--lm-head", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["fp", "fp-bf16", "packed"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "generate_cpu.json"))
    args = ap.parse_args()
    if args.child:
        args.threads = args.threads[0]
        return child(args)
    trained = args.checkpoint is None and os.path.isfile(os.path.join(TRAINED, "quant_config.json"))
    if args.checkpoint:
        what = f"given with --checkpoint: {args.checkpoint_note or 'no note'}"
    elif trained:
        what = "trained: dbllm-lab train --recipe best --save build/models/best"
    else:
        what = "UNTRAINED FDB init (clip, g = 64): its text is not meaningful"
    args.checkpoint = args.checkpoint or (TRAINED if trained else os.path.join(ROOT, "checkpoints", "fdb_clip_g64"))
    header, fp_bytes = ensure_checkpoint(args)
    load_before = os.getloadavg()
    rows = []
    for threads in args.threads:
        for kind, backend, engine, lm_head in RUNS:
            r = run_child(kind, backend, engine, lm_head, threads, args)
            r["file_MiB"] = (fp_bytes if kind.startswith("fp") else dir_bytes(args.checkpoint)) / 2**20
            rows.append(r)
            print({k: v for k, v in r.items() if k not in ("token_ids", "text")}, flush=True)
    load_after = os.getloadavg()
    for r in rows:
        fp = next(f for f in rows if f["model"] == "fp" and f["engine"] == "hf" and f["threads"] == r["threads"])
        r["decode_speedup_vs_fp32"] = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
        r["same_greedy_tokens_as_fp32"] = sum(a == b for a, b in zip(r["token_ids"], fp["token_ids"]))
    for r in rows:
        del r["token_ids"]  # the text stays
    peers = llamacpp_rows(args)
    for r in peers:
        fp = next(f for f in rows if f["model"] == "fp" and f["engine"] == "hf" and f["threads"] == r["threads"])
        r["decode_speedup_vs_fp32"] = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
    rows += peers
    # the bench's own 2-thread runs raise the load it ends with, so only the load it starts under tells of other jobs
    loaded = load_before[0] > 0.5 * os.cpu_count()
    settings = {"model": header.get("base_model") or "embedded SmolLM2-135M-Instruct", "group_size": args.group_size,
                "checkpoint": args.checkpoint, "checkpoint_is": what,
                "prompt": args.prompt, "new_tokens": args.tokens, "threads": args.threads,
                "speedup": "decode tokens/s over the FP32 model's on HF generate at the same threads",
                "llamacpp_rows": len(peers),
                "loadavg_before": load_before, "loadavg_after": load_after,
                "file": "FP: the model as fp32 safetensors; packed: the packed folder",
                "note": (f"LOADED MACHINE: other jobs ran (1-min load average {load_before[0]:.1f} before, "
                         f"{load_after[0]:.1f} after, on {os.cpu_count()} cores): not quiet-machine tokens/s"
                         if loaded else f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
                                        "(after: its own threads included)")}
    write_results(args.out, rows, settings,
                  columns=["model", "engine", "lm_head", "threads", "decode_tokens_per_s", "decode_speedup_vs_fp32", "prefill_s",
                           "peak_rss_generate_MiB", "linear_layers_MiB", "weights_read_per_token_MiB", "lm_head_MiB",
                           "file_MiB"])


if __name__ == "__main__":
    main()
