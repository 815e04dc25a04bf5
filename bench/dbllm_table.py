"""DB-LLM results table: a runner over (recipe x seed).

Each row trains a named recipe (``dbllm_lab/recipes.py``) with one seed through ``run_recipe.train_recipe``, the
function ``dbllm-lab train --recipe`` calls, so a row and a user's run are one computation. The training text is
generated inside the row and counted in its budget. Every row is measured on the whole WikiText-2 test split in
one pass (``ppl.perplexity``): **dev** PPL on windows 1-40 (where recipes are compared and chosen), **held-out** PPL
on windows 41-589 (where results are reported) and the full split; plus the head-class bias statistic on the first
``--bias-windows`` dev windows (method.md §7). A row is named ``run_recipe.run_name`` ("best s1"); rows already in
the JSON are kept, and a killed run resumes from its checkpoints under ``run_recipe.run_path`` (build/runs/best-s1).

Rows measured before the runner existed stay in the JSON as data, with their settings and notes
(``settings.rows``, ``settings.row_notes``); ``complete_rows`` gives every row ``ppl_dev`` and, where its full-split
PPL was measured, ``ppl_heldout`` derived from dev and full (every window predicts 511 tokens, so the held-out
NLL is (589 * NLL_full - 40 * NLL_dev) / 549 exactly; ``heldout_derived`` says so).

    python bench/dbllm_table.py --recipes best best-uniform --seeds 0 1 2   # train and measure missing rows
    python bench/dbllm_table.py --recipes best+dad best+kd --seeds 1 --stage1-from best  # end to end on best's stage 1
    python bench/dbllm_table.py --plot                                      # redraw the figure from the JSON

``--stage1-from best`` pairs a row with best's: it starts from ``build/runs/best-s{seed}/stage1`` (trained there
first if missing; run one such process per seed at a time then) and records that in the row's ``stage1_from``.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import load_results, machine_info, results_lock, write_results  # noqa: E402
from dbllm_lab.cpu_kernel import cpu_name, cpu_signature  # noqa: E402
from dbllm_lab.bias import entropy_edges, head_class_bias, head_tokens, teacher_entropies  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.ppl import DEV_WINDOWS, eval_windows, perplexity  # noqa: E402
from dbllm_lab.recipes import RECIPES, recipe  # noqa: E402
from dbllm_lab.run_recipe import RUNS_DIR, run_name, run_path, train_recipe  # noqa: E402
from dbllm_lab.timing import LoadSampler  # noqa: E402
from dbllm_lab.train import freeze_quantized  # noqa: E402

OUT = "bench/results/dbllm_table.json"
SEQLEN, FULL_WINDOWS = 512, 589  # WikiText-2 test at seqlen 512 has 589 windows (SmolLM2's tokenizer)


def complete_rows(rows):
    """Give every row ``ppl_dev`` (its ``ppl``: the first 40 windows) and, where the full split was measured,
    ``ppl_heldout`` derived exactly from dev and full (module docstring). Rows measured by the runner have both."""
    for r in rows:
        r.setdefault("ppl_dev", r.get("ppl"))
        full = r.get("ppl_full_split")
        if r.get("ppl_heldout") is None and full and r.get("full_split_windows") == FULL_WINDOWS and r.get("ppl"):
            nll = (FULL_WINDOWS * math.log(full) - DEV_WINDOWS * math.log(r["ppl"])) / (FULL_WINDOWS - DEV_WINDOWS)
            r.update(ppl_heldout=math.exp(nll), heldout_derived=True)
        r.setdefault("ppl_heldout", None)
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp and fp.get("ppl_heldout"):
        for r in rows:
            if r.get("ppl_heldout"):
                r["heldout_over_fp"] = r["ppl_heldout"] / fp["ppl_heldout"]
    return rows


class Measure:
    """What every row is measured with: the full split (dev / held-out / full) and the head-class bias."""

    def __init__(self, teacher, tok, bias_windows=6, head_k=100, buckets=4):
        self.tok = tok
        dev = eval_windows(teacher, tok, seqlen=SEQLEN, max_windows=DEV_WINDOWS)
        self.bias_windows = dev[:bias_windows]
        self.head = head_tokens(dev, head_k, teacher.config.vocab_size)
        self.ent = teacher_entropies(teacher, self.bias_windows)
        self.edges = entropy_edges(self.ent, buckets)
        self.settings = {"bias_windows": bias_windows, "head_k": head_k, "buckets": buckets,
                         "edges_nats": self.edges, "head_reference": "token frequencies of the dev windows"}

    def __call__(self, model, fp=None):
        res = perplexity(model, self.tok, seqlen=SEQLEN)
        hb = head_class_bias(model, self.bias_windows, self.head, self.ent, self.edges)
        row = {"ppl": res.ppl_dev, "ppl_dev": res.ppl_dev, "ppl_heldout": res.ppl_heldout, "ppl_full_split": res.ppl,
               "full_split_windows": res.windows, "eval_seconds": round(res.seconds, 1),
               "head_share_all": hb["overall"], "head_share_high": hb["buckets"][-1]["head_share"],
               "head_share_low": hb["buckets"][0]["head_share"], "bias_buckets": hb["buckets"]}
        if fp is not None:
            row.update(ppl_over_fp=row["ppl_dev"] / fp["ppl_dev"], heldout_over_fp=row["ppl_heldout"] / fp["ppl_heldout"],
                       head_excess_high=row["head_share_high"] - fp["head_share_high"],
                       head_excess_all=row["head_share_all"] - fp["head_share_all"])
        return row


def save_row(row, settings):
    """Add or replace ``row`` (by name) in the JSON, re-reading it under ``results_lock``: runner processes (one
    per seed, side by side) share the file."""
    with results_lock(OUT):
        rows = [r for r in load_results(OUT) if r["method"] != row["method"]]
        rows = [row] + rows if row["method"] == "fp" else rows + [row]
        write_results(OUT, complete_rows(rows), settings)


def fp_row(measure, teacher, settings):
    """The FP reference, measured on the full split once (dev, held-out and full) and kept in the JSON."""
    fp = next((r for r in complete_rows(load_results(OUT)) if r["method"] == "fp"), None)
    if fp is None or fp.get("ppl_heldout") is None:
        fp = {**(fp or {}), "method": "fp", "bits_per_weight": 16.0, **measure(teacher)}
        save_row(fp, settings)
    return fp


STAGE1_KEYS = ("quant", "init", "text", "blockwise")  # what decides a recipe's stage 1


def shared_stage1(name, source, seed, runs_dir):
    """The stage-1 folder of recipe ``source`` with ``seed``, for recipe ``name`` to start from: both must have
    the same stage 1 (``STAGE1_KEYS``), so the row's end-to-end stage is paired with ``source``'s row. None when
    ``source`` is None. ``train.train_two_stage`` also checks the folder's manifest (``blockwise.check_folder``)."""
    if source is None:
        return None
    mine, theirs = recipe(name), recipe(source)
    diff = [k for k in STAGE1_KEYS if mine[k] != theirs[k]]
    if diff or mine["stage"] == "e2e":
        raise ValueError(f"--stage1-from {source}: recipe {name!r} does not share {source!r}'s stage 1 "
                         f"(differs in {diff or ['stage: e2e has none']}); allowed: recipes with the same {STAGE1_KEYS}")
    return os.path.join(run_path(source, seed, runs_dir), "stage1")


def run(names, seeds, threads, runs_dir=RUNS_DIR, stage1_from=None):
    """Train and measure every missing (recipe, seed) row; with ``stage1_from`` (a recipe name) each row starts
    from that recipe's stage 1 of the same seed (trained there first if missing) and records it in ``stage1_from``."""
    import json
    for name in names:
        for seed in seeds:
            shared_stage1(name, stage1_from, seed, runs_dir)  # unknown names and mismatches fail before the model loads
    with open(OUT) as f:
        settings = json.load(f)["settings"]
    teacher, tok = load_model(None)
    measure = Measure(teacher, tok)
    settings["runner"] = {"measure": measure.settings, "seqlen": SEQLEN, "rows": "those with a 'recipe' field",
                          "cpu_minutes": "process time of all threads; generation_cpu_minutes is what generating the "
                                         "row's text cost when it was written (cached text included)"}
    fp_row(measure, teacher, settings)
    for name in names:
        for seed in seeds:
            method = run_name(name, seed)
            if any(r["method"] == method or (r.get("recipe"), r.get("seed")) == (name, seed) for r in load_results(OUT)):
                continue
            r = recipe(name)
            stage1_dir = shared_stage1(name, stage1_from, seed, runs_dir)
            with LoadSampler(every=30.0) as load:
                t0 = time.time()
                student, info = train_recipe(teacher, tok, r, seed=seed,
                                             out_dir=run_path(name, seed, runs_dir), stage1_dir=stage1_dir)
                row = {"method": method, "recipe": name, "seed": seed, "quant": r["quant"], "stage": r["stage"],
                       "settings": r, "threads": threads,
                       **{k: v for k, v in info.items() if k not in ("stage1_blocks", "stage2_curve")},
                       "wall_minutes": round((time.time() - t0) / 60, 1),
                       **measure(freeze_quantized(student), fp_row(measure, teacher, settings)),
                       "stage1_blocks": info.get("stage1_blocks"), "date": machine_info()["date"],
                       "machine": cpu_signature()}  # rows of one JSON come from different machines
                if stage1_dir:
                    row["stage1_from"] = (f"{stage1_dir}: {stage1_from} s{seed}'s stage 1 (same configuration, seed "
                                          f"and text; check_folder verified it). Its stage-1 CPU-minutes are that run's")
            s = load.summary()["loadavg_1min"]
            row.update({"load_average_mean": s["mean"], "load_average_max": round(s["max"], 2),
                        "load_average_samples": s["samples"]})
            save_row(row, settings)
            print({k: row.get(k) for k in ("method", "ppl_dev", "ppl_heldout", "total_cpu_minutes")})
            del student


SUMMARY = "bench/results/dbllm_recipes.json"


def machines(rows):
    """'AMD EPYC x2, Intel Xeon Processor x1': the CPUs a recipe's seeds ran on (CPU-minutes depend on it)."""
    from collections import Counter
    names = Counter(cpu_name(r["machine"]) if r.get("machine") else "unrecorded" for r in rows)
    return ", ".join(f"{n} x{k}" for n, k in sorted(names.items()))


def write_summary():
    """Per recipe, over its seeds: held-out PPL mean, sd, min and max, its ratio to FP, bits per weight and the
    budget with the text, and the machines it was measured on; FP first. The README's headline table."""
    import statistics
    rows = complete_rows(load_results(OUT))
    fp = next(r for r in rows if r["method"] == "fp")
    out = [{"method": "fp (Q4_1 dequantized)", "seeds": None, "bits_per_weight": 16.0, "ppl_dev": fp["ppl_dev"],
            "ppl_heldout_mean": fp["ppl_heldout"], "heldout_over_fp": 1.0}]
    for name in sorted({r["recipe"] for r in rows if r.get("recipe")}, key=list(RECIPES).index):  # recipes.py's order
        mine = sorted((r for r in rows if r.get("recipe") == name and r.get("ppl_heldout")), key=lambda r: r["seed"])
        held = [r["ppl_heldout"] for r in mine]
        budget = [r["total_cpu_minutes"] for r in mine if r.get("total_cpu_minutes") is not None]
        out.append({"method": name, "seeds": ",".join(str(r["seed"]) for r in mine),
                    "bits_per_weight": mine[0]["bits_per_weight"],
                    "ppl_dev": statistics.mean(r["ppl_dev"] for r in mine), "ppl_heldout_mean": statistics.mean(held),
                    "ppl_heldout_sd": statistics.stdev(held) if len(held) > 1 else None,
                    "ppl_heldout_min": min(held), "ppl_heldout_max": max(held),
                    "heldout_over_fp": statistics.mean(held) / fp["ppl_heldout"],
                    "total_cpu_minutes_mean": statistics.mean(budget) if budget else None,
                    "total_cpu_minutes_max": max(budget) if budget else None, "machines": machines(mine)})
    write_results(SUMMARY, out, {"model": "smollm2-135m", "dataset": "wikitext2", "split": "test", "seqlen": SEQLEN,
                                 "windows": "held out: 41-589 (ppl_dev: mean over seeds on windows 1-40)",
                                 "note": "rows: bench/results/dbllm_table.json (those with a recipe); sd over seeds; "
                                         "total_cpu_minutes: text generation + init + training, process time"})
    return out


def first_sink_misfire(row):
    """The first stage-1 block whose trained stream fires an attention sink where FP has none (``sink_misfires``
    on the block's statistics windows, after training), and that block's ordinary-token error; None when none does."""
    blocks = [b for b in row.get("stage1_blocks") or [] if isinstance(b.get("after"), dict)]
    first = next((b for b in blocks if b["after"].get("sink_misfires")), None)
    return {"first_sink_misfire_block": first["block"] if first else None,
            "its_rel_err_ordinary": round(first["after"]["rel_err_ordinary"], 3) if first else None}


def plot(fig_dir="figures"):
    """Held-out PPL of every seed of every recipe, against FP and 3x FP, each recipe labelled with its mean budget
    (text included); PNG + the CSV behind it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import pandas as pd
    rows = complete_rows(load_results(OUT))
    df = pd.DataFrame([{"recipe": r["recipe"], "seed": r["seed"], "ppl_heldout": r["ppl_heldout"],
                        "ppl_dev": r["ppl_dev"], "bits_per_weight": r["bits_per_weight"],
                        "total_cpu_minutes": r.get("total_cpu_minutes"), **first_sink_misfire(r)}
                       for r in rows if r.get("recipe")])
    if len(df):
        df["first_sink_misfire_block"] = df["first_sink_misfire_block"].astype("Int64")
    fp = next(r for r in rows if r["method"] == "fp")
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    names = sorted(set(df.recipe), key=list(RECIPES).index) if len(df) else []  # recipes.py's order
    for i, name in enumerate(names):
        g = df[df.recipe == name]
        ax.plot([i - 0.25, i + 0.25], [g.ppl_heldout.mean()] * 2, "-", color="tab:orange", lw=4)
        ax.plot(i + 0.12 * (g.seed - g.seed.mean()), g.ppl_heldout, "o", color="tab:blue", ms=9)  # seeds side by side
    ax.axhline(fp["ppl_heldout"], color="k", ls=":")
    ax.axhline(3 * fp["ppl_heldout"], color="gray", ls="--")
    for y, label in ((fp["ppl_heldout"], "FP\n(Q4_1\ndequantized)"), (3 * fp["ppl_heldout"], "3x FP")):
        ax.text(1.01, y, label, transform=ax.get_yaxis_transform(), va="center", ha="left", fontsize=8)  # off the data
    budget = df.groupby("recipe").total_cpu_minutes.mean() if len(df) else {}
    label = {n: n.replace("+", "\n+") for n in names}  # long names break before "+"
    ax.set_xticks(range(len(names)), [f"{label[n]}\n{budget[n]:.0f} CPU-min" if pd.notna(budget[n]) else label[n]
                                      for n in names], fontsize=8)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set_yscale("log")
    ax.set_ylim(0.85 * fp["ppl_heldout"], 1.15 * max([3 * fp["ppl_heldout"], *df.get("ppl_heldout", [])]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([30, 45, 60, 90, 120])
    ax.set(ylabel="WikiText-2 PPL, held-out windows 41-589",
           title="Recipes: each seed (dots), their mean (bar), budget with the text")
    fig.tight_layout()
    os.makedirs(fig_dir, exist_ok=True)
    fig.savefig(os.path.join(fig_dir, "dbllm_recipes.png"), dpi=110)
    df.to_csv(os.path.join(fig_dir, "dbllm_recipes.csv"), index=False)
    plt.close(fig)
    print("wrote", os.path.join(fig_dir, "dbllm_recipes.png"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=["best", "best-uniform"], help="recipe names (dbllm-lab recipes)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: two rows can share the 2 cores)")
    ap.add_argument("--stage1-from", metavar="RECIPE", help="start each row from RECIPE's stage 1 of the same seed "
                    "(e.g. best+dad and best+kd from best: their end-to-end stage is then paired with best's row)")
    ap.add_argument("--plot", action="store_true", help="only redraw the figure from the JSON")
    a = ap.parse_args(argv)
    if not a.plot:
        torch.set_num_threads(a.threads)
        run(a.recipes, a.seeds, a.threads, stage1_from=a.stage1_from)
    plot()
    for r in write_summary():
        print(r)


if __name__ == "__main__":
    main()
