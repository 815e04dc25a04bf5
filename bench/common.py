"""Shared benchmark helpers: machine description and the common result layout.

Every result table is one JSON file: {"machine": {...}, "settings": {...}, "rows": [{"method", "ppl",
"bits_per_weight", ...}, ...]} plus a markdown rendering of the rows next to it (same name, .md).
"""
import contextlib
import fcntl
import json
import os
import platform
import re
import time


def machine_info():
    """CPU model, cores, RAM, GPU (if any), and library versions, for the top of every result file."""
    import torch
    from dbllm_lab.cpu_kernel import cpu_model, cpu_signature
    cpu = cpu_model() or platform.processor()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram = None
    info = {"cpu": cpu, "cpu_signature": cpu_signature(), "cores": os.cpu_count(), "ram_gib": round(ram, 1) if ram else None,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def gpu_tag():
    """The CUDA device's name as a file-name tag (``NVIDIA H200`` -> ``nvidia_h200``), for result files per GPU."""
    import torch
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def markdown_table(rows, columns=None):
    """Rows (list of dicts) as a GitHub markdown table; columns default to the union of keys in order."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], (dict, list))))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(path_json, rows, settings, columns=None):
    """Write {machine, settings, rows} to ``path_json`` atomically and the rows as markdown beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path_json)), exist_ok=True)
    doc = {"machine": machine_info(), "settings": settings, "rows": rows}
    tmp = path_json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path_json)
    md = os.path.splitext(path_json)[0] + ".md"
    with open(md + ".tmp", "w") as f:
        f.write(markdown_table(rows, columns))
    os.replace(md + ".tmp", md)
    print(f"wrote {path_json} and {md}")
    return doc


@contextlib.contextmanager
def results_lock(path_json):
    """Hold an exclusive lock on the folder of ``path_json`` while rows are merged into it (read, merge, write), so
    that benchmark processes writing the same results file keep each other's rows."""
    folder = os.path.dirname(os.path.abspath(path_json))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def load_results(path_json):
    """The rows already written (for resumable benchmarks), or [] if the file does not exist."""
    if not os.path.isfile(path_json):
        return []
    with open(path_json) as f:
        return json.load(f)["rows"]


# Committed result tables evaluate WikiText-2 test at seqlen 512 on the first EVAL_WINDOWS windows: the full split
# (589 windows) takes ~20 min per model on 2 CPU cores, too long for a many-row table. `--windows 0` = full split.
EVAL_WINDOWS = 40


def add_eval_args(ap, out_default):
    """The evaluation arguments every result-table benchmark shares."""
    ap.add_argument("--model", default=None, help="default: embedded SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)")
    ap.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/wiki.test.raw (or DBLLM_DATA_DIR)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=EVAL_WINDOWS, help="evaluation windows; 0 = the full test split")
    ap.add_argument("--out", default=out_default)
    return ap


def eval_settings(model, args, **extra):
    """Top-level settings of a result table: model, dataset, seqlen, windows (+ anything in ``extra``)."""
    return {"model": getattr(model, "name_or_path", str(args.model)), "dataset": "wikitext2", "split": "test",
            "seqlen": args.seqlen, "windows": "full split" if not args.windows else args.windows,
            "fp_note": "the embedded model's FP reference is its GGUF Q4_1 file dequantized to float", **extra}


def add_calib_args(ap):
    """Calibration text shared by the PTQ and ARB tables: teacher-written by default (method.md §3)."""
    ap.add_argument("--calib", default="generated", help="'generated' (FP model writes it) or a text file path")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    return ap


def calib_note(args):
    if args.calib == "generated":
        return (f"{args.calib_samples} samples x {args.calib_seqlen} tokens written by the FP model "
                "(datafree.generate_samples: random start token, 4 greedy tokens, then sampled at T=1; seed 0)")
    return f"{args.calib_samples} random windows x {args.calib_seqlen} tokens of {args.calib} (seed 0)"


def calib_windows(model, tok, args):
    """(n, seqlen) calibration windows as ``calib_note(args)`` describes them: never the evaluated split."""
    from dbllm_lab.datafree import corpus_samples, generate_samples
    if args.calib == "generated":
        return generate_samples(model, tok, args.calib_samples, args.calib_seqlen, seed=0, batch_size=16)
    return corpus_samples(tok, args.calib_samples, args.calib_seqlen, path=args.calib, seed=0)
