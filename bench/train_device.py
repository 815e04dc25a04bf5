"""Recipes trained on a GPU: training wall time (text included), peak GPU memory and dev / held-out / full PPL, per
(recipe, seed).

    python bench/train_device.py --recipes best best+dad best+kd --seeds 0 1 2 --stage1-from best --deadline-minutes 8

The same ``run_recipe.train_recipe`` as ``bench/dbllm_table.py`` (the CPU table), on ``--device`` (default cuda):
the teacher writes the text on the device, stage 1 streams each block through it, stage 2 runs whole models there.
A recipe that shares ``best``'s stage 1 (``best+dad``, ``best+kd``) starts from the stage 1 trained here for the same
seed with ``--stage1-from best`` (``dbllm_table.shared_stage1``), so its row is paired with that seed's ``best`` row.

GPU numerics and GPU-written text differ from the CPU's: these rows are their own table
(``bench/results/train_<gpu>.json``), never mixed with the CPU rows. Rows are written as they finish; a row starts
only while less than ``--deadline-minutes`` have passed, so a fixed lease ends with whole rows.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import gpu_tag, load_results, write_results  # noqa: E402
from bench.dbllm_table import shared_stage1  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.ppl import perplexity  # noqa: E402
from dbllm_lab.recipes import recipe  # noqa: E402
from dbllm_lab.run_recipe import run_name, run_path, train_recipe  # noqa: E402
from dbllm_lab.train import freeze_quantized  # noqa: E402


def synced_time(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.time()


def measure(model, tok, device, max_windows=None):
    """(dev, held-out, full) PPL and the eval's wall seconds."""
    t0 = synced_time(device)
    r = perplexity(model, tok, device=device, max_windows=max_windows, progress=False)
    return {"ppl_dev": r.ppl_dev, "ppl_heldout": r.ppl_heldout, "ppl": r.ppl, "eval_windows": r.windows,
            "eval_seconds": round(synced_time(device) - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["best"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs-dir", default="build/runs_device")
    ap.add_argument("--stage1-from", default=None, help="a recipe whose stage 1 (same seed, this table) rows start from")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate on the first N windows (a smoke test)")
    ap.add_argument("--deadline-minutes", type=float, default=None, help="start no row after this many minutes")
    ap.add_argument("--out", default=None, help="default bench/results/train_<device name>.json")
    args = ap.parse_args(argv)
    for name in args.recipes:
        recipe(name)  # bad names fail before the model loads
        for seed in args.seeds:
            shared_stage1(name, args.stage1_from, seed, args.runs_dir)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible; the CPU table is bench/dbllm_table.py")
    name_of_device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    out = args.out or os.path.join("bench", "results", f"train_{gpu_tag() if args.device.startswith('cuda') else 'cpu'}.json")
    start = time.time()
    t0 = synced_time(args.device)
    teacher, tok = load_model(None, device=args.device)
    settings = {"device": args.device, "device_name": name_of_device, "runs_dir": args.runs_dir,
                "load_seconds": round(synced_time(args.device) - t0, 1),
                "timer": "wall seconds with torch.cuda.synchronize() at each phase's end",
                "note": "GPU-written text and GPU numerics: compare these rows with each other, not with the CPU table"}
    rows = load_results(out)
    if not any(r["method"] == "fp" for r in rows):
        rows.insert(0, {"method": "fp", **measure(teacher, tok, args.device, args.max_windows)})
        write_results(out, rows, settings)
    for seed in args.seeds:
        for name in args.recipes:
            method = run_name(name, seed)
            if any(r["method"] == method for r in rows):
                continue
            if args.deadline_minutes is not None and (time.time() - start) / 60 > args.deadline_minutes:
                print(f"deadline: {method} not started")
                continue
            stage1_dir = shared_stage1(name, args.stage1_from, seed, args.runs_dir)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = synced_time(args.device), time.process_time()
            student, info = train_recipe(teacher, tok, recipe(name), seed=seed, device=args.device,
                                         out_dir=run_path(name, seed, args.runs_dir),
                                         stage1_dir=stage1_dir, progress=False)
            wall = synced_time(args.device) - t0
            row = {"method": method, "recipe": name, "seed": seed, "train_wall_seconds": round(wall, 1),
                   "process_cpu_minutes": round((time.process_time() - c0) / 60, 2),
                   **{k: v for k, v in info.items() if k not in ("stage1_blocks", "stage2_curve")},
                   "stage1_optimiser_seconds": round(sum(b["seconds"] for b in info.get("stage1_blocks") or []), 1),
                   "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                   if args.device.startswith("cuda") else None,
                   **measure(freeze_quantized(student).to(args.device), tok, args.device, args.max_windows)}
            if stage1_dir and name != args.stage1_from:
                row["stage1_from"] = f"{args.stage1_from} s{seed} (this table)"
            rows.append(row)
            write_results(out, rows, settings)  # write_results records the machine
            print({k: row[k] for k in ("method", "train_wall_seconds", "ppl_dev", "ppl_heldout")}, flush=True)
            del student
    print(f"total {round((time.time() - start) / 60, 2)} min")


if __name__ == "__main__":
    main()
