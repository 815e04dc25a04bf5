"""Probes of trained recipe rows: where a student's perplexity goes, and what stage 1 costs in memory.

Each probe takes rows of ``bench/dbllm_table.py`` by recipe and seed (``best:1``), rebuilds the student of a finished
stage-1 run from its checkpoints under ``build/runs/{recipe}-s{seed}`` (``run_recipe.finished_student``: nothing is
trained again) and writes its own JSON, keeping rows measured before.

    python bench/dbllm_probes.py --position-ppl best:1 best-uniform:1   # PPL by position in the dev windows
    python bench/dbllm_probes.py --stream-errors best:1                 # per-block errors on unseen text
    python bench/dbllm_probes.py --memory-flatness [--quick]            # stage-1 peak memory against depth
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import load_results, write_results  # noqa: E402
from dbllm_lab.blockwise import BlockwiseConfig, block_errors  # noqa: E402
from dbllm_lab.datafree import SEED_STRIDE, generate_samples  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.ppl import DEV_WINDOWS, eval_windows, window_nll  # noqa: E402
from dbllm_lab.run_recipe import finished_student, parse_run, run_folder, run_name  # noqa: E402

POSITION_OUT = "bench/results/dbllm_position_ppl.json"
STREAM_OUT = "bench/results/dbllm_stream_errors.json"
MEMORY_OUT = "bench/results/blockwise_memory.json"
POSITION_RANGES = ((1, 128), (128, 256), (256, 512))  # predicted tokens' positions [lo, hi)
HELDOUT_SEED = SEED_STRIDE ** 2  # a generation seed no recipe's text uses (datafree.teacher_text)
HELDOUT_SAMPLES, STREAM_WINDOWS = 64, 8


def position_ppl(runs):
    """PPL on the dev windows by the position of the predicted token (POSITION_RANGES), FP included; ``runs``:
    (recipe, seed) pairs."""
    teacher, tok = load_model(None)
    windows = eval_windows(teacher, tok, seqlen=512, max_windows=DEV_WINDOWS)
    todo = [("fp", teacher)] + [(run_name(n, s), (n, s)) for n, s in runs]
    names = {m for m, _ in todo}
    rows = [r for r in load_results(POSITION_OUT) if r["method"] not in names]
    for method, model in todo:
        model = model if method == "fp" else finished_student(teacher, tok, *model)
        total, n = window_nll(model, windows, per_position=True, desc=method)
        for lo, hi in POSITION_RANGES:
            nll = float(total[lo - 1:hi - 1].sum()) / (n * (hi - lo))
            rows.append({"method": method, "positions": f"{lo}-{hi - 1}", "ppl": math.exp(nll)})
        rows.append({"method": method, "positions": "all", "ppl": math.exp(float(total.sum()) / (n * total.numel()))})
    write_results(POSITION_OUT, rows, {"windows": f"dev (first {DEV_WINDOWS})", "seqlen": 512,
                                       "ranges": "positions of the predicted tokens, 0-based, [lo, hi]"})


def stream_errors(runs, gen_len=512):
    """Per block, ``blockwise.block_errors`` (the model as it runs) on text no row trained on: teacher-written
    samples (seed HELDOUT_SEED), whole and from their middle on, and the first STREAM_WINDOWS dev windows."""
    teacher, tok = load_model(None)
    held = generate_samples(teacher, tok, HELDOUT_SAMPLES, gen_len, seed=HELDOUT_SEED)
    texts = {"teacher-written, held out": held, "teacher-written, held out, from mid-text": held[:, gen_len // 2:],
             "wikitext-2 dev windows": eval_windows(teacher, tok, seqlen=512, max_windows=STREAM_WINDOWS)}
    rows = load_results(STREAM_OUT)
    for name, seed in runs:
        model = finished_student(teacher, tok, name, seed)
        rows = [r for r in rows if r["method"] != run_name(name, seed)]
        for text, windows in texts.items():
            rows += [{"method": run_name(name, seed), "text": text, "windows": list(windows.shape), **r}
                     for r in block_errors(teacher, model, windows)]
    write_results(STREAM_OUT, rows, {"heldout_seed": HELDOUT_SEED, "heldout_samples": HELDOUT_SAMPLES,
                                     "gen_len": gen_len, "wikitext_windows": STREAM_WINDOWS,
                                     "error": "blockwise.block_errors: relative error of ordinary tokens, on the "
                                              "model's own stream"})


def _vm_hwm_kib():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM")))


def memory_probe(blocks, quick):
    """One process: a random LLaMA of ``blocks`` blocks, teacher and FDB student resident; the peak resident memory
    *added* while stage 1 runs (the peak counter is reset just before it)."""
    from dbllm_lab.blockwise import blockwise_reconstruct
    from dbllm_lab.model import tiny_llama
    from dbllm_lab.quantize import quantize_model
    torch.manual_seed(0)
    hidden, inter = (128, 384) if quick else (512, 1408)
    teacher = tiny_llama(vocab_size=512, hidden=hidden, layers=blocks, heads=8, kv_heads=4, intermediate=inter,
                         max_pos=256)
    student = copy.deepcopy(teacher)
    quantize_model(student, "fdb", progress=False)
    windows = torch.randint(0, 512, (8 if quick else 32, 128))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    base = _vm_hwm_kib()
    blockwise_reconstruct(teacher, student, windows, BlockwiseConfig(epochs=1), progress=False)
    return {"blocks": blocks, "hidden": hidden, "intermediate": inter, "windows": list(windows.shape),
            "resident_before_mib": round(base / 1024, 1), "stage_added_peak_mib": round((_vm_hwm_kib() - base) / 1024, 1)}


GROWTH_LIMIT = 1.15  # stage 1 "does not grow with depth": no deeper model adds more than 1.15x what 8 blocks add


def memory_flatness(quick):
    """Stage 1 streams one block at a time, so the memory it adds must not grow with the number of blocks: the
    peak it adds at 16 and 32 blocks is at most GROWTH_LIMIT x the peak at 8 (each depth in a fresh process)."""
    rows = []
    for blocks in (8, 16, 32):
        cmd = [sys.executable, os.path.abspath(__file__), "--_probe-blocks", str(blocks)] + (["--quick"] if quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    added = [r["stage_added_peak_mib"] for r in rows]
    growth = max(added[1:]) / added[0]
    doc = {"growth_over_8_blocks": round(growth, 3), "grows_with_depth": growth > GROWTH_LIMIT,
           "growth_limit": GROWTH_LIMIT,
           "note": "peak resident memory added by stage 1 (VmHWM reset before it, Linux), teacher and student already "
                   "resident; a smaller peak at more blocks is allocator reuse, not a saving"}
    if not quick:
        write_results(MEMORY_OUT, rows, doc)
    print(json.dumps({**doc, "added_mib": added}))
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--position-ppl", nargs="+", metavar="RECIPE:SEED")
    ap.add_argument("--stream-errors", nargs="+", metavar="RECIPE:SEED")
    ap.add_argument("--memory-flatness", action="store_true")
    ap.add_argument("--quick", action="store_true", help="--memory-flatness on small models (for tests)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--_probe-blocks", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    try:  # every named run is checked before any model loads
        runs = [parse_run(spec) for spec in a.position_ppl or a.stream_errors or []]
        for name, seed in runs:
            run_folder(name, seed)
    except ValueError as e:
        ap.error(str(e))
    torch.set_num_threads(a.threads)
    if a._probe_blocks:
        print(json.dumps(memory_probe(a._probe_blocks, a.quick)))
    elif a.memory_flatness:
        memory_flatness(a.quick)
    elif a.position_ppl:
        position_ppl(runs)
    elif a.stream_errors:
        stream_errors(runs)
    else:
        ap.error("name a probe: --position-ppl, --stream-errors or --memory-flatness")


if __name__ == "__main__":
    main()
