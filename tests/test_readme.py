"""Every number the README's result tables quote comes from a committed result file."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import update_readme  # noqa: E402


def test_readme_and_results_page_match_the_result_files():
    for page in update_readme.PAGES:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        assert update_readme.BLOCK.findall(text), f"{page} has no result-table blocks"
        assert update_readme.update(text) == text, f"{page} tables are stale: run `python bench/update_readme.py`"


def test_a_table_block_fails_when_its_rows_are_missing(tmp_path):
    """A block that selects rows by a field fails loudly when no row has it; a missing file says so in the page."""
    import pytest
    with pytest.raises(ValueError, match="no row has 'no_such_field'"):
        update_readme.render("bench/results/dbllm_table.json", "method", "no_such_field")
    assert "Not measured yet" in update_readme.render("bench/results/no_such_file.json", None)


def test_readme_is_a_front_door():
    """At most 250 lines, and every notebook is in its table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 250
    for nb in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
        if nb.endswith(".ipynb"):
            assert f"notebooks/{nb}" in text, nb


def test_every_result_table_has_the_shared_layout():
    """The PPL tables the README quotes share one layout (issues 3-5)."""
    import json
    for name in ("ppl_fp.json", "ptq.json", "dbllm_table.json", "arb_table.json"):
        if not os.path.isfile(os.path.join(ROOT, "bench", "results", name)):
            continue
        with open(os.path.join(ROOT, "bench", "results", name)) as f:
            doc = json.load(f)
        assert {"machine", "settings", "rows"} <= set(doc), name
        assert {"model", "dataset", "seqlen", "windows"} <= set(doc["settings"]), name
        for row in doc["rows"]:
            assert {"method", "ppl", "bits_per_weight"} <= set(row), (name, row)


def _results(name):
    import json
    with open(os.path.join(ROOT, "bench", "results", name)) as f:
        return json.load(f)


def _named(name, *keys):
    """{row name: row} of a results file, each row named by its first field of ``keys`` that it has."""
    return {next((r[k] for k in keys if k in r), None): r for r in _results(name)["rows"]}


def _row(rows, key):
    """A named row; a missing one fails the claim that quotes it (it never makes the claim vanish)."""
    assert key in rows, f"row {key!r} is missing from the results file the README quotes"
    return rows[key]


def readme_prose_claims():
    """(what, the text the README must contain) for every number its prose quotes, computed from the result files."""
    table, recipes = _named("dbllm_table.json", "method"), _named("dbllm_recipes.json", "method")
    t = {k: _row(table, k) for k in [f"{n} s{s}" for n in ("best", "best+dad", "best+kd") for s in (0, 1, 2)]
         + ["best-bf16 s1"]}
    r = {k: _row(recipes, k) for k in ("best", "best-bf16", "best+bf16-text", "best-uniform")}
    trained = [x["total_cpu_minutes"] for x in table.values()
               if x.get("recipe") in ("best", "best-bf16", "best+bf16-text")]
    gpu = _named("train_nvidia_h200.json", "method")
    kern = _results("kernel_cpu.json")["rows"][0]  # the 4096 x 4096 layer at batch 1
    dec = {(x["model"], x.get("lm_head"), x["threads"]): x["decode_tokens_per_s"]  # lean loop and llama.cpp rows
           for x in _results("generate_cpu.json")["rows"] if x.get("engine") != "hf"}
    gpu_kern = next(x for x in _results("kernel_nvidia_h200.json")["rows"]
                    if x["shape"] == "4096x4096" and x["batch"] == 1)
    exact, int8 = (_results(f"kernel_ppl/best-quarter-s1_cpu-{p}.json")["ppl"] for p in ("exact", "int8"))
    q2k = _row(_named("llamacpp.json", "format"), "Q2_K")

    def held(name):
        return f"{t[name]['ppl_heldout']:.2f}"

    def cpu(name, field="total_cpu_minutes"):
        return f"{t[name][field]:.2f}"

    return [
        ("best s0 budget", f"`best` costs {cpu('best s0')} CPU-minutes"),
        ("best s0 split", f"(seed 0: {cpu('best s0', 'generation_cpu_minutes')} of text, "
                          f"{cpu('best s0', 'stage1_cpu_minutes')} of stage 1)"),
        ("best s1, s2 budgets", f"{cpu('best s1')} and {cpu('best s2')} on a 2-core AMD EPYC"),
        ("best s1, s2 split", f"(seeds 1 and 2: {cpu('best s1', 'generation_cpu_minutes')} and "
                              f"{cpu('best s2', 'generation_cpu_minutes')} of text, "
                              f"{cpu('best s1', 'stage1_cpu_minutes')} and "
                              f"{cpu('best s2', 'stage1_cpu_minutes')} of stage 1)"),
        ("best-bf16", f"costs {r['best-bf16']['total_cpu_minutes_mean']:.1f} CPU-minutes on the EPYC for "
                      f"{r['best-bf16']['heldout_over_fp']:.2f}× FP"),
        ("best+bf16-text", f"{r['best+bf16-text']['total_cpu_minutes_mean']:.1f} on the Xeon for "
                           f"{r['best+bf16-text']['heldout_over_fp']:.2f}× FP"),
        ("best's ratio", f"against `best`'s {r['best']['heldout_over_fp']:.2f}×"),
        ("bf16 stage-1 saving", "stage 1 costs "
         f"{t['best s1']['stage1_cpu_minutes'] / t['best-bf16 s1']['stage1_cpu_minutes']:.2f}× less"),
        ("budget range", f"after {min(trained):.0f}–{max(trained):.0f} CPU-minutes"),
        ("end to end, seed 0", f"seed 0 {held('best s0')} → {held('best+dad s0')} (DAD), {held('best+kd s0')} (KD)"),
        ("end to end, seed 1", f"seed 1 {held('best s1')} → {held('best+dad s1')}, {held('best+kd s1')}"),
        ("end to end, seed 2", f"seed 2 {held('best s2')} → {held('best+dad s2')}, {held('best+kd s2')}"),
        ("end to end, GPU", " → ".join(f"{_row(gpu, k)['ppl_heldout']:.2f}" for k in ("best s0", "best+dad s0"))
         + f", {_row(gpu, 'best+kd s0')['ppl_heldout']:.2f}"),
        ("FDB vs uniform", f"`best` averages {r['best']['ppl_heldout_mean']:.2f} ± {r['best']['ppl_heldout_sd']:.2f} "
                           f"over three seeds and `best-uniform` {r['best-uniform']['ppl_heldout_mean']:.2f} ± "
                           f"{r['best-uniform']['ppl_heldout_sd']:.2f}"),
        ("FDB's extra bits", f"FDB spends {r['best']['bits_per_weight'] - r['best-uniform']['bits_per_weight']:.2f} "
                             "more bits"),
        ("kernel", f"takes {kern['int8_ms']:.2f} ms on the integer path against {kern['fp32_ms']:.2f} ms for torch "
                   f"fp32 and {kern['bf16_ms']:.2f} ms for bf16 ({kern['int8_speedup_vs_fp32']:.1f}× and "
                   f"{kern['int8_speedup_vs_bf16']:.1f}×), "
                   f"{kern['int8_fraction_of_byte_limit']:.2f} of the byte limit"),
        ("kernel PPL cost", f"+{100 * (int8 / exact - 1):.2f}% (dev)"),
        ("decode", f"{dec[('packed cpu', 'int8', 2)]:.0f} tok/s with the lean loop and the optional int8 LM head "
                   f"({dec[('packed cpu', 'exact', 2)]:.0f} with the exact head), against llama.cpp's F16 "
                   f"{dec[('llama.cpp F16', None, 2)]:.0f}"),
        ("llama.cpp Q2_K", f"\"Q2_K\", {dec[('llama.cpp Q2_K', None, 2)]:.0f}, which is really "
                           f"{q2k['bits_per_decoder_weight']:.2f} bits per decoder weight"),
        ("Q2_K against best", f"({q2k['ppl_dev']:.1f} on dev against `best`'s {r['best']['ppl_dev']:.1f}"),
        ("GPU training", f"in {_row(gpu, 'best s0')['train_wall_seconds']:.0f} s"),
        ("GPU kernel", f"{gpu_kern['speedup_vs_fp16']:.2f}× cuBLAS fp16 at 4096×4096, batch 1, about "
                       f"{100 * gpu_kern['kernel_fraction_of_copy_GBps']:.0f}% of the copy bandwidth"),
    ]


def test_readme_prose_numbers_match_the_result_files():
    """The numbers in the README's prose are recomputed from the committed rows: a changed or missing row fails."""
    import re
    with open(os.path.join(ROOT, "README.md")) as f:
        text = re.sub(r"\s+", " ", f.read())
    missing = [(what, claim) for what, claim in readme_prose_claims() if claim not in text]
    assert not missing, "README prose differs from the result files:\n" + "\n".join(f"  {w}: {c!r}" for w, c in missing)
