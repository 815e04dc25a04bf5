"""Post-training quantization table (no training): WikiText-2 test PPL of the embedded model for FP, RTN W4/W3/W2,
GPTQ W2, sign binarization and FDB initialised without training (every init option), all group 64, with bits per
weight, bytes and wall time. Writes bench/results/ptq.json (+ .md); resumable row by row.

    python bench/ptq.py --data-dir ../shared/data [--windows 40] [--only rtn-w2 fdb-clip]

Calibration (GPTQ and FDB-from-GPTQ) uses teacher-written text (method.md §3), never the evaluated split.
"""
import argparse
import copy
import os
import resource
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_calib_args, add_eval_args, calib_note, calib_windows, eval_settings, load_results,  # noqa: E402
                    write_results)  # noqa: E402

from dbllm_lab.checkpoint import save_quantized  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.quantize import quantize_model  # noqa: E402
from dbllm_lab.ppl import eval_windows, perplexity  # noqa: E402

GROUP = 64
# name -> quantize_model keyword arguments (None = the unquantized model)
ROWS = {
    "fp": None,
    "rtn-w4": dict(method="rtn", bits=4),
    "rtn-w3": dict(method="rtn", bits=3),
    "rtn-w2": dict(method="rtn", bits=2),
    "gptq-w2": dict(method="gptq", bits=2),
    "sign-w1": dict(method="sign"),
    "fdb-minmax-fixed": dict(method="fdb", init="minmax", orientation="fixed"),
    "fdb-minmax": dict(method="fdb", init="minmax", orientation="per-group"),
    "fdb-clip-fixed": dict(method="fdb", init="clip", orientation="fixed"),
    "fdb-clip": dict(method="fdb", init="clip", orientation="per-group"),
    "fdb-gptq": dict(method="fdb", init="gptq"),
}


def disk_bytes(model):
    """Bytes of the packed safetensors checkpoint of an FDB model (what `dbllm-lab quantize --out` writes)."""
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ptq.json"))
    ap.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS))
    add_calib_args(ap)
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the output file")
    args = ap.parse_args()
    base, tok = load_model(args.model)
    windows = eval_windows(base, tok, "wikitext2", "test", args.seqlen, args.windows or None, args.data_dir)
    rows = [r for r in load_results(args.out) if not (args.redo and r["method"] in args.only)]
    done = {r["method"] for r in rows}
    calib = None
    for name in args.only:
        if name in done:
            print(f"{name}: already in {args.out}, skipped")
            continue
        kw = ROWS[name]
        model = copy.deepcopy(base)
        t0 = time.time()
        report = {"bits_per_weight": 16.0, "note": "reference: GGUF Q4_1 dequantized to float (weights held in fp32)"}
        if kw is not None:
            needs_calib = kw["method"] == "gptq" or kw.get("init") == "gptq"
            if needs_calib and calib is None:
                calib = calib_windows(base, tok, args)
            report = quantize_model(model, group_size=GROUP, calib_windows=calib if needs_calib else None, **kw)
        quant_s = time.time() - t0
        res = perplexity(model, tok, seqlen=args.seqlen, windows=windows)
        n = report.get("n_weights") or sum(m.weight.numel() for m in model.model.layers.modules()
                                           if isinstance(m, torch.nn.Linear))
        row = {"method": name, "ppl": res.ppl, "bits_per_weight": report["bits_per_weight"],
               "quantize_s": round(quant_s, 1), "eval_s": round(res.seconds, 1),
               "linear_bytes": int(round(n * report["bits_per_weight"] / 8)),
               "disk_bytes": disk_bytes(model) if name.startswith("fdb") else None,
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               **{k: report.get(k) for k in ("init", "orientation")}}
        rows.append(row)
        rows.sort(key=lambda r: list(ROWS).index(r["method"]))
        print(row, flush=True)
        calib_text = calib_note(args) + " (GPTQ and FDB-from-GPTQ rows)"
        write_results(args.out, rows, eval_settings(base, args, group_size=GROUP, calib=calib_text, bytes_rule=(
            "linear_bytes = decoder linear weights x bits_per_weight / 8 (codes + per-group scales/zeros; "
            "embeddings and lm_head not counted); disk_bytes = size of the packed FDB checkpoint on disk "
            "(bit-planes + fp16 scales + header)")))
        del model


if __name__ == "__main__":
    main()
