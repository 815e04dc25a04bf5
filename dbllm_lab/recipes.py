"""Named training recipes: small plain-literal presets, as nanoGPT's ``config/`` files.

A recipe says everything ``dbllm-lab train --recipe NAME`` needs to build a W2 student end to end:

- ``quant``: "fdb" (dual binarization) or "uniform" (the learnable uniform 2-bit grid); ``init``: FDB's init;
- ``stage``: "blockwise" (stage 1 alone), "e2e" (end-to-end alone) or "both" (block-wise, then end to end);
- ``text``: the teacher-written training text (method.md §3): ``samples`` of ``tokens`` tokens, generated in sets
  of ``set_size`` samples, set k of seed s with generation seed ``s * 1000 + k`` (``datafree.teacher_text``), so a
  seed changes the text as well as the training order, and seed 0 is the pool the committed table rows used;
  an optional ``precision`` ("fp32" unless set, or "bf16") is the teacher's while it writes;
- ``blockwise`` / ``e2e``: overrides of ``BlockwiseConfig`` / ``TrainConfig`` fields (their defaults otherwise);
- ``purpose``: one line for ``dbllm-lab recipes``; ``result``: the recipe name the results JSON files its rows under.

Anything unset takes the one default of its dataclass field. Explicit command-line flags override a recipe.
"""
from copy import deepcopy

# the best stage 1 measured (docs/findings.md): one pass over 512 teacher-written samples of 512 tokens, windows cut
# from token 64 of the joined stream (they start mid-text, as evaluation windows do), batch 1, cosine to 1% of peak
BEST_STAGE1 = {"epochs": 1, "stats_samples": 64, "window_offset": 64, "min_lr_ratio": 0.01}
BEST_TEXT = {"samples": 512, "tokens": 512, "set_size": 128}
# a gentle end-to-end stage after a good stage 1: 150 steps of one 512-token window, small lrs, latent weights too
GENTLE_E2E = {"steps": 150, "seqlen": 512, "batch_size": 1, "lr": 1e-4, "lr_latent": 5e-5, "train_latent": True,
              "warmup": 15}

RECIPES = {
    "best": {
        "purpose": "the reference recipe the others vary: FDB W2g64, stage 1 alone on 512 x 512 teacher tokens",
        "quant": "fdb", "init": "clip", "stage": "blockwise",
        "text": BEST_TEXT, "blockwise": BEST_STAGE1, "e2e": {},
    },
    "best-bf16": {
        "purpose": "best's text and settings with stage 1's block passes under bf16 autocast (fp32 weights and evaluation)",
        "quant": "fdb", "init": "clip", "stage": "blockwise",
        "text": BEST_TEXT, "blockwise": {**BEST_STAGE1, "precision": "bf16"}, "e2e": {},
    },
    "best+bf16-text": {
        "purpose": "best with its text written by a bf16 copy of the teacher (1.44x less CPU): best inside 90 CPU-min?",
        "quant": "fdb", "init": "clip", "stage": "blockwise",
        "text": {**BEST_TEXT, "precision": "bf16"}, "blockwise": BEST_STAGE1, "e2e": {},
    },
    "best-bf16-896": {
        "purpose": "the best measured 2-bit model: best with its text and stage 1 in bf16, and 1.75x the text "
                   "(896 x 512 teacher tokens) for the CPU that saves",
        "quant": "fdb", "init": "clip", "stage": "blockwise",
        "text": {**BEST_TEXT, "samples": 896, "precision": "bf16"}, "blockwise": {**BEST_STAGE1, "precision": "bf16"},
        "e2e": {},
    },
    "best-uniform": {
        "purpose": "the learnable uniform 2-bit grid (2.28 bits) with exactly best's stage 1 and text",
        "quant": "uniform", "init": "clip", "stage": "blockwise",
        "text": BEST_TEXT, "blockwise": BEST_STAGE1, "e2e": {},
    },
    "best-quarter": {
        "purpose": "best's settings on a quarter of its text (128 x 512 tokens): a trained student in ~1/4 the budget",
        "quant": "fdb", "init": "clip", "stage": "blockwise",
        "text": {**BEST_TEXT, "samples": 128}, "blockwise": BEST_STAGE1, "e2e": {},
    },
    "best-quarter+bf16-text": {
        "purpose": "best-quarter with its text written by a bf16 copy of the teacher: does cheaper text cost quality?",
        "quant": "fdb", "init": "clip", "stage": "blockwise",
        "text": {**BEST_TEXT, "samples": 128, "precision": "bf16"}, "blockwise": BEST_STAGE1, "e2e": {},
    },
    "best+dad": {
        "purpose": "best's stage 1, then 150 gentle end-to-end DAD steps on 512-token windows",
        "quant": "fdb", "init": "clip", "stage": "both",
        "text": BEST_TEXT, "blockwise": BEST_STAGE1,
        "e2e": {**GENTLE_E2E, "loss": "dad"},
    },
    "best+kd": {
        "purpose": "as best+dad with plain KD (KL to the teacher) as the end-to-end loss",
        "quant": "fdb", "init": "clip", "stage": "both",
        "text": BEST_TEXT, "blockwise": BEST_STAGE1,
        "e2e": {**GENTLE_E2E, "loss": "kd"},
    },
    "paper": {
        "purpose": "the paper's recipe (method.md): end-to-end DAD from the FDB init, scales only, no stage 1",
        "quant": "fdb", "init": "clip", "stage": "e2e",
        "text": {"samples": 64, "tokens": 256, "set_size": 64}, "blockwise": {}, "e2e": {"loss": "dad"},
    },
    "quick": {
        "purpose": "a few-minute two-stage run for CI and quick notebooks (a toy: far from best's quality)",
        "quant": "fdb", "init": "clip", "stage": "both",
        "text": {"samples": 8, "tokens": 128, "set_size": 8},
        "blockwise": {"epochs": 1}, "e2e": {"steps": 8, "lr": 2e-4, "lr_latent": 1e-4, "train_latent": True},
    },
}


def recipe(name):
    """A copy of recipe ``name`` (so callers may edit it); a clear error names the known ones."""
    if name not in RECIPES:
        raise ValueError(f"recipe {name!r} is not known; recipes: {sorted(RECIPES)}")
    return deepcopy(RECIPES[name])
