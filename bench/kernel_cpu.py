"""CPU benchmark of the packed dual-bit-plane layer: the C++ kernel (dbllm_lab.cpu_kernel) vs torch fp32 and bf16.

    python bench/kernel_cpu.py                                  # all shapes, batches 1 4 16, 2 threads
    python bench/kernel_cpu.py --shapes 4096x4096 --batches 1   # a subset

Shapes are out x in: LLaMA-7B (4096x4096, 4096x11008 = down_proj, 11008x4096 = up/gate) and the embedded
SmolLM2-135M (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down); FDB bit-planes (clip init, g = 64)
of Gaussian weights for the LLaMA shapes and of the embedded model's layer-0 weights for its shapes.

Three columns measured side by side in one run: ``F.linear`` with the dense fp32 weight ``w_hat``, the same with
bf16 weight and activations, and ``PackedDualBinaryLinear`` (backend 'cpu': the C++ kernel reading the packed
words; fp32 activations, fp16 scales). Timing: each sample is a run of calls on successive copies of the weight
(enough copies that one method's copies span ``--rotate-mib``, so weights come from memory, as in decoding a
model larger than the cache, not from a warm cache), the three methods interleaved round by round so a
background load hits them alike; median over ``--rounds`` samples. Achieved GB/s = bytes read / time (weights,
activations, output); the byte-count limit of the speedup over fp32 is fp32 bytes / packed bytes (12.8x for the
weights alone at g = 64; a memory-bound GEMV cannot beat it). Writes bench/results/kernel_cpu.json.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_results  # noqa: E402
from kernel import add_shape_args, quantize, sparsity, weights_for  # noqa: E402

from dbllm_lab import cpu_kernel  # noqa: E402
from dbllm_lab import kernel as K  # noqa: E402
from dbllm_lab.packed_linear import PackedDualBinaryLinear  # noqa: E402


def copies_for(nbytes, rotate_bytes, cap=256):
    return max(2, min(cap, math.ceil(rotate_bytes / nbytes)))


def interleaved_ms(fns, rounds, min_sample_ms=2.0):
    """{name: median ms per call}. fns[name] is a list of calls (one per weight copy), called in turn; each sample
    times enough calls to last >= min_sample_ms; the methods alternate within every round."""
    reps, pos = {}, {k: 0 for k in fns}
    for k, calls in fns.items():  # warm up every copy once, and size the samples
        t0 = time.perf_counter()
        for c in calls:
            c()
        per_call = (time.perf_counter() - t0) * 1e3 / len(calls)
        reps[k] = max(1, math.ceil(min_sample_ms / max(per_call, 1e-4)))
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, calls in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                calls[pos[k]]()
                pos[k] = (pos[k] + 1) % len(calls)
            samples[k].append((time.perf_counter() - t0) * 1e3 / reps[k])
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def bench_shape(shape, batches, planes, args):
    N, Kin = shape
    g = args.group_size
    b1, b2, a1, a2 = planes
    layer = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, backend="cpu")  # fp16 scales
    w32 = layer.dequantize(torch.float32)
    rotate = args.rotate_mib * 2**20
    packed_bytes = layer.packed_bytes()
    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(packed_bytes, rotate) - 1)]
    w32s = [w32] + [w32.clone() for _ in range(copies_for(w32.numel() * 4, rotate) - 1)]
    w16s = [w.bfloat16() for w in w32s[:copies_for(w32.numel() * 2, rotate)]]
    while len(w16s) < copies_for(w32.numel() * 2, rotate):
        w16s.append(w16s[0].clone())
    rows = []
    for M in batches:
        x = torch.randn(M, Kin)
        xb = x.bfloat16()
        with torch.no_grad():
            ref = K.dual_binary_matmul_reference(x, layer.p1, layer.p2, layer.a1, layer.a2, g)
            err = ((layer(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            ms = interleaved_ms({"fp32": [lambda w=w: F.linear(x, w) for w in w32s],
                                 "bf16": [lambda w=w: F.linear(xb, w) for w in w16s],
                                 "packed": [lambda m=m: m(x) for m in layers]}, args.rounds)
        io32, io16 = (M * Kin + M * N) * 4, (M * Kin + M * N) * 2
        bytes_fp32, bytes_bf16, bytes_packed = N * Kin * 4 + io32, N * Kin * 2 + io16, packed_bytes + io32
        limit = bytes_fp32 / bytes_packed
        speedup = ms["fp32"] / ms["packed"]
        rows.append({"shape": f"{N}x{Kin}", "out": N, "in": Kin, "batch": M,
                     "fp32_ms": ms["fp32"], "bf16_ms": ms["bf16"], "packed_ms": ms["packed"],
                     "fp32_GBps": bytes_fp32 / ms["fp32"] / 1e6, "bf16_GBps": bytes_bf16 / ms["bf16"] / 1e6,
                     "packed_GBps": bytes_packed / ms["packed"] / 1e6,
                     "speedup_vs_fp32": speedup, "speedup_vs_bf16": ms["bf16"] / ms["packed"],
                     "byte_limit_vs_fp32": limit, "fraction_of_limit": speedup / limit,
                     "packed_MiB": packed_bytes / 2**20, "fp32_MiB": N * Kin * 4 / 2**20,
                     "copies": {"fp32": len(w32s), "bf16": len(w16s), "packed": len(layers)},
                     "max_rel_err_vs_reference": err})
    return rows


def save(args, rows, how, kinfo, load_before, t_start, done):
    """Write the rows so far (after every shape: a run stopped early keeps what it measured)."""
    load_after = os.getloadavg()
    loaded = max(load_before[0], load_after[0]) > 0.5 * os.cpu_count()
    settings = {
        "device": "cpu", "group_size": args.group_size, "scales": "fp16", "batches": args.batches,
        "torch_threads": torch.get_num_threads(), "kernel_threads": torch.get_num_threads(), "kernel": kinfo,
        "quantizer": how, "rounds": args.rounds, "rotate_mib": args.rotate_mib, "seconds": time.time() - t_start,
        "complete": done if done else f"no: {len(rows)} of {len(args.shapes) * len(args.batches)} rows measured so far",
        "loadavg_before": load_before, "loadavg_after": load_after,
        "timer": "time.perf_counter; per sample a run of calls on successive weight copies (>= 2 ms), methods "
                 "interleaved each round; median of the samples",
        "columns": "fp32/bf16: torch F.linear with the dense w_hat in that dtype (activations too); packed: "
                   "PackedDualBinaryLinear(backend='cpu') forward, fp32 activations, fp16 scales",
        "bandwidth_limit": "speedup over fp32 <= byte_limit_vs_fp32 = fp32 bytes / packed bytes (memory-bound GEMV)",
        "note": (f"machine under load from other jobs (1-min load average {load_before[0]:.1f} before, "
                 f"{load_after[0]:.1f} after, on {os.cpu_count()} cores): times are dominated by the scheduler (the "
                 "kernel and torch alike wait for time slices), so neither absolute times nor ratios show what "
                 "the kernel does on an idle machine" if loaded else
                 f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores"),
    }
    write_results(args.out, rows, settings,
                  columns=["shape", "batch", "fp32_ms", "bf16_ms", "packed_ms", "packed_GBps", "speedup_vs_fp32",
                           "speedup_vs_bf16", "byte_limit_vs_fp32", "fraction_of_limit", "max_rel_err_vs_reference"])


def main():
    ap = add_shape_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--threads", type=int, default=2, help="torch and kernel threads (default 2)")
    ap.add_argument("--init", default="clip", choices=["clip", "minmax"],
                    help="FDB init of the bit-planes (the kernel's time does not depend on it; minmax is faster)")
    ap.add_argument("--rounds", type=int, default=15, help="timed samples per method (median reported)")
    ap.add_argument("--rotate-mib", type=int, default=512, help="weight copies of each method span this many MiB")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "kernel_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinfo = cpu_kernel.info()  # compiles on first use
    load_before = os.getloadavg()
    t_start = time.time()
    data = weights_for(args.shapes, args.group_size, not args.no_embedded_weights)
    rows, how = [], None
    for shape in args.shapes:
        w, source = data[shape]
        b1, b2, a1, a2, how = quantize(w, args.group_size, args.init)
        for row in bench_shape(shape, args.batches, (b1, b2, a1, a2), args):
            row.update({"weights": source, **sparsity(b1, b2)})
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        save(args, rows, how, kinfo, load_before, t_start, done=shape == args.shapes[-1])
if __name__ == "__main__":
    main()
