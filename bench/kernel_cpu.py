"""CPU benchmark of the packed dual-bit-plane layer: the C++ kernel's integer and exact paths vs torch fp32 and bf16.

    python bench/kernel_cpu.py                                  # all shapes, batches 1 4 16, 2 threads
    python bench/kernel_cpu.py --shapes 4096x4096 --batches 1   # a subset
    python bench/kernel_cpu.py ... --ppl-model build/models/best   # and dev PPL of both packed paths

Shapes are out x in: LLaMA-7B (4096x4096, 4096x11008 = down_proj, 11008x4096 = up/gate) and the embedded
SmolLM2-135M (576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down); FDB bit-planes (clip init, g = 64)
of Gaussian weights for the LLaMA shapes and of the embedded model's layer-0 weights for its shapes.

Methods, timed side by side in one run (fp32 activations, fp16 scales for the packed ones):
  * ``int8``: the integer path: ``PackedDualBinaryLinear(backend='cpu-int8')`` forward, what backend 'cpu' runs
    for 1-4 rows (int8 activations; the "vnni" layout and AVX-512 VNNI where the CPU has it, else the "lut" layout
    and AVX2 byte-shuffle lookups, candidate (b));
  * ``int8_call`` / ``int8_lut_call`` / ``expand_call`` / ``exact_call``: the library calls alone (no Python
    layer): the integer path in this CPU's layout, in the "lut" layout (only where that is not this CPU's),
    candidate (a) (bits expanded to bytes, vpmaddubsw; AVX2 only) and the exact fp32 path;
  * ``exact``: ``PackedDualBinaryLinear(backend='cpu-exact')`` forward;
  * ``fp32`` / ``bf16``: torch ``F.linear`` with the dense ``w_hat`` in that dtype (activations too);
  * ``stream``: ``torch.sum`` over a buffer of ``--rotate-mib`` MiB: the machine's streaming read bandwidth now.
Timing (``--clock wall``, or ``cpu``: the process's CPU time / threads, for a machine that other jobs load):
each sample is a run of calls on successive copies of the weights (enough copies that one method's span
``--rotate-mib``, so weights come from memory as in decoding a model larger than the cache); the methods alternate
within every round, so a background load hits them alike. Rounds run in blocks of ``--block`` until, for every
method, the medians of the last three blocks lie within ``--spread`` of each other (or ``--max-rounds``); the
median of all samples is reported. The 1-min load average and the kernel's count of running threads are sampled
every second during the run. Byte limit: a GEMV cannot read its weights faster than the stream, so
fraction_of_byte_limit = (weight bytes / time) / stream GB/s; the speedup over fp32 is at most the ratio of the
weight bytes (12.8x at g = 64). Writes bench/results/kernel_cpu.json.
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import write_results  # noqa: E402
from kernel import add_shape_args, quantize, sparsity, weights_for  # noqa: E402

from dbllm_lab import cpu_kernel  # noqa: E402
from dbllm_lab.packed_linear import PackedDualBinaryLinear  # noqa: E402
from dbllm_lab.timing import LoadSampler  # noqa: E402


def copies_for(nbytes, rotate_bytes, cap=256):
    return max(2, min(cap, math.ceil(rotate_bytes / nbytes)))


def timed_rounds(fns, args, threads):
    """{name: median ms per call} and how the rounds went. fns[name] is a list of calls (one per weight copy),
    called in turn; a sample lasts >= 2 ms; blocks of rounds until the last three block medians agree. Clock
    'wall': time.perf_counter; 'cpu': the process's CPU time / threads (time spent descheduled by other jobs not
    counted; with more than 1 thread an OpenMP thread spinning for a descheduled one is counted)."""
    reps, pos = {}, {k: 0 for k in fns}
    for k, calls in fns.items():  # warm up every copy once, and size the samples
        t0 = time.perf_counter()
        for c in calls:
            c()
        reps[k] = max(1, math.ceil(2.0 / max((time.perf_counter() - t0) * 1e3 / len(calls), 1e-4)))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    samples, block_medians, spread = {k: [] for k in fns}, {k: [] for k in fns}, None
    while len(samples["fp32"]) < args.max_rounds:
        for _ in range(args.block):
            for k, calls in fns.items():
                t0 = clock()
                for _ in range(reps[k]):
                    calls[pos[k]]()
                    pos[k] = (pos[k] + 1) % len(calls)
                samples[k].append((clock() - t0) * 1e3 / reps[k] / (threads if args.clock == "cpu" else 1))
        for k in fns:
            block_medians[k].append(statistics.median(samples[k][-args.block:]))
        if len(block_medians["fp32"]) >= 3:
            last = {k: v[-3:] for k, v in block_medians.items()}
            spread = max((max(v) - min(v)) / statistics.median(v) for v in last.values())
            if spread <= args.spread:
                break
    medians = {k: statistics.median(v) for k, v in samples.items()}
    return medians, {"rounds": len(samples["fp32"]), "spread_of_last_3_block_medians": spread,
                     "converged": spread is not None and spread <= args.spread}


def bench_shape(shape, batches, planes, args):
    N, Kin = shape
    g = args.group_size
    b1, b2, a1, a2 = planes
    layer = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g, backend="cpu-int8")  # fp16 scales
    w32 = layer.dequantize(torch.float32)
    rotate = args.rotate_mib * 2**20
    packed_bytes = layer.packed_bytes()
    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(packed_bytes, rotate) - 1)]
    int8_weights = [m.int8_weights() for m in layers]
    lut_weights = [] if int8_weights[0].layout == "lut" else \
        [cpu_kernel.repack_int8(m.p1, m.p2, m.a1, m.a2, g, "lut") for m in layers]
    exact_layers = [copy.copy(m) for m in layers]  # the same buffers on backend 'cpu-exact'
    for m in exact_layers:
        m.backend = "cpu-exact"
    w32s = [w32] + [w32.clone() for _ in range(copies_for(w32.numel() * 4, rotate) - 1)]
    w16s = [w32.bfloat16() for _ in range(copies_for(w32.numel() * 2, rotate))]
    stream_buf = torch.ones(rotate // 4)
    lib, threads, half = cpu_kernel.load(), torch.get_num_threads(), 1
    rows = []
    for M in batches:
        x = torch.randn(M, Kin)
        xb, out = x.bfloat16(), torch.empty(M, N)
        with torch.no_grad():
            exact_ref = cpu_kernel.dual_binary_matmul_cpu(x, layer.p1, layer.p2, layer.a1, layer.a2, g)
            int8_ref = cpu_kernel.int8_matmul_reference(x, layer.p1, layer.p2, layer.a1, layer.a2, g)
            y_int8 = layer(x)
            fns = {"int8": [lambda m=m: m(x) for m in layers],
                   "int8_call": [lambda p=p: int8_call(lib, x, M, p, out, threads) for p in int8_weights],
                   "exact_call": [lambda m=m: lib.dbl_matmul(
                       x.data_ptr(), M, m.p1.data_ptr(), m.p2.data_ptr(), m.a1.data_ptr(), m.a2.data_ptr(), half,
                       out.data_ptr(), N, Kin, g, threads) for m in layers],
                   "exact": [lambda m=m: m(x) for m in exact_layers],
                   "fp32": [lambda w=w: F.linear(x, w) for w in w32s],
                   "bf16": [lambda w=w: F.linear(xb, w) for w in w16s],
                   "stream": [stream_buf.sum]}
            if lut_weights:
                fns["int8_lut_call"] = [lambda p=p: int8_call(lib, x, M, p, out, threads) for p in lut_weights]
            if lib.dbl_int8_isa() & 1:
                fns["expand_call"] = [lambda m=m: lib.dbl_matmul_int8_expand(
                    x.data_ptr(), M, m.p1.data_ptr(), m.p2.data_ptr(), m.a1.data_ptr(), m.a2.data_ptr(), half,
                    out.data_ptr(), N, Kin, g, threads) for m in layers]
            ms, how = timed_rounds(fns, args, threads)
        stream_GBps = rotate / ms["stream"] / 1e6
        io = (M * Kin + M * N) * 4
        weight_bytes = {"fp32": N * Kin * 4, "bf16": N * Kin * 2, "packed": packed_bytes}
        row = {"shape": f"{N}x{Kin}", "out": N, "in": Kin, "batch": M, **{f"{k}_ms": v for k, v in ms.items()}}
        for k, wb in (("int8", "packed"), ("int8_call", "packed"), ("int8_lut_call", "packed"), ("exact", "packed"),
                      ("fp32", "fp32"), ("bf16", "bf16")):
            if k in ms:
                row[f"{k}_weight_GBps"] = weight_bytes[wb] / ms[k] / 1e6
        row.update({
            "stream_GBps": stream_GBps,
            "int8_speedup_vs_fp32": ms["fp32"] / ms["int8"], "int8_speedup_vs_bf16": ms["bf16"] / ms["int8"],
            "exact_speedup_vs_fp32": ms["fp32"] / ms["exact"], "int8_speedup_vs_exact": ms["exact"] / ms["int8"],
            "byte_limit_vs_fp32": (weight_bytes["fp32"] + io) / (packed_bytes + io),
            "int8_fraction_of_byte_limit": packed_bytes / ms["int8"] / 1e6 / stream_GBps,
            "int8_call_fraction_of_byte_limit": packed_bytes / ms["int8_call"] / 1e6 / stream_GBps,
            **({"int8_lut_call_fraction_of_byte_limit": packed_bytes / ms["int8_lut_call"] / 1e6 / stream_GBps,
                "int8_call_speedup_vs_lut_call": ms["int8_lut_call"] / ms["int8_call"]} if lut_weights else {}),
            "fp32_fraction_of_byte_limit": weight_bytes["fp32"] / ms["fp32"] / 1e6 / stream_GBps,
            "packed_MiB": packed_bytes / 2**20, "fp32_MiB": weight_bytes["fp32"] / 2**20,
            "copies": {"packed": len(layers), "fp32": len(w32s), "bf16": len(w16s)}, **how,
            "int8_max_rel_err_vs_int8_reference": _rel(y_int8, int8_ref, "max"),
            "exact_max_rel_err_vs_reference": _rel(exact_ref, _exact_reference(x, layer, g), "max"),
            "int8_rms_rel_err_vs_exact": _rel(y_int8, exact_ref, "rms")})
        rows.append(row)
    return rows


def int8_call(lib, x, M, packed, out, threads):
    """The library's integer path on ``packed`` (``cpu_kernel.Int8Weights``, its layout), no Python layer."""
    lib.dbl_matmul_int8(x.data_ptr(), M, *packed.ptrs, out.data_ptr(), packed.N, packed.K, packed.group_size, threads,
                        cpu_kernel.INT8_LAYOUTS.index(packed.layout), 0)


def _exact_reference(x, layer, g):
    from dbllm_lab.kernel import dual_binary_matmul_reference
    return dual_binary_matmul_reference(x, layer.p1, layer.p2, layer.a1, layer.a2, g)


def _rel(y, ref, kind):
    d = (y.float() - ref.float())
    return (d.abs().max() / ref.abs().max()).item() if kind == "max" else (d.norm() / ref.norm()).item()


def dev_perplexity(model_dir, max_windows):
    """Dev-window PPL (first ``max_windows`` WikiText-2 test windows) of a packed model folder with the integer path
    at every batch size ('cpu-int8') and with the exact path ('cpu-exact')."""
    from dbllm_lab.checkpoint import load_quantized
    from dbllm_lab.generate import set_backend
    from dbllm_lab.model import load_model
    from dbllm_lab.ppl import perplexity
    base, tok = load_model()
    model = load_quantized(model_dir, base_model=base)
    res = {"model": model_dir, "max_windows": max_windows}
    for backend in ("cpu-exact", "cpu-int8"):
        set_backend(model, backend)
        r = perplexity(model, tok, max_windows=max_windows, progress=False)
        res[backend] = {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens, "seconds": r.seconds}
        print(backend, res[backend], flush=True)
    res["int8_vs_exact_rel_change"] = res["cpu-int8"]["ppl"] / res["cpu-exact"]["ppl"] - 1
    return res


DEFAULTS = {"threads": 2, "group_size": 64, "init": "clip", "block": 5, "spread": 0.05, "max_rounds": 60,
            "clock": "wall", "rotate_mib": 256}  # the CLI's defaults (main), shared with measure()


def measure(shapes, batches, threads=DEFAULTS["threads"], group_size=DEFAULTS["group_size"], init=DEFAULTS["init"],
            embedded_weights=True, block=DEFAULTS["block"], spread=DEFAULTS["spread"],
            max_rounds=DEFAULTS["max_rounds"], clock=DEFAULTS["clock"], rotate_mib=DEFAULTS["rotate_mib"],
            verbose=True):
    """Run the benchmark (module docstring) on ``shapes`` [(out, in)] x ``batches`` with ``threads`` torch and kernel
    threads: (rows, settings), what ``main`` writes to the JSON (without the machine block and the perplexity).
    Torch's thread count is restored afterwards. The notebooks call this for a live run."""
    args = argparse.Namespace(group_size=group_size, block=block, spread=spread, max_rounds=max_rounds, clock=clock,
                              rotate_mib=rotate_mib)
    shapes = [tuple(s) for s in shapes]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kinfo = cpu_kernel.info()  # compiles on first use
        data = weights_for(shapes, group_size, embedded_weights)
        t_start, rows, how = time.time(), [], None
        with LoadSampler() as sampler:
            for shape in shapes:
                w, source = data[shape]
                b1, b2, a1, a2, how = quantize(w, group_size, init)
                for row in bench_shape(shape, batches, (b1, b2, a1, a2), args):
                    row.update({"weights": source, **sparsity(b1, b2)})
                    rows.append(row)
                    if verbose:
                        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        settings = _settings(batches, kinfo, how, args, t_start, sampler.summary())
    finally:
        torch.set_num_threads(threads_before)
    return rows, settings


def _settings(batches, kinfo, how, args, t_start, load):
    busy = load["loadavg_1min"] and load["loadavg_1min"]["median"] > 0.5 * os.cpu_count()
    return {
        "device": "cpu", "group_size": args.group_size, "scales": "fp16", "batches": list(batches),
        "torch_threads": torch.get_num_threads(), "kernel_threads": torch.get_num_threads(), "kernel": kinfo,
        "quantizer": how, "block": args.block, "spread_target": args.spread, "max_rounds": args.max_rounds,
        "rotate_mib": args.rotate_mib, "seconds": time.time() - t_start, "load_during_run": load,
        "clock": args.clock,
        "timer": ("time.perf_counter" if args.clock == "wall" else "time.process_time / threads") +
                 "; per sample a run of calls on successive weight copies (>= 2 ms), methods interleaved each round; "
                 "median of all samples",
        "byte_limit": "fraction_of_byte_limit = (weight bytes / time) / stream GB/s (torch.sum over rotate_mib MiB, "
                      "timed in the same rounds); weight bytes: packed planes + fp16 scales, or the dense weight",
        "note": (f"LOADED MACHINE: other jobs ran during the whole run (1-min load average median "
                 f"{load['loadavg_1min']['median']:.1f} on {os.cpu_count()} cores, sampled every second): every "
                 "method waits for time slices, so these are not quiet-machine numbers" if busy else
                 "1-min load average at most half the cores during the run (sampled every second)"),
    }


def main():
    ap = add_shape_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch and kernel threads (default 2)")
    ap.add_argument("--init", default=DEFAULTS["init"], choices=["clip", "minmax"],
                    help="FDB init of the bit-planes (the kernel's time does not depend on it; minmax is faster)")
    ap.add_argument("--block", type=int, default=DEFAULTS["block"], help="rounds per block (default 5)")
    ap.add_argument("--spread", type=float, default=DEFAULTS["spread"],
                    help="stop when the last 3 block medians agree this well")
    ap.add_argument("--max-rounds", type=int, default=DEFAULTS["max_rounds"])
    ap.add_argument("--clock", default=DEFAULTS["clock"], choices=["wall", "cpu"],
                    help="wall time, or the process's CPU time / threads (for a machine loaded by other jobs)")
    ap.add_argument("--rotate-mib", type=int, default=DEFAULTS["rotate_mib"],
                    help="weight copies of each method span this many MiB")
    ap.add_argument("--ppl-model", default=None, help="packed model folder: also measure its dev PPL on both paths")
    ap.add_argument("--ppl-note", default="", help="what the --ppl-model folder is (stored beside its PPL)")
    ap.add_argument("--ppl-windows", type=int, default=40)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "kernel_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # also for the perplexity run and machine_info's torch_threads
    rows, settings = measure(args.shapes, args.batches, threads=args.threads, group_size=args.group_size,
                             init=args.init, embedded_weights=not args.no_embedded_weights, block=args.block,
                             spread=args.spread, max_rounds=args.max_rounds, clock=args.clock,
                             rotate_mib=args.rotate_mib)
    if args.ppl_model:
        settings["perplexity"] = {**dev_perplexity(args.ppl_model, args.ppl_windows), "what": args.ppl_note}
    write_results(args.out, rows, settings, columns=COLUMNS)


COLUMNS = ["shape", "batch", "int8_ms", "int8_call_ms", "int8_lut_call_ms", "expand_call_ms", "exact_ms", "fp32_ms", "bf16_ms",
           "int8_speedup_vs_fp32", "int8_speedup_vs_bf16", "stream_GBps", "int8_fraction_of_byte_limit",
           "int8_rms_rel_err_vs_exact"]  # the markdown table beside the JSON


if __name__ == "__main__":
    main()
