"""DB-LLM results table: FP, RTN W2g64, FDB init, and FDB trained with CE / KD / DAD (gamma 0, 0.5, 1).

Every trained row starts from the same FDB initialisation, sees the same teacher-generated data
(``generate_samples``, never the evaluation text) in the same order (same seed) for the same number of
optimiser steps. Each row records WikiText-2 test PPL (first ``--windows`` windows of ``--seqlen``), the
head-class bias statistic (method.md §7) on the first ``--bias-windows`` windows, training wall and CPU
minutes, and the process's peak RSS. Rows already in the JSON are skipped (resumable); a trained row that
was interrupted resumes from its checkpoint under checkpoints/dbllm_table/.

    flock /tmp/bench.lock python bench/dbllm_table.py                  # the table
    flock /tmp/bench.lock python bench/dbllm_table.py --explore        # recipe exploration (small budget)
"""
import argparse
import copy
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import add_eval_args, eval_settings, load_results, write_results  # noqa: E402
from dbllm_lab.bias import entropy_edges, head_class_bias, head_tokens, teacher_entropies  # noqa: E402
from dbllm_lab.datafree import generate_samples  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.modules import quantize_model  # noqa: E402
from dbllm_lab.ppl import eval_windows, perplexity  # noqa: E402
from dbllm_lab.train import TrainConfig, build_student, freeze_fdb, peak_rss_gib, train, write_curve  # noqa: E402

TRAINED = [("fdb+ce", "ce", 1.0), ("fdb+kd", "kd", 1.0), ("fdb+dad g=0", "dad", 0.0),
           ("fdb+dad g=0.5", "dad", 0.5), ("fdb+dad g=1", "dad", 1.0)]


def parse_args(argv=None):
    ap = add_eval_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), "bench/results/dbllm_table.json")
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps of every trained row")
    ap.add_argument("--train-seqlen", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak lr of the FDB scales (chosen by --explore)")
    ap.add_argument("--lr-latent", type=float, default=1e-5)
    ap.add_argument("--train-latent", type=int, default=0, help="1: also train the latent weights (STE)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--init", default="clip", help="FDB init: clip (chosen by --explore), gptq (on generated data), minmax")
    ap.add_argument("--calib-windows", type=int, default=16, help="generated windows for init=gptq")
    ap.add_argument("--gen-n", type=int, default=64, help="teacher-generated samples")
    ap.add_argument("--gen-len", type=int, default=256, help="tokens per generated sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bias-windows", type=int, default=6)
    ap.add_argument("--head-k", type=int, default=100)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--explore", action="store_true", help="recipe exploration instead of the table")
    ap.add_argument("--recipes", default="1e-4,1e-3,1e-4/1e-5",
                    help="--explore: comma-separated 'lr' (scales only) or 'lr/lr_latent' (scales + latent weights)")
    ap.add_argument("--ckpt-dir", default="checkpoints/dbllm_table")
    ap.add_argument("--memory-probe", action="store_true",
                    help="print the peak RSS of teacher + student + optimizer for 2 steps at --seqlen, batch 1, "
                         "latent weights trained (the largest optimizer state), then exit")
    return ap.parse_args(argv)


class Context:
    """Everything the rows share: teacher, data, evaluation windows, head tokens, teacher entropies."""

    def __init__(self, args):
        self.args = args
        self.teacher, self.tok = load_model(args.model)
        self.data = generate_samples(self.teacher, self.tok, args.gen_n, args.gen_len, seed=args.seed, batch_size=64)
        self.eval = eval_windows(self.teacher, self.tok, "wikitext2", "test", args.seqlen, args.windows or None,
                                 args.data_dir)
        self.bias_windows = self.eval[:args.bias_windows]
        self.head = head_tokens(self.eval, args.head_k, self.teacher.config.vocab_size)
        self.ent = teacher_entropies(self.teacher, self.bias_windows)
        self.edges = entropy_edges(self.ent, args.buckets)
        self._student = None
        self.init_seconds = None

    def student_init(self):
        """The FDB initialisation every trained row starts from (cached on disk under --ckpt-dir)."""
        a = self.args
        if self._student is None:
            key = hashlib.sha1(json.dumps([a.model, a.init, a.calib_windows, a.gen_n, a.gen_len, a.seed,
                                           a.train_seqlen]).encode()).hexdigest()[:10]
            path = os.path.join(a.ckpt_dir, f"init_{a.init}_{key}.pt")
            calib = self.data.reshape(-1, a.train_seqlen)[:a.calib_windows] if a.init == "gptq" else None
            t0 = time.time()
            if os.path.isfile(path):  # rebuild the modules cheaply (minmax), then load the cached scales
                student, report = build_student(self.teacher, init="minmax")
                ck = torch.load(path, weights_only=False)
                student.load_state_dict(ck["state"])
                report = ck["report"]
            else:
                student, report = build_student(self.teacher, init=a.init, calib_windows=calib)
                os.makedirs(a.ckpt_dir, exist_ok=True)
                torch.save({"state": student.state_dict(), "report": report}, path + ".tmp")
                os.replace(path + ".tmp", path)
            self.init_seconds = report.get("seconds", time.time() - t0)
            self._student = (student, report)
        return self._student

    def measure(self, model, fp_bias=None):
        """PPL on the evaluation windows and the head-class bias statistic."""
        a = self.args
        res = perplexity(model, self.tok, windows=self.eval, seqlen=a.seqlen)
        hb = head_class_bias(model, self.bias_windows, self.head, self.ent, self.edges)
        row = {"ppl": res.ppl, "eval_seconds": round(res.seconds, 1), "head_share_all": hb["overall"],
               "head_share_high": hb["buckets"][-1]["head_share"], "head_share_low": hb["buckets"][0]["head_share"],
               "bias_buckets": hb["buckets"]}
        if fp_bias is not None:
            row["head_excess_high"] = row["head_share_high"] - fp_bias["head_share_high"]
            row["head_excess_all"] = row["head_share_all"] - fp_bias["head_share_all"]
        return row


def train_row(ctx, name, cfg, curves):
    a = ctx.args
    student = copy.deepcopy(ctx.student_init()[0])
    out_dir = os.path.join(a.ckpt_dir, name.replace(" ", "_").replace("=", ""))
    r = train(student, ctx.data, teacher=ctx.teacher, config=cfg, out_dir=out_dir)
    curves[name] = r["history"]
    freeze_fdb(student)
    return student, {"train_steps": r["steps_done"], "train_tokens": r["history"][-1]["tokens"],
                     "train_minutes": round(r["seconds"] / 60, 2), "train_cpu_minutes": round(r["cpu_seconds"] / 60, 2),
                     "final_loss": r["history"][-1]["loss"], "peak_rss_gib": round(r["peak_rss_gib"], 2)}


def config(a, loss, gamma, **kw):
    base = dict(loss=loss, gamma=gamma, steps=a.steps, seqlen=a.train_seqlen, batch_size=a.batch_size,
                grad_accum=a.grad_accum, lr=a.lr, lr_latent=a.lr_latent, train_latent=bool(a.train_latent),
                warmup=a.warmup, seed=a.seed, ckpt_every=5, log_every=1)
    base.update(kw)
    return TrainConfig(**base).validate()


def run_table(ctx, out):
    a = ctx.args
    rows = load_results(out)
    done = {r["method"] for r in rows}
    only = set(a.only.split(",")) if a.only else None
    curves_path = os.path.splitext(out)[0] + "_curves"
    curves = json.load(open(curves_path + ".json")) if os.path.isfile(curves_path + ".json") else {}
    fp = next((r for r in rows if r["method"] == "fp"), None)
    settings = eval_settings(ctx.teacher, a, bias={"windows": a.bias_windows, "head_k": a.head_k,
                                                  "buckets": a.buckets, "edges_nats": ctx.edges,
                                                  "head_reference": "token frequencies of the evaluated windows"},
                             train={**{k: getattr(a, k) for k in ("steps", "train_seqlen", "batch_size", "grad_accum",
                                                                  "lr", "lr_latent", "train_latent", "warmup", "init",
                                                                  "calib_windows", "gen_n", "gen_len", "seed")},
                                    "data": "teacher-generated (method.md §3), dbllm_lab.datafree.generate_samples",
                                    "threads": torch.get_num_threads(),
                                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
                             budget_note="Every trained row gets the same step budget (a few CPU minutes on a shared "
                                         "2-core machine); the issue's target is 60 CPU minutes of training. "
                                         "Numbers are what this budget reaches, not the method's ceiling.")

    mem_path = os.path.splitext(out)[0] + "_memory.json"
    if not os.path.isfile(mem_path):
        mem = run_memory_probe(a)
        with open(mem_path, "w") as f:
            json.dump(mem, f, indent=2)
    settings["memory_probe"] = json.load(open(mem_path))

    def emit(row):
        rows.append(row)
        write_results(out, rows, settings)
        curves_rows = [{"method": m, **h} for m, hs in curves.items() for h in hs]
        write_curve(curves_rows, os.path.dirname(out) or ".", os.path.basename(curves_path))

    def want(name):
        return name not in done and (only is None or name in only)

    if fp is None:
        fp = {"method": "fp", "bits_per_weight": 16.0, **ctx.measure(ctx.teacher)}
        emit(fp)
    if want("rtn w2g64"):
        m = copy.deepcopy(ctx.teacher)
        rep = quantize_model(m, "rtn", bits=2, group_size=64)
        emit({"method": "rtn w2g64", "bits_per_weight": rep["bits_per_weight"], **ctx.measure(m, fp)})
        del m
    if want("fdb init"):
        student, rep = ctx.student_init()
        m = freeze_fdb(copy.deepcopy(student))
        emit({"method": "fdb init", "init": a.init, "bits_per_weight": rep["bits_per_weight"],
              "init_seconds": round(ctx.init_seconds, 1), **ctx.measure(m, fp)})
        del m
    for name, loss, gamma in TRAINED:
        if not want(name):
            continue
        student, info = train_row(ctx, name, config(a, loss, gamma), curves)
        emit({"method": name, "loss": loss, "gamma": gamma if loss == "dad" else None, "init": a.init,
              "bits_per_weight": ctx.student_init()[1]["bits_per_weight"], **info, **ctx.measure(student, fp)})
    return rows


def run_explore(ctx, out):
    """Small-budget comparison of recipes (init, what trains, lr), DAD gamma=1, fewer eval windows."""
    a = ctx.args
    rows = load_results(out)
    done = {r["method"] for r in rows}
    settings = eval_settings(ctx.teacher, a, purpose="recipe exploration for bench/dbllm_table.py",
                             steps=a.steps, train_seqlen=a.train_seqlen, batch_size=a.batch_size)
    recipes = []
    for spec in a.recipes.split(","):  # "lr" or "lr/lr_latent" (latent weights trained)
        lr, _, lr_lat = spec.partition("/")
        kw = dict(lr=float(lr), train_latent=bool(lr_lat), **({"lr_latent": float(lr_lat)} if lr_lat else {}))
        recipes.append((f"{a.init} {'scales+latent' if lr_lat else 'scales'} lr{spec}", kw))
    if f"{a.init} init" not in done:
        student, rep = ctx.student_init()
        rows.append({"method": f"{a.init} init", "init": a.init, "init_seconds": round(ctx.init_seconds, 1),
                     **ctx.measure(freeze_fdb(copy.deepcopy(student)))})
        write_results(out, rows, settings)
    curves = {}
    for name, kw in recipes:
        if name in done:
            continue
        cfg = config(a, "dad", 1.0, **kw)
        student, info = train_row(ctx, "explore " + name, cfg, curves)
        rows.append({"method": name, "init": a.init, **kw, **info, **ctx.measure(student)})
        write_results(out, rows, settings)
        write_curve([{"method": m, **h} for m, hs in curves.items() for h in hs], os.path.dirname(out),
                    os.path.basename(os.path.splitext(out)[0]) + "_curves_" + str(len(rows)))
    return rows


def memory_probe(a):
    """Peak RSS of a fresh process holding teacher + FDB student + AdamW state while training at --seqlen."""
    teacher, tok = load_model(a.model)
    data = generate_samples(teacher, tok, a.gen_n, a.gen_len, seed=a.seed, batch_size=64)
    data = data.reshape(-1, a.seqlen) if data.shape[1] < a.seqlen else data
    student, _ = build_student(teacher, init="minmax", progress=False)
    cfg = TrainConfig(loss="dad", gamma=1.0, steps=2, seqlen=a.seqlen, batch_size=1, train_latent=True, warmup=1)
    r = train(student, data, teacher=teacher, config=cfg, progress=False)
    print(json.dumps({"peak_rss_gib": round(r["peak_rss_gib"], 3), "seqlen": a.seqlen, "batch_size": 1,
                      "train_latent": True, "step_seconds": [h["seconds"] for h in r["history"]]}))


def run_memory_probe(a):
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", "--seqlen", str(a.seqlen), "--gen-n",
           str(a.gen_n), "--gen-len", str(a.gen_len), "--seed", str(a.seed)] + (["--model", a.model] if a.model else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (out.stderr or out.stdout)[-500:]}


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.memory_probe:
        return memory_probe(a)
    t0 = time.time()
    ctx = Context(a)
    out = a.out if not a.explore else os.path.splitext(a.out)[0] + "_explore.json"
    rows = run_explore(ctx, out) if a.explore else run_table(ctx, out)
    print(f"done in {(time.time() - t0) / 60:.1f} min, peak RSS {peak_rss_gib():.2f} GiB")
    for r in rows:
        print({k: r.get(k) for k in ("method", "ppl", "head_share_high", "head_excess_high", "train_minutes")})


if __name__ == "__main__":
    main()
