"""Committed-results views for the notebooks: a few rows of the bench JSON files under plain labels, with a
glossary, instead of every row the benches wrote (the full tables are in ``docs/results.md``).

A view row that a notebook relies on is looked up with :func:`row`, which raises naming the file and the row when
it is missing: a claim about a committed row fails loudly instead of silently dropping out. Rows that may not be
measured yet (the end-to-end stages on the best recipe) are ``optional`` and shown as "not measured yet".

Named recipes (``dbllm_lab.recipes``) file their rows as ``run_recipe.run_name(recipe, seed)``, with fields
``recipe`` and ``seed``; rows trained before the recipes had names keep their long names and no ``recipe`` field (the settings'
seeds of the training order only, on one text), so they are never counted as a recipe's seeds.
"""
import json
import os
import statistics

from .paths import bench_result
from .run_recipe import run_name

FP_NOTE = "FP = the embedded SmolLM2-135M-Instruct GGUF Q4_1 file dequantized to float (not the FP16 checkpoint)"

# label -> (file, row or recipe, what it is); "recipe:NAME" rows are looked up by recipe (the lowest seed present,
# the others listed)
GLOSSARY = {
    "FP": ("dbllm_table.json", "fp", "the reference model: " + FP_NOTE),
    "RTN W3": ("ptq.json", "rtn-w3", "round-to-nearest 3-bit, group 64, clip search; no training"),
    "RTN W2": ("dbllm_table.json", "rtn w2g64", "round-to-nearest 2-bit, group 64, clip search; no training"),
    "FDB init": ("dbllm_table.json", "fdb init",
                 "FDB W2g64 (two bit-planes, scales a1, a2 per group of 64) from the clipped 2-bit grid; no training"),
    "ARB-RC": ("arb_table.json", "arb-rc",
               "ARB-LLM's row x column binarizer (post-training, Hessian from 16 x 256 teacher-written tokens)"),
    "ARB-X+CGB": ("arb_table.json", "arb-x+cgb", "ARB-LLM's best variant here: ARB-X with column-group bitmap"),
    "best": ("dbllm_table.json", "recipe:best",
             "recipe `best`: FDB W2g64, stage 1 (block-wise reconstruction) alone on 512 x 512 teacher-written "
             "tokens, one pass; no end-to-end stage, no DAD"),
    "best-uniform": ("dbllm_table.json", "recipe:best-uniform",
                     "recipe `best-uniform`: a learnable uniform 2-bit grid (2.28 bits) with exactly best's stage 1"),
    "best+DAD": ("dbllm_table.json", "recipe:best+dad",
                 "recipe `best+dad`: best's stage 1, then 150 gentle end-to-end DAD steps"),
    "best+KD": ("dbllm_table.json", "recipe:best+kd",
                "recipe `best+kd`: best's stage 1, then 150 gentle end-to-end plain-KD steps"),
}


def load(name, results_dir=None):
    """{method: row} of ``bench/results/<name>`` (or ``results_dir/<name>``); raises FileNotFoundError."""
    path = os.path.join(results_dir, name) if results_dir else bench_result(name)
    with open(path) as f:
        doc = json.load(f)
    return {r["method"]: r for r in doc["rows"]}


def row(rows, method, source="the results file"):
    """Row ``method`` of ``rows``; a KeyError naming the file and row when it is missing."""
    if method not in rows:
        raise KeyError(f"committed row {method!r} is missing from {source}: the claims that read it cannot be "
                       f"checked (regenerate the file or update the row name)")
    return rows[method]


def recipe_rows(rows, recipe):
    """{seed: row} of recipe ``recipe``: the rows with field ``recipe`` (the runner's, ``bench/dbllm_table.py``)."""
    return dict(sorted((int(r["seed"]), r) for r in rows.values() if r.get("recipe") == recipe))


def heldout_by_seed(rows, recipe):
    """{seed: held-out PPL} of recipe ``recipe``'s rows that have one."""
    return {s: r["ppl_heldout"] for s, r in recipe_rows(rows, recipe).items() if r.get("ppl_heldout")}


def lookup(files, label, optional=False):
    """The row behind glossary ``label`` (recipe rows: the lowest seed present, usually 0) from ``files`` =
    {file name: {method: row}}. Missing: None when ``optional``, else KeyError naming file and row."""
    fname, key, _ = GLOSSARY[label]
    rows = files.get(fname, {})
    if key.startswith("recipe:"):
        seeds = recipe_rows(rows, key[7:])
        if seeds:
            return seeds[min(seeds)]
        if optional:
            return None
        raise KeyError(f"committed rows of recipe {key[7:]!r} are missing from {fname}")
    if optional and key not in rows:
        return None
    return row(rows, key, fname)


def view(files, labels, optional=()):
    """A list of dicts, one per label: label, bits, PPL (dev windows), x FP, held-out PPL, train CPU-min, seeds
    (recipe rows: PPL over every seed present) and the source row; optional labels not measured yet keep their
    line with ``ppl`` None."""
    fp = lookup(files, "FP")["ppl"]
    out = []
    for label in labels:
        r = lookup(files, label, optional=label in optional)
        fname, key, _ = GLOSSARY[label]
        if r is None:
            out.append({"label": label, "bits": None, "ppl": None, "x_fp": None, "ppl_heldout": None,
                        "cpu_min": None, "seeds": "", "row": f"{key} (not measured yet)"})
            continue
        seeds = ""
        if key.startswith("recipe:"):
            v = [s["ppl"] for s in recipe_rows(files[fname], key[7:]).values()]
            held = list(heldout_by_seed(files[fname], key[7:]).values())
            if len(v) > 1:
                seeds = f"{len(v)} seeds: dev mean {statistics.mean(v):.1f}, range {min(v):.1f}-{max(v):.1f}"
            if len(held) > 1:
                seeds += f"; held-out mean {statistics.mean(held):.1f} +- {statistics.stdev(held):.1f} ({len(held)} seeds)"
        out.append({"label": label, "bits": r.get("bits_per_weight"), "ppl": r["ppl"], "x_fp": r["ppl"] / fp,
                    "ppl_heldout": r.get("ppl_heldout"), "cpu_min": r.get("train_cpu_minutes"), "seeds": seeds,
                    "row": f"{fname}: {r['method']}"})
    return out


def glossary(labels):
    """Markdown-ready lines 'label: what it is' for ``labels``."""
    return [f"- **{label}**: {GLOSSARY[label][2]}" for label in labels]


TRAIN_HINT = ("dbllm-lab train --recipe best --save build/models/best  (its measured CPU-minutes: "
              "`dbllm-lab recipes`, from bench/results/dbllm_recipes.json)")


def trained_checkpoint(path):
    """Absolute folder of a packed trained student (``checkpoint.save_quantized``) when it exists, else None;
    a relative ``path`` is taken from the project root. Prints what was found, or how to get it."""
    from .paths import root
    if not path:
        print("trained student: not requested (TRAINED is empty)")
        return None
    full = os.path.normpath(os.path.join(root(), os.path.expanduser(str(path))))
    if os.path.isfile(os.path.join(full, "quant_config.json")):
        print(f"trained student: {full}, {trained_label(full)} (measured live below)")
        return full
    print(f"trained student: {full} not found, so only the toy run is measured live. To get it: {TRAIN_HINT}")
    return None


def trained_label(path):
    """Plot/table label of a packed trained student: 'trained RECIPE sSEED' from its quant_config.json (the recipe
    that ``dbllm-lab train --recipe`` recorded), or 'trained (recipe not recorded)'."""
    with open(os.path.join(path, "quant_config.json")) as f:
        recipe = json.load(f).get("recipe") or {}
    if "name" not in recipe:
        return "trained (recipe not recorded)"
    return f"trained {run_name(recipe['name'], recipe.get('seed', 0))}"
