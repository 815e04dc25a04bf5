"""Dual-bit-plane matmul benchmark: packed DB-LLM layer vs the dense matmul, against the bandwidth limit.

    python bench/kernel.py                      # needs CUDA; the CPU kernel: bench/kernel_cpu.py
    python bench/kernel.py --batches 1 --shapes 576x576   # a subset

Shapes are out x in (LLaMA-7B 4096x4096, 4096x11008 = down_proj, 11008x4096 = up/gate; the embedded
SmolLM2-135M's 576x576 q/o, 192x576 k/v, 1536x576 gate/up, 576x1536 down); batches 1, 4, 16 activation rows.

On CUDA (writes bench/results/kernel_<gpu>.json): the Triton kernel (GEMV for <= 8 rows, GEMM above) vs
torch fp16 ``F.linear`` with the dense weight. Median of ``triton.testing.do_bench`` (L2 flushed before
every repetition). Each timed call is a CUDA graph replaying the op on ``--copies`` distinct weight copies
(time divided by the copies), so Python launch overhead is not timed and every launch reads cold weights;
the eager time (one Python call, launch overhead included) is reported too. Achieved GB/s = bytes moved /
time with bytes = packed planes + scales + activations + output (dense: fp16 weight + activations +
output). A memory-bound kernel can beat fp16 by at most 16 / bits-per-weight (6.4 at g = 64).

On CPU, ``bench/kernel_cpu.py`` times the C++ kernel (it reuses the weights and shapes of this file).

Both count the ones in each bit-plane (sparsity) of weights quantized with FDB (quant.fdb_init / dual_binarize):
Gaussian weights for the LLaMA-7B shapes and, where loadable, the embedded model's layer-0 weights for its shapes.
"""
import argparse
import os
import re
import sys

import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    print("CUDA present: unsetting TRITON_INTERPRET (set by the Makefile for CPU tests) to time compiled kernels")
    os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import gpu_tag, write_results  # noqa: E402

from dbllm_lab import kernel as K, quant  # noqa: E402
from dbllm_lab.packed_linear import PackedDualBinaryLinear  # noqa: E402

LLAMA7B = ["4096x4096", "4096x11008", "11008x4096"]
EMBEDDED = ["576x576", "192x576", "1536x576", "576x1536"]
# layer-0 weight of the embedded model with this (out, in) shape
EMBEDDED_LAYER = {(576, 576): "self_attn.q_proj", (192, 576): "self_attn.k_proj", (1536, 576): "mlp.up_proj",
                  (576, 1536): "mlp.down_proj"}


# ------------------------------------------------------------------------------------------------------
# Weights -> FDB bit-planes
# ------------------------------------------------------------------------------------------------------
def quantize(w, g, init="clip"):
    """(b1, b2, a1, a2, how): FDB with the project's init (default the clip search, method.md §1)."""
    a1, a2 = quant.fdb_init(w.float(), g, init=init)
    b1, b2 = quant.dual_binarize(w.float(), a1, a2, g)
    return b1, b2, a1, a2, f"dbllm_lab.quant.fdb_init(init={init!r}, orientation='per-group') + dual_binarize"


def weights_for(shapes, g, use_embedded):
    """{(out, in): (w, source)}; embedded-model layer-0 weights for its shapes if requested and loadable."""
    real = {}
    if use_embedded and any(s in EMBEDDED_LAYER for s in shapes):
        try:
            from dbllm_lab.model import load_model, quantizable_linears
            model, _ = load_model()
            lins = quantizable_linears(model.model.layers[0])
            real = {s: (lins[n].weight.detach().float().clone(), f"embedded layer 0 {n}")
                    for s, n in EMBEDDED_LAYER.items()}
            del model
        except Exception as e:  # noqa: BLE001  (no model package on a bare GPU box: Gaussian instead)
            print(f"embedded model not loadable ({type(e).__name__}: {e}); Gaussian weights for its shapes")
    gen = torch.Generator().manual_seed(0)
    return {s: real.get(s) or (torch.randn(*s, generator=gen) * 0.02, "gaussian(0, 0.02)") for s in shapes}


def sparsity(b1, b2):
    n = b1.numel()
    return {"ones_b1": b1.sum().item() / n, "ones_b2": b2.sum().item() / n,
            "both_zero": ((b1 == 0) & (b2 == 0)).sum().item() / n}


# ------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------
def cuda_graph_ms(fns, warmup, rep):
    """Median ms per op of a CUDA graph that runs every fn once (L2 flushed before each replay)."""
    import triton
    for f in fns:  # autotune + compile outside the capture
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for f in fns:
            f()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for f in fns:
                f()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median") / len(fns)


def copy_GBps(gib=2, warmup=25, rep=200):
    """The device's memory ceiling: a device-to-device copy of ``gib`` GiB, bytes read + written / median time."""
    import triton
    src = torch.randn(gib * 2**28, device="cuda")  # 4-byte floats
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def bench_cuda(shape, M, planes, args):
    import triton
    from torch.nn import functional as F
    N, Kin = shape
    g = args.group_size
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    b1, b2, a1, a2 = planes
    layer = PackedDualBinaryLinear.from_bitplanes(b1, b2, a1, a2, g).cuda()
    w16 = layer.dequantize(dt)
    x = torch.randn(M, Kin, device="cuda", dtype=dt)
    copies = [(layer.p1.clone(), layer.p2.clone(), layer.a1.clone(), layer.a2.clone()) for _ in range(args.copies)]
    dense = [w16.clone() for _ in range(args.copies)]
    run_k = [lambda c=c: K.dual_binary_matmul(x, *c, g, backend="triton") for c in copies]
    run_d = [lambda w=w: F.linear(x, w) for w in dense]
    y = run_k[0]()
    ref = K.dual_binary_matmul_reference(x, layer.p1, layer.p2, layer.a1, layer.a2, g)
    err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    t_k = cuda_graph_ms(run_k, args.warmup, args.rep)
    t_d = cuda_graph_ms(run_d, args.warmup, args.rep)
    t_k_eager = triton.testing.do_bench(run_k[0], warmup=args.warmup, rep=args.rep, return_mode="median")
    t_d_eager = triton.testing.do_bench(run_d[0], warmup=args.warmup, rep=args.rep, return_mode="median")
    esz = x.element_size()
    io = (M * Kin + M * N) * esz
    bytes_k = layer.packed_bytes() + io
    bytes_d = N * Kin * esz + io
    tuned = K._gemv_tuned if M <= K.GEMV_MAX_ROWS else K._gemm_tuned
    bpw = layer.bits_per_weight
    return {"path": "gemv" if M <= K.GEMV_MAX_ROWS else "gemm", "kernel_ms": t_k, "fp16_ms": t_d,
            "kernel_eager_ms": t_k_eager, "fp16_eager_ms": t_d_eager,
            "kernel_GBps": bytes_k / t_k / 1e6, "fp16_GBps": bytes_d / t_d / 1e6,
            "speedup_vs_fp16": t_d / t_k, "speedup_limit": 16 / bpw, "fraction_of_limit": (t_d / t_k) / (16 / bpw),
            "bytes_kernel": bytes_k, "bytes_fp16": bytes_d, "max_rel_err_vs_reference": err,
            "config": str(getattr(tuned, "best_config", None))}


def parse_shape(s):
    m = re.fullmatch(r"(\d+)[xX](\d+)", s)
    if not m:
        raise argparse.ArgumentTypeError(f"shape {s!r} is not OUTxIN, e.g. 4096x11008")
    return int(m.group(1)), int(m.group(2))


def add_shape_args(ap):
    """Shapes, batches, group size and weight source: shared with bench/kernel_cpu.py."""
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in LLAMA7B + EMBEDDED],
                    help="OUTxIN (default: LLaMA-7B and embedded-model shapes)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--no-embedded-weights", action="store_true", help="Gaussian weights for every shape")
    return ap


def main():
    ap = add_shape_args(argparse.ArgumentParser(description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="CUDA activation dtype")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--copies", type=int, default=8, help="weight copies per CUDA graph replay")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("no CUDA device is visible: this benchmark times the Triton kernels; for the CPU kernel run "
                 "python bench/kernel_cpu.py")
    device = "cuda"
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.out is None:
        args.out = os.path.join(results, f"kernel_{gpu_tag()}.json")

    ceiling = copy_GBps()
    print(f"device-to-device copy: {ceiling:.0f} GB/s (the byte ceiling)", flush=True)
    data = weights_for(args.shapes, args.group_size, not args.no_embedded_weights)
    rows, how = [], None
    for shape in args.shapes:
        w, source = data[shape]
        b1, b2, a1, a2, how = quantize(w, args.group_size)
        sp = sparsity(b1, b2)
        for M in args.batches:
            row = {"shape": f"{shape[0]}x{shape[1]}", "out": shape[0], "in": shape[1], "batch": M,
                   "weights": source, **sp, "bits_per_weight": K.bits_per_weight(args.group_size),
                   **bench_cuda(shape, M, (b1, b2, a1, a2), args)}
            row["kernel_fraction_of_copy_GBps"] = row["kernel_GBps"] / ceiling
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    settings = {"device": device, "device_name": torch.cuda.get_device_name(0),
                "group_size": args.group_size, "scales": "fp16", "batches": args.batches,
                "quantizer": how, "torch_threads": torch.get_num_threads(),
                "triton": getattr(K.triton, "__version__", None), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
                "bandwidth_limit": "speedup over fp16 <= 16 / bits_per_weight (memory-bound decode)"}
    settings.update({"copy_GBps": ceiling, "copy": "torch copy_ of 2 GiB fp32, read + write bytes / median time",
                     "timer": "triton.testing.do_bench median, L2 flushed per rep, CUDA graph of "
                              f"{args.copies} launches on distinct weight copies (per-op time)",
                     "activation_dtype": args.dtype, "warmup_ms": args.warmup, "rep_ms": args.rep,
                     "baseline": "torch F.linear with dense fp16/bf16 weight"})
    cols = ["shape", "batch", "path", "kernel_ms", "fp16_ms", "kernel_GBps", "fp16_GBps", "speedup_vs_fp16",
            "speedup_limit", "kernel_fraction_of_copy_GBps", "kernel_eager_ms", "ones_b1", "ones_b2", "max_rel_err_vs_reference"]
    write_results(args.out, rows, settings, columns=cols)


if __name__ == "__main__":
    main()
