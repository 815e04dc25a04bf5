"""Which end-to-end setting moves perplexity: short stage-2 runs from one shared stage 1.

Every lever starts from the same finished stage 1 (the 128-sample tuned block-wise stage of
``bench/dbllm_table.py``, built there first), runs ``--steps`` end-to-end DAD steps on the 512-sample pool with
the table's ``TUNED_E2E`` settings plus the lever's overrides, and is evaluated on the table's windows (levers in
``STAGE1_LEVERS`` start from another stage 1 instead). One seed
and few steps: a lever that wins here is a candidate for a full row, not a result.

    python bench/e2e_levers.py                   # every lever not yet in the JSON (resumable)
    python bench/e2e_levers.py --only norms
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import add_eval_args, load_results, write_results  # noqa: E402
from bench.dbllm_table import (BASE_STAGE1, BEST_GAMMA, TUNED_E2E, TUNED_STAGE1, stage1_dir,  # noqa: E402
                               teacher_pool, train_row)
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.ppl import eval_windows, perplexity  # noqa: E402

LEVERS = {
    "base": {},                                        # the table's tuned end-to-end settings
    "seq256": {"seqlen": 256, "batch_size": 1},        # whole 256-token samples, same tokens per step
    "lat2e-4": {"lr_latent": 2e-4},                    # twice the latent-weight lr
    "norms": {"train_norms": True, "lr_norm": 1e-3},   # RMSNorm weights train too (full precision)
    "s1n512": {},                                      # the tuned settings after another stage 1 (STAGE1_LEVERS)
}
STAGE1_SAMPLES, STAGE2_SAMPLES = 128, 512
# levers that start from another stage 1: (block-wise overrides, stage-1 samples); the rest share the tuned one
# 512 samples seen once: the stage 1 of the table's "fdb blockwise n512 1ep" row
STAGE1_LEVERS = {"s1n512": ({**TUNED_STAGE1, "epochs": 1}, 512)}


def main(argv=None):
    ap = add_eval_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "bench/results/e2e_levers.json")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--only", default=None, help=f"comma-separated levers of {list(LEVERS)}")
    ap.add_argument("--ckpt-dir", default="checkpoints/dbllm_table", help="where the table keeps its stage 1")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    only = a.only.split(",") if a.only else list(LEVERS)
    bad = sorted(set(only) - set(LEVERS))
    if bad:
        raise SystemExit(f"unknown levers {bad}; levers: {list(LEVERS)}")
    torch.set_num_threads(a.threads)
    teacher, tok = load_model(a.model)
    ctx = argparse.Namespace(args=a, teacher=teacher, pool=teacher_pool(teacher, tok, STAGE2_SAMPLES, 256))
    windows = eval_windows(teacher, tok, "wikitext2", "test", a.seqlen, a.windows or None, a.data_dir)
    settings = {"steps": a.steps, "stage1": {**BASE_STAGE1, **TUNED_STAGE1},
                "stage1_dir": stage1_dir(a.ckpt_dir, "fdb", TUNED_STAGE1, STAGE1_SAMPLES),
                "stage1_samples": STAGE1_SAMPLES, "stage2_samples": STAGE2_SAMPLES,
                "e2e_base": {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA},
                "levers": LEVERS, "stage1_levers": STAGE1_LEVERS, "seqlen": a.seqlen, "windows": a.windows, "threads": a.threads,
                "note": "one seed; CPU minutes depend on what else ran (two levers ran side by side; s1n512 shared the "
                        "2 cores with a test run). base, seq256, lat2e-4 and norms were measured by this procedure run "
                        "from a scratch copy before the script was committed (same calls, checkpoints outside the "
                        "repo, wall time not recorded); rerunning the script after deleting a row remeasures it."}
    for name in only:
        if name in {r["method"] for r in load_results(a.out)}:
            continue
        t0 = time.time()
        # the table's own row builder: same stage-1 folder, stage 2 under <ckpt-dir>/levers_<name>
        bw, n1 = STAGE1_LEVERS.get(name, (TUNED_STAGE1, STAGE1_SAMPLES))
        spec = ("fdb", "both", bw, {**settings["e2e_base"], "steps": a.steps, **LEVERS[name]}, (n1, STAGE2_SAMPLES))
        s1 = os.path.basename(stage1_dir(a.ckpt_dir, "fdb", bw, n1))
        student, info = train_row(ctx, f"levers {name}", spec)
        res = perplexity(student, tok, windows=windows, seqlen=a.seqlen)
        row = {"method": name, "overrides": json.dumps(LEVERS[name]), "stage1": s1, "ppl": res.ppl,
               "bits_per_weight": info["bits_per_weight"], "stage2_cpu_minutes": info["stage2_cpu_minutes"],
               "stage2_final_loss": info["stage2_final_loss"], "wall_minutes": round((time.time() - t0) / 60, 1)}
        rows = [r for r in load_results(a.out) if r["method"] != name] + [row]
        write_results(a.out, sorted(rows, key=lambda r: list(LEVERS).index(r["method"])), settings)


if __name__ == "__main__":
    main()
