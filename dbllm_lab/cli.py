"""``dbllm-lab`` command line: one function per subcommand.

    dbllm-lab eval-ppl --model smollm2-135m --dataset wikitext2 --seqlen 512 [--max-windows N] [--json out.json]
    dbllm-lab quantize --method fdb --group-size 64 --init clip --out ckpt/ [--eval]
    dbllm-lab eval-ppl --checkpoint ckpt/ ...
    dbllm-lab generate-data --n 64 --gen-len 256 --seed 0            # teacher-written text (method.md §3)
    dbllm-lab train --stage both --loss dad --out-dir checkpoints/dad [--eval]   # block-wise, then end-to-end
    dbllm-lab eval-zeroshot --tasks piqa,arc_easy --limit 100 [--checkpoint ckpt/] [--out zs.json]  # lm-eval
    dbllm-lab generate --checkpoint ckpt/ --prompt "The capital of France is" --max-new-tokens 64 [--backend cpu]
"""
import argparse
import sys

from .data import DATASETS
from .quantize import METHODS


def _model(args):
    if getattr(args, "checkpoint", None):
        from .checkpoint import load_quantized
        model = load_quantized(args.checkpoint, base_model=args.model)
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
    model, tok = _model(args)
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
        save_quantized(model, args.out, base_model=args.model)
        print(f"saved packed checkpoint to {args.out}")
    if args.eval:
        from .ppl import perplexity
        print(perplexity(model, tok, seqlen=args.seqlen, max_windows=args.max_windows, data_dir=args.data_dir))
    return report


def cmd_generate_data(args):
    from .datafree import generate_samples
    from .model import load_model
    model, tok = load_model(args.model, dtype=args.dtype)
    data = generate_samples(model, tok, args.n, args.gen_len, seed=args.seed, batch_size=args.batch_size,
                            cache_dir=args.cache_dir)
    print(f"{tuple(data.shape)} teacher-generated tokens cached under {args.cache_dir}")
    return data


def train_configs(args):
    """(TrainConfig, BlockwiseConfig) of ``dbllm-lab train``: unset end-to-end options take TrainConfig's defaults,
    or ``train.AFTER_STAGE1`` with ``--stage both``."""
    from .blockwise import BlockwiseConfig
    from .train import AFTER_STAGE1, STAGES, TrainConfig
    if args.stage not in STAGES:
        raise ValueError(f"--stage {args.stage!r} is not supported; use one of {STAGES}")
    e2e = {**vars(TrainConfig()), **(AFTER_STAGE1 if args.stage == "both" else {})}
    cfg = TrainConfig(loss=args.loss, gamma=args.gamma, steps=args.steps, seqlen=args.train_seqlen,
                      batch_size=args.batch_size, grad_accum=args.grad_accum,
                      lr=e2e["lr"] if args.lr is None else args.lr,
                      lr_latent=e2e["lr_latent"] if args.lr_latent is None else args.lr_latent,
                      train_latent=args.train_latent or e2e["train_latent"], warmup=args.warmup, seed=args.seed,
                      train_norms=args.train_norms, lr_norm=args.lr_norm, precision=args.precision,
                      ckpt_every=args.ckpt_every).validate()
    bw = BlockwiseConfig(epochs=args.bw_epochs, batch_size=args.bw_batch_size, lr=args.bw_lr,
                         lr_latent=args.bw_lr_latent, train_latent=not args.bw_scales_only, loss=args.bw_loss,
                         inputs=args.bw_inputs, stats_samples=args.bw_stats_samples, train_norms=args.bw_train_norms,
                         lr_norm=args.bw_lr_norm, seqlen=args.bw_seqlen,
                         window_offset=args.bw_window_offset, min_lr_ratio=args.bw_min_lr_ratio,
                         seed=args.seed).validate()
    return cfg, bw


def cmd_train(args):
    """Two-stage training of a W2 student (FDB or the learnable uniform grid) against the FP teacher:
    --stage blockwise (block-wise reconstruction), e2e (end-to-end DAD / KD / CE) or both."""
    import json
    from .datafree import corpus_samples, generate_samples
    from .model import load_model
    from .train import freeze_quantized, train_two_stage
    cfg, bw = train_configs(args)
    for key in ("n", "e2e_n"):
        v = getattr(args, key)
        if v is not None and (isinstance(v, bool) or v <= 0):
            raise ValueError(f"--{key.replace('_', '-')} {v!r} must be a positive number of training samples")
    n_all = max(args.n, args.e2e_n or 0)  # stage 1 takes the first --n samples, stage 2 the first --e2e-n
    teacher, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.train_text:
        data = corpus_samples(tok, n_all, args.gen_len, path=args.train_text, seed=args.seed)
    else:
        data = generate_samples(teacher, tok, n_all, args.gen_len, seed=args.seed, cache_dir=args.cache_dir)
    calib = data[:args.n].reshape(-1, cfg.seqlen)[:args.calib_windows] if args.init == "gptq" else None
    student, info = train_two_stage(teacher, data[:args.n], stage=args.stage, quant=args.quant, blockwise=bw,
                                    config=cfg, out_dir=args.out_dir, init=args.init, group_size=args.group_size,
                                    calib_windows=calib, device=args.device,
                                    e2e_data=data[:args.e2e_n] if args.e2e_n else None)
    summary = {k: v for k, v in info.items() if k not in ("stage1_blocks", "stage2_curve")}
    summary.update(stage=args.stage, quant=args.quant, out_dir=args.out_dir)
    if args.save:
        from .checkpoint import save_quantized
        save_quantized(student, args.save)
        summary["packed_checkpoint"] = args.save
    if args.eval:
        from .ppl import perplexity
        summary["ppl"] = perplexity(freeze_quantized(student), tok, seqlen=args.seqlen, max_windows=args.max_windows,
                                    data_dir=args.data_dir).ppl
    print(json.dumps(summary, indent=2))
    return summary


def cmd_eval_zeroshot(args):
    """Zero-shot accuracy with lm-evaluation-harness on local task files (dbllm_lab/zeroshot.py)."""
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
        print(f"{t:14s} n={r['n']:5d}  acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}{norm}")
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
    res = greedy_generate(model, tok, args.prompt, args.max_new_tokens)
    print(args.prompt + res["text"])
    print(f"[{res['new_tokens']} tokens, decode {res['decode_tokens_per_s']:.1f} tokens/s, prefill "
          f"{res['prefill_s']:.2f} s; {'packed layers: %d on backend %s' % (n, args.backend) if n else 'FP model'}; "
          f"{torch.get_num_threads()} threads]")
    return res


def build_parser():
    from .blockwise import BlockwiseConfig
    from .train import AFTER_STAGE1, TrainConfig
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
    p = sub.add_parser("generate-data", help="teacher-written training text (method.md §3), cached on disk")
    common(p)
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--gen-len", type=int, default=256, help="tokens per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default="data/generated")
    p.set_defaults(func=cmd_generate_data)

    p = sub.add_parser("train", help="W2 student (FDB or uniform) trained against the FP teacher: block-wise "
                                     "reconstruction, then end-to-end DAD / KD / CE")
    common(p)
    p.add_argument("--stage", default="both", help="blockwise, e2e or both (block-wise first)")
    p.add_argument("--quant", default="fdb", help="fdb (dual binarization) or uniform (learnable 2-bit grid)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    bw = BlockwiseConfig()
    p.add_argument("--bw-epochs", type=int, default=bw.epochs, help="block-wise: passes over the samples per block")
    p.add_argument("--bw-batch-size", type=int, default=bw.batch_size)
    p.add_argument("--bw-lr", type=float, default=bw.lr, help="block-wise: peak lr of the quantizer scales")
    p.add_argument("--bw-lr-latent", type=float, default=bw.lr_latent, help="block-wise: peak lr of the latent weights")
    p.add_argument("--bw-scales-only", action="store_true", help="block-wise: train only the scales")
    p.add_argument("--bw-loss", default=bw.loss, help="block-wise loss: split (default), relative or mse")
    p.add_argument("--bw-inputs", default=bw.inputs, help="block-wise inputs: quant (default) or fp")
    p.add_argument("--bw-stats-samples", type=int, default=bw.stats_samples,
                   help="block-wise: per-block error statistics on the first N samples (0: all)")
    p.add_argument("--bw-train-norms", action="store_true", help="block-wise: also train each block's RMSNorm weights")
    p.add_argument("--bw-lr-norm", type=float, default=bw.lr_norm, help="block-wise: peak lr of the norm weights")
    p.add_argument("--bw-seqlen", type=int, default=bw.seqlen,
                   help="block-wise: cut samples into windows of this many tokens (0: whole samples)")
    p.add_argument("--bw-window-offset", type=int, default=bw.window_offset,
                   help="block-wise: join the samples into one stream and cut windows from this token on, so that "
                        "they start mid-sample (0: windows start where samples start)")
    p.add_argument("--bw-min-lr-ratio", type=float, default=bw.min_lr_ratio,
                   help="block-wise: each block's cosine decays to this fraction of the peak lrs")
    p.add_argument("--save", default=None, help="folder for the trained student's packed checkpoint (fdb only)")
    tc = TrainConfig()
    p.add_argument("--loss", default=tc.loss, help="end-to-end loss: dad, kd or ce")
    p.add_argument("--gamma", type=float, default=tc.gamma, help="DAD gamma in [0, 1]")
    p.add_argument("--steps", type=int, default=tc.steps, help="end-to-end optimiser steps")
    p.add_argument("--train-seqlen", type=int, default=tc.seqlen)
    p.add_argument("--batch-size", type=int, default=tc.batch_size)
    p.add_argument("--grad-accum", type=int, default=tc.grad_accum)
    p.add_argument("--lr", type=float, default=None,
                   help=f"end-to-end: peak lr of the quantizer scales (default {tc.lr}; {AFTER_STAGE1['lr']} after "
                        f"stage 1, --stage both)")
    p.add_argument("--lr-latent", type=float, default=None,
                   help=f"end-to-end: peak lr of the latent weights (default {tc.lr_latent}; "
                        f"{AFTER_STAGE1['lr_latent']} with --stage both)")
    p.add_argument("--train-latent", action="store_true",
                   help="end-to-end: also train the latent weights (STE); always on with --stage both")
    p.add_argument("--train-norms", action="store_true",
                   help="end-to-end: also train the RMSNorm weights (full precision; stored in the packed checkpoint)")
    p.add_argument("--lr-norm", type=float, default=tc.lr_norm, help="end-to-end: peak lr of the norm weights")
    p.add_argument("--precision", default=tc.precision, help="end-to-end forward passes: fp32 or bf16 (autocast)")
    p.add_argument("--warmup", type=int, default=tc.warmup)
    p.add_argument("--seed", type=int, default=tc.seed)
    p.add_argument("--init", default="clip", help="FDB init: clip, gptq (on the training text) or minmax")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--n", type=int, default=64, help="training samples")
    p.add_argument("--e2e-n", type=int, default=None, help="samples of the end-to-end stage (default: --n)")
    p.add_argument("--gen-len", type=int, default=256, help="tokens per training sample")
    p.add_argument("--train-text", default=None, help="train on this text file instead of generated text")
    p.add_argument("--cache-dir", default="data/generated")
    p.add_argument("--out-dir", default=None, help="checkpoints + loss curve; an existing run there resumes")
    p.add_argument("--ckpt-every", type=int, default=tc.ckpt_every)
    p.add_argument("--eval", action="store_true", help="WikiText-2 perplexity afterwards")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval-zeroshot", help="zero-shot accuracy with lm-evaluation-harness on local task files")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--checkpoint", default=None, help="a packed checkpoint folder (from `quantize --out`)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,hellaswag,winogrande", help="comma-separated")
    p.add_argument("--limit", type=int, default=None, help="first N documents per task (default: the full split)")
    p.add_argument("--data-dir", default=None, help="folder with zeroshot/<task>/<split>.jsonl (or DBLLM_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.set_defaults(func=cmd_eval_zeroshot)

    p = sub.add_parser("generate", help="greedy text from the FP model or a packed checkpoint, with tokens/s")
    p.add_argument("--model", default=None, help="HF id, local folder or .gguf; default: embedded SmolLM2-135M")
    p.add_argument("--checkpoint", default=None, help="a packed checkpoint folder (from `quantize --out`)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "triton"],
                   help="packed layers: auto (Triton on CUDA, the C++ kernel on CPU), cpu, torch or triton")
    p.add_argument("--threads", type=int, default=None, help="torch and CPU-kernel threads (default: torch's)")
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
