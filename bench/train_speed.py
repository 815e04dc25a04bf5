"""Training speed on this CPU: fp32 against bf16 autocast, 1 against 2 torch threads, cached teacher logits, the
FDB rounding and its scale gradients in C++ (``quant.fdb_round`` and ``quant.fdb_scale_grads``, the default on the
CPU) against their torch forms, and the fused AdamW update (``runtime.adamw``'s default) against the unfused one,
for the two training stages of the DB-LLM table (the tuned recipe on the embedded model).

Each setting trains a fresh copy of the same FDB clip-init student from the same data and seed:
  - stage 1: ``blockwise_reconstruct`` on the first ``--blocks`` decoder blocks (a truncated copy of the model);
  - stage 2: ``train`` (end-to-end DAD, latent weights trained, the ``quick`` recipe's end-to-end settings) for ``--steps`` steps.
It reports wall and CPU seconds per step (the first ``--warmup`` steps of stage 2 left out) and how far each
setting's losses move from the fp32 / 1-thread reference, so that a faster setting is only kept within a stated
tolerance. Run it on an otherwise idle machine: the 2-thread rows need both cores.

    python bench/train_speed.py                  # bench/results/train_speed.json
"""
import argparse
import copy
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_results  # noqa: E402
from dbllm_lab.blockwise import BlockwiseConfig, blockwise_reconstruct  # noqa: E402
from dbllm_lab.datafree import generate_samples  # noqa: E402
from dbllm_lab import quant  # noqa: E402
from dbllm_lab.model import decoder_layers, load_model  # noqa: E402
from dbllm_lab.recipes import recipe  # noqa: E402
from dbllm_lab.train import TrainConfig, build_student, to_windows, train  # noqa: E402

# (precision, torch threads, cached teacher logits, FDB rounding and scale gradients in C++, fused AdamW, stage-1
# window: 0 = whole 256-token samples)
SETTINGS = [("fp32", 1, False, True, True, 0), ("bf16", 1, False, True, True, 0), ("fp32", 2, False, True, True, 0),
            ("bf16", 2, False, True, True, 0), ("fp32", 1, True, True, True, 0), ("fp32", 1, False, False, True, 0),
            ("fp32", 1, False, True, False, 0), ("fp32", 1, False, True, True, 128)]


def truncated(model, blocks):
    """A copy of ``model`` with only its first ``blocks`` decoder blocks (stage 1 is per block: its cost per block
    does not depend on how many follow)."""
    m = copy.deepcopy(model)
    m.model.layers = torch.nn.ModuleList(list(decoder_layers(m))[:blocks])
    m.config.num_hidden_layers = blocks
    return m


def stage1(teacher_k, student0, data, precision, fused, seqlen):
    student = copy.deepcopy(student0)
    cfg = BlockwiseConfig(epochs=1, fused_adamw=fused, seqlen=seqlen, precision=precision)
    r = blockwise_reconstruct(teacher_k, student, data, cfg, progress=False)
    steps = sum(b["steps"] for b in r["blocks"])
    cpu = sum(b["cpu_seconds"] for b in r["blocks"])
    return {"stage1_wall_s_per_step": sum(b["seconds"] for b in r["blocks"]) / steps,
            "stage1_cpu_s_per_step": cpu / steps,
            "stage1_cpu_us_per_token": 1e6 * cpu / (len(r["blocks"]) * data.numel()),  # per token and block
            "stage1_rel_err_after": [b["after"]["rel_err_ordinary"] for b in r["blocks"]]}


def stage2(teacher, student0, data, cfg, warmup, cached):
    student = copy.deepcopy(student0)
    logits, cache_s = None, 0.0
    if cached:  # every window's teacher logits computed once, before training (timed separately)
        t0 = time.time()
        with torch.no_grad():
            logits = torch.cat([teacher(w[None]).logits.float() for w in to_windows(data, cfg.seqlen)])
        cache_s = time.time() - t0
    r = train(student, data, teacher=None if cached else teacher, config=cfg, teacher_logits=logits,
              progress=False)
    h = r["history"]
    n = len(h) - warmup
    return {"stage2_wall_s_per_step": (h[-1]["seconds"] - h[warmup - 1]["seconds"]) / n,
            "stage2_cpu_s_per_step": (h[-1]["cpu_seconds"] - h[warmup - 1]["cpu_seconds"]) / n,
            "stage2_losses": [x["loss"] for x in h], "teacher_cache_s": round(cache_s, 1),
            "teacher_cache_mib": round(logits.numel() * 4 / 2**20, 1) if cached else 0.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=8, help="teacher-written samples of 256 tokens")
    ap.add_argument("--blocks", type=int, default=2, help="stage 1: decoder blocks reconstructed")
    ap.add_argument("--steps", type=int, default=8, help="stage 2: optimiser steps")
    ap.add_argument("--warmup", type=int, default=2, help="stage 2: first steps left out of the timing")
    ap.add_argument("--out", default="bench/results/train_speed.json")
    a = ap.parse_args(argv)
    if a.steps <= a.warmup:
        raise ValueError(f"--steps {a.steps} must exceed --warmup {a.warmup}")
    load_start, t_start = [round(x, 2) for x in os.getloadavg()], time.time()
    teacher, tok = load_model(a.model)
    data = generate_samples(teacher, tok, 128, 256, seed=0, batch_size=64)[:a.samples]
    student0, _ = build_student(teacher, progress=False)
    teacher_k = truncated(teacher, a.blocks)
    student0_k = truncated(student0, a.blocks)
    cfg = TrainConfig(**{**recipe("quick")["e2e"], "loss": "dad", "steps": a.steps, "batch_size": 2, "seqlen": 128})
    rows = []
    for precision, threads, cached, cpp, fused, seqlen in SETTINGS:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        quant.FDB_ROUND_CPP = cpp
        row = {"method": f"{precision}, {threads} thread{'s' * (threads > 1)}" + (", cached teacher" if cached else "")
                         + ("" if cpp else ", torch rounding and scale grads") + ("" if fused else ", unfused AdamW")
                         + (f", stage-1 windows of {seqlen}" if seqlen else ""),
               "precision": precision, "threads": threads, "cached_teacher_logits": cached, "fdb_round_cpp": cpp,
               "fused_adamw": fused, "stage1_seqlen": seqlen or data.shape[1]}
        row.update(stage1(teacher_k, student0_k, data, precision, fused, seqlen))
        row.update(stage2(teacher, student0, data, replace(cfg, fused_adamw=fused, precision=precision), a.warmup,
                          cached))
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if not isinstance(v, list)},
              flush=True)
    ref = rows[0]
    for r in rows:
        for s in ("stage1", "stage2"):
            r[f"{s}_speedup_cpu"] = ref[f"{s}_cpu_s_per_step"] / r[f"{s}_cpu_s_per_step"]
            r[f"{s}_speedup_wall"] = ref[f"{s}_wall_s_per_step"] / r[f"{s}_wall_s_per_step"]
        r["stage1_max_rel_err_change"] = (None if r["stage1_seqlen"] != ref["stage1_seqlen"] else  # other windows
                                          max(abs(x - y) / y for x, y in zip(r["stage1_rel_err_after"],
                                                                             ref["stage1_rel_err_after"])))
        r["stage2_max_loss_change"] = max(abs(x - y) / y for x, y in zip(r["stage2_losses"], ref["stage2_losses"]))
    write_results(a.out, rows, {"model": a.model, "samples": a.samples, "sample_len": 256, "stage1_blocks": a.blocks,
                                "stage1": "BlockwiseConfig defaults, 1 epoch",
                                "stage2": {**vars(cfg), "precision": "each row's (TrainConfig.precision)"},
                                "stage2_timed_steps": a.steps - a.warmup,
                                "load_average_at_start": load_start,
                                "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                                "seconds": round(time.time() - t_start, 1),
                                "note": "losses are compared with the fp32, 1-thread row step by step "
                                        "(relative change); the 2-thread rows need an idle 2-core machine"})
    print("wrote", a.out)


if __name__ == "__main__":
    main()
