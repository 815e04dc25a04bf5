"""Every number the README, docs/findings.md and docs/results.md quote, in tables and in prose, comes from a
committed result file (tables: bench/update_readme.py; prose: the claims lists below)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import update_readme  # noqa: E402
from dbllm_lab import views  # noqa: E402  (load / row: a missing row is a KeyError naming it)


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


def _llama():
    """{format: row} of llama.cpp's results (its rows are named by ``format``, not ``method``)."""
    return {r["format"]: r for r in _results("llamacpp.json")["rows"]}


def _xeon_decode():
    """({(model, lm_head or None, threads): decode tok/s}, {same key: sd or None}) of generate_cpu_xeon.json's lean
    and llama.cpp rows (llama.cpp's carry no lm_head)."""
    rows = [x for x in _results("generate_cpu_xeon.json")["rows"] if x.get("engine") != "hf"]
    key = [(x["model"], None if x["model"].startswith("llama.cpp") else x["lm_head"], x["threads"]) for x in rows]
    return ({k: x["decode_tokens_per_s"] for k, x in zip(key, rows)},
            {k: x.get("decode_tokens_per_s_sd") for k, x in zip(key, rows)})


def _prefill():
    """(rows keyed (model, engine or 'llama.cpp', threads, tokens), settings) of prefill_cpu.json."""
    doc = _results("prefill_cpu.json")
    key = [(x["model"], "llama.cpp" if x["model"].startswith("llama.cpp") else x["engine"], x["threads"], x["tokens"])
           for x in doc["rows"]]
    return dict(zip(key, doc["rows"])), doc["settings"]


def _same_dev_ppl(settings):
    """The prefill path's and the exact kernel's dev PPL to 4 decimals, asserted equal."""
    ppl = settings["dev_ppl"]
    assert f"{ppl['cpu']['ppl']:.4f}" == f"{ppl['cpu-exact']['ppl']:.4f}", ppl
    return f"{ppl['cpu']['ppl']:.4f}"


def _prefill_ms(rows, model, engine="lean"):
    """'492 ms': a 512-token prompt at 2 threads, from ``_prefill()``'s rows."""
    return f"{rows[(model, engine, 2, 512)]['prefill_ms']:.0f} ms"


def _xeon_layout_claim(text):
    """``text`` when the Xeon kernel file ran the 'vnni' layout, else a claim no page makes."""
    vnni = _results("kernel_cpu_xeon.json")["settings"]["kernel"]["int8_layout"] == "vnni"
    return text if vnni else "the Xeon's kernel file does not record the vnni layout"


def readme_prose_claims():
    """(what, the text the README must contain) for every number its prose quotes, computed from the result files."""
    table, recipes = views.load("dbllm_table.json"), views.load("dbllm_recipes.json")
    t = {k: views.row(table, k) for k in [f"{n} s{s}" for n in ("best", "best+dad", "best+kd") for s in (0, 1, 2)]
         + ["best-bf16 s1"]}
    r = {k: views.row(recipes, k) for k in ("best", "best-bf16", "best+bf16-text", "best-uniform")}
    trained = [x["total_cpu_minutes"] for x in table.values()
               if x.get("recipe") in ("best", "best-bf16", "best+bf16-text")]
    gpu = views.load("train_nvidia_h200.json")
    kern = _results("kernel_cpu.json")["rows"][0]  # the 4096 x 4096 layer at batch 1
    dec = {(x["model"], x.get("lm_head"), x["threads"]): x["decode_tokens_per_s"]  # lean loop and llama.cpp rows
           for x in _results("generate_cpu.json")["rows"] if x.get("engine") != "hf"}
    gpu_kern = next(x for x in _results("kernel_nvidia_h200.json")["rows"]
                    if x["shape"] == "4096x4096" and x["batch"] == 1)
    kx = _results("kernel_cpu_xeon.json")["rows"][0]
    dx = _xeon_decode()[0]
    exact, int8 = (_results(f"kernel_ppl/best-quarter-s1_cpu-{p}.json")["ppl"] for p in ("exact", "int8"))
    q2k = views.row(_llama(), "Q2_K")
    pf, pst = _prefill()

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
        ("end to end, GPU", " → ".join(f"{views.row(gpu, k)['ppl_heldout']:.2f}" for k in ("best s0", "best+dad s0"))
         + f", {views.row(gpu, 'best+kd s0')['ppl_heldout']:.2f}"),
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
        ("Q2_K against best", f"({q2k['ppl_heldout']:.1f} held out against `best`'s "
                              f"{r['best']['ppl_heldout_mean']:.1f}"),
        ("Xeon kernel", f"the same layer takes {kx['int8_ms']:.2f} ms against {kx['fp32_ms']:.2f} ms for torch fp32 "
                        f"({kx['int8_speedup_vs_fp32']:.1f}×), {kx['int8_fraction_of_byte_limit']:.2f} of the byte "
                        f"limit, where dense fp32 itself reaches {kx['fp32_fraction_of_byte_limit']:.2f} of it; the "
                        f"kernel call alone, without the Python layer, takes {kx['int8_call_ms']:.3f} ms, "
                        f"{kx['int8_call_fraction_of_byte_limit']:.2f} of the byte limit"),
        ("Xeon decode", f"the packed student makes {dx[('packed cpu', 'int8', 1)]:.0f} tok/s at 1 thread against "
                        f"llama.cpp's Q4_0 {dx[('llama.cpp Q4_0', None, 1)]:.0f} and \"Q2_K\" "
                        f"{dx[('llama.cpp Q2_K', None, 1)]:.0f}, and {dx[('packed cpu', 'int8', 2)]:.0f} at 2 threads "
                        f"against {dx[('llama.cpp Q4_0', None, 2)]:.0f} and {dx[('llama.cpp Q2_K', None, 2)]:.0f}"),
        ("prefill", f"a 512-token prompt takes {_prefill_ms(pf, 'packed cpu')} at 2 threads "
                    f"({pf[('packed cpu', 'lean', 2, 512)]['prefill_tokens_per_s']:.0f} tok/s) against "
                    f"{_prefill_ms(pf, 'packed cpu-exact')} on the kernel that reads the planes, "
                    f"{_prefill_ms(pf, 'fp')} for the dense fp32 model and "
                    f"{_prefill_ms(pf, 'llama.cpp Q4_0', 'llama.cpp')} for llama.cpp's Q4_0"),
        ("prefill PPL", f"dev PPL is unchanged ({_same_dev_ppl(pst)} on both paths)"),
        ("prefill bf16", f"the packed student reads it in {_prefill_ms(pf, 'packed-bf16 cpu')}, at dev PPL "
                         f"{pst['dev_ppl']['bf16 cpu']['ppl']:.2f}"),
        ("GPU training", f"in {views.row(gpu, 'best s0')['train_wall_seconds']:.0f} s"),
        ("GPU kernel", f"{gpu_kern['speedup_vs_fp16']:.2f}× cuBLAS fp16 at 4096×4096, batch 1, about "
                       f"{100 * gpu_kern['kernel_fraction_of_copy_GBps']:.0f}% of the copy bandwidth"),
    ]


def _signed(x):
    return f"{x:+.2f}".replace("-", "−")


def findings_claims():
    """(what, text) for the runner-seed numbers of docs/findings.md §1-§3 and its open questions."""
    table, recipes = views.load("dbllm_table.json"), views.load("dbllm_recipes.json")
    t = {k: views.row(table, k) for k in [f"{n} s{s}" for n in ("best", "best-bf16", "best+bf16-text", "best-uniform",
                                                             "best+dad", "best+kd") for s in (0, 1, 2)]}
    r = {k: views.row(recipes, k) for k in ("fp (Q4_1 dequantized)", "best", "best-bf16", "best+bf16-text",
                                            "best-uniform", "best+dad", "best+kd")}
    mean = {k: v["ppl_heldout_mean"] for k, v in r.items()}
    fp_held = mean["fp (Q4_1 dequantized)"]
    dev = {"best": r["best"]["ppl_dev"], "fp": r["fp (Q4_1 dequantized)"]["ppl_dev"]}
    ll = _llama()
    kx = _results("kernel_cpu_xeon.json")["rows"][0]
    dx, sx = _xeon_decode()
    profile = _results("decode_profile_xeon.json")
    head2 = next(x for x in profile["rows"] if x["model"] == "packed cpu" and x["threads"] == 2)
    head_ppl = profile["settings"]["int8_head_perplexity_packed_model"]

    def f(name, field, digits=2):
        return f"{t[name][field]:.{digits}f}"

    def held(*names):
        return ", ".join(f(n, "ppl_heldout") for n in names)

    def summary(name):
        return f"{r[name]['ppl_heldout_mean']:.2f} ± {r[name]['ppl_heldout_sd']:.2f}"

    def parts(name):
        return (f"({f(name, 'generation_cpu_minutes')} text, {f(name, 'init_cpu_minutes')} init, "
                f"{f(name, 'stage1_cpu_minutes')} stage 1)")

    def pair(a, b, s):
        return _signed(t[f"{a} s{s}"]["ppl_heldout"] - t[f"{b} s{s}"]["ppl_heldout"])

    bf16_text = [f"best+bf16-text s{s}" for s in (1, 2, 0)]
    return [
        ("§1 best seeds", f"Seed 0 ends at {f('best s0', 'ppl_dev')} dev and **{f('best s0', 'ppl_heldout')} held "
                          "out**; "
                          f"seed 1 at {f('best s1', 'ppl_dev')} and {f('best s1', 'ppl_heldout')}; seed 2 at "
                          f"{f('best s2', 'ppl_dev')} and {f('best s2', 'ppl_heldout')}"),
        ("§1 best mean", f"**{summary('best')} ({r['best']['heldout_over_fp']:.2f}× FP)**: above the 3× bar "
                         f"({3 * fp_held:.2f})"),
        ("§1 best s0 budget", f"seed 0 cost **{f('best s0', 'total_cpu_minutes')} CPU-minutes** {parts('best s0')}"),
        ("§1 best s0 load", f"(1-min load mean {f('best s0', 'load_average_mean')}, max "
                            f"{f('best s0', 'load_average_max')})"),
        ("§1 best s1 budget", f"Seed 1 cost {f('best s1', 'total_cpu_minutes')} CPU-minutes {parts('best s1')}"),
        ("§1 best s2 budget", f"seed 2 {f('best s2', 'total_cpu_minutes')} ({f('best s2', 'generation_cpu_minutes')}, "
                              f"{f('best s2', 'init_cpu_minutes')}, {f('best s2', 'stage1_cpu_minutes')})"),
        ("§1 bf16 stage 1", f"stage 1 costs {f('best-bf16 s1', 'stage1_cpu_minutes')} and "
                            f"{f('best-bf16 s2', 'stage1_cpu_minutes')} CPU-minutes against fp32's "
                            f"{f('best s1', 'stage1_cpu_minutes')} and {f('best s2', 'stage1_cpu_minutes')}"),
        ("§1 bf16 budgets", f"**{f('best-bf16 s0', 'total_cpu_minutes')}, {f('best-bf16 s1', 'total_cpu_minutes')} "
                            f"and {f('best-bf16 s2', 'total_cpu_minutes')} CPU-minutes (mean "
                            f"{r['best-bf16']['total_cpu_minutes_mean']:.2f})**"),
        ("§1 bf16 quality", f"Held out {held('best-bf16 s0', 'best-bf16 s1')} and "
                            f"{f('best-bf16 s2', 'ppl_heldout')}: mean **{summary('best-bf16')} "
                            f"({r['best-bf16']['heldout_over_fp']:.2f}× FP)**"),
        ("§1 bf16 pairs", f"bf16 − fp32 is {pair('best-bf16', 'best', 1)} (seed 1) and "
                          f"{pair('best-bf16', 'best', 2)} (seed 2)"),
        ("§1 bf16 text budgets", ", ".join(f(n, "total_cpu_minutes") for n in bf16_text[:2]) + " and "
         + f(bf16_text[2], "total_cpu_minutes") + " CPU-minutes with the text (seeds 1, 2, 0; mean "
         f"{r['best+bf16-text']['total_cpu_minutes_mean']:.2f})"),
        ("§1 bf16 text quality", f"Held out {held('best+bf16-text s0', 'best+bf16-text s1')} and "
                                 f"{f('best+bf16-text s2', 'ppl_heldout')}: mean **{summary('best+bf16-text')} "
                                 f"({r['best+bf16-text']['heldout_over_fp']:.2f}× FP)**"),
        *[(f"§2 seed {s}", f"| {held(f'best s{s}', f'best+dad s{s}', f'best+kd s{s}').replace(', ', ' | ')} | "
                           f"{pair('best+dad', 'best+kd', s)} |") for s in (0, 1, 2)],
        ("§2 means", f"the means are {mean['best']:.2f} for stage 1 alone, {summary('best+dad')} with DAD and "
                     f"{summary('best+kd')} with KD"),
        ("§2 costs", f"(`best+dad s0` costs {f('best+dad s0', 'total_cpu_minutes')} in all on the Xeon, `best+dad s1` "
                     f"{f('best+dad s1', 'total_cpu_minutes')} on the EPYC)"),
        ("§2 DAD - KD", f"the means differ by {abs(mean['best+kd'] - mean['best+dad']):.2f}"),
        ("§3 FDB", f"give {held('best s0', 'best s1', 'best s2')} (mean **{summary('best')}**)"),
        ("§3 uniform", f"gives {held('best-uniform s0', 'best-uniform s1', 'best-uniform s2')} (mean "
                       f"**{summary('best-uniform')}**)"),
        ("§3 pairs", "uniform − FDB is " + ", ".join(pair("best-uniform", "best", s) for s in (0, 1))
         + f" and {pair('best-uniform', 'best', 2)}"),
        ("§3 lead", f"lead of the means, {mean['best-uniform'] - mean['best']:.2f},"),
        ("open question FDB", f"put FDB {mean['best-uniform'] - mean['best']:.2f} held-out PPL ahead"),
        ("§3 costs", f"stage 1 cost {f('best s0', 'stage1_cpu_minutes')} CPU-minutes for FDB and "
                     f"{f('best-uniform s0', 'stage1_cpu_minutes')} for the uniform grid "
                     f"({f('best-uniform s0', 'total_cpu_minutes')} with the text)"),
        ("llama.cpp held out", f"Q2_K's ({ll['Q2_K']['ppl_heldout']:.2f} held out against `best`'s {mean['best']:.2f}, "
                               f"`llamacpp.json`; Q4_0 {ll['Q4_0']['ppl_heldout']:.2f}, Q4_K_M "
                               f"{ll['Q4_K_M']['ppl_heldout']:.2f}, FP {fp_held:.2f})"),
        ("Xeon kernel", f"The layer: {kx['int8_ms']:.2f} ms against {kx['fp32_ms']:.2f} ms for torch fp32 "
                        f"({kx['int8_speedup_vs_fp32']:.2f}×) and {kx['bf16_ms']:.2f} ms for bf16, "
                        f"{kx['int8_fraction_of_byte_limit']:.2f} of the byte limit; dense fp32 reaches "
                        f"{kx['fp32_fraction_of_byte_limit']:.2f} of it. The kernel call alone: "
                        f"{kx['int8_call_ms']:.3f} ms, {kx['int8_call_fraction_of_byte_limit']:.2f} of the byte limit, "
                        f"against {kx['int8_lut_call_ms']:.3f} ms ({kx['int8_lut_call_fraction_of_byte_limit']:.2f}) "
                        f"for the AVX2 lookup layout in the same run ({kx['int8_call_speedup_vs_lut_call']:.2f}×)"),
        ("Xeon layout", _xeon_layout_claim("the integer path's second layout, 'vnni'")),
        ("Xeon head", f"At 2 threads it takes {head2['int8_head_ms']:.3f} ms per token against "
                      f"{head2['int8_head_avx2_ms']:.3f} ms on its AVX2 loop (warm, repeated calls); a whole decode "
                      f"step with it takes {head2['lean_int8_head_ms']:.2f} ms. On `best` (seed 0) the int8 head moves "
                      f"dev PPL from {head_ppl['ppl_exact_head']:.2f} to {head_ppl['ppl_int8_head']:.2f}"),
        ("Xeon head format", f"llama.cpp stores this model's tied embedding as {ll['Q4_0']['embedding_type']} in its "
                             f"Q4_0 and Q2_K files" if ll["Q4_0"]["embedding_type"] == ll["Q2_K"]["embedding_type"]
                             else "the two llama.cpp files' embedding types differ"),
        ("Xeon drift", f"had Q4_0 at {ll['Q4_0']['decode_tok_s_t2']:.1f} (± {ll['Q4_0']['decode_tok_s_t2_sd']:.1f}) "
                       "at 2 threads"),
        ("Xeon decode", f"{dx[('packed cpu', 'int8', 2)]:.1f} tok/s at 2 threads against llama.cpp's Q4_0 "
                        f"{dx[('llama.cpp Q4_0', None, 2)]:.1f} (± {sx[('llama.cpp Q4_0', None, 2)]:.1f}) and Q2_K "
                        f"{dx[('llama.cpp Q2_K', None, 2)]:.1f} (± {sx[('llama.cpp Q2_K', None, 2)]:.1f}); at 1 thread "
                        f"{dx[('packed cpu', 'int8', 1)]:.1f} against {dx[('llama.cpp Q4_0', None, 1)]:.1f} and "
                        f"{dx[('llama.cpp Q2_K', None, 1)]:.1f}. With the exact fp32 head {dx[('packed cpu', 'exact', 2)]:.1f} "
                        "at 2 threads"),
        ("dev optimism", f"{mean['best']:.2f} / {dev['best']:.2f} = {mean['best'] / dev['best']:.3f}, where FP's "
                         f"own is {fp_held:.2f} / {dev['fp']:.2f} = {fp_held / dev['fp']:.3f}"),
    ]


def results_claims():
    """(what, text) for the paragraph of docs/results.md that says which run drew the committed figures."""
    import json
    with open(os.path.join(ROOT, "figures", "RUN.json")) as f:
        run = json.load(f)
    load = run["load_during_run"]["loadavg_1min"]
    student = views.row(views.load("dbllm_table.json"), "best s0")
    assert run["trained_student"] == {"path": "build/models/best", "trained_now": False}, run["trained_student"]
    llama, kx = _results("llamacpp.json"), _results("kernel_cpu_xeon.json")["rows"][0]
    q2k = views.row(_llama(), "Q2_K")
    recipes = views.load("dbllm_recipes.json")
    fp_held = views.row(recipes, "fp (Q4_1 dequantized)")["ppl_heldout_mean"]
    gen = _results("generate_cpu_xeon.json")["settings"]
    dx = _xeon_decode()[0]
    return [("llama.cpp load", f"(the decode-only rerun's 1-min load: {llama['settings']['load_avg_before'][0]:.2f} "
                               f"before, {llama['settings']['load_avg_after_decode'][0]:.2f} after)"),
            ("Q2_K against FP", f"Its Q2_K is {q2k['ppl_heldout'] / fp_held:.2f}× FP's held-out perplexity, where "
                                f"the 2.5-bit `best` is {views.row(recipes, 'best')['heldout_over_fp']:.2f}×"),
            ("Xeon kernel", f"Dense fp32 reaches {kx['fp32_fraction_of_byte_limit']:.2f} of the measured stream on "
                            "this CPU, so torch's GEMV is near the byte limit here; the integer layer's "
                            f"{kx['int8_speedup_vs_fp32']:.1f}× over it is "
                            f"{kx['int8_speedup_vs_fp32'] / kx['byte_limit_vs_fp32']:.2f} of the "
                            f"{kx['byte_limit_vs_fp32']:.1f}× the bytes allow, and the kernel call alone reaches "
                            f"{kx['int8_call_fraction_of_byte_limit']:.2f} of the byte limit"),
            ("Xeon layout", _xeon_layout_claim("integer path runs its AVX-512 VNNI layout "
                                               "(`settings.kernel.int8_layout`)")),
            ("Xeon decode load", f"alone (1-min load {gen['loadavg_before'][0]:.1f} before it"),
            ("Xeon decode order", "Here the packed student with the int8 head decodes faster than llama.cpp's Q4_0 and "
                                  "\"Q2_K\" at both thread counts; with the exact fp32 head it is slower than both"
                                  if all(dx[("packed cpu", "int8", t)] > dx[(f"llama.cpp {f}", None, t)] >
                                         dx[("packed cpu", "exact", t)] for t in (1, 2) for f in ("Q4_0", "Q2_K"))
                                  else "the order of the Xeon decode rows changed"),
            ("the full run", f"`{run['command']}` at commit {run['commit'][:7]} with a clean tree"),
            ("its cost", f"{run['wall_minutes']} wall minutes and {run['cpu_minutes']} CPU-minutes for the "
                         f"{len(run['notebooks'])} notebooks"),
            ("its load", f"1-min load median {load['median']:.2f} (its own two threads; max {load['max']:.2f})"),
            ("its student", f"Training it cost {student['total_cpu_minutes']:.2f} CPU-minutes, text included, and "
                            f"{student['wall_minutes']} wall minutes on one thread")]


def xeon_decode_findings_claims():
    """(what, text) of findings §7's Xeon decode sentence (generate_cpu_xeon.json's lean and llama.cpp rows)."""
    dx, sd = _xeon_decode()
    q4, q2 = ("llama.cpp Q4_0", None), ("llama.cpp Q2_K", None)
    return [("Xeon decode", f"with the int8 head: {dx[('packed cpu', 'int8', 2)]:.1f} tok/s at 2 threads against "
                            f"llama.cpp's Q4_0 {dx[(*q4, 2)]:.1f} (± {sd[(*q4, 2)]:.1f}) and Q2_K {dx[(*q2, 2)]:.1f} "
                            f"(± {sd[(*q2, 2)]:.1f}); at 1 thread {dx[('packed cpu', 'int8', 1)]:.1f} against "
                            f"{dx[(*q4, 1)]:.1f} and {dx[(*q2, 1)]:.1f}. With the exact fp32 head "
                            f"{dx[('packed cpu', 'exact', 2)]:.1f} at 2 threads")]


def prefill_claims():
    """(what, text) of findings §7's prompt bullet, then (the last) results.md's prefill paragraph (prefill_cpu.json)."""
    p, st = _prefill()
    sweep = {(x["shape"], x["rows"]): x["prefill_speedup"] for x in st["layer_sweep"]}
    shapes, dense = sorted({s for s, _ in sweep}), st["dense_min_rows"]
    small = [sweep[(s, dense)] for s in shapes if s != "4096x4096"]
    ppl = st["dev_ppl"]
    crashed = all(x["repack_1_exit"] == "-11" for k, x in p.items() if k[0] in ("llama.cpp Q4_0", "llama.cpp Q2_K"))
    slower_below_32 = all(v < 1 for (s, m), v in sweep.items() if m < 32)
    faster_from = all(v > 1 for (s, m), v in sweep.items() if m >= dense)
    return [
        ("dense rows", f"from `DENSE_MIN_ROWS` = {dense} rows on"),
        ("the sweep", f"faster on every measured shape ({sweep[('4096x4096', dense)]:.2f}× at 4096×4096, "
                      f"{min(small):.2f}–{max(small):.2f}× on SmolLM2's), at {dense // 2} it loses on 4096×4096 "
                      f"({sweep[('4096x4096', dense // 2)]:.2f}×)" if faster_from else "the sweep's order changed"),
        ("512 tokens", f"**{_prefill_ms(p, 'packed cpu')} against {_prefill_ms(p, 'packed cpu-exact')} before "
                       f"({p[('packed cpu-exact', 'lean', 2, 512)]['prefill_ms'] / p[('packed cpu', 'lean', 2, 512)]['prefill_ms']:.2f}×)**, "
                       f"the dense fp32 model {_prefill_ms(p, 'fp')}, bf16 {_prefill_ms(p, 'fp-bf16')} (AMX), "
                       f"llama.cpp Q4_0 {_prefill_ms(p, 'llama.cpp Q4_0', 'llama.cpp')} and \"Q2_K\" "
                       f"{_prefill_ms(p, 'llama.cpp Q2_K', 'llama.cpp')}"),
        ("perplexity", f"the {ppl['cpu']['windows']} dev windows take {ppl['cpu']['seconds']:.1f} s against "
                       f"{ppl['cpu-exact']['seconds']:.1f} s, and dev PPL is {_same_dev_ppl(st)} on both paths (logits "
                       f"within {max(st['prefill_path_max_rel_logit_change'].values()):.1e} of the exact path"),
        ("bf16", f"the prompt takes {_prefill_ms(p, 'packed-bf16 cpu')}, the {ppl['bf16 cpu']['windows']} dev windows "
                 f"{ppl['bf16 cpu']['seconds']:.1f} s, and dev PPL moves from {ppl['cpu']['ppl']:.2f} to "
                 f"{ppl['bf16 cpu']['ppl']:.2f} ({100 * (ppl['bf16 cpu']['ppl'] / ppl['cpu']['ppl'] - 1):+.2f}%)"),
        ("llama.cpp repack", "prompt processing then crashes on this virtual machine (SIGSEGV, `repack_1_exit`"
                             if crashed else "llama.cpp's repack no longer crashes"),
        ("the sweep, results.md", "the prefill path is slower below 32 rows on every shape and faster from "
                                  f"{dense} on" if slower_below_32 and faster_from else "the sweep's order changed"),
    ]


def transformers_claims():
    """(what, text) of docs/transformers.md's bf16 paragraph (prefill_cpu.json)."""
    p, st = _prefill()
    ppl = st["dev_ppl"]
    speed = p[("packed cpu", "lean", 2, 512)]["prefill_ms"] / p[("packed-bf16 cpu", "lean", 2, 512)]["prefill_ms"]
    return [("bf16", f"a 512-token prompt {speed:.2f}× faster than in fp32 on the AMX Xeon (2 threads), at "
                     f"{100 * (ppl['bf16 cpu']['ppl'] / ppl['cpu']['ppl'] - 1):+.2f}% dev PPL on `best`")]


def bf16_896_claims():
    """(what, text) for recipe best-bf16-896, declared in 68a91e7 before any of its windows was scored: (README
    claims, findings claims)."""
    import math
    table, recipes = views.load("dbllm_table.json"), views.load("dbllm_recipes.json")
    seeds = views.recipe_rows(table, "best-bf16-896")
    assert sorted(seeds) == [0, 1, 2], f"best-bf16-896 has seeds {sorted(seeds)}; the docs quote 0, 1 and 2"
    r, text = views.row(recipes, "best-bf16-896"), views.recipe_rows(table, "best+bf16-text")
    fp_held = views.row(recipes, "fp (Q4_1 dequantized)")["ppl_heldout_mean"]
    ref = views.row(recipes, "best-bf16")["ppl_heldout_mean"]
    assert min(recipes.values(), key=lambda x: x["ppl_dev"] if x.get("seeds") else math.inf) is r  # best on dev too

    def f(field, sep=", ", last=" and "):
        v = [f"{seeds[s][field]:.2f}" for s in (0, 1, 2)]
        return f"{v[0]}{sep}{v[1]}{last}{v[2]}"

    def span(field):
        v = [seeds[s][field] for s in (0, 1, 2)]
        return f"{min(v):.2f}–{max(v):.2f}"

    held = sorted(seeds[s]["ppl_heldout"] for s in (0, 1, 2))
    misfire = next(b for b in seeds[2]["stage1_blocks"] if isinstance(b.get("after"), dict)
                   and b["after"].get("sink_misfires"))
    mean = f"mean {r['ppl_heldout_mean']:.2f} ± {r['ppl_heldout_sd']:.2f} ({r['heldout_over_fp']:.2f}× FP)"
    readme = [("896 result", f"held out {f('ppl_heldout')}, {mean}, for {f('total_cpu_minutes')} CPU-minutes with "
                             "the text on the Xeon")]
    findings = [
        ("896 expectation", f"{ref * 0.90 ** math.log2(1.75):.1f}–{ref * 0.95 ** math.log2(1.75):.1f}"),
        ("896 load", f"1-min load {span('load_average_mean')}"),
        ("896 budgets", f"{f('total_cpu_minutes')} CPU-minutes with the text (mean {r['total_cpu_minutes_mean']:.2f}): "
                        f"text {span('generation_cpu_minutes')}, stage 1 {span('stage1_cpu_minutes')}"),
        ("896 quality", f"Held out {f('ppl_heldout')}: {mean.replace('mean ', 'mean **')}**, every seed under the 3× "
                        f"bar ({3 * fp_held:.2f}); dev {r['ppl_dev']:.2f}"),
        ("896 pairs", ", ".join(_signed(seeds[s]["ppl_heldout"] - text[s]["ppl_heldout"]) for s in (0, 1, 2))
         + " (seeds 0, 1, 2)"),
        ("896 seed 2", f"Seed 2 misfires a sink from block {misfire['block']} on"),
        ("896 seed 2 error", f"(ordinary-token error {misfire['after']['rel_err_ordinary']:.2f} there)"),
        ("896 worst by", f"worst seed by {held[2] - held[1]:.1f} only"),
        ("2x FP", f"2× FP ({2 * fp_held:.1f})"),
    ]
    assert max(held) <= 3 * fp_held and max(seeds[s]["total_cpu_minutes"] for s in (0, 1, 2)) <= 90
    assert seeds[2]["ppl_heldout"] == held[2]  # "seed 2 ... is still the recipe's worst seed"
    return readme, findings


PAGE_CLAIMS = {"README.md": (readme_prose_claims, lambda: bf16_896_claims()[0]), "docs/transformers.md": (transformers_claims,),
               "docs/findings.md": (findings_claims, xeon_decode_findings_claims, lambda: prefill_claims()[:-1],
                                    lambda: bf16_896_claims()[1]),
               "docs/results.md": (results_claims, lambda: prefill_claims()[-1:])}


def test_prose_numbers_match_the_result_files():
    """The numbers the prose of the README, the findings and the results page quote are recomputed from the committed
    rows: a changed or missing row fails."""
    import re
    for page, claim_lists in PAGE_CLAIMS.items():
        with open(os.path.join(ROOT, page)) as f:
            text = re.sub(r"\s+", " ", f.read())
        missing = [(what, claim) for claims in claim_lists for what, claim in claims() if claim not in text]
        assert not missing, f"{page} differs from the result files:\n" + "\n".join(f"  {w}: {c!r}" for w, c in missing)
