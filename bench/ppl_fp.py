"""Full-precision reference: WikiText-2 test perplexity of a model at seqlen 512 and 2048 (GPTQ protocol,
full split unless --max-windows), with tokens/s and peak RSS. Writes bench/results/ppl_fp.json (+ .md).

    python bench/ppl_fp.py --data-dir ../shared/data [--seqlens 512 2048] [--max-windows N]
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_results, write_results  # noqa: E402

from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.ppl import perplexity  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--max-windows", type=int, default=None, help="default: the full test split")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ppl_fp.json"))
    args = ap.parse_args()
    model, tok = load_model(args.model)
    rows = [r for r in load_results(args.out) if r.get("windows_requested") == args.max_windows]
    for seqlen in args.seqlens:
        if any(r["seqlen"] == seqlen for r in rows):
            print(f"seqlen {seqlen}: already in {args.out}, skipped")
            continue
        t0 = time.time()
        res = perplexity(model, tok, seqlen=seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                         data_dir=args.data_dir)
        sec = time.time() - t0
        rows.append({"method": "fp", "seqlen": seqlen, "ppl": res.ppl, "nll": res.nll, "windows": res.windows,
                     "tokens": res.tokens, "bits_per_weight": 32, "seconds": sec,
                     "tokens_per_s": res.windows * seqlen / sec,
                     "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                     "windows_requested": args.max_windows})
        print(res, flush=True)
        settings = {"model": model.name_or_path, "dataset": "wikitext2", "split": "test", "seqlen": sorted(r["seqlen"] for r in rows),
                    "windows": "full split" if args.max_windows is None else args.max_windows,
                    "batch_size": args.batch_size, "dtype": "float32", "torch_threads": torch.get_num_threads(),
                    "note": res.note}
        write_results(args.out, rows, settings)  # after every seqlen: a killed run keeps what it measured


if __name__ == "__main__":
    main()
