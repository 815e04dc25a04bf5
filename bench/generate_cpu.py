"""End-to-end CPU generation: the embedded model in FP32 vs its packed FDB checkpoint on the C++ kernel.

    python bench/generate_cpu.py                  # quantizes (FDB, clip init, g = 64) and saves the checkpoint once
    python bench/generate_cpu.py --tokens 32      # shorter run

Each model runs in a fresh Python process (so its memory is its own): load, then greedy generation of
``--tokens`` new tokens (``dbllm_lab.generate.greedy_generate``: decode tokens/s measured apart from the prompt).
Memory: the resident set right after loading and the peak resident set during generation (Linux VmHWM, reset
after loading through /proc/self/clear_refs, so loading the FP base model that the packed checkpoint builds on
is not counted), and the bytes of the decoder's linear layers (FP: fp32 weights; packed: bit-planes + fp16
scales). Disk: the packed checkpoint folder vs the FP model saved as fp32 safetensors. Writes
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
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    if args.child == "packed":
        from dbllm_lab.checkpoint import load_quantized
        model = load_quantized(args.checkpoint, base_model=model)
    load_s = time.perf_counter() - t0
    release_memory()
    rss_loaded = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    linear_bytes = sum(t.numel() * t.element_size() for m in quantizable_linears(model).values()
                       for t in list(m.parameters()) + list(m.buffers()))
    paths = sorted({m.path(torch.zeros(1)) for m in quantizable_linears(model).values() if hasattr(m, "path")})
    res = greedy_generate(model, tok, args.prompt, args.tokens)
    res.update({"model": args.child, "load_s": load_s, "rss_after_load_MiB": rss_loaded,
                "peak_rss_generate_MiB": status_mib("VmHWM"), "linear_layers_MiB": linear_bytes / 2**20,
                "packed_paths": paths, "threads": torch.get_num_threads()})
    print("RESULT " + json.dumps(res))


def run_child(kind, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--checkpoint", args.checkpoint,
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--prompt", args.prompt]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if out.returncode or line is None:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


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
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "checkpoints", "fdb_clip_g64"),
                    help="packed checkpoint folder (made here if missing)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--child", choices=["fp", "packed"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "generate_cpu.json"))
    args = ap.parse_args()
    if args.child:
        return child(args)
    header, fp_bytes = ensure_checkpoint(args)
    load_before = os.getloadavg()
    rows = []
    for kind in ("fp", "packed"):
        r = run_child(kind, args)
        r["file_MiB"] = (fp_bytes if kind == "fp" else dir_bytes(args.checkpoint)) / 2**20
        r["file"] = ("FP model as fp32 safetensors" if kind == "fp" else
                     "packed checkpoint folder (quantized linears only; embeddings/norms come from the base model)")
        rows.append(r)
        print({k: v for k, v in r.items() if k != "token_ids"}, flush=True)
    load_after = os.getloadavg()
    fp, pk = rows
    for r in rows:
        r["decode_speedup_vs_fp"] = r["decode_tokens_per_s"] / fp["decode_tokens_per_s"]
    loaded = max(load_before[0], load_after[0]) > 0.5 * os.cpu_count()
    same = sum(a == b for a, b in zip(fp["token_ids"], pk["token_ids"]))
    settings = {"model": header.get("base_model") or "embedded SmolLM2-135M-Instruct", "group_size": args.group_size,
                "quantizer": "quantize_model(model, 'fdb', group_size, init='clip') -> checkpoint.save_quantized "
                             "(fp16 scales)", "prompt": args.prompt, "new_tokens": args.tokens,
                "torch_threads": args.threads, "loadavg_before": load_before, "loadavg_after": load_after,
                "packed_peak_vs_fp": pk["peak_rss_generate_MiB"] / fp["peak_rss_generate_MiB"],
                "packed_linear_vs_fp": pk["linear_layers_MiB"] / fp["linear_layers_MiB"],
                "same_greedy_tokens_as_fp": f"{same} of {args.tokens} (FDB without training changes the text)",
                "note": (f"machine under load from other jobs (1-min load average {load_before[0]:.1f} before, "
                         f"{load_after[0]:.1f} after, on {os.cpu_count()} cores): tokens/s are noisy"
                         if loaded else f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")}
    write_results(args.out, rows, settings,
                  columns=["model", "decode_tokens_per_s", "decode_speedup_vs_fp", "prefill_s", "rss_after_load_MiB",
                           "peak_rss_generate_MiB", "linear_layers_MiB", "file_MiB"])


if __name__ == "__main__":
    main()
