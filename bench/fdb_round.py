"""Speed of the FDB rounding: ``quant.fdb_round`` (its C++ form ``quant.fdb_round_cpu`` where a compiler is
available: ``settings.fdb_round_path``) against its torch form ``fdb_round_torch`` (sorted levels, three midpoint
comparisons per weight) and the two forms that one replaced: the literal reference (distances to all four levels,
argmin over (distance, |level|), gather) and the training-only form train.py used to swap in (midpoint thresholds,
float code sums, no 2-bit-grid rule, ties upward). On the embedded model's layer shapes, forward + backward of
``w_hat = a1 b1 + a2 b2`` as training runs it, one CPU thread: ``fdb_round`` with the layer's backward as training
runs it (the scale gradients in C++ too, ``quant.fdb_scale_grads``), every other form with torch's backward
(``quant.FDB_ROUND_CPP`` False, as a machine without a compiler). Scales: the clip init (every group on a 2-bit grid)
and the same scales moved off the grid (as after training). Also counts the weights on which each other form
disagrees with ``fdb_round`` (0 for the torch form: same rule).
Writes bench/results/fdb_round.json (+ .md).

    python bench/fdb_round.py [--repeats 9]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

from dbllm_lab.layers import _DualBinaryWeight  # noqa: E402
from dbllm_lab.model import load_model, quantizable_linears  # noqa: E402
from dbllm_lab import cpu_kernel, quant  # noqa: E402
from dbllm_lab.quant import fdb_init, fdb_round, fdb_round_torch, round_half_to_zero  # noqa: E402


def argmin_round(w, a1, a2):
    """The form used before ``fdb_round``: nearest of the four levels by fp32 distance, ties to the level nearer
    zero; 2-bit-grid groups with RTN's arithmetic."""
    levels = torch.stack(torch.broadcast_tensors(torch.zeros_like(a1), a2, a1, a1 + a2), -1)
    dist = (w[..., None] - levels).abs()
    on_grid = (a1.abs() == 2 * a2.abs()) & (a2 != 0)
    if on_grid.any():
        s = torch.where(on_grid, a2.abs(), torch.ones_like(a2))
        k = round_half_to_zero(w / s).clamp(levels.amin(-1) / s, levels.amax(-1) / s)
        dist = torch.where(on_grid[..., None], (levels - (k * s)[..., None]).abs(), dist)
    tied = dist == dist.amin(-1, keepdim=True)
    idx = torch.where(tied, levels.abs().expand_as(dist), torch.inf).argmin(-1)
    return (idx >> 1).to(torch.uint8), (idx & 1).to(torch.uint8)


def old_training_round(w, a1, a2):
    """The training-only form train.py used before: with sorted levels and midpoints m_k, b = b(l_0) +
    sum_k [w > m_k] (b(l_k+1) - b(l_k)) as floats; no 2-bit-grid rule, ties at a midpoint go up."""
    levels = torch.stack(torch.broadcast_tensors(torch.zeros_like(a1), a2, a1, a1 + a2), -1)
    srt, order = levels.sort(-1)
    bits1, bits2 = (order >= 2).float(), (order % 2).float()
    mid = (srt[..., 1:] + srt[..., :-1]) / 2
    d1, d2 = bits1.diff(dim=-1), bits2.diff(dim=-1)
    b1, b2 = bits1[..., 0].expand_as(w).clone(), bits2[..., 0].expand_as(w).clone()
    for k in range(3):
        m = w > mid[..., k]
        b1.add_(m * d1[..., k])
        b2.add_(m * d2[..., k])
    return b1.to(torch.uint8), b2.to(torch.uint8)


def autograd_with(round_fn):
    """The layer's autograd function with its rounding swapped for ``round_fn`` (same backward)."""
    class Weight(_DualBinaryWeight):
        @staticmethod
        def forward(ctx, w, a1, a2, group_size):
            out, n = w.shape
            b1, b2 = round_fn(w.detach().reshape(out, n // group_size, group_size).float(),
                              a1.detach().float()[..., None], a2.detach().float()[..., None])
            ctx.save_for_backward(b1, b2)
            return (a1[..., None] * b1.to(a1.dtype) + a2[..., None] * b2.to(a2.dtype)).reshape(out, n).to(w.dtype)
    return Weight.apply


def fwd_bwd_ms(fn, w, a1, a2, g, repeats):
    a1, a2 = a1.clone().requires_grad_(), a2.clone().requires_grad_()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(w, a1, a2, g).sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default="bench/results/fdb_round.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model()
    shapes = {}
    for name, m in quantizable_linears(model).items():
        shapes.setdefault(tuple(m.weight.shape), (name, m.weight.detach().float()))
    g, rows = args.group_size, []
    for (out_f, in_f), (name, w) in shapes.items():
        a1, a2 = fdb_init(w, g)
        gen = torch.Generator().manual_seed(0)
        moved = (a1 * (1 + 0.1 * torch.randn(a1.shape, generator=gen)),
                 a2 * (1 + 0.1 * torch.randn(a2.shape, generator=gen)))
        for scales, (s1, s2) in (("clip init (on grid)", (a1, a2)), ("moved off the grid", moved)):
            wg = w.reshape(out_f, in_f // g, g)
            new = fdb_round(wg, s1[..., None], s2[..., None])
            row = {"shape": f"{out_f}x{in_f}", "layer": name, "scales": scales,
                   "fdb_round_ms": round(fwd_bwd_ms(_DualBinaryWeight.apply, w, s1, s2, g, args.repeats), 2)}
            for key, fn in (("torch_form", fdb_round_torch), ("argmin_form", argmin_round),
                            ("old_training_form", old_training_round)):
                old = fn(wg, s1[..., None], s2[..., None])
                cpp, quant.FDB_ROUND_CPP = quant.FDB_ROUND_CPP, False  # torch's backward for the other forms
                try:
                    row[f"{key}_ms"] = round(fwd_bwd_ms(autograd_with(fn), w, s1, s2, g, args.repeats), 2)
                finally:
                    quant.FDB_ROUND_CPP = cpp
                row[f"{key}_speedup"] = round(row[f"{key}_ms"] / row["fdb_round_ms"], 2)
                row[f"{key}_weights_differing"] = int(((new[0] != old[0]) | (new[1] != old[1])).sum())
            rows.append({**row, "n_weights": w.numel()})
            print(rows[-1], flush=True)
    write_results(args.out, rows, {"group_size": g, "repeats": args.repeats,
                                   "fdb_round_path": "C++ (quant.fdb_round_cpu)" if cpu_kernel.available()
                                   else f"torch (C++ unavailable: {cpu_kernel.why_unavailable()})",
                                   "timer": "best of repeats, "
                                   "forward + backward of the FDB layer weight, torch threads 1",
                                   "backward": "fdb_round: the layer's (scale gradients in C++ where fdb_round_path "
                                               "is C++); the other forms: torch's (FDB_ROUND_CPP False)",
                                   "weights": "embedded SmolLM2-135M, first layer of each shape",
                                   "load_average_1_5_15min": os.getloadavg()})


if __name__ == "__main__":
    main()
