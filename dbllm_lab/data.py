"""Evaluation and calibration text: WikiText-2, C4 and local files (method.md §5).

Resolution order for a named dataset: the ``data_dir`` argument, then the environment variable
``DBLLM_DATA_DIR``, then the project's own ``data/`` folder (it ships the WikiText-2 raw test split,
``data/wikitext-2-raw/wiki.test.raw``, CC BY-SA; see data/README.md), then ``datasets.load_dataset`` from the
Hugging Face hub for the other corpora and splits.
"""
import glob
import os
import random

from .paths import PROJECT_ROOT

DATASETS = ("wikitext2", "c4", "c4-new")
SPLITS = {"wikitext2": ("test", "validation", "train"), "c4": ("validation", "train"), "c4-new": ("validation", "train")}
_WIKI_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}
# the project's data/ folder beside the package (a clone, or an editable install `pip install -e .`); a non-editable
# install does not carry it: point DBLLM_DATA_DIR at a clone's data/ folder instead
SHIPPED_DIR = os.path.join(PROJECT_ROOT, "data") if PROJECT_ROOT else None
_WIKI_PARQUET = {"test": "test-*.parquet", "validation": "validation-*.parquet", "train": "train-*.parquet"}


def _normalise(text):
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return _normalise(f.read())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"could not read text file {path!r}: {e}") from None


def _wikitext_lines(split, data_dir):
    """Lines of WikiText-2 raw from the official layout or the Hugging Face parquet layout under data_dir."""
    name = _WIKI_FILES[split]
    for cand in (os.path.join(data_dir, name), os.path.join(data_dir, "wikitext-2-raw", name),
                 os.path.join(data_dir, "wikitext-2-raw-v1", name)):
        if os.path.isfile(cand):
            return _read(cand).split("\n")
    for pattern in (os.path.join(data_dir, "**", "wikitext-2-raw-v1", _WIKI_PARQUET[split]),
                    os.path.join(data_dir, _WIKI_PARQUET[split])):
        files = sorted(glob.glob(pattern, recursive=True))
        if files:
            import pandas as pd
            return [_normalise(t) for f in files for t in pd.read_parquet(f)["text"].tolist()]
    return None


def _missing(dataset, split, tried, hub_error):
    """FileNotFoundError naming the folders searched, why the hub gave nothing, and the file to put where."""
    where = {"wikitext2": f"wikitext-2-raw/{_WIKI_FILES.get(split, 'wiki.test.raw')}",
             "c4": _C4_SHARDS[split], "c4-new": _C4_SHARDS[split]}[dataset]
    layout = {"wikitext2": " (the layout of the official WikiText-2 raw zip)",
              "c4": " (a shard of allenai/c4 en)", "c4-new": " (a shard of allenai/c4 en)"}[dataset]
    return FileNotFoundError(
        f"No {dataset} {split} text found. File not found: looked for {where} in "
        f"{', '.join(tried) or 'no folder (none given, no data/ beside the package)'}. Hub: {hub_error}. "
        f"Fix: put the file at <DIR>/{where}{layout} and pass data_dir=<DIR> (--data-dir <DIR>, or set "
        f"DBLLM_DATA_DIR=<DIR>).")


_C4_SHARDS = {"validation": "c4/c4-validation.00000-of-00008.json.gz", "train": "c4/c4-train.00000-of-01024.json.gz"}


def _c4_docs(split, data_dir):
    shard = os.path.basename(_C4_SHARDS[split])
    for cand in (os.path.join(data_dir, shard), os.path.join(data_dir, "c4", shard),
                 os.path.join(data_dir, "en", shard)):
        if os.path.isfile(cand):
            import gzip, json
            with gzip.open(cand, "rt", encoding="utf-8") as f:
                return [_normalise(json.loads(line)["text"]) for line in f]
    return None


def _hub_lines(dataset, split):
    """(lines, None) from the Hugging Face hub, or (None, why not): not installed / not reachable / failed."""
    try:
        import datasets
    except ImportError:
        return None, "the `datasets` package is not installed (pip install datasets)"
    try:
        if dataset == "wikitext2":
            return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]), None
        shard = "en/" + os.path.basename(_C4_SHARDS[split])
        return list(datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"]), None
    except (ConnectionError, TimeoutError) as e:
        return None, f"the Hugging Face hub was not reachable ({type(e).__name__}: {e})"
    except Exception as e:  # e.g. dataset renamed on the hub, disk full
        return None, f"`datasets` could not load it ({type(e).__name__}: {e})"


def load_text(dataset="wikitext2", split="test", data_dir=None, seed=0):
    """Return the text of ``dataset``/``split`` as one string, in the GPTQ protocol's form.

    ``wikitext2``: lines joined with "\\n\\n". ``c4-new``: the first 1100 documents joined with " ".
    ``c4`` returns the validation documents joined with "\\n\\n" (``c4_windows`` samples the GPTQ windows).
    ``dataset`` may also be the path of a local text file (read whole, line endings normalised).
    """
    if dataset not in DATASETS:
        if os.path.isfile(str(dataset)):
            return _read(dataset)
        raise ValueError(f"dataset={dataset!r} is neither one of {DATASETS} nor an existing text file")
    if split not in SPLITS[dataset]:
        raise ValueError(f"split={split!r} is not available for {dataset}; use one of {SPLITS[dataset]}")
    given = [d for d in (data_dir, os.environ.get("DBLLM_DATA_DIR")) if d]
    for d in given:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"data_dir {d!r} does not exist or is not a directory")
    tried = given + ([SHIPPED_DIR] if SHIPPED_DIR and os.path.isdir(SHIPPED_DIR) else [])
    lines = hub_error = None
    for d in tried:
        lines = _wikitext_lines(split, d) if dataset == "wikitext2" else _c4_docs(split, d)
        if lines is not None:
            break
    if lines is None:
        lines, hub_error = _hub_lines(dataset, split)
    if lines is None:
        raise _missing(dataset, split, tried, hub_error)
    if dataset == "c4-new":
        return " ".join(lines[:1100])
    return "\n\n".join(lines)


def c4_windows(tokenizer, seqlen, n=256, data_dir=None, seed=0):
    """GPTQ "c4" evaluation: ``n`` random windows of ``seqlen`` tokens from validation documents, seeded."""
    import torch
    docs = load_text("c4", "validation", data_dir).split("\n\n")
    rng = random.Random(seed)
    out = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        ids = tokenizer(docs[rng.randrange(len(docs))], return_tensors="pt").input_ids[0]
        if len(ids) > seqlen:
            start = rng.randrange(len(ids) - seqlen)
            out.append(ids[start:start + seqlen])
    if len(out) < n:
        raise ValueError(f"found only {len(out)} C4 documents longer than seqlen={seqlen}; lower n or seqlen")
    return torch.stack(out)


def tokenize(tokenizer, text):
    """Tokenise a whole text once (no BOS added), as 1-D LongTensor."""
    import torch
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.long)


def to_windows(data, seqlen):
    """Cut (n, L) samples into (n * (L // seqlen), seqlen) windows (tail of each sample dropped)."""
    if data.dim() != 2:
        raise ValueError(f"training data must be a (n, length) LongTensor, got shape {tuple(data.shape)}")
    if data.shape[1] < seqlen:
        raise ValueError(f"samples have {data.shape[1]} tokens, fewer than seqlen={seqlen}")
    k = data.shape[1] // seqlen
    return data[:, :k * seqlen].reshape(-1, seqlen).contiguous()
