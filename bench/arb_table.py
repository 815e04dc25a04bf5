"""ARB-LLM family table (1-bit PTQ baselines, method.md §4): WikiText-2 test PPL of the embedded model for the
BiLLM-style baseline, ARB, ARB-X and ARB-RC, each without and with CGB, with bits per weight (bitmaps and fp16
scales included, ``dbllm_lab.arb.BITS_RULE``) and wall time. Writes bench/results/arb_table.json (+ .md);
resumable row by row.

    python bench/arb_table.py --data-dir ../shared/data [--windows 40] [--only arb arb-x+cgb] [--calib FILE]

Calibration (block-by-block Hessians) uses text written by the FP model itself (method.md §3,
``datafree.generate_samples``: random start token, 4 greedy tokens, then sampled; seed 0), or ``--calib FILE``
(random windows of a text file; never the evaluated split). It is never the WikiText-2 test split.
"""
import argparse
import copy
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (add_calib_args, add_eval_args, calib_note, calib_windows, eval_settings, load_results,  # noqa: E402
                    write_results)

from dbllm_lab.arb import BITS_RULE, VARIANTS  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.quantize import quantize_model  # noqa: E402
from dbllm_lab.ppl import eval_windows, perplexity  # noqa: E402

# row name -> (variant, cgb); "fp" = the unquantized model
ROWS = {"fp": None, **{v + ("+cgb" if cgb else ""): (v, cgb) for v in VARIANTS for cgb in (False, True)}}
RUN_ORDER = [v for v in VARIANTS] + [v + "+cgb" for v in VARIANTS] + ["fp"]  # most informative rows first


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_eval_args(ap, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "arb_table.json"))
    ap.add_argument("--only", nargs="+", choices=list(ROWS), default=RUN_ORDER)
    add_calib_args(ap)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--redo", action="store_true", help="recompute rows already in the output file")
    args = ap.parse_args()
    base, tok = load_model(args.model)
    windows = eval_windows(base, tok, "wikitext2", "test", args.seqlen, args.windows or None, args.data_dir)
    calib = calib_windows(base, tok, args)
    settings = eval_settings(base, args, calib=calib_note(args), iters=args.iters, blocksize=128, percdamp=0.01,
                             bits_rule=BITS_RULE, seconds_note="quantize_s includes the block-by-block calibration "
                             "forward passes; wall time on the machine below, under a shared lock")
    rows = [r for r in load_results(args.out) if not (args.redo and r["method"] in args.only)]
    done = {r["method"] for r in rows}
    for name in args.only:
        if name in done:
            print(f"{name}: already in {args.out}, skipped", flush=True)
            continue
        model = copy.deepcopy(base)
        t0 = time.time()
        report = {"bits_per_weight": 16.0}
        if ROWS[name] is not None:
            variant, cgb = ROWS[name]
            iters = {} if variant == "billm" else {"iters": args.iters}  # BiLLM has no refinement iterations
            report = quantize_model(model, variant, calib_windows=calib, cgb=cgb, **iters)
        quant_s = time.time() - t0
        res = perplexity(model, tok, seqlen=args.seqlen, windows=windows)
        row = {"method": name, "variant": ROWS[name] and ROWS[name][0], "cgb": ROWS[name] and ROWS[name][1],
               "ppl": res.ppl, "bits_per_weight": report["bits_per_weight"],
               **{k: report.get(k) for k in ("sign_bits_per_weight", "bitmap_bits_per_weight",
                                             "scale_bits_per_weight")},
               "quantize_s": round(quant_s, 1), "eval_s": round(res.seconds, 1),
               "total_s": round(time.time() - t0, 1),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "note": "FP = GGUF Q4_1 dequantized to float, held in fp32" if name == "fp" else ""}
        rows.append(row)
        rows.sort(key=lambda r: list(ROWS).index(r["method"]))
        print(row, flush=True)
        write_results(args.out, rows, settings)
        del model


if __name__ == "__main__":
    main()
