"""One recipe, end to end: the teacher writes the training text, then the two-stage training runs.

``train_recipe`` is what ``dbllm-lab train --recipe NAME`` and ``bench/dbllm_table.py`` both call, so a table row
and a user's run are the same computation. Its budget counts the training text too: CPU-minutes (process time, all
threads) of generation, of building the W2 student, of stage 1 and of stage 2, and their total.
"""
import copy
import glob
import os
import time

from .blockwise import BlockwiseConfig
from .datafree import DEFAULT_CACHE, teacher_text, text_cpu_minutes, text_digest, text_is_cached
from .quantize import METHODS
from .recipes import recipe
from .runtime import check_precision
from .train import TrainConfig, freeze_quantized, train_two_stage


TEXT_KEYS = ("samples", "tokens", "set_size", "precision")  # a recipe's ``text`` section; precision is optional


def text_options(t, seed, cache_dir):
    """``teacher_text``'s keyword arguments for a recipe's ``text`` section ``t`` (its precision only where set, so
    the one default is teacher_text's)."""
    return dict(seed=seed, set_size=t["set_size"], cache_dir=cache_dir, **({"precision": t["precision"]}
                                                                           if "precision" in t else {}))


def configs(r, seed=0):
    """(BlockwiseConfig, TrainConfig) of recipe dict ``r`` with ``seed`` (the training order of both stages); the
    text section is checked too, so that a bad value fails before any model loads."""
    unknown = sorted(set(r["text"]) - set(TEXT_KEYS))
    if unknown:
        raise ValueError(f"text section: unknown keys {unknown}; allowed: {list(TEXT_KEYS)}")
    if "precision" in r["text"]:
        check_precision(r["text"]["precision"])
    return (BlockwiseConfig(**{**r["blockwise"], "seed": seed}).validate(),
            TrainConfig(**{**r["e2e"], "seed": seed}).validate())


def train_recipe(teacher, tokenizer, r, seed=0, out_dir=None, device="cpu", cache_dir=DEFAULT_CACHE,
                 group_size=None, e2e_samples=None, stage1_dir=None, progress=True):
    """Train recipe dict ``r`` (``recipes.recipe(name)``, possibly edited) with ``seed``; returns (student, info).

    ``out_dir``: checkpoints of both stages (an existing run there resumes). ``group_size``: default the method
    registry's. ``e2e_samples``: samples of the end-to-end stage (default: the recipe's ``text.samples``).
    ``stage1_dir``: stage 1's folder when another recipe's run shares it (default ``out_dir/stage1``)."""
    bw, cfg = configs(r, seed)
    t = r["text"]
    n_all = max(t["samples"], e2e_samples or 0)
    text = text_options(t, seed, cache_dir)
    cached = text_is_cached(teacher, n_all, t["tokens"], **text)
    c0 = time.process_time()
    data = teacher_text(teacher, tokenizer, n_all, t["tokens"], progress=progress, **text)
    generation = round((time.process_time() - c0) / 60, 2)
    if cache_dir:  # every set's cost as recorded when it was written, now or before (None where not recorded)
        generation = text_cpu_minutes(teacher, n_all, t["tokens"], **text)
    group_size = METHODS[r["quant"]].group_size if group_size is None else group_size
    calib = data[:t["samples"]].reshape(-1, cfg.seqlen)[:16] if r["init"] == "gptq" else None
    student, info = train_two_stage(teacher, data[:t["samples"]], stage=r["stage"], quant=r["quant"], blockwise=bw,
                                    config=cfg, out_dir=out_dir, stage1_dir=stage1_dir, init=r["init"], group_size=group_size,
                                    calib_windows=calib, device=device, progress=progress,
                                    e2e_data=data[:e2e_samples] if e2e_samples else None)
    info.update(generation_cpu_minutes=generation, text_from_cache=cached, text_sha256=text_digest(data),
                group_size=group_size,
                total_cpu_minutes=None if generation is None else
                round(generation + info["init_cpu_minutes"] + info["train_cpu_minutes"], 2))
    return student, info


RUNS_DIR = "build/runs"


def run_path(name, seed, runs_dir=RUNS_DIR):
    """``{runs_dir}/{name}-s{seed}``: the one spelling of a run's folder, where recipe ``name`` trains with ``seed``
    and a killed run resumes (``dbllm-lab train``, ``bench/dbllm_table.py``, ``bench/train_device.py``)."""
    return os.path.join(runs_dir, f"{name}-s{seed}")


def run_name(name, seed):
    """``"best s1"``: the one spelling of a run's row name in the results JSON files (``bench/dbllm_table.py``,
    ``bench/zeroshot.py``, ``bench/dbllm_probes.py``), beside its folder ``run_path(name, seed)``."""
    return f"{name} s{seed}"


def parse_run(spec):
    """``"best:1"`` -> ``("best", 1)``: a run named ``RECIPE:SEED`` on a command line (``bench/zeroshot.py --run``,
    ``bench/dbllm_probes.py``); a ValueError names the bad spec, or the known recipes."""
    name, sep, seed = spec.rpartition(":")
    if not sep or not seed.isdigit():
        raise ValueError(f"{spec!r}: expected RECIPE:SEED, e.g. best:1")
    recipe(name)
    return name, int(seed)


def run_folder(name, seed, runs_dir=RUNS_DIR):
    """``run_path(name, seed)``, where ``dbllm-lab train --recipe NAME --seed SEED`` trains, checked to hold the
    stage 1 of a stage-1 recipe; a ValueError names what is wrong before any model loads."""
    r = recipe(name)  # an unknown name fails here, naming the known ones
    if r["stage"] != "blockwise":
        raise ValueError(f"recipe {name!r} has stage {r['stage']!r}; only stage-1 recipes ('blockwise') are rebuilt "
                         f"from their folder")
    folder = run_path(name, seed, runs_dir)
    if not os.path.isdir(os.path.join(folder, "stage1")):
        raise ValueError(f"{folder}/stage1 does not exist; train it first (dbllm-lab train --recipe {name} "
                         f"--seed {seed})")
    return folder


def finished_student(teacher, tokenizer, name, seed, runs_dir=RUNS_DIR):
    """The student of a finished stage-1 run (``run_folder``), rebuilt by ``train_recipe``, which resumes the run
    from its checkpoints without training, and frozen to plain w_hat layers (``train.freeze_quantized``). Students
    without a packed format (the uniform grid) are measured this way. An incomplete stage 1 is an error, not a
    training run."""
    folder = run_folder(name, seed, runs_dir)
    blocks, n = len(glob.glob(os.path.join(folder, "stage1", "block_*.pt"))), teacher.config.num_hidden_layers
    if blocks != n:
        raise ValueError(f"{folder}/stage1 holds {blocks} of {n} blocks: finish the run first "
                         f"(dbllm-lab train --recipe {name} --seed {seed})")
    student, _ = train_recipe(copy.deepcopy(teacher), tokenizer, recipe(name), seed=seed, out_dir=folder,
                              progress=False)
    return freeze_quantized(student)
