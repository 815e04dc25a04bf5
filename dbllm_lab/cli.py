"""``dbllm-lab`` command line: one function per subcommand.

    dbllm-lab eval-ppl --model smollm2-135m --dataset wikitext2 --seqlen 512 [--max-windows N] [--json out.json]
    dbllm-lab quantize --method fdb --group-size 64 --init clip --out ckpt/ [--eval]
    dbllm-lab eval-ppl --checkpoint ckpt/ ...
    dbllm-lab convert OLD_CKPT NEW_FOLDER                            # format_version 1 -> a transformers model folder
    dbllm-lab generate-data --n 64 --gen-len 256 --seed 0            # teacher-written text (method.md §3)
    dbllm-lab recipes                                                # the named training recipes
    dbllm-lab train --recipe best --save build/models/best [--seed S] [--eval]   # text, stage 1 [, stage 2]
    dbllm-lab eval-zeroshot --tasks piqa,arc_easy --limit 100 [--checkpoint ckpt/] [--out zs.json]  # lm-eval
    dbllm-lab generate --checkpoint ckpt/ --prompt "The capital of France is" --max-new-tokens 64 [--backend cpu] \
        [--engine lean [--lm-head int8]]                              # lean: dbllm_lab.decode, same tokens
"""
import argparse
import sys

from .data import DATASETS
from .quantize import METHODS


def _model(args):
    if getattr(args, "checkpoint", None):
        from .checkpoint import load_quantized
        from .model import resolve_dtype
        dtype = resolve_dtype(args.dtype)  # before loading: a bad value fails first
        # --dtype casts all but the packed tensors (PackedDualBinaryLinear keeps its planes and scales)
        model = load_quantized(args.checkpoint, base_model=args.model).to(dtype)
        if model.quant_header.get("tokenizer") and args.model is None:  # the folder carries its tokenizer
            from transformers import AutoTokenizer
            return model, AutoTokenizer.from_pretrained(args.checkpoint)
        from .model import load_model
        _, tok = load_model(model.quant_header["base_model"] if args.model is None else args.model)
        return model, tok
    from .model import load_model
    return load_model(args.model, dtype=args.dtype)


def cmd_eval_ppl(args):
    import os
    from .ppl import perplexity
    if args.dataset not in DATASETS and not os.path.isfile(args.dataset):
        raise ValueError(f"dataset={args.dataset!r} is neither one of {DATASETS} nor an existing text file")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, tok = _model(args)
    if args.backend:
        if not args.checkpoint:
            raise ValueError("--backend applies to a packed model: pass --checkpoint")
        from .generate import set_backend
        set_backend(model, args.backend)
    res = perplexity(model, tok, dataset=args.dataset, split=args.split, seqlen=args.seqlen,
                     max_windows=args.max_windows, batch_size=args.batch_size, data_dir=args.data_dir)
    print(res)
    if args.json:
        res.to_json(args.json)
    return res


def cmd_quantize(args):
    import json
    from .model import load_model
    from .quantize import check_args, quantize_model
    # only what the user gave: a method refuses options it would ignore; unset ones take the method's default
    opts = {k: getattr(args, k) for k in ("init", "orientation") if getattr(args, k) is not None}
    if args.cgb:
        opts["cgb"] = True
    method, _, _, full = check_args(args.method, args.bits, args.group_size, packed=bool(args.out), **opts)
    needs_calib = method.needs_calib(full)
    if needs_calib and not args.calib_data:
        raise ValueError(f"method {args.method!r} needs calibration text: pass --calib-data FILE (never the "
                         f"split you evaluate on)")
    model, tok = load_model(args.model, dtype=args.dtype)
    calib = None
    if needs_calib:
        from .ppl import eval_windows
        calib = eval_windows(model, tok, args.calib_data, seqlen=args.calib_seqlen, max_windows=args.calib_windows)
    report = quantize_model(model, args.method, bits=args.bits, group_size=args.group_size, calib_windows=calib,
                            packed=bool(args.out), **opts)
    print(json.dumps(report, indent=2))
    if args.out:
        from .checkpoint import save_quantized
        recipe = {"name": "dbllm-lab quantize", "calib_data": args.calib_data,
                  **{k: v for k, v in report.items() if k in ("method", "group_size", "init", "orientation")}}
        save_quantized(model, args.out, base_model=args.model, recipe=recipe, tokenizer=tok)
        print(f"saved packed model folder to {args.out}")
    if args.eval:
        from .ppl import perplexity
        res = perplexity(model, tok, seqlen=args.seqlen, max_windows=args.max_windows, data_dir=args.data_dir)
        print(res)
        if args.out:
            from .checkpoint import record_perplexity
            record_perplexity(args.out, res, "dbllm-lab " + " ".join(sys.argv[1:]))
    return report


def cmd_convert(args):
    """A format_version 1 checkpoint folder rewritten as a transformers model folder (checkpoint.convert)."""
    from .checkpoint import convert
    header = convert(args.old, args.new, base_model=args.model)
    print(f"wrote {args.new}: {len(header['layers'])} packed layers, model card {args.new}/README.md")
    return header


def cmd_generate_data(args):
    from .datafree import teacher_text
    from .model import load_model
    model, tok = load_model(args.model, dtype=args.dtype)
    data = teacher_text(model, tok, args.n, args.gen_len, seed=args.seed, set_size=args.set_size,
                        cache_dir=args.cache_dir, precision=args.precision)
    print(f"{tuple(data.shape)} teacher-generated tokens cached under {args.cache_dir}")
    return data


# `dbllm-lab train` flags that set a recipe field: {flag dest: (recipe section, field)}; "" is the top level
BW_FLAGS = ("epochs", "batch_size", "lr", "lr_latent", "train_latent", "loss", "inputs", "stats_samples",
            "train_norms", "lr_norm", "seqlen", "window_offset", "min_lr_ratio", "precision")
E2E_FLAGS = ("loss", "gamma", "steps", "seqlen", "batch_size", "grad_accum", "lr", "lr_latent", "train_latent",
             "train_norms", "lr_norm", "precision", "warmup", "ckpt_every")
TRAIN_FLAGS = {"quant": ("", "quant"), "stage": ("", "stage"), "init": ("", "init"), "n": ("text", "samples"),
               "gen_len": ("text", "tokens"), "text_precision": ("text", "precision"),
               **{f"bw_{f}": ("blockwise", f) for f in BW_FLAGS},
               **{("train_seqlen" if f == "seqlen" else f): ("e2e", f) for f in E2E_FLAGS}}


def train_recipe_of(args):
    """The recipe ``dbllm-lab train`` runs: ``--recipe``'s, with every flag the user gave in its place."""
    from .recipes import recipe
    r = recipe(args.recipe)
    for dest, (section, key) in TRAIN_FLAGS.items():
        v = getattr(args, dest)
        if v is not None:
            (r[section] if section else r)[key] = v
    for key in ("n", "e2e_n"):
        v = getattr(args, key)
        if v is not None and (isinstance(v, bool) or v <= 0):
            raise ValueError(f"--{key.replace('_', '-')} {v!r} must be a positive number of training samples")
    return r


def cmd_train(args):
    """A W2 student (FDB or the uniform grid) trained against the FP teacher by a named recipe, data generation
    included: block-wise reconstruction and/or end-to-end DAD / KD / CE. Resumable from --out-dir."""
    import hashlib
    import json
    import os

    import torch
    from .run_recipe import configs, run_path, train_recipe
    from .train import freeze_quantized
    r = train_recipe_of(args)
    configs(r, args.seed)  # bad values fail before the model loads
    if args.save and r["quant"] != "fdb":
        raise ValueError(f"--save stores FDB students only (the packed dual-bit-plane format); quant={r['quant']!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .recipes import recipe
    custom = "" if r == recipe(args.recipe) else "-custom-" + hashlib.sha256(
        json.dumps(r, sort_keys=True).encode()).hexdigest()[:8]  # flags changed it: another run folder
    out_dir = args.out_dir or run_path(args.recipe + custom, args.seed)
    from .model import load_model
    teacher, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    student, info = train_recipe(teacher, tok, r, seed=args.seed, out_dir=out_dir, device=args.device,
                                 cache_dir=args.cache_dir, group_size=args.group_size, e2e_samples=args.e2e_n)
    summary = {"recipe": args.recipe, "seed": args.seed, "settings": r, "threads": torch.get_num_threads(),
               "out_dir": out_dir, **{k: v for k, v in info.items() if k not in ("stage1_blocks", "stage2_curve")}}
    if args.save:
        from .checkpoint import save_quantized
        save_quantized(student, args.save, tokenizer=tok,
                       recipe={"name": args.recipe, "seed": args.seed, **r, "cpu_minutes": info["total_cpu_minutes"]})
        summary["packed_checkpoint"] = args.save
    if args.eval:
        from .ppl import perplexity
        res = perplexity(freeze_quantized(student), tok, seqlen=args.seqlen, max_windows=args.max_windows,
                         data_dir=args.data_dir)
        summary.update(ppl=res.ppl, ppl_dev=res.ppl_dev, ppl_heldout=res.ppl_heldout, eval_windows=res.windows)
        if args.save:
            from .checkpoint import record_perplexity
            record_perplexity(args.save, res, "dbllm-lab " + " ".join(sys.argv[1:]))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=2))
    print(f"CPU-minutes: generation {info['generation_cpu_minutes']}"
          f"{' (cached text: the cost recorded when it was written)' if info['text_from_cache'] else ''}, "
          f"init {info['init_cpu_minutes']}, "
          f"stage 1 {info['stage1_cpu_minutes']}, stage 2 {info['stage2_cpu_minutes']}; "
          f"total {info['total_cpu_minutes']}")
    return summary


def cmd_recipes(args):
    """Each recipe, its purpose and its measured result over seeds: held-out mean ± sd, dev, budget with the text
    (the rows of bench/results/dbllm_recipes.json, which bench/dbllm_table.py writes)."""
    import os
    from .paths import bench_result
    from .recipes import RECIPES
    from .views import load
    rows = load("dbllm_recipes.json") if os.path.isfile(bench_result("dbllm_recipes.json")) else {}
    width = max(map(len, RECIPES))
    for name, r in RECIPES.items():
        x = rows.get(name)
        result = "not measured yet"
        if x:
            sd = "" if x["ppl_heldout_sd"] is None else f" ± {x['ppl_heldout_sd']:.2f}"
            budget = ("budget not recorded" if x["total_cpu_minutes_mean"] is None
                      else f"{x['total_cpu_minutes_mean']:.1f} CPU-min with the text")
            result = (f"held out {x['ppl_heldout_mean']:.2f}{sd} ({x['heldout_over_fp']:.2f}x FP), dev "
                      f"{x['ppl_dev']:.2f}, seeds {x['seeds']}; {budget}")
        print(f"{name:{width}s}  {r['purpose']}\n{'':{width}s}  {result}")
    return RECIPES


def cmd_eval_zeroshot(args):
    """Zero-shot accuracy with lm-evaluation-harness (dbllm_lab/zeroshot.py) on the shipped data/zeroshot sets, or
    on --data-dir / DBLLM_DATA_DIR; every task file is found and checked before the model loads."""
    import json
    from .zeroshot import check_limit, evaluate, parse_tasks, task_file
    tasks = parse_tasks(args.tasks)
    check_limit(args.limit)
    for t in tasks:  # a missing data file fails before the model loads
        task_file(t, args.data_dir)
    model, tok = _model(args)
    res = evaluate(model, tok, tasks, limit=args.limit, data_dir=args.data_dir, batch_size=args.batch_size)
    res["settings"].update(model=args.model, checkpoint=args.checkpoint, dtype=args.dtype)
    for t, r in res["tasks"].items():
        norm = "" if r["acc_norm"] is None else f"  acc_norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"
        print(f"{t:14s} n={r['n']:5d}  acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}{norm}  (chance {r['chance']:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {args.out}")
    return res


def cmd_generate(args):
    """Greedy text from the FP model or, with --checkpoint, the packed model (its layers on --backend)."""
    import torch
    from .generate import greedy_generate, set_backend
    if args.max_new_tokens < 2:  # before the model loads
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be >= 2 (one prefill token + decoding)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _model(args)
    n = set_backend(model, args.backend) if args.checkpoint else 0
    res = greedy_generate(model, tok, args.prompt, args.max_new_tokens, engine=args.engine, lm_head=args.lm_head)
    print(args.prompt + res["text"])
    print(f"[{res['new_tokens']} tokens, decode {res['decode_tokens_per_s']:.1f} tokens/s, prefill "
          f"{res['prefill_s']:.2f} s; {'packed layers: %d on backend %s' % (n, args.backend) if n else 'FP model'}; "
          f"engine {args.engine}, LM head {args.lm_head}; {torch.get_num_threads()} threads]")
    return res


def build_parser():
    from .blockwise import BlockwiseConfig
    from .datafree import DEFAULT_CACHE, TEXT_PRECISION
    from .decode import LM_HEADS
    from .generate import DEFAULT_ENGINE, DEFAULT_LM_HEAD, ENGINES
    from .recipes import RECIPES
    from .runtime import PRECISIONS
    from .train import TrainConfig
    ap = argparse.ArgumentParser(prog="dbllm-lab", description="DB-LLM dual binarization lab")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="HF id, local folder or .gguf; default: embedded SmolLM2-135M")
        p.add_argument("--dtype", default="float32")
        p.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/wiki.test.raw (or DBLLM_DATA_DIR)")
        p.add_argument("--seqlen", type=int, default=512)
        p.add_argument("--max-windows", type=int, default=None)

    p = sub.add_parser("eval-ppl", help="perplexity with the GPTQ protocol")
    common(p)
    p.add_argument("--checkpoint", default=None, help="a packed checkpoint folder (from `quantize --out`)")
    p.add_argument("--dataset", default="wikitext2", help=f"one of {DATASETS} or a text file")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--backend", default=None, help="packed layers' backend (packed_linear.BACKENDS), e.g. cpu-exact or "
                                                   "cpu-int8 (default: the layer's)")
    p.add_argument("--threads", type=int, default=None, help="torch and CPU-kernel threads (default: torch's)")
    p.set_defaults(func=cmd_eval_ppl)

    p = sub.add_parser("quantize", help="quantize the decoder's linear layers")
    common(p)
    p.add_argument("--method", default="fdb", choices=list(METHODS))
    p.add_argument("--bits", type=int, default=None, help="code bits (rtn/gptq: 2, 3, 4, 8; default: the method's)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale group (default 64; a multiple of 32 with --out; not for the ARB family)")
    p.add_argument("--init", default=None, help="fdb: minmax, clip (default) or gptq")
    p.add_argument("--orientation", default=None, help="fdb (minmax/clip init): per-group (default) or fixed")
    p.add_argument("--cgb", action="store_true", help="ARB family: column-group bitmap for salient columns")
    p.add_argument("--calib-data", default=None, help="text file for GPTQ/ARB calibration")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--out", default=None, help="folder for the packed checkpoint (fdb only)")
    p.add_argument("--eval", action="store_true", help="evaluate WikiText-2 perplexity afterwards")
    p.set_defaults(func=cmd_quantize)
    p = sub.add_parser("convert", help="rewrite an old (format_version 1) checkpoint folder as a model folder")
    p.add_argument("old", help="the format_version 1 folder (model.safetensors + quant_config.json)")
    p.add_argument("new", help="the model folder to write")
    p.add_argument("--model", default=None, help="its base model (default: the one its header names)")
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("generate-data", help="teacher-written training text (method.md §3), cached on disk")
    common(p)
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--gen-len", type=int, default=256, help="tokens per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set-size", type=int, default=128, help="samples per seeded set (datafree.teacher_text)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--precision", default=TEXT_PRECISION, choices=PRECISIONS,
                   help="the teacher's precision while it writes")
    p.set_defaults(func=cmd_generate_data)

    p = sub.add_parser("train", help="a W2 student trained by a named recipe (`dbllm-lab recipes`), text included; "
                                     "flags override the recipe")
    common(p)
    p.add_argument("--recipe", default="quick", choices=list(RECIPES), help="a named recipe (default: quick)")
    p.add_argument("--seed", type=int, default=0, help="training text and training order")
    p.add_argument("--save", default=None, help="folder for the trained student as a packed model folder")
    p.add_argument("--out-dir", default=None, help="checkpoints and result.json; an existing run there resumes "
                                                   "(default build/runs/RECIPE-sSEED)")
    p.add_argument("--eval", action="store_true", help="WikiText-2 PPL afterwards: dev, held-out and full")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--group-size", type=int, default=None, help="weights per scale group (default: the method's)")
    p.add_argument("--e2e-n", type=int, default=None, help="samples of the end-to-end stage (default: --n)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the teacher-written text is cached")
    r = "the recipe's"
    p.add_argument("--quant", default=None, help=f"fdb or uniform (default: {r})")
    p.add_argument("--stage", default=None, help=f"blockwise, e2e or both (default: {r})")
    p.add_argument("--init", default=None, help=f"FDB init: clip, gptq or minmax (default: {r})")
    p.add_argument("--n", type=int, default=None, help=f"training samples (default: {r})")
    p.add_argument("--gen-len", type=int, default=None, help=f"tokens per training sample (default: {r})")
    p.add_argument("--text-precision", default=None, choices=PRECISIONS,
                   help=f"the teacher's precision while it writes the text (default: {r}, else {TEXT_PRECISION!r})")
    for prefix, cls, names in (("bw-", BlockwiseConfig, BW_FLAGS), ("", TrainConfig, E2E_FLAGS)):
        stage = "block-wise" if prefix else "end-to-end"
        for f in names:
            default = getattr(cls(), f)
            flag = "--" + prefix + ("train-seqlen" if (f, prefix) == ("seqlen", "") else f.replace("_", "-"))
            help_ = f"{stage} {f} (default: {r}, else {default!r})"
            if isinstance(default, bool):
                p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_)
            else:
                p.add_argument(flag, type=type(default), default=None, help=help_)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="the named training recipes and their last measured results")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("eval-zeroshot", help="zero-shot accuracy with lm-evaluation-harness on local task files")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--checkpoint", default=None, help="a packed checkpoint folder (from `quantize --out`)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande", help="comma-separated")
    p.add_argument("--limit", type=int, default=None, help="first N documents per task (default: the full split)")
    p.add_argument("--data-dir", default=None, help="folder with zeroshot/<task>/<split>.jsonl[.xz] (else "
                   "DBLLM_DATA_DIR, else the shipped data/zeroshot, checksum-verified)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval_zeroshot)

    p = sub.add_parser("generate", help="greedy text from the FP model or a packed checkpoint, with tokens/s")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--checkpoint", default=None, help="a packed checkpoint folder (from `quantize --out`)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cpu-exact", "cpu-int8", "torch", "triton"],
                   help="packed layers: auto (Triton on CUDA, the C++ kernel on CPU), cpu, torch or triton")
    p.add_argument("--threads", type=int, default=None, help="torch and CPU-kernel threads (default: torch's)")
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=ENGINES,
                   help="hf: transformers' generate; lean: dbllm_lab.decode's static-cache loop (same tokens)")
    p.add_argument("--lm-head", default=DEFAULT_LM_HEAD, choices=LM_HEADS,
                   help="exact: the model's LM head; int8: int8 rows with per-row scales (--engine lean only)")
    p.set_defaults(func=cmd_generate)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"dbllm-lab {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
