"""``dbllm-lab`` command line: one function per subcommand.

    dbllm-lab eval-ppl --model smollm2-135m --dataset wikitext2 --seqlen 512 [--max-windows N] [--json out.json]
    dbllm-lab quantize --method fdb --group-size 64 --init clip --out ckpt/ [--eval]
    dbllm-lab eval-ppl --checkpoint ckpt/ ...
"""
import argparse
import sys

from .data import DATASETS


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
    from .modules import quantize_model
    from .modules import _check_args
    _check_args(args.method, args.bits, args.group_size, args.init, args.orientation)
    needs_calib = args.method in ("gptq", "billm", "arb", "arb-x", "arb-rc") or (args.method == "fdb" and args.init == "gptq")
    if needs_calib and not args.calib_data:
        raise ValueError(f"method {args.method!r} needs calibration text: pass --calib-data FILE (never the "
                         f"split you evaluate on)")
    model, tok = load_model(args.model, dtype=args.dtype)
    calib = None
    if needs_calib:
        from .ppl import eval_windows
        calib = eval_windows(model, tok, args.calib_data, seqlen=args.calib_seqlen, max_windows=args.calib_windows)
    kw = {"cgb": args.cgb} if args.method in ("billm", "arb", "arb-x", "arb-rc") else {}
    report = quantize_model(model, args.method, bits=args.bits, group_size=args.group_size, init=args.init,
                            orientation=args.orientation, calib_windows=calib, **kw)
    print(json.dumps(report, indent=2))
    if args.out:
        from .checkpoint import save_quantized
        save_quantized(model, args.out, base_model=args.model)
        print(f"saved packed checkpoint to {args.out}")
    if args.eval:
        from .ppl import perplexity
        print(perplexity(model, tok, seqlen=args.seqlen, max_windows=args.max_windows, data_dir=args.data_dir))
    return report


def build_parser():
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
    p.add_argument("--method", default="fdb", help="rtn, gptq, sign, fdb, billm, arb, arb-x, arb-rc")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--init", default="clip", help="fdb: minmax, clip or gptq")
    p.add_argument("--orientation", default="per-group", help="fdb: per-group or fixed")
    p.add_argument("--cgb", action="store_true", help="ARB family: column-group bitmap for salient columns")
    p.add_argument("--calib-data", default=None, help="text file for GPTQ/ARB calibration")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--out", default=None, help="folder for the packed checkpoint (fdb only)")
    p.add_argument("--eval", action="store_true", help="evaluate WikiText-2 perplexity afterwards")
    p.set_defaults(func=cmd_quantize)
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
