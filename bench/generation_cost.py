"""Cost of the teacher-written training text (method.md §3): one set of samples, timed side by side.

Three loops generate the same kind of text from the same pre-drawn start tokens and uniforms:

- ``library``: ``dbllm_lab.datafree`` (KV cache written in place, inverse-CDF sampling over chunk sums), the path
  every recipe uses;
- ``library-bf16``: the same loop on a bf16 copy of the teacher (``precision="bf16"``, the copy's cost included);
- ``concat-cache``: the textbook loop the library replaced (transformers' default cache, which concatenates at every
  step, and a softmax and cumsum over the whole vocabulary per token), batches of 64.

All run on one thread in this process, one after the other, and the load average is sampled during the run.
Each path's text is then scored by the fp32 teacher (``teacher_nll``: its mean NLL per sampled token on the first
``--nll-samples`` samples, with the standard error over samples): text drawn from the teacher's own distribution
scores about its entropy, so a precision that distorted the sampling would show as a different NLL.
Writes bench/results/dbllm_generation.json (+ .md): each row names its CPU (``machine``, also in its method), a run
replaces only the rows of its own CPU, and rows measured before this script stay as data.

    python bench/generation_cost.py [--samples 128] [--tokens 512] [--paths library library-bf16 concat-cache]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import load_results, write_results  # noqa: E402
from dbllm_lab.cpu_kernel import cpu_name, cpu_signature  # noqa: E402
from dbllm_lab.datafree import GREEDY_TOKENS, TEMPERATURE, _generate_batch, cache_keyword, generation_model  # noqa: E402
from dbllm_lab.model import load_model  # noqa: E402
from dbllm_lab.timing import LoadSampler  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "dbllm_generation.json")


@torch.no_grad()
def concat_cache_batch(model, start, uniforms, greedy_tokens, temperature):
    """The replaced loop: default (concatenating) cache, full-vocabulary softmax and cumsum per sampled token."""
    out, past, cur, key = [start[:, None]], None, start[:, None], cache_keyword(model)
    for j in range(uniforms.shape[1]):
        res = model(input_ids=cur, use_cache=True, **{key: past})
        past, logits = res[key], res.logits[:, -1].float()
        if j < greedy_tokens:
            nxt = logits.argmax(-1)
        else:
            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
            u = uniforms[:, j:j + 1].to(cdf) * cdf[:, -1:]
            nxt = torch.searchsorted(cdf, u).squeeze(1).clamp_max(logits.shape[-1] - 1)
        cur = nxt[:, None]
        out.append(cur)
    return torch.cat(out, 1)


PATHS = {"library": (_generate_batch, 128, "fp32"), "library-bf16": (_generate_batch, 128, "bf16"),
         "concat-cache": (concat_cache_batch, 64, "fp32")}  # name: (loop, batch size, precision)


@torch.no_grad()
def teacher_nll(model, samples, greedy_tokens, batch=8):
    """The fp32 teacher's NLL per sampled token (positions after the greedy ones), mean over samples, and the
    standard error of that mean over samples."""
    per_sample = []
    for i in range(0, samples.shape[0], batch):
        x = samples[i:i + batch]
        logp = torch.log_softmax(model(input_ids=x[:, :-1]).logits.float(), -1)
        nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)[:, greedy_tokens:]
        per_sample += nll.mean(1).tolist()
    v = torch.tensor(per_sample, dtype=torch.float64)
    return round(v.mean().item(), 4), round((v.std() / len(v) ** 0.5).item(), 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="one set of the recipes' text (set_size)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--nll-samples", type=int, default=32, help="samples per path the teacher scores (teacher_nll)")
    a = ap.parse_args()
    if a.samples < 1 or a.tokens <= GREEDY_TOKENS + 1:
        raise SystemExit(f"--samples {a.samples} / --tokens {a.tokens}: need samples >= 1 and tokens > "
                         f"{GREEDY_TOKENS + 1} (the greedy tokens and at least one sampled one)")
    if not 1 <= a.nll_samples <= a.samples:
        raise SystemExit(f"--nll-samples {a.nll_samples}: must be in [1, --samples={a.samples}]")
    torch.set_num_threads(1)
    model, tok = load_model(None)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, min(model.config.vocab_size, len(tok)), (a.samples,), generator=g)
    uniforms = torch.rand(a.samples, a.tokens - 1, generator=g, dtype=torch.float64)
    machine = cpu_signature()
    rows = [r for r in load_results(OUT) if not r.get("path") or r["machine"] != machine]  # other CPUs' rows stay
    new, measured = [], {}
    with LoadSampler(every=10.0) as load:
        for name in a.paths:
            fn, batch, precision = PATHS[name]
            t0, c0 = time.time(), time.process_time()
            writer = generation_model(model, precision)
            measured[name] = torch.cat([fn(writer, start[i:i + batch], uniforms[i:i + batch], GREEDY_TOKENS,
                                           TEMPERATURE) for i in range(0, a.samples, batch)])
            cpu = time.process_time() - c0
            del writer
            new.append({"method": f"{name} {a.samples} x {a.tokens} ({cpu_name(machine)})", "path": name,
                        "machine": machine, "precision": precision,
                        "samples": a.samples, "tokens_per_sample": a.tokens, "batch_size": batch,
                        "seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu, 1),
                        "cpu_minutes_per_1k_samples": round(cpu / 60 * 1000 / a.samples, 1), "threads": 1})
            print(new[-1], flush=True)
    s = load.summary()["loadavg_1min"]
    for r in new:
        x = measured[r["path"]]
        r["teacher_nll"], r["teacher_nll_se"] = teacher_nll(model, x[:a.nll_samples], GREEDY_TOKENS)
        for ref_name in ("concat-cache", "library"):
            if ref_name in measured and ref_name != r["path"]:
                ref = next(q for q in new if q["path"] == ref_name)
                r[f"speedup_vs_{ref_name.replace('-', '_')}"] = round(ref["cpu_seconds"] / r["cpu_seconds"], 2)
                same = (x == measured[ref_name]).all(1).float().mean().item()
                r[f"samples_identical_to_{ref_name.replace('-', '_')}"] = round(same, 3)
        r.update(load_average_mean=s["mean"], load_average_max=round(s["max"], 2))
    write_results(OUT, rows + new, {"model": model.name_or_path, "note": (
        "one set of samples per path from the same start tokens and uniforms, 1 thread, side by side (load "
        "sampled during generation only; teacher_nll is scored after it); "
        "rows without 'path' were measured earlier with the concatenating loop (batch 64) on another machine. "
        "Samples differ between paths only where float rounding moves a sampled token across a CDF boundary")})


if __name__ == "__main__":
    main()
