"""Perplexity of the calibrated baselines (GPTQ W2g64, ARB-RC+CGB, ARB-X+CGB) against the number of calibration tokens.

    python bench/calib_tokens.py                 # 4k, 16k and 64k teacher-written tokens; resumable
    python bench/calib_tokens.py --plot          # only redraw figures/calib_tokens.png from the JSON

Each point is one run of the table script that owns the method (``bench/ptq.py --only gptq-w2``,
``bench/arb_table.py --only arb-rc+cgb arb-x+cgb``) with ``--calib-samples N --calib-seqlen L``, written to
``bench/results/calib_tokens/<script>_<tokens>.json``; this script gathers them into
``bench/results/calib_tokens.json`` and draws ``figures/calib_tokens.png`` (+ CSV). Calibration text is written
by the FP model (``datafree.generate_samples``), never the evaluated split. GPTQ's Hessian from 4k tokens
overfits: on held-out text its error can be worse than RTN's; the ARB papers calibrate on far more.
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import load_results, write_results  # noqa: E402

# (samples, seqlen): 4,096 / 16,384 / 65,536 tokens
POINTS = ((16, 256), (64, 256), (128, 512))
SCRIPTS = {"ptq": ["gptq-w2"], "arb_table": ["arb-rc+cgb", "arb-x+cgb"]}


def run_points(a):
    os.makedirs(os.path.join(ROOT, "bench", "results", "calib_tokens"), exist_ok=True)
    for n, L in POINTS:
        for script, methods in SCRIPTS.items():
            out = os.path.join(ROOT, "bench", "results", "calib_tokens", f"{script}_{n * L}.json")
            done = {r["method"] for r in load_results(out)} if os.path.isfile(out) else set()
            if set(methods) <= done:
                continue
            cmd = [sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--only", *methods,
                   "--calib-samples", str(n), "--calib-seqlen", str(L), "--windows", str(a.windows), "--out", out]
            if a.data_dir:
                cmd += ["--data-dir", a.data_dir]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def gather(out):
    rows = []
    for n, L in POINTS:
        for script, methods in SCRIPTS.items():
            path = os.path.join(ROOT, "bench", "results", "calib_tokens", f"{script}_{n * L}.json")
            if not os.path.isfile(path):
                continue
            for r in load_results(path):
                if r["method"] in methods:
                    rows.append({"method": r["method"], "calib_tokens": n * L, "calib_samples": n, "calib_seqlen": L,
                                 "ppl": r["ppl"], "bits_per_weight": r.get("bits_per_weight"),
                                 "quantize_s": r.get("quantize_s")})
    write_results(out, rows, {"points": [f"{n} x {L}" for n, L in POINTS], "scripts": SCRIPTS,
                              "calib": "teacher-written text (datafree.generate_samples, seed 0)"},
                  columns=["method", "calib_tokens", "ppl", "bits_per_weight", "quantize_s"])
    return rows


def plot(rows, fig_dir=os.path.join(ROOT, "figures")):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    df = pd.DataFrame(rows)
    os.makedirs(fig_dir, exist_ok=True)
    df.to_csv(os.path.join(fig_dir, "calib_tokens.csv"), index=False)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for m, sub in df.groupby("method"):
        sub = sub.sort_values("calib_tokens")
        ax.plot(sub.calib_tokens, sub.ppl, "o-", label=m)
    ax.set_xscale("log", base=2); ax.set_yscale("log")
    ax.set_xlabel("calibration tokens (teacher-written)"); ax.set_ylabel("WikiText-2 PPL (first windows)")
    ax.set_title("Calibrated baselines vs calibration tokens", fontsize=10); ax.legend(fontsize=8)
    fig.tight_layout(); fig.savefig(os.path.join(fig_dir, "calib_tokens.png"), dpi=110)
    print(f"wrote {os.path.join(fig_dir, 'calib_tokens.png')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "calib_tokens.json"))
    a = ap.parse_args()
    if not a.plot:
        run_points(a)
    plot(gather(a.out))


if __name__ == "__main__":
    main()
