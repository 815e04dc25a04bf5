"""Zero-shot accuracy table (the papers' second table): PIQA, ARC-Easy, ARC-Challenge, HellaSwag and WinoGrande
through lm-evaluation-harness (``dbllm_lab.zeroshot``: lm-eval's HFLM and its own task definitions on the shipped
data/zeroshot files, or --data-dir), for FP, RTN W2g64, FDB init (clip), ARB-RC, and any packed checkpoint given
with --checkpoint. Writes bench/results/zeroshot.json (+ .md); resumable row by row, and several invocations with
different --only may run at once (rows are merged into the file under a lock on its folder).

    python bench/zeroshot.py [--docs 1000 | --limit 100 | --full] [--only fp rtn-w2g64 fdb-init arb-rc]
    python bench/zeroshot.py --only --checkpoint "best s0=build/models/best"
    python bench/zeroshot.py --only --run best-uniform:1          # a trained run folder (build/runs/best-uniform-s1)
    python bench/zeroshot.py --only fp --tasks hellaswag & python bench/zeroshot.py --only fp --tasks piqa,...

A row may be scored in parts side by side (``--tasks`` subsets, each process on one core): the parts are merged
into one row as they land (``raw`` keeps lm-eval's per-task results; ``partial`` names the tasks still missing).

Trained rows come from packed checkpoints (``dbllm-lab train ... --save DIR``): ``--checkpoint NAME=DIR`` adds a
row named NAME. Its packed layers are dequantized once into dense ``nn.Linear`` weights for scoring
(``zeroshot.dense_weights``: the same w_hat, torch's matmul instead of the bit-plane kernel, which is slower here).
Students without a packed format (the uniform grid) come from their run folder: ``--run RECIPE:SEED`` scores
``run_recipe.finished_student`` of ``build/runs/RECIPE-sSEED`` as row ``"RECIPE sSEED"`` (dbllm_table.py's name).

Sizes: ``--docs N`` (the default, N = 1000, "at size") scores the first N documents of each task and
takes a split whole where it holds under 1.5 N rows (ARC-Challenge 1,172 and WinoGrande 1,267); ``--limit N``
scores the first N of every task (quick mode); ``--full`` the full splits (PIQA 1,838, ARC-Easy 2,376,
ARC-Challenge 1,172, HellaSwag 10,042, WinoGrande 1,267). Every row records its documents per task (``n``), each
accuracy's standard error, the chance level of the scored documents, and which cells lie within 2 standard errors
of chance; the CPU time of quantizing and of evaluating. The mean is over the five tasks' ``acc``;
``mean_acc_norm`` uses acc_norm where the task has it (all but WinoGrande).
"""
import argparse
import copy
import json
import os
import resource
import sys
import time

import lm_eval
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_calib_args, calib_note, calib_windows, load_results, results_lock, write_results  # noqa: E402

from dbllm_lab import zeroshot  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.quantize import quantize_model  # noqa: E402
from dbllm_lab.run_recipe import finished_student, parse_run, run_folder, run_name  # noqa: E402

# row name -> quantize_model arguments (None: the FP model); "arb-rc" is calibrated like bench/arb_table.py
ROWS = {"fp": None,
        "rtn-w2g64": dict(method="rtn", bits=2, group_size=64),
        "fdb-init": dict(method="fdb", group_size=64, init="clip"),
        "arb-rc": dict(method="arb-rc", cgb=False, iters=15)}
MD_COLUMNS = ["method", "bits_per_weight", "docs_per_task", *zeroshot.TASKS, "mean", "mean_norm", "row_cpu_min"]


def pct(x):
    return None if x is None else round(100 * x, 2)


def table_row(name, res, bits, limit, quant_cpu_s, quant_s):
    """One result row: per task acc / acc_norm with stderr (in %), the means, display columns, times."""
    tasks = res["tasks"]
    row = {"method": name, "bits_per_weight": bits, "docs_per_task": zeroshot.docs_label(tasks)}
    for metric in ("acc", "acc_norm"):
        for t, r in tasks.items():
            if r.get(metric) is not None:
                row[f"{t}_{metric}"], row[f"{t}_{metric}_stderr"] = pct(r[metric]), pct(r[metric + "_stderr"])
        mean, se = zeroshot.mean_accuracy(tasks, metric)
        row[f"mean_{metric}"], row[f"mean_{metric}_stderr"] = pct(mean), pct(se)
    for t, r in tasks.items():  # display columns: "acc ± stderr" in %, and the same for acc_norm
        row[t] = f"{pct(r['acc']):.1f} ± {pct(r['acc_stderr']):.1f}"
        row[t + "_norm"] = (f"{pct(r['acc_norm']):.1f} ± {pct(r['acc_norm_stderr']):.1f}"
                            if r.get("acc_norm") is not None else f"({pct(r['acc']):.1f})")
    row["mean"] = f"{row['mean_acc']:.1f} ± {row['mean_acc_stderr']:.1f}"
    row["mean_norm"] = f"{row['mean_acc_norm']:.1f} ± {row['mean_acc_norm_stderr']:.1f}"
    chance = {t: pct(r["chance"]) for t, r in tasks.items()}
    mean_chance = round(sum(chance.values()) / len(chance), 2)
    mean_near = abs(row["mean_acc"] - mean_chance) < 2 * row["mean_acc_stderr"]
    row.update(chance=chance, mean_chance=mean_chance,
               near_chance=zeroshot.near_chance(tasks) + ["mean acc"] * mean_near,
               data={t: r["data"]["sha256"] for t, r in tasks.items()},
               data_shipped=all(r["data"]["shipped"] for r in tasks.values()))
    row.update(n={t: r["n"] for t, r in tasks.items()}, task_versions=res["task_versions"],
               quantize_s=round(quant_s, 1), quantize_cpu_min=round(quant_cpu_s / 60, 2),
               eval_s=res["seconds"], eval_cpu_min=round(res["cpu_seconds"] / 60, 2),
               row_cpu_min=round((quant_cpu_s + res["cpu_seconds"]) / 60, 2),
               peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    return row


def per_task_limit(limit, tasks):
    """{task: limit} for every task from one limit (int / None) or a dict of them."""
    return {t: (limit.get(t) if isinstance(limit, dict) else limit) for t in tasks}


def covers(row, tasks, limit):
    """Whether ``row`` already holds every task of ``tasks`` scored with ``limit``."""
    have = per_task_limit(row.get("limit"), row.get("n", {}))
    return all(t in have and have[t] == lim for t, lim in per_task_limit(limit, tasks).items())


def build_row(name, raw, limit, checkpoint):
    """The full row from its raw record (lm-eval's per-task results, times, bits), whole or merged from parts."""
    order = [t for t in zeroshot.TASKS if t in raw["tasks"]]
    res = {"tasks": {t: raw["tasks"][t] for t in order}, "seconds": raw["seconds"], "cpu_seconds": raw["cpu_seconds"],
           "task_versions": {t: raw["tasks"][t]["version"] for t in order}}
    row = {**table_row(name, res, raw["bits"], limit, raw["quant_cpu_s"], raw["quant_s"]),
           "limit": limit, "checkpoint": checkpoint, "raw": raw}
    missing = [t for t in zeroshot.TASKS if t not in raw["tasks"]]
    if missing:
        row["partial"] = f"tasks still missing: {', '.join(missing)} (the means cover the tasks present)"
    return row


def merge_parts(old, row):
    """A row scored in parts (``--tasks`` subsets run side by side): ``old``'s tasks plus ``row``'s, times summed."""
    a, b = old["raw"], row["raw"]
    raw = {"tasks": {**a["tasks"], **b["tasks"]}, "bits": b["bits"], "parts": a.get("parts", 1) + 1,
           "command": [*([a["command"]] if isinstance(a.get("command"), str) else a.get("command", [])), b["command"]],
           **{k: round(a[k] + b[k], 1) for k in ("seconds", "cpu_seconds", "quant_cpu_s", "quant_s")}}
    limit = {**per_task_limit(old["limit"], a["tasks"]), **per_task_limit(row["limit"], b["tasks"])}
    return build_row(row["method"], raw, limit, row["checkpoint"])


def table_notes(rows):
    """Settings derived from the rows: near-chance cells per row and the FP row against the model card."""
    notes = {"near_chance": {r["method"]: r.get("near_chance") for r in rows},
             "near_chance_note": "cells (task metric) whose accuracy is within 2 standard errors of chance (the "
                                 "mean of 1/choices over the scored documents), per row; 'mean acc' when the mean is"}
    fp = next((r for r in rows if r["method"] == "fp"), {})
    ours = {m: {t: fp.get(f"{t}_{m}") for t in ("hellaswag", "piqa")} for m in ("acc", "acc_norm")}
    for m in ours:  # None where the FP row lacks the task (not scored yet)
        arc = [fp.get(f"{t}_{m}") for t in ("arc_easy", "arc_challenge")]
        ours[m]["arc_average"] = None if None in arc else round(sum(arc) / 2, 2)
    notes["fp_vs_model_card"] = {**zeroshot.MODEL_CARD, "fp_acc": ours["acc"], "fp_acc_norm": ours["acc_norm"],
                                 "fp_n": fp.get("n")}
    return notes


def save_row(out, row, settings, order):
    """Merge ``row`` into ``out`` under ``results_lock`` (parallel invocations stay consistent). A row of the same
    method holding other tasks only (an earlier part) is combined with it."""
    with results_lock(out):
        existing = load_results(out)
        old = next((r for r in existing if r["method"] == row["method"]), None)
        if old and "raw" in old and not set(old["raw"]["tasks"]) & set(row["raw"]["tasks"]):
            row = merge_parts(old, row)
        rows = [r for r in existing if r["method"] != row["method"]] + [row]
        rows.sort(key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
        limits = {json.dumps(r.get("limit"), sort_keys=True) for r in rows}  # other limits' rows are kept as they are
        if len(limits) > 1:
            settings = {**settings, "limit": [json.loads(x) for x in sorted(limits)],
                        "docs_per_task": "differs by row: see the docs_per_task column"}
        write_results(out, rows, {**settings, **table_notes(rows)}, MD_COLUMNS)


def parse_checkpoints(specs):
    out = {}
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--checkpoint {spec!r}: expected NAME=DIR (a packed checkpoint folder)")
        out[name] = path
    return out


def parse_runs(specs):
    """{row name: (recipe, seed)} from ``RECIPE:SEED`` specs, each run folder checked before the model loads."""
    out = {}
    for spec in specs:
        try:
            name, seed = parse_run(spec)
            run_folder(name, seed)
        except ValueError as e:
            raise SystemExit(f"--run: {e}") from None
        out[run_name(name, seed)] = (name, seed)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)")
    ap.add_argument("--data-dir", default=None, help="folder with zeroshot/<task>/<split>.jsonl[.xz] (else "
                    "DBLLM_DATA_DIR, else the shipped data/zeroshot)")
    ap.add_argument("--tasks", default=",".join(zeroshot.TASKS))
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--docs", type=int, default=zeroshot.AT_SIZE,
                      help="first N documents per task, a split under 1.5 N taken whole (default %(default)s)")
    size.add_argument("--limit", type=int, default=None, help="first N documents of every task (quick mode)")
    size.add_argument("--full", action="store_true", help="score the full splits")
    ap.add_argument("--only", nargs="*", choices=list(ROWS), default=list(ROWS),
                    help="built-in rows to run (none: only the --checkpoint rows)")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                    help="add a row for a packed checkpoint folder (e.g. a trained FDB+DAD or KD student)")
    ap.add_argument("--run", action="append", default=[], metavar="RECIPE:SEED",
                    help="add a row for a finished stage-1 run folder, build/runs/RECIPE-sSEED (e.g. the uniform grid, "
                         "which has no packed format)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the output file")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "zeroshot.json"))
    ap.add_argument("--refresh", action="store_true", help="rewrite --out's notes and markdown from its rows, "
                    "scoring nothing")
    add_calib_args(ap)
    args = ap.parse_args()
    if args.refresh:
        with open(args.out) as f:
            doc = json.load(f)
        write_results(args.out, doc["rows"], {**doc["settings"], **table_notes(doc["rows"])}, MD_COLUMNS)
        return
    torch.set_num_threads(args.threads)
    tasks = zeroshot.parse_tasks(args.tasks)
    if args.full:
        limit = None
    elif args.limit is not None:
        limit = zeroshot.check_limit(args.limit)
    else:
        limit = zeroshot.at_size_limits(tasks, args.docs)
    for t in tasks:  # a missing file fails before any model work
        zeroshot.task_file(t, args.data_dir)
    ckpts = parse_checkpoints(args.checkpoint)
    runs = parse_runs(args.run)
    names = list(args.only) + list(ckpts) + list(runs)  # rows already in the file are skipped (resumable)
    order = list(ROWS) + list(ckpts) + list(runs)

    existing = load_results(args.out)
    mixed = [r["method"] for r in existing if not covers(r, tasks, limit) and r["method"] not in names]
    if mixed and not args.redo:
        print(f"note: rows {mixed} in {args.out} were run with another limit; they are kept as they are", flush=True)
    done = {r["method"] for r in existing if covers(r, tasks, limit)}
    todo = [n for n in names if args.redo or n not in done]
    if not todo:
        print(f"all requested rows are already in {args.out}")
        return
    base, tok = load_model(args.model)
    settings = {"model": getattr(base, "name_or_path", str(args.model)), "engine": f"lm-eval {lm_eval.__version__}",
                "tasks": tasks, "num_fewshot": 0,
                "limit": limit, "docs_per_task": ("full splits" if limit is None else f"first {limit} of each split"
                                                  if isinstance(limit, int) else
                                                  "first N of each split, a split under 1.5 N rows whole (limit)"),
                "splits": {t: zeroshot.TASKS[t][1] for t in tasks}, "batch_size": args.batch_size,
                "threads": args.threads, "calib": calib_note(args) + " (arb-rc row)",
                "mean": "unweighted mean over the five tasks of acc (mean_acc_norm: acc_norm where the task has "
                        "it, acc for WinoGrande); its stderr is sqrt(sum of squared task stderrs) / 5",
                "note": "accuracies and stderr in %; FP = the embedded SmolLM2-135M-Instruct GGUF Q4_1 model "
                        "dequantized to float32 (not the bf16 Hugging Face weights); checkpoint rows: packed layers "
                        "dequantized to dense weights for scoring; run rows (--run): the run folder's frozen w_hat; "
                        "CPU minutes are process CPU time on a shared 2-core machine",
                "older_rows": "rows scored on the first 100 documents per task (before scoring at size) were dropped; "
                              "they are in git: git show c8ed8d5:bench/results/zeroshot.json"}
    calib = None
    for name in todo:
        print(f"--- {name}", flush=True)
        c0, t0 = time.process_time(), time.time()
        if name in ckpts:
            from dbllm_lab.checkpoint import load_quantized
            from dbllm_lab.quant import fdb_bits_per_weight
            model = load_quantized(ckpts[name], base_model=copy.deepcopy(base))
            bits = fdb_bits_per_weight(2, model.quant_header["group_size"])
            print(f"{zeroshot.dense_weights(model)} packed layers dequantized to dense weights", flush=True)
        elif name in runs:
            model = finished_student(base, tok, *runs[name])
            bits = next(m.bits_per_weight for m in model.modules() if hasattr(m, "bits_per_weight"))
        elif ROWS[name] is None:
            model, bits = base, 16.0
        else:
            kw = dict(ROWS[name])
            if kw["method"] == "arb-rc":
                calib = calib if calib is not None else calib_windows(base, tok, args)
                kw["calib_windows"] = calib
            model = copy.deepcopy(base)
            bits = quantize_model(model, **kw)["bits_per_weight"]
        quant_cpu, quant_s = time.process_time() - c0, time.time() - t0
        c1 = time.process_time()
        res = zeroshot.evaluate(model, tok, tasks, limit=limit, data_dir=args.data_dir, batch_size=args.batch_size)
        raw = {"tasks": res["tasks"], "bits": bits, "seconds": res["seconds"],
               "cpu_seconds": round(time.process_time() - c1, 1), "quant_cpu_s": round(quant_cpu, 1),
               "quant_s": round(quant_s, 1), "command": " ".join(["python"] + sys.argv)}
        row = build_row(name, raw, limit, ckpts.get(name) or (run_folder(*runs[name]) if name in runs else None))
        print({k: row[k] for k in ("method", "mean", "mean_norm", "row_cpu_min", "eval_s")}, flush=True)
        save_row(args.out, row, settings, order)
        if model is not base:
            del model


if __name__ == "__main__":
    main()
