"""DB-LLM results table: two-stage training (block-wise reconstruction, then end-to-end DAD / KD) of FDB W2g64
and of a learnable uniform 2-bit grid, against FP, RTN and the untrained initialisations.

Every trained row is built by ``dbllm_lab.train.train_two_stage``, the function ``dbllm-lab train --stage``
calls, with ``BlockwiseConfig(**BASE_STAGE1)`` (the first recipe: batch 4, latent lr 5e-4) and ``TrainConfig``'s
defaults unless a row names an override (both with the unfused AdamW the rows were trained with before
``fused_adamw`` existed; a row names ``fused_adamw`` True to use the fused one). All rows see
teacher-written text (prefixes of one cached pool, never the evaluated split). Each row records WikiText-2
test PPL (first ``--windows`` windows of ``--seqlen``), the head-class bias statistic on the first
``--bias-windows`` windows, and the CPU minutes of each stage; data generation is reported once in the
settings. Rows already in the JSON are skipped and every stage checkpoints under ``--ckpt-dir``: rerunning the
command resumes.

    python bench/dbllm_table.py                       # the table (rows in ROWS order; --only NAME,NAME)
    python bench/dbllm_table.py --save "fdb 2-stage dad s0" ckpt/dad   # a finished row as a packed checkpoint
    python bench/dbllm_table.py --memory-flatness     # stage-1 peak memory on random LLaMA configs, 8/16/32 blocks
    python bench/dbllm_table.py --stream-errors ROW ROW   # per-block errors of finished rows on unseen text
    python bench/dbllm_table.py --position-ppl ROW ROW    # their PPL by position in the evaluation window
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import add_eval_args, eval_settings, load_results, write_results  # noqa: E402
from dbllm_lab.bias import entropy_edges, head_class_bias, head_tokens, teacher_entropies  # noqa: E402
from dbllm_lab.blockwise import BlockwiseConfig, block_errors  # noqa: E402
from dbllm_lab.checkpoint import save_quantized  # noqa: E402
from dbllm_lab.datafree import generate_samples  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.ppl import eval_windows, perplexity, window_nll  # noqa: E402
from dbllm_lab.quantize import quantize_model  # noqa: E402
from dbllm_lab.train import AFTER_STAGE1, TrainConfig, freeze_quantized, peak_rss_gib, train_two_stage  # noqa: E402

BEST_GAMMA = 0.0  # best gamma of the end-to-end-only sweep (fdb+dad g=0 / 0.5 / 1 in the earlier rows below)
# TrainConfig / BlockwiseConfig defaults (the CLI's) unless a row overrides them

# Block-wise settings of every row = BASE_STAGE1 (the first recipe) updated by the row's overrides; the stage-1
# folders are named by those overrides. TUNED_STAGE1 is what BlockwiseConfig's defaults are now.
BASE_STAGE1 = {"batch_size": 4, "lr_latent": 5e-4, "fused_adamw": False}
BASE_E2E = {"fused_adamw": False}  # rows before fused_adamw existed used the unfused AdamW; new rows set it True
LAT2E3_STAGE1 = {"lr_latent": 2e-3}
LAT_E2E = {"train_latent": True, "lr_latent": 1e-4, "seed": 0}  # as "+latent": scales at TrainConfig's lr 1e-2
TUNED_STAGE1 = {"batch_size": 1, "lr_latent": 2e-3}
# the long stage-1 rows: one epoch, statistics on 64 samples, fused AdamW; MIDTEXT: windows from token 64 of the stream
LONG_STAGE1 = {**TUNED_STAGE1, "epochs": 1, "stats_samples": 64, "fused_adamw": True}
MIDTEXT_STAGE1 = {**LONG_STAGE1, "window_offset": 64}
MIN1PCT_STAGE1 = {**MIDTEXT_STAGE1, "min_lr_ratio": 0.01}  # the best row's: each block's cosine ends at 1% of its peak
TUNED_E2E = {**AFTER_STAGE1, "seed": 0}  # lr 2e-4 on the scales, 1e-4 on the latent weights

# name: (quantizer, stage, block-wise overrides, end-to-end overrides, training samples: n for both stages, or
# (n stage 1, n stage 2)); samples are a prefix of the teacher-written pool (teacher_pool)
ROWS = {
    "fdb blockwise": ("fdb", "blockwise", {}, {}, 64),
    "fdb blockwise mse": ("fdb", "blockwise", {"loss": "mse"}, {}, 64),
    # stage-1 budget sweep: same data, more optimiser steps (smaller batches), higher latent lr, more epochs
    "fdb blockwise b1": ("fdb", "blockwise", {"batch_size": 1}, {}, 64),
    "fdb blockwise lat2e-3": ("fdb", "blockwise", {"lr_latent": 2e-3}, {}, 64),
    "fdb blockwise lat5e-3": ("fdb", "blockwise", {"lr_latent": 5e-3}, {}, 64),
    "fdb blockwise b1 lat2e-3": ("fdb", "blockwise", {"batch_size": 1, "lr_latent": 2e-3}, {}, 64),
    "fdb 2-stage dad s0": ("fdb", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 0}, 64),
    "uniform 2-stage dad s0": ("uniform", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 0}, 64),
    "fdb 2-stage kd s0": ("fdb", "both", {}, {"loss": "kd", "seed": 0}, 64),
    # seed 1: the end-to-end stage's data order; stage 1 is shared with seed 0 (a second stage 1 did not fit the budget)
    "fdb 2-stage dad s1": ("fdb", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 1}, 64),
    "fdb 2-stage kd s1": ("fdb", "both", {}, {"loss": "kd", "seed": 1}, 64),
    "fdb 2-stage dad n16": ("fdb", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 0}, 16),
    "fdb 2-stage dad n32": ("fdb", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 0}, 32),
    "fdb 2-stage dad n128": ("fdb", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 0}, 128),
    "fdb 2-stage dad +latent": ("fdb", "both", {}, {"loss": "dad", "gamma": BEST_GAMMA, "seed": 0, "train_latent": True,
                                                   "lr_latent": 1e-4}, 64),
    # stage 1 with the latent weights at lr 2e-3 (batch 4: "lat2e-3"; batch 1, 4x the steps: "tuned", the best of the
    # stage-1 sweep above), then end to end with the latent weights trained too (lr 1e-4, as "+latent"); seed s
    # sets both stages' data order
    "fdb lat2e-3 dad s0": ("fdb", "both", LAT2E3_STAGE1, {**LAT_E2E, "loss": "dad", "gamma": BEST_GAMMA}, 64),
    "fdb lat2e-3 kd s0": ("fdb", "both", LAT2E3_STAGE1, {**LAT_E2E, "loss": "kd"}, 64),
    # after a good stage 1, the end-to-end lr of 1e-2 on the scales (tuned for starting from the FDB init) undoes it:
    # the lat2e-3 rows end above their stage 1 (267). Gentler end-to-end learning rates ("fdb tuned dad s0" is
    # lr 2e-4 on the scales, 1e-4 on the latent weights):
    "fdb tuned dad lr1e-3": ("fdb", "both", TUNED_STAGE1,
                             {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA, "lr": 1e-3, "lr_latent": 3e-4}, 64),
    "fdb tuned dad s0": ("fdb", "both", TUNED_STAGE1, {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA}, 64),
    "fdb tuned kd s0": ("fdb", "both", TUNED_STAGE1, {**TUNED_E2E, "loss": "kd"}, 64),
    "fdb tuned dad s1": ("fdb", "both", {**TUNED_STAGE1, "seed": 1},
                         {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA, "seed": 1}, 64),
    "fdb tuned kd s1": ("fdb", "both", {**TUNED_STAGE1, "seed": 1}, {**TUNED_E2E, "loss": "kd", "seed": 1}, 64),
    "uniform tuned dad s0": ("uniform", "both", TUNED_STAGE1, {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA}, 64),
    # twice the training text: all 128 pool samples in both stages (stage 1 does twice the steps)
    "fdb long dad s0": ("fdb", "both", TUNED_STAGE1, {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA}, 128),
    # the tuned recipe on 256 samples (with 64 and 128 above: PPL against the amount of teacher-written text)
    "fdb tuned dad n256": ("fdb", "both", TUNED_STAGE1, {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA}, 256),
    # the same stage 1 as "fdb long dad s0" (128 samples), then 10x the end-to-end steps (600 x 2 x 128 tokens) on
    # 512 samples: per token, stage 2 costs about 1.5x stage 1 and trains all blocks against the teacher's outputs
    "fdb e2e600 dad s0": ("fdb", "both", TUNED_STAGE1,
                          {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA, "steps": 600}, (128, 512)),
    "fdb e2e600 dad lr1e-3 s0": ("fdb", "both", TUNED_STAGE1, {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA,
                                                               "steps": 600, "lr": 1e-3, "lr_latent": 3e-4}, (128, 512)),
    # stage 1 alone on 128 samples (the stage 1 of "fdb long" / "fdb e2e600"), and on 512 samples seen once: same
    # optimiser steps per sample, four times the distinct text, twice the stage-1 compute
    "fdb tuned blockwise n128": ("fdb", "blockwise", TUNED_STAGE1, {}, 128),
    "fdb blockwise n512 1ep": ("fdb", "blockwise", {**TUNED_STAGE1, "epochs": 1}, {}, 512),
    # the same optimiser steps per block as n512 1ep (512), on half the distinct text: 256 samples seen twice (the
    # stage 1 of "fdb tuned dad n256", evaluated alone)
    "fdb tuned blockwise n256": ("fdb", "blockwise", TUNED_STAGE1, {}, 256),
    # twice that text again: 1,024 samples seen once (--gen-pool 1024), before/after statistics on the first 64
    # (training is the same whatever stats_samples is: it only skips forward passes that training does not need)
    "fdb blockwise n1024 1ep": ("fdb", "blockwise", {**TUNED_STAGE1, "epochs": 1, "stats_samples": 64}, {}, 1024),
    # "fdb tuned blockwise n128" with each block's RMSNorm weights trained too (Norm-Tweaking's idea, lr 1e-3)
    "fdb blockwise n128 norms": ("fdb", "blockwise", {**TUNED_STAGE1, "train_norms": True}, {}, 128),
    # "fdb blockwise b1 lat2e-3" (64 samples, 2 epochs) with each sample cut into two 128-token windows: the same
    # tokens in twice the optimiser steps
    "fdb blockwise n64 w128": ("fdb", "blockwise", {**TUNED_STAGE1, "seqlen": 128}, {}, 64),
    # each sample seen once (no overfitting): does a higher latent lr pay? (fused AdamW, run side by side)
    "fdb blockwise n128 1ep fused": ("fdb", "blockwise", {**TUNED_STAGE1, "epochs": 1, "fused_adamw": True}, {}, 128),
    "fdb blockwise n128 1ep lat4e-3 fused": ("fdb", "blockwise", {**TUNED_STAGE1, "epochs": 1, "lr_latent": 4e-3,
                                                                  "fused_adamw": True}, {}, 128),
    # the stage 1 of "fdb blockwise n1024 1ep" with the fused AdamW update, then a gentler end-to-end stage (short
    # end-to-end stages after a good stage 1 made it worse or barely moved it: 132.9 -> 141.6 in 60 steps, 105.6 ->
    # 104.9 in 100). Here: half TUNED_E2E's lrs, 30 warm-up steps (10%), 300 steps on 512 samples (each window seen
    # at most once); fused AdamW
    "fdb n1024 e2e300 gentle s0": ("fdb", "both", LONG_STAGE1,
                                   {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA, "steps": 300, "lr": 1e-4,
                                    "lr_latent": 5e-5, "warmup": 30, "fused_adamw": True}, (1024, 512)),
    # that row's stage 1 evaluated alone (shared folder)
    "fdb blockwise n1024 1ep fused": ("fdb", "blockwise", LONG_STAGE1, {}, 1024),
    # a longer stage 1 alone: 1,408 samples seen once (--gen-pool 1408), 1.375x the optimiser steps of n1024. It tested
    # "stage 1 is limited by its steps" (180.0, 132.9, 105.6, 93.4 for 128, 256, 512, 1,024 steps per block) and did
    # worse (README: its block 11 misfires the sink at positions 1-2 of windows that start mid-text, --stream-errors,
    # and it loses most on positions 1-127, --position-ppl)
    "fdb blockwise n1408 1ep fused": ("fdb", "blockwise", LONG_STAGE1, {}, 1408),
    # n1024 fused with each sample cut into two 128-token windows: half the windows start mid-text, as evaluation
    # windows do. Both rows above misfire block 11's sink at positions 1-2 of windows that start mid-text
    # (--stream-errors), a case stage 1 on whole samples never sees. It misfires nowhere and is the best of the three
    # on positions 1-127, but worse past 127, where it never trained (--position-ppl): 103.5 in all
    "fdb blockwise n1024 1ep fused w128": ("fdb", "blockwise", {**LONG_STAGE1, "seqlen": 128}, {}, 1024),
    # stage-1 windows as long as the evaluation's: 512 teacher-written samples of 512 tokens (ROW_GEN_LEN; the same
    # tokens as 1,024 of 256), joined into one stream and cut from token 64 on, so that every window starts
    # mid-text, as evaluation windows do, and has up to 448 tokens of one text. 511 steps per block of 512 tokens,
    # against the n1024 rows' 1,024 of 256 (--position-ppl: those rows lose most against FP past position 255,
    # where their stage 1 never trained): 87.5, the best row, 0.4 above 3x FP
    "fdb blockwise n512 len512 1ep fused off64": ("fdb", "blockwise", MIDTEXT_STAGE1, {}, 512),
    # that stage 1 (shared folder), then a gentle end-to-end stage on whole 512-token windows (the earlier end-to-end
    # stages trained on 128-token windows): 150 DAD steps of 1 x 512 tokens, "fdb n1024 e2e300 gentle s0"'s lrs,
    # 15 warm-up steps (10%)
    "fdb len512 off64 e2e150 w512 s0": ("fdb", "both", MIDTEXT_STAGE1,
                                        {**TUNED_E2E, "loss": "dad", "gamma": BEST_GAMMA, "steps": 150, "lr": 1e-4,
                                         "lr_latent": 5e-5, "warmup": 15, "fused_adamw": True, "seqlen": 512,
                                         "batch_size": 1}, 512),
    # the stage 1 of "fdb blockwise n512 len512 1ep fused off64" on a larger pool of the same kind: 704 samples of
    # 512 tokens (6 sets; the first 512 are that row's), 703 steps per block, 1.375x that row's steps and tokens:
    # 87.6, no gain (its per-block errors on their shared first 64 windows are within 0.0014 of that row's in blocks
    # 0-27 and lower only in blocks 28-29)
    "fdb blockwise n704 len512 1ep fused off64": ("fdb", "blockwise", MIDTEXT_STAGE1, {}, 704),
    # the best row's stage 1 with each block's RMSNorm weights trained too (lr 1e-3, as "fdb blockwise n128 norms":
    # 129.8 against 132.9 without); the norm weights stay in full precision in every row, so the bits per weight do
    # not change: 89.2, worse
    "fdb blockwise n512 len512 1ep fused off64 norms": ("fdb", "blockwise", {**MIDTEXT_STAGE1, "train_norms": True},
                                                        {}, 512),
    # the best row's stage 1 with seed 1: the same windows in another order (BlockwiseConfig.seed); how far one
    # setting spreads across seeds: 88.7 against 87.5 for seed 0
    "fdb blockwise n512 len512 1ep fused off64 s1": ("fdb", "blockwise", {**MIDTEXT_STAGE1, "seed": 1}, {}, 512),
    # the best row's stage 1 with the cosine decaying to 1% of the peak lrs instead of 10% (min_lr_ratio): its last
    # steps are batch-1 steps, and a smaller last lr averages over more of them: 83.7 (2.88x FP) in 51.3 CPU-minutes,
    # the best row; its per-block errors are lower than those of the row at 10% in every block but 28
    "fdb blockwise n512 len512 1ep fused off64 min0.01": ("fdb", "blockwise", MIN1PCT_STAGE1, {}, 512),
    # that stage 1 with seed 1 (the same windows in another order), to set its result against the spread across seeds:
    # 88.7 (3.06x FP) in 47.1 CPU-minutes, no better than seed 1 at 10% (88.7), though its per-block errors are lower
    # in 27 of 30 blocks; the two seeds average 86.2 (2.97x), against 88.1 at 10%
    "fdb blockwise n512 len512 1ep fused off64 min0.01 s1": ("fdb", "blockwise", {**MIN1PCT_STAGE1, "seed": 1}, {},
                                                             512),
    # the third seed of that setting (seed 2), to say whether its mean across seeds stays below 3x FP: 87.9 (3.03x FP)
    # in 40.8 CPU-minutes, with per-block errors within 0.0028 of seed 0's; the three seeds average 86.8 (2.99x), 0.3
    # below the bar
    "fdb blockwise n512 len512 1ep fused off64 min0.01 s2": ("fdb", "blockwise", {**MIN1PCT_STAGE1, "seed": 2}, {},
                                                             512),
    # the uniform 2-bit grid (per-group step and zero) with exactly that stage 1 (seed 0): FDB against uniform at
    # equal training on the best recipe: 89.7 (3.09x FP) in 49.1 CPU-minutes, above all three FDB seeds (83.7, 88.7,
    # 87.9), with per-block errors within 0.0016 of FDB seed 0's in every block but 28 (0.0065 lower); full split 96.4
    # against 88.3
    "uniform blockwise n512 len512 1ep fused off64 min0.01": ("uniform", "blockwise", MIN1PCT_STAGE1, {}, 512),
}
# rows trained on teacher-written samples of another length than --gen-len's (row_pool)
# stage-1 rows trained on the cached pool of "fdb blockwise n512 len512 1ep fused off64"
CACHED_POOL_ROWS = ["fdb blockwise n512 len512 1ep fused off64 norms", "fdb blockwise n512 len512 1ep fused off64 s1",
                    "fdb blockwise n512 len512 1ep fused off64 min0.01",
                    "fdb blockwise n512 len512 1ep fused off64 min0.01 s1",
                    "fdb blockwise n512 len512 1ep fused off64 min0.01 s2",
                    "uniform blockwise n512 len512 1ep fused off64 min0.01"]
ROW_GEN_LEN = dict.fromkeys(["fdb blockwise n512 len512 1ep fused off64", "fdb len512 off64 e2e150 w512 s0",
                             "fdb blockwise n704 len512 1ep fused off64", *CACHED_POOL_ROWS], 512)
# how a row was run, where that is not in its settings
ROW_NOTES = {"fdb blockwise n128 norms": "quality probe: shared the 2 cores with 'fdb blockwise n64 w128' and tests, so its "
                                         "CPU minutes are not a budget figure",
             "fdb blockwise n64 w128": "quality probe: shared the 2 cores with 'fdb blockwise n128 norms', so its CPU "
                                       "minutes are not a budget figure",
             "fdb blockwise n128 1ep fused": "quality probe: ran side by side with 'fdb blockwise n128 1ep lat4e-3 "
                                             "fused', a test run and the notebook suite, so its CPU minutes are not a "
                                             "budget figure. The disk filled up while its row was written; a fresh "
                                             "process loaded its finished stage 1 and evaluated it again",
             "fdb blockwise n128 1ep lat4e-3 fused": "quality probe: ran side by side with 'fdb blockwise n128 1ep "
                                                     "fused', a test run and the notebook suite, so its CPU minutes are "
                                                     "not a budget figure. The disk filled up while its stage-1 result "
                                                     "was written (after all 30 block checkpoints); a fresh process "
                                                     "resumed from them and evaluated",
             "fdb tuned blockwise n256": "its stage 1 was trained for the row 'fdb tuned dad n256' (shared folder) "
                                         "and only evaluated for this row; its CPU minutes are those recorded then",
             "fdb blockwise n512 1ep": "blocks 14-29 ran in a resumed process under torch.set_flush_denormal(True) "
                                       "(ruling out subnormal numbers as the cause of the slowdown: no change); "
                                       "blocks 17-29 shared the 2 cores with a test run",
             "fdb blockwise n1024 1ep": "ran alone on the machine (apart from two py-spy samples of 20 and 15 s, at "
                                        "blocks 11 and 28, and a 3-s probe at block 28). The first process was "
                                        "stopped after block 15 and a fresh one resumed from the checkpoints "
                                        "(blocks 16-29); its replay of blocks 0-15 (forward passes only, 9.7 "
                                        "wall-minutes) is not in the row's CPU minutes",
             "fdb blockwise n1024 1ep fused": "its stage 1 was trained for the row 'fdb n1024 e2e300 gentle s0' "
                                              "(shared folder; see its note) and only evaluated for this row; its "
                                              "CPU minutes are those recorded then",
             "fdb n1024 e2e300 gentle s0": "ran alone on the machine. The first process was stopped during block 2 "
                                           "to change the end-to-end settings (before its stage 2 began); a fresh "
                                           "one resumed from the checkpoints of blocks 0-1 (their replay, forward "
                                           "passes only, is not in the row's CPU minutes). The teacher-written pool "
                                           "was generated anew for this row (the cache is git-ignored, not in the "
                                           "repository), and its text is not identical to the earlier rows': block "
                                           "0's error before training on the first 64 samples is 0.2118 against "
                                           "0.2123 for 'fdb blockwise n1024 1ep'",
             "fdb blockwise n1408 1ep fused": "ran alone on the machine, in one process. The pool's sets 8-10 "
                                              "(samples 1,025-1,408) were generated just before it (not in the "
                                              "row's CPU minutes); samples 1-1,024 are those of the n1024 fused "
                                              "rows",
             "fdb blockwise n1024 1ep fused w128": "ran alone on the machine, in one process, on the pool of the n1024 "
                                                   "fused rows. Its before/after statistics are on its first 64 "
                                                   "windows of 128 tokens, not on 64 whole samples as the other "
                                                   "long stage-1 rows'",
             "fdb blockwise n512 len512 1ep fused off64": "ran alone on the machine, in one process. Its pool (4 sets "
                                                          "of 128 samples of 512 tokens, seeds 0-3) was generated just "
                                                          "before it, two sets at a time side by side; that is not in "
                                                          "the row's CPU minutes. Its before/after statistics are on "
                                                          "its first 64 windows (512 tokens from token 64 of a sample "
                                                          "on)",
             "fdb len512 off64 e2e150 w512 s0": "its stage 1 is that of 'fdb blockwise n512 len512 1ep fused off64' "
                                                "(shared folder; see its note), loaded, with the CPU minutes recorded "
                                                "then; its end-to-end stage ran alone on the machine, in one process",
             "fdb blockwise n704 len512 1ep fused off64": "ran alone on the machine, in one process. Its pool's sets "
                                                          "4-5 (samples 513-704) were generated just before it, two "
                                                          "sets side by side; that is not in the row's CPU minutes. "
                                                          "Samples 1-512 are those of 'fdb blockwise n512 len512 1ep "
                                                          "fused off64'",
             **dict.fromkeys(CACHED_POOL_ROWS, "ran alone on the machine, in one process, on the pool of 'fdb "
                                               "blockwise n512 len512 1ep fused off64' (cached)")}
# rows measured by the previous version of this table (end-to-end only, 30 steps from the FDB init): kept
CARRIED = ("fp", "rtn w2g64", "fdb init", "fdb+ce", "fdb+kd", "fdb+dad g=0", "fdb+dad g=0.5", "fdb+dad g=1")
ORDER = CARRIED + ("uniform init",) + tuple(ROWS)


def parse_args(argv=None):
    ap = add_eval_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "bench/results/dbllm_table.json")
    ap.add_argument("--gen-pool", type=int, default=512,
                    help="teacher-written samples generated once, in sets of 128 (a row uses a prefix)")
    ap.add_argument("--gen-len", type=int, default=256, help="tokens per generated sample")
    ap.add_argument("--bias-windows", type=int, default=6)
    ap.add_argument("--head-k", type=int, default=100)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP with 2 threads on a loaded "
                                                             "2-core machine made small matmuls several times slower)")
    ap.add_argument("--only", default=None, help="comma-separated row names (default: every row of ROWS)")
    ap.add_argument("--ckpt-dir", default="checkpoints/dbllm_table")
    ap.add_argument("--plot", action="store_true", help="only redraw the figures from the JSON")
    ap.add_argument("--full-split", default=None, metavar="ROW",
                    help="add the full WikiText-2 test split PPL (all windows) to a finished row (or fp)")
    ap.add_argument("--time-generation", action="store_true",
                    help="time one pool set's generation (uncached) into dbllm_generation.json, then exit")
    ap.add_argument("--save", nargs=2, default=None, metavar=("ROW", "DIR"),
                    help="write a finished FDB row as a packed checkpoint folder DIR, then exit")
    ap.add_argument("--position-ppl", nargs="+", default=None, metavar="ROW",
                    help="PPL of finished rows (and FP) on the table's windows by position range into "
                         "dbllm_position_ppl.json (rows already there are kept), then exit")
    ap.add_argument("--stream-errors", nargs="+", default=None, metavar="ROW",
                    help="per-block errors of finished rows on held-out teacher text (whole, and cut mid-text) and "
                         "on WikiText-2 windows (dbllm_stream_errors.json), then exit")
    ap.add_argument("--memory-flatness", action="store_true", help="measure stage-1 peak memory vs depth, then exit")
    ap.add_argument("--quick", action="store_true", help="--memory-flatness: smaller models and data (for tests)")
    ap.add_argument("--_probe-blocks", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Context:
    """Everything the rows share: teacher, the data pool, evaluation windows, head tokens, teacher entropies."""

    def __init__(self, args):
        self.args = args
        self.teacher, self.tok = load_model(args.model)
        self.pool = teacher_pool(self.teacher, self.tok, args.gen_pool, args.gen_len)
        self.gen = {"samples": args.gen_pool, "tokens_per_sample": args.gen_len, "set_size": POOL_SET,
                    "rows_with_other_sample_lengths": ROW_GEN_LEN,
                    "note": f"sets of {POOL_SET} samples, set k with seed k; generation time: --time-generation "
                            "(dbllm_generation.json)"}
        self.eval = eval_windows(self.teacher, self.tok, "wikitext2", "test", args.seqlen, args.windows or None,
                                 args.data_dir)
        self.bias_windows = self.eval[:args.bias_windows]
        self.head = head_tokens(self.eval, args.head_k, self.teacher.config.vocab_size)
        self.ent = teacher_entropies(self.teacher, self.bias_windows)
        self.edges = entropy_edges(self.ent, args.buckets)

    def measure(self, model, fp=None):
        """PPL on the evaluation windows and the head-class bias statistic (method.md §7)."""
        res = perplexity(model, self.tok, windows=self.eval, seqlen=self.args.seqlen)
        hb = head_class_bias(model, self.bias_windows, self.head, self.ent, self.edges)
        row = {"ppl": res.ppl, "eval_seconds": round(res.seconds, 1), "head_share_all": hb["overall"],
               "head_share_high": hb["buckets"][-1]["head_share"], "head_share_low": hb["buckets"][0]["head_share"],
               "bias_buckets": hb["buckets"]}
        if fp is not None:
            row["head_excess_high"] = row["head_share_high"] - fp["head_share_high"]
            row["head_excess_all"] = row["head_share_all"] - fp["head_share_all"]
        if fp is not None and fp.get("ppl"):
            row["ppl_over_fp"] = row["ppl"] / fp["ppl"]
        return row


POOL_SET = 128


def teacher_pool(teacher, tok, n, gen_len):
    """The first ``n`` samples of the training pool, generated (and cached) in sets of POOL_SET, set k with seed k,
    so that a larger pool extends a smaller one (``time_generation`` times one set)."""
    sets = [generate_samples(teacher, tok, POOL_SET, gen_len, seed=k, batch_size=64)
            for k in range(math.ceil(n / POOL_SET))]
    return torch.cat(sets)[:n]


def row_pool(ctx, name, n):
    """The first ``n`` samples of the pool a row trains on: ``ctx.pool`` (samples of --gen-len tokens), or for the
    rows of ROW_GEN_LEN a pool of that length, generated (and cached) in the same seeded sets."""
    gen_len = ROW_GEN_LEN.get(name, ctx.args.gen_len)
    if gen_len != ctx.args.gen_len:
        return teacher_pool(ctx.teacher, ctx.tok, n, gen_len)
    if n > len(ctx.pool):
        raise ValueError(f"row {name!r} needs {n} samples; --gen-pool is {len(ctx.pool)}")
    return ctx.pool[:n]


def row_samples(spec):
    """(stage-1 samples, stage-2 samples) of a row."""
    n = spec[4]
    return (n, n) if isinstance(n, int) else tuple(n)


def stage1_dir(ckpt_dir, quant, bw, n, gen_len=None):
    """One stage-1 folder per (quantizer, block-wise overrides, samples[, their length where it is not
    --gen-len's]): rows that differ only in their end-to-end stage share it, e.g. stage1_fdb_{loss=mse}_n64."""
    overrides = ",".join(f"{k}={v}" for k, v in sorted(bw.items()))
    return os.path.join(ckpt_dir, f"stage1_{quant}_{{{overrides}}}_n{n}" + (f"_len{gen_len}" if gen_len else ""))


def train_row(ctx, name, spec, freeze=True):
    quant, stage, bw, e2e, _ = spec
    n1, n2 = row_samples(spec)
    a = ctx.args
    gen_len = ROW_GEN_LEN.get(name)  # None: --gen-len's samples
    pool = row_pool(ctx, name, max(n1, n2))
    student, info = train_two_stage(ctx.teacher, pool[:n1], stage=stage, quant=quant,
                                    blockwise=BlockwiseConfig(**{**BASE_STAGE1, **bw}),
                                    config=TrainConfig(**{**BASE_E2E, **e2e}),
                                    out_dir=os.path.join(a.ckpt_dir, name.replace(" ", "_")),
                                    stage1_dir=stage1_dir(a.ckpt_dir, quant, bw, n1, gen_len),
                                    e2e_data=pool[:n2])
    if freeze:  # fixed quantized weights: fast evaluation (the learnable layers are what a packed checkpoint stores)
        freeze_quantized(student)
    return student, info


def run_table(ctx, out):
    a = ctx.args
    rows = load_results(out)
    done = {r["method"] for r in rows}
    only = set(a.only.split(",")) if a.only else set(ROWS)
    unknown = only - set(ROWS) - set(CARRIED)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; rows: {list(ROWS)}")
    fp = next((r for r in rows if r["method"] == "fp"), None)
    settings = eval_settings(ctx.teacher, a, bias={"windows": a.bias_windows, "head_k": a.head_k,
                                                  "buckets": a.buckets, "edges_nats": ctx.edges,
                                                  "head_reference": "token frequencies of the evaluated windows"},
                             blockwise_base=vars(BlockwiseConfig(**BASE_STAGE1)),
                             e2e_defaults=vars(TrainConfig(**BASE_E2E)),
                             rows={k: {"quant": v[0], "stage": v[1], "blockwise": v[2], "e2e": v[3], "samples": v[4]}
                                   for k, v in ROWS.items()},
                             data_generation=ctx.gen, row_notes=ROW_NOTES,
                             threads="torch threads of each trained row: its 'threads' field (1 where absent)",
                             load_average_at_start=[round(x, 2) for x in os.getloadavg()],
                             carried_rows_note="fp, rtn w2g64, fdb init and the fdb+ce/kd/dad rows (end-to-end only, 30 "
                                               "steps of 2x128 tokens from the FDB init, 64 samples generated as one set) "
                                               "were measured by the previous version of this table with the same "
                                               "evaluation settings and are kept unchanged.")
    if fp is None:
        fp = {"method": "fp", "bits_per_weight": 16.0, **ctx.measure(ctx.teacher)}
        rows.insert(0, fp)
        write_results(out, rows, settings)
    if "uniform init" not in done:
        m = copy.deepcopy(ctx.teacher)
        rep = quantize_model(m, "uniform", bits=2, group_size=64)
        rows.append({"method": "uniform init", "bits_per_weight": rep["bits_per_weight"],
                     **ctx.measure(freeze_quantized(m), fp)})
        write_results(out, rows, settings)
        del m
    for name, spec in ROWS.items():
        if name not in only or name in {r["method"] for r in load_results(out)}:
            continue
        student, info = train_row(ctx, name, spec)
        row = {"method": name, "quant": spec[0], "stage": spec[1], "loss": spec[3].get("loss"),
               "gamma": spec[3].get("gamma") if spec[3].get("loss") == "dad" else None,
               "seed": spec[3].get("seed", 0), "train_samples": max(row_samples(spec)),
               "stage_samples": list(row_samples(spec)),
               "tokens_per_sample": ROW_GEN_LEN.get(name, a.gen_len), "threads": torch.get_num_threads(), **info,
               **ctx.measure(student, fp)}
        # re-read before writing: another process may have added rows meanwhile (disjoint --only sets)
        rows = [r for r in load_results(out) if r["method"] != name] + [row]
        rows.sort(key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER))
        write_results(out, rows, settings)
        del student
    return rows


def rebuild(a, name, freeze=True):
    """(teacher, tokenizer, model) of a finished row, rebuilt from its checkpoints (no training is redone)."""
    rows = load_results(a.out)
    if name not in {r["method"] for r in rows} or (name != "fp" and name not in ROWS):
        raise ValueError(f"{name!r}: not a finished row of {a.out}; finished: {sorted(r['method'] for r in rows)}")
    teacher, tok = load_model(a.model)
    if name == "fp":
        return teacher, tok, teacher
    # the --gen-len pool only as far as this row reads it (row_pool takes ROW_GEN_LEN rows' samples elsewhere)
    pool = None if name in ROW_GEN_LEN else teacher_pool(teacher, tok, max(row_samples(ROWS[name])), a.gen_len)
    ctx = argparse.Namespace(args=a, teacher=teacher, tok=tok, pool=pool)
    model, _ = train_row(ctx, name, ROWS[name], freeze=freeze)
    return teacher, tok, model


def full_split(a, name):
    """Add a finished row's PPL on the full test split."""
    _, tok, model = rebuild(a, name)
    res = perplexity(model, tok, seqlen=a.seqlen, data_dir=a.data_dir)
    rows = load_results(a.out)
    settings = json.load(open(a.out))["settings"]
    for r in rows:
        if r["method"] == name:
            r.update(ppl_full_split=res.ppl, full_split_windows=res.windows, full_split_eval_seconds=round(res.seconds, 1))
    write_results(a.out, rows, settings)


def time_generation(a):
    """Time the generation of one pool set (POOL_SET samples of --gen-len tokens, neither read from nor written to
    the cache): a table run reads the cached sets and reports 0. Writes its row into
    bench/results/dbllm_generation.json, one row per sample length."""
    teacher, tok = load_model(a.model)
    t0, c0 = time.time(), time.process_time()
    generate_samples(teacher, tok, POOL_SET, a.gen_len, seed=0, batch_size=64, cache_dir=None)
    row = {"method": f"generate {POOL_SET} x {a.gen_len}", "samples": POOL_SET, "tokens_per_sample": a.gen_len,
           "seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
           "cpu_minutes_per_1k_samples": round((time.process_time() - c0) / 60 * 1000 / POOL_SET, 1),
           "threads": torch.get_num_threads(), "load_average_after": [round(x, 2) for x in os.getloadavg()],
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    out = os.path.join(os.path.dirname(a.out), "dbllm_generation.json")
    rows = [r for r in load_results(out) if r["method"] != row["method"]] + [row]
    write_results(out, sorted(rows, key=lambda r: r["tokens_per_sample"]),
                  {"model": a.model, "batch_size": 64,
                   "note": "one set of the training pool (seed 0) per sample length, generated by the FP teacher"})
    print(row)


def save_packed(a, name, path):
    """Write a finished FDB row as a packed checkpoint (e.g. for ``bench/zeroshot.py --checkpoint``)."""
    if name in ROWS and ROWS[name][0] != "fdb":
        raise ValueError(f"{name!r} is a {ROWS[name][0]} row; the packed format stores FDB models only")
    _, _, model = rebuild(a, name, freeze=False)
    header = save_quantized(model, path)
    print(f"saved {name!r} to {path} ({len(header['layers'])} packed layers, group size {header['group_size']})")


HELDOUT_SEED = 10 ** 6  # a generation seed no pool set uses (set k has seed k): text no row trained on
HELDOUT_SAMPLES, STREAM_WINDOWS = 64, 8
STREAM_OUT = "bench/results/dbllm_stream_errors.json"


def stream_errors(a, names, out=STREAM_OUT, fig_dir="figures"):
    """Per block, ``blockwise.block_errors`` (the model as it runs, earlier blocks' errors included) of finished
    rows on three texts no row trained on: HELDOUT_SAMPLES teacher-written samples (seed HELDOUT_SEED), whole and
    from their middle token on (windows that start mid-text, as evaluation windows do; the samples themselves start
    at a random token), and the first STREAM_WINDOWS WikiText-2 test windows. Stage 1's own statistics are on its
    training samples; this says whether that fit carries to unseen text, and where two rows' perplexities part."""
    rows = []
    for name in names:
        teacher, tok, model = rebuild(a, name)
        held = generate_samples(teacher, tok, HELDOUT_SAMPLES, a.gen_len, seed=HELDOUT_SEED, batch_size=64)
        texts = {"teacher-written, held out": held,
                 "teacher-written, held out, from mid-text": held[:, a.gen_len // 2:],
                 "wikitext-2 test": eval_windows(teacher, tok, seqlen=a.seqlen, max_windows=STREAM_WINDOWS,
                                                 data_dir=a.data_dir)}
        for text, windows in texts.items():
            for r in block_errors(teacher, model, windows):
                rows.append({"method": name, "text": text, "windows": list(windows.shape), **r})
        del teacher, model
    write_results(out, rows, {"heldout_seed": HELDOUT_SEED, "heldout_samples": HELDOUT_SAMPLES,
                              "gen_len": a.gen_len, "wikitext_windows": STREAM_WINDOWS, "seqlen": a.seqlen,
                              "error": "blockwise.block_errors: relative error of ordinary tokens, on the model's "
                                       "own stream"})
    plot_stream_errors(out, fig_dir)


POSITION_OUT = "bench/results/dbllm_position_ppl.json"
POSITION_RANGES = ((1, 128), (128, 256), (256, 512))  # predicted tokens' positions [lo, hi)


def position_ppl(a, names, out=POSITION_OUT, fig_dir="figures"):
    """PPL of FP and finished rows on the table's evaluation windows, split by the position of the predicted token
    (POSITION_RANGES): stage 1 trains on windows of 256 tokens (128 with ``seqlen=128``; 512 in the len512 rows),
    evaluation windows have 512. Rows already in ``out`` are kept; the named rows (and FP, where absent) are
    measured again or added."""
    windows_setting = a.windows or "full split"
    old = json.load(open(out)) if os.path.isfile(out) else {"settings": {}, "rows": []}
    same = (old["settings"].get("windows"), old["settings"].get("seqlen")) == (windows_setting, a.seqlen)
    kept = [r for r in old["rows"] if r["method"] not in names] if same else []  # else measure all again
    todo = (["fp"] if "fp" not in {r["method"] for r in kept} else []) + [n for n in names if n != "fp"]
    rows = []
    for name in todo:
        teacher, tok, model = rebuild(a, name)
        windows = eval_windows(teacher, tok, seqlen=a.seqlen, max_windows=a.windows or None, data_dir=a.data_dir)
        total, n = window_nll(model, windows, per_position=True, desc=name)
        for lo, hi in POSITION_RANGES:
            nll = float(total[lo - 1:hi - 1].sum()) / (n * (hi - lo))
            rows.append({"method": name, "positions": f"{lo}-{hi - 1}", "ppl": math.exp(nll)})
        rows.append({"method": name, "positions": "all", "ppl": math.exp(float(total.sum()) / (n * total.numel()))})
        del teacher, model
    rows = [r for r in rows if r["method"] == "fp"] + kept + [r for r in rows if r["method"] != "fp"]
    write_results(out, rows, {"windows": windows_setting, "seqlen": a.seqlen,
                              "ranges": "positions of the predicted tokens, 0-based, [lo, hi]"})
    plot_position_ppl(out, fig_dir)


def save_figure(fig, df, fig_dir, stem):
    """``fig`` as fig_dir/stem.png and the table behind it, ``df``, as fig_dir/stem.csv."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    os.makedirs(fig_dir, exist_ok=True)
    fig.savefig(os.path.join(fig_dir, stem + ".png"), dpi=110)
    df.to_csv(os.path.join(fig_dir, stem + ".csv"), index=False)
    plt.close(fig)
    print("wrote", os.path.join(fig_dir, stem + ".png"))


def plot_position_ppl(out, fig_dir="figures"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    df = pd.DataFrame(load_results(out))
    df = df[df.positions != "all"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, g in df.groupby("method", sort=False):
        ax.semilogy(g.positions, g.ppl, "o-", label=name)
    ax.set(xlabel="position of the predicted token in the 512-token window",
           ylabel="WikiText-2 PPL (the table's windows)", title="Perplexity by position")
    ax.legend(fontsize=8)
    save_figure(fig, df, fig_dir, "dbllm_position_ppl")


def plot_stream_errors(out, fig_dir="figures"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    df = pd.DataFrame(load_results(out))
    texts = list(dict.fromkeys(df.text))
    fig, ax = plt.subplots(1, len(texts), figsize=(5.5 * len(texts), 4.5), sharey=True, squeeze=False)
    for a_, text in zip(ax[0], texts):
        for name, g in df[df.text == text].groupby("method", sort=False):
            a_.semilogy(g.block, g.rel_err_ordinary, "o-", ms=3,
                        label=f"{name} (misfires, most in a block: {g.sink_misfires.max()})")
        a_.set(title=text, xlabel="decoder block")
        a_.legend(fontsize=8)
    ax[0][0].set_ylabel("relative output error, ordinary tokens\n(model as it runs)")
    save_figure(fig, df, fig_dir, "dbllm_stream_errors")


# ---- figures ----------------------------------------------------------------------------------------------------

def settings_gen_len(out):
    with open(out) as f:
        return json.load(f)["settings"]["data_generation"]["tokens_per_sample"]


def plot(out, fig_dir="figures"):
    """PPL against training CPU-minutes (each training path from its initialisation) and against the number of
    teacher-written training tokens; PNG + the CSV behind each in ``fig_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    rows = {r["method"]: r for r in load_results(out)}
    paths = {"FDB two-stage, first recipe (DAD)": ["fdb init", "fdb blockwise", "fdb 2-stage dad s0"],
             "FDB two-stage, tuned (DAD)": ["fdb init", "fdb blockwise b1 lat2e-3", "fdb tuned dad s0"],
             "FDB tuned, 128-sample stage 1, then 60 / 600 end-to-end steps (DAD)":
                 ["fdb init", "fdb tuned blockwise n128", "fdb long dad s0", "fdb e2e600 dad s0"],
             "FDB stage 1 alone, 512 samples seen once": ["fdb init", "fdb blockwise n512 1ep"],
             "FDB stage 1 alone, 1,024 samples seen once": ["fdb init", "fdb blockwise n1024 1ep"],
             "FDB 1,024-sample stage 1 (fused AdamW, regenerated pool), then 300 gentle end-to-end steps (DAD)":
                 ["fdb init", "fdb blockwise n1024 1ep fused", "fdb n1024 e2e300 gentle s0"],
             "FDB stage 1 alone, 1,408 samples seen once (fused AdamW)": ["fdb init", "fdb blockwise n1408 1ep fused"],
             "FDB stage 1 alone, 1,024 samples cut into 128-token windows (fused AdamW)":
                 ["fdb init", "fdb blockwise n1024 1ep fused w128"],
             "FDB stage 1 on 512 samples of 512 tokens, windows from token 64 (fused AdamW), then 150 gentle "
             "end-to-end steps on 512-token windows (DAD)":
                 ["fdb init", "fdb blockwise n512 len512 1ep fused off64", "fdb len512 off64 e2e150 w512 s0"],
             "FDB stage 1 alone, 704 samples of 512 tokens, windows from token 64 (fused AdamW)":
                 ["fdb init", "fdb blockwise n704 len512 1ep fused off64"],
             "FDB stage 1 alone, 512 samples of 512 tokens, windows from token 64, RMSNorm weights trained too":
                 ["fdb init", "fdb blockwise n512 len512 1ep fused off64 norms"],
             "FDB stage 1 alone, 512 samples of 512 tokens, windows from token 64, seed 1":
                 ["fdb init", "fdb blockwise n512 len512 1ep fused off64 s1"],
             "FDB stage 1 alone, 512 samples of 512 tokens, windows from token 64, lr decaying to 1% (seed 0)":
                 ["fdb init", "fdb blockwise n512 len512 1ep fused off64 min0.01"],
             "FDB stage 1 alone, 512 samples of 512 tokens, windows from token 64, lr decaying to 1% (seed 1)":
                 ["fdb init", "fdb blockwise n512 len512 1ep fused off64 min0.01 s1"],
             "FDB stage 1 alone, 512 samples of 512 tokens, windows from token 64, lr decaying to 1% (seed 2)":
                 ["fdb init", "fdb blockwise n512 len512 1ep fused off64 min0.01 s2"],
             "FDB end-to-end only (DAD)": ["fdb init", "fdb+dad g=0"],
             "uniform two-stage, first recipe (DAD)": ["uniform init", "uniform 2-stage dad s0"],
             "uniform two-stage, tuned (DAD)": ["uniform init", "uniform tuned dad s0"],
             "uniform stage 1 alone, 512 samples of 512 tokens, windows from token 64, lr decaying to 1% (seed 0)":
                 ["uniform init", "uniform blockwise n512 len512 1ep fused off64 min0.01"]}
    pts = [{"path": k, "method": m, "train_cpu_minutes": rows[m].get("train_cpu_minutes") or 0.0, "ppl": rows[m]["ppl"]}
           for k, ms in paths.items() for m in ms if m in rows]
    curves = {"FDB two-stage, first recipe (DAD)": ("fdb 2-stage dad n16", "fdb 2-stage dad n32", "fdb 2-stage dad s0"),
              "FDB two-stage, tuned (DAD)": ("fdb tuned dad s0", "fdb long dad s0", "fdb tuned dad n256"),
              "FDB stage 1 alone, tuned (2 epochs; 512 and 1,024 samples: 1)":
                  ("fdb blockwise b1 lat2e-3", "fdb tuned blockwise n128", "fdb blockwise n512 1ep",
                   "fdb blockwise n1024 1ep"),
              "FDB stage 1 alone, fused AdamW (1 epoch; 128 samples: a probe beside other jobs)":
                  ("fdb blockwise n128 1ep fused", "fdb blockwise n1024 1ep fused", "fdb blockwise n1408 1ep fused"),
              "FDB stage 1 alone, 512-token windows from token 64 (fused AdamW, 1 epoch)":
                  ("fdb blockwise n512 len512 1ep fused off64", "fdb blockwise n704 len512 1ep fused off64")}
    tok = [{"path": k, "method": m,
            "train_tokens": rows[m]["train_samples"] * rows[m].get("tokens_per_sample", settings_gen_len(out)),
            "ppl": rows[m]["ppl"], "train_cpu_minutes": rows[m]["train_cpu_minutes"]}
           for k, ms in curves.items() for m in ms if m in rows]
    os.makedirs(fig_dir, exist_ok=True)
    fp = rows.get("fp", {}).get("ppl")
    fig, ax = plt.subplots(1, 2, figsize=(13, 6.5))
    df = pd.DataFrame(pts)
    for k, g in df.groupby("path", sort=False):
        ax[0].semilogy(g.train_cpu_minutes, g.ppl, "o-", label=k)
    dt = pd.DataFrame(tok)
    for k, g in (dt.groupby("path", sort=False) if len(dt) else ()):
        ax[1].semilogy(g.train_tokens, g.ppl, "o-", label=k)
    for a in ax:
        if fp:
            a.axhline(fp, color="k", ls=":", label="FP (Q4_1 dequantized)")
            a.axhline(3 * fp, color="gray", ls="--", label="3x FP")
        a.set_ylabel("WikiText-2 PPL (first 40 windows, seqlen 512)")
        a.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below the axes
    ax[0].set(xlabel="training CPU-minutes (2-core machine, 1 thread)", title="PPL vs training compute")
    ax[1].set(xlabel="teacher-written training tokens", xscale="log", title="PPL vs training data")
    fig.tight_layout()
    fig.savefig(os.path.join(fig_dir, "dbllm_training_curves.png"), dpi=110)
    df.to_csv(os.path.join(fig_dir, "dbllm_ppl_vs_cpu_minutes.csv"), index=False)
    dt.to_csv(os.path.join(fig_dir, "dbllm_ppl_vs_tokens.csv"), index=False)
    plt.close(fig)
    print("wrote", os.path.join(fig_dir, "dbllm_training_curves.png"))


# ---- stage-1 memory against depth -------------------------------------------------------------------------------

def _vm_hwm_kib():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM")))


def memory_probe(blocks, quick):
    """One process: a random LLaMA with ``blocks`` blocks, teacher + FDB student resident; the peak resident
    memory *added* while stage 1 runs (the peak counter is reset just before it)."""
    from dbllm_lab.blockwise import blockwise_reconstruct
    from dbllm_lab.model import tiny_llama
    torch.manual_seed(0)
    hidden, inter = (128, 384) if quick else (512, 1408)
    teacher = tiny_llama(vocab_size=512, hidden=hidden, layers=blocks, heads=8, kv_heads=4, intermediate=inter,
                         max_pos=256)
    student = copy.deepcopy(teacher)
    quantize_model(student, "fdb", group_size=64, progress=False)
    windows = torch.randint(0, 512, (8 if quick else 32, 128))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _vm_hwm_kib()
    blockwise_reconstruct(teacher, student, windows, BlockwiseConfig(epochs=1), progress=False)
    peak = _vm_hwm_kib()
    return {"blocks": blocks, "hidden": hidden, "intermediate": inter, "windows": list(windows.shape),
            "resident_before_mib": round(base / 1024, 1), "stage_added_peak_mib": round((peak - base) / 1024, 1)}


def run_memory_flatness(a):
    rows = []
    for blocks in (8, 16, 32):
        cmd = [sys.executable, os.path.abspath(__file__), "--_probe-blocks", str(blocks)] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    added = [r["stage_added_peak_mib"] for r in rows]
    spread = max(added) / min(added) - 1
    doc = {"rows": rows, "spread": spread, "flat_within_15_percent": spread <= 0.15,
           "note": "peak resident memory added by stage 1 (VmHWM reset before it, Linux), teacher and student "
                   "already resident; on a GPU this is the device memory of one block, its activations and its "
                   "optimiser state"}
    if not a.quick:
        path = os.path.join(os.path.dirname(a.out), "blockwise_memory.json")
        write_results(path, rows, {k: v for k, v in doc.items() if k != "rows"})
    print(json.dumps({"spread": spread, "flat_within_15_percent": spread <= 0.15}))
    return doc


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    if a._probe_blocks:
        print(json.dumps(memory_probe(a._probe_blocks, a.quick)))
        return
    if a.memory_flatness:
        return run_memory_flatness(a)
    if a.plot:
        if os.path.isfile(STREAM_OUT):
            plot_stream_errors(STREAM_OUT)
        if os.path.isfile(POSITION_OUT):
            plot_position_ppl(POSITION_OUT)
        return plot(a.out)
    if a.full_split:
        return full_split(a, a.full_split)
    if a.save:
        return save_packed(a, *a.save)
    if a.stream_errors:
        return stream_errors(a, a.stream_errors)
    if a.position_ppl:
        return position_ppl(a, a.position_ppl)
    if a.time_generation:
        return time_generation(a)
    t0 = time.time()
    ctx = Context(a)
    rows = run_table(ctx, a.out)
    plot(a.out)
    print(f"done in {(time.time() - t0) / 60:.1f} min, peak RSS {peak_rss_gib():.2f} GiB")
    for r in rows:
        print({k: r.get(k) for k in ("method", "ppl", "head_excess_high", "train_cpu_minutes")})


if __name__ == "__main__":
    main()
