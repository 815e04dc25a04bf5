"""Zero-shot multiple-choice accuracy through lm-evaluation-harness (``lm-eval``), on local task files.

lm-eval is the engine; nothing here scores anything itself:

- the model: lm-eval's own ``HFLM`` accepts an already-built ``PreTrainedModel`` and tokenizer, so every
  model dbllm_lab builds (FP, fake-quantized, FDB-trained, loaded from a packed checkpoint) is evaluated
  exactly as lm-eval evaluates a Hugging Face model (``lm_adapter``);
- the tasks: lm-eval's built-in definitions of PIQA, ARC-Easy, ARC-Challenge, HellaSwag and WinoGrande (their
  YAML, prompts, ``process_docs``, choices, targets, ``acc`` / ``acc_norm``) with one change: the documents are
  read from ``<data-dir>/zeroshot/<task>/<split>.jsonl`` instead of the Hugging Face hub (``task_config``).

Where the documents come from (``task_file``): ``data_dir`` (``--data-dir``), else ``$DBLLM_DATA_DIR``, else the
project's shipped ``data/zeroshot/<task>/<split>.jsonl.xz`` (all five sets, xz-compressed, 2.6 MB; sources and
licenses in data/zeroshot/README.md). A shipped file is checked against the SHA-256 of its uncompressed text
(``TASKS``) and decompressed once into a cache folder (``$DBLLM_CACHE_DIR``, else ``~/.cache/dbllm_lab``);
a folder given by the user may hold ``<split>.jsonl`` or ``<split>.jsonl.xz`` and is read as it is (any file can
be scored, the 4-row test fixtures too), and every result records the SHA-256 of the text it read and whether
that equals the shipped set's.

``acc`` is the share of documents where the gold choice has the highest summed log-likelihood
log P(choice | prompt); ``acc_norm`` divides each choice's log-likelihood by its length in characters first
(lm-eval's definitions; WinoGrande has ``acc`` only). Standard errors are lm-eval's: sqrt(p(1-p)/(n-1)).
"""
import hashlib
import lzma
import os
import time

from .paths import PROJECT_ROOT

# task -> (lm-eval's YAML under lm_eval/tasks/, the split lm-eval scores, rows in that split)
TASKS = {
    "piqa": ("piqa/piqa.yaml", "validation", 1838),
    "arc_easy": ("arc/arc_easy.yaml", "test", 2376),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", 1172),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", 10042),
    "winogrande": ("winogrande/default.yaml", "validation", 1267),
}
# SHA-256 of each shipped set's uncompressed JSON Lines text (data/zeroshot/README.md gives its source)
SHA256 = {
    "piqa": "0c4c6dd2b5da00b3a4588d1cd249a1d70f034c8881bca51645f912c4742101de",
    "arc_easy": "c38ac007c93b8de43edbf5732f3dd14d842e11007749a27f5a0ba11ac2d19851",
    "arc_challenge": "062fe98a0d64b0bb86b43ee49faf8de6b4c02417f0b4a6b7f9607208c6f1a9d6",
    "hellaswag": "dc1be2fa1bef56aab8e92a5be597a617e363b09239fa66822939d7fb7a8da4ec",
    "winogrande": "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8",
}
# the project's data/zeroshot/ (a clone or an editable install); a non-editable install has none
SHIPPED_DIR = os.path.join(PROJECT_ROOT, "data", "zeroshot") if PROJECT_ROOT else None
# "at size": the first AT_SIZE documents of each task; a split under 1.5 x AT_SIZE rows is taken whole
AT_SIZE = 1000
# keys of lm-eval's task config that task_config changes (everything else is lm-eval's own definition)
DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split",
             "test_split", "fewshot_split")


def parse_tasks(tasks):
    """'piqa,arc_easy' or ['piqa', ...] -> list of task names; unknown names are a ValueError."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError(f"no task given; choose from {', '.join(TASKS)}")
    bad = [t for t in names if t not in TASKS]
    if bad:
        raise ValueError(f"unknown zero-shot task(s) {', '.join(map(repr, bad))}; choose from {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def check_limit(limit):
    """``None`` (full split) or a whole number of documents >= 1 per task."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit={limit!r}: give a whole number of documents per task >= 1, or none for the "
                         "full split")
    return limit


def at_size_limits(tasks, docs=AT_SIZE):
    """{task: limit}: the first ``docs`` documents, or ``None`` (the whole split) where the split holds fewer
    than 1.5 x ``docs`` rows (at 1,000: ARC-Challenge 1,172 and WinoGrande 1,267 whole, the others cut)."""
    docs = check_limit(docs)
    return {t: (None if TASKS[t][2] < 1.5 * docs else docs) for t in parse_tasks(tasks)}


def sha256_file(path):
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_dir():
    """Folder for decompressed task files: ``$DBLLM_CACHE_DIR/zeroshot``, else ``~/.cache/dbllm_lab/zeroshot``."""
    root = os.environ.get("DBLLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dbllm_lab")
    return os.path.join(root, "zeroshot")


def _decompress(task, xz_path, expect=None):
    """The uncompressed copy of ``xz_path`` in ``cache_dir()`` (written once, atomically). With ``expect``, the
    text must have that SHA-256, else a ValueError names the file."""
    try:
        with open(xz_path, "rb") as f:
            raw = lzma.decompress(f.read())
    except lzma.LZMAError as e:
        raise ValueError(f"{xz_path} is corrupt: it is not a valid .xz file ({e}). Restore it from the repository "
                         f"(git checkout -- {os.path.relpath(xz_path)}) or pass --data-dir DIR") from None
    digest = hashlib.sha256(raw).hexdigest()
    if expect and digest != expect:
        raise ValueError(f"{xz_path} is corrupt: its text has SHA-256 {digest}, expected {expect} (zero-shot task "
                         f"{task!r}). Restore it from the repository or pass --data-dir DIR")
    folder = cache_dir()
    out = os.path.join(folder, f"{task}-{digest[:16]}.jsonl")
    if not (os.path.isfile(out) and sha256_file(out) == digest):
        os.makedirs(folder, exist_ok=True)
        tmp = f"{out}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(raw)
        os.replace(tmp, out)
    return out


def task_file(task, data_dir=None):
    """Path of the uncompressed JSON Lines file ``task`` is read from (see the module docstring for the order).

    ``data_dir`` / ``$DBLLM_DATA_DIR``: ``<dir>/zeroshot/<task>/<split>.jsonl`` or ``.jsonl.xz``; else the
    shipped ``data/zeroshot/<task>/<split>.jsonl.xz``, checksum-verified. A missing file is a FileNotFoundError
    and a corrupt shipped file a ValueError, each naming the file and what to do."""
    parse_tasks([task])
    _, split, rows = TASKS[task]
    rel = os.path.join("zeroshot", task, f"{split}.jsonl")
    root = data_dir or os.environ.get("DBLLM_DATA_DIR")
    if root:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            return path
        if os.path.isfile(path + ".xz"):
            return _decompress(task, path + ".xz")
        given = "--data-dir" if data_dir else "DBLLM_DATA_DIR"
        raise FileNotFoundError(
            f"{path} does not exist (nor {path}.xz): zero-shot task {task!r} reads lm-eval's {split} split "
            f"({rows} rows) from <data-dir>/{rel}, one JSON object per line in the Hugging Face layout lm-eval "
            f"reads. Put the file there, point --data-dir / DBLLM_DATA_DIR at the folder that holds zeroshot/, "
            f"or leave both unset ({given} is set now) to use the shipped copy in data/zeroshot/")
    if SHIPPED_DIR is None:
        raise FileNotFoundError(
            f"zero-shot task {task!r} needs {rel} and this install has no data/ folder (a non-editable install "
            f"does not carry it): pass --data-dir DIR (or set DBLLM_DATA_DIR=DIR) where DIR/{rel} or "
            f"DIR/{rel}.xz exists, e.g. DIR=<a clone>/data")
    xz = os.path.join(SHIPPED_DIR, task, f"{split}.jsonl.xz")
    if not os.path.isfile(xz):
        raise FileNotFoundError(
            f"{xz} is missing: it is the shipped copy of zero-shot task {task!r} ({rows} rows of lm-eval's {split} "
            f"split). Restore it from the repository (git checkout -- data/zeroshot), or pass --data-dir DIR "
            f"(or set DBLLM_DATA_DIR=DIR) where DIR/{rel} exists")
    return _decompress(task, xz, expect=SHA256[task])


def data_provenance(path, task):
    """{file, sha256, shipped}: the text a task was scored on and whether it is the shipped set."""
    digest = sha256_file(path)
    return {"file": os.path.abspath(path), "sha256": digest, "shipped": digest == SHA256[task]}


def builtin_config(task):
    """lm-eval's own task config for ``task`` (its YAML with ``include`` and ``!function`` resolved)."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml
    parse_tasks([task])
    cfg = load_yaml(os.path.join(os.path.dirname(lm_eval.tasks.__file__), TASKS[task][0]), resolve_func=True)
    assert cfg["task"] == task, f"lm-eval's {TASKS[task][0]} defines task {cfg['task']!r}, expected {task!r}"
    return cfg


def task_config(task, data_dir=None):
    """lm-eval's config for ``task`` with the documents read from the local JSON Lines file (DATA_KEYS only)."""
    path = task_file(task, data_dir)
    split = TASKS[task][1]
    cfg = builtin_config(task)
    for key in ("tag", "group", "task_list"):  # grouping keys: lm-eval's factory drops them too
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {split: path}},
               training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    cfg[f"{split}_split"] = split
    cfg["metadata"] = {**cfg.get("metadata", {}), "data_file": os.path.abspath(path)}
    return cfg


def build_tasks(tasks, data_dir=None):
    """{name: lm-eval ConfigurableTask} reading local files; every file is checked before any is loaded."""
    from lm_eval.api.task import ConfigurableTask
    names = parse_tasks(tasks)
    configs = {t: task_config(t, data_dir) for t in names}
    return {t: ConfigurableTask(config=cfg) for t, cfg in configs.items()}


def lm_adapter(model, tokenizer, batch_size=16, max_length=None):
    """lm-eval's HFLM around an already-built model (FP, fake-quantized, FDB, packed checkpoint) + tokenizer."""
    import logging

    from lm_eval.models.huggingface import HFLM
    log = logging.getLogger("lm_eval.models.huggingface")
    level = log.level
    log.setLevel(logging.ERROR)  # HFLM warns that other loading arguments are ignored for a model object
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        log.setLevel(level)


def check_limits(tasks, limit):
    """{task: limit or None} from one ``limit`` for every task (None: the full split) or a dict of them."""
    names = parse_tasks(tasks)
    if not isinstance(limit, dict):
        return {t: check_limit(limit) for t in names}
    extra = set(limit) - set(names)
    if extra:
        raise ValueError(f"limit names task(s) {sorted(extra)} that are not being scored ({', '.join(names)})")
    return {t: check_limit(limit.get(t)) for t in names}


def chance_accuracy(task, n):
    """Expected ``acc`` of uniform guessing on the first ``n`` documents of an lm-eval task: the mean of
    1 / (number of choices) (0.5 for PIQA and WinoGrande, 0.25 for HellaSwag, about 0.25 for ARC)."""
    docs = list(task.eval_docs)[:n]
    return sum(1 / len(task.doc_to_choice(d)) for d in docs) / len(docs)


def evaluate(model, tokenizer, tasks="piqa,arc_easy,arc_challenge,hellaswag,winogrande", limit=None,
             data_dir=None, batch_size=16):
    """Zero-shot accuracy of ``model`` with lm-eval on local files; returns a JSON-ready dict:
    lm-eval's version, per task {acc, acc_stderr, acc_norm, acc_norm_stderr, n, n_split, version, split,
    chance, data: {file, sha256, shipped}}, settings and wall time. ``limit`` scores the first ``limit``
    documents of each task (lm-eval's --limit; None: the whole split), or is a dict {task: limit or None}
    (``at_size_limits``); tasks that share a limit are scored in one lm-eval call."""
    import lm_eval
    limits = check_limits(tasks, limit)
    task_dict = build_tasks(list(limits), data_dir)
    lm = lm_adapter(model, tokenizer, batch_size=batch_size)
    t0 = time.time()
    per_task = {}
    for lim in dict.fromkeys(limits.values()):
        group = {t: task_dict[t] for t in limits if limits[t] == lim}
        out = lm_eval.simple_evaluate(model=lm, tasks=list(group.values()), num_fewshot=0, limit=lim,
                                      log_samples=False, bootstrap_iters=1000)
        for name, task in group.items():
            r, n = out["results"][name], out["n-samples"][name]
            per_task[name] = {
                "acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"],
                "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
                "n": n["effective"], "n_split": n["original"], "limit": lim,
                "version": out["versions"][name], "split": TASKS[name][1],
                "chance": chance_accuracy(task, n["effective"]),
                "data": data_provenance(task.config.metadata["data_file"], name),
            }
    seconds = time.time() - t0
    per_task = {t: per_task[t] for t in limits}
    one = set(limits.values())
    return {"lm_eval_version": lm_eval.__version__,
            "model": getattr(model, "name_or_path", type(model).__name__),
            "tasks": per_task,
            "task_versions": {t: v["version"] for t, v in per_task.items()},
            "n": {t: v["n"] for t, v in per_task.items()},
            "settings": {"num_fewshot": 0, "limit": one.pop() if len(one) == 1 else limits,
                         "batch_size": batch_size,
                         "data": "JSON Lines zeroshot/<task>/<split>.jsonl[.xz]: --data-dir, DBLLM_DATA_DIR or the "
                                 "shipped data/zeroshot (see each task's data.sha256 / data.shipped)",
                         "metrics": "lm-eval's acc and acc_norm (acc_norm: log-likelihood divided by the length of "
                                    "the choice in characters)"},
            "seconds": round(seconds, 1)}


def dense_weights(model):
    """Replace every ``PackedDualBinaryLinear`` of ``model`` (in place) by an ``nn.Linear`` holding its dequantized
    weight w_hat = a1*b1 + a2*b2: the same function, evaluated by torch's dense matmul instead of the bit-plane
    kernel (faster for long scoring runs on CPU; sums in another order, so log-likelihoods agree to float
    rounding). Returns the number of layers replaced."""
    import torch
    from torch import nn

    from .model import set_module
    from .packed_linear import PackedDualBinaryLinear
    packed = [(name, m) for name, m in model.named_modules() if isinstance(m, PackedDualBinaryLinear)]
    for name, m in packed:
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.p1.device)
        with torch.no_grad():
            dense.weight.copy_(m.dequantize(torch.float32))
            if m.bias is not None:
                dense.bias.copy_(m.bias)
        set_module(model, name, dense)
    return len(packed)


def mean_accuracy(per_task, metric="acc"):
    """Unweighted mean over tasks of ``metric`` (acc_norm falls back to acc where a task has none, i.e.
    WinoGrande) and its standard error sqrt(sum se_i^2) / k, treating the tasks as independent."""
    vals, ses = [], []
    for r in per_task.values():
        m = metric if r.get(metric) is not None else "acc"
        vals.append(r[m])
        ses.append(r[m + "_stderr"])
    return sum(vals) / len(vals), sum(s * s for s in ses) ** 0.5 / len(ses)


def docs_label(tasks):
    """'1000 / 1000 / 1172 / 1000 / 1267 (whole: arc_challenge, winogrande)': documents scored per task."""
    whole = [t for t, r in tasks.items() if r["n"] == r["n_split"]]
    label = " / ".join(str(r["n"]) for r in tasks.values())
    return label + (f" (whole: {', '.join(whole)})" if whole and len(whole) < len(tasks) else
                    " (whole splits)" if whole else "")


def near_chance(tasks):
    """Cells whose accuracy lies within 2 standard errors of the chance level of the scored documents."""
    out = []
    for t, r in tasks.items():
        for metric in ("acc", "acc_norm"):
            if r.get(metric) is not None and abs(r[metric] - r["chance"]) < 2 * r[metric + "_stderr"]:
                out.append(f"{t} {metric}")
    return out


# SmolLM2-135M-Instruct's model card, "Evaluation / Instruction model" (lighteval, zero-shot), read offline from a
# stored copy of the card's README: published numbers to compare the FP row with, not measured here
MODEL_CARD = {"source": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (README, Evaluation: "
                        "Instruction model)",
              "values": {"hellaswag": 40.9, "arc_average": 37.3, "piqa": 66.3},
              "note": "lighteval, zero-shot, on the Hugging Face weights (FP here is the GGUF Q4_1 copy, "
                      "dequantized); lighteval's prompts and normalisation differ from lm-eval's, so the comparison "
                      "is indicative; ARC (Average) is the mean of ARC-Easy and ARC-Challenge; the card gives no "
                      "WinoGrande number for the Instruct model"}
