"""Zero-shot multiple-choice accuracy through lm-evaluation-harness (``lm-eval``), on local task files.

lm-eval is the engine; nothing here scores anything itself:

- the model: lm-eval's own ``HFLM`` accepts an already-built ``PreTrainedModel`` and tokenizer, so every
  model dbllm_lab builds (FP, fake-quantized, FDB-trained, loaded from a packed checkpoint) is evaluated
  exactly as lm-eval evaluates a Hugging Face model (``lm_adapter``);
- the tasks: lm-eval's built-in definitions of PIQA, ARC-Easy, ARC-Challenge, HellaSwag and WinoGrande (their
  YAML, prompts, ``process_docs``, choices, targets, ``acc`` / ``acc_norm``) with one change: the documents are
  read from ``<data-dir>/zeroshot/<task>/<split>.jsonl`` instead of the Hugging Face hub (``task_config``).

``acc`` is the share of documents where the gold choice has the highest summed log-likelihood
log P(choice | prompt); ``acc_norm`` divides each choice's log-likelihood by its length in characters first
(lm-eval's definitions; WinoGrande has ``acc`` only). Standard errors are lm-eval's: sqrt(p(1-p)/(n-1)).
"""
import os
import time

# task -> (lm-eval's YAML under lm_eval/tasks/, the split lm-eval scores, rows in that split)
TASKS = {
    "piqa": ("piqa/piqa.yaml", "validation", 1838),
    "arc_easy": ("arc/arc_easy.yaml", "test", 2376),
    "arc_challenge": ("arc/arc_challenge.yaml", "test", 1172),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation", 10042),
    "winogrande": ("winogrande/default.yaml", "validation", 1267),
}
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


def task_file(task, data_dir=None):
    """Path of the JSON Lines file for ``task``: ``<dir>/zeroshot/<task>/<split>.jsonl``, where dir is
    ``data_dir``, else ``$DBLLM_DATA_DIR``. A missing file is a FileNotFoundError that says where to put it."""
    parse_tasks([task])
    _, split, rows = TASKS[task]
    rel = os.path.join("zeroshot", task, f"{split}.jsonl")
    root = data_dir or os.environ.get("DBLLM_DATA_DIR")
    if not root:
        raise FileNotFoundError(
            f"zero-shot task {task!r} needs its data file {rel} ({rows} rows of lm-eval's {split} split as JSON "
            f"Lines, in the Hugging Face layout lm-eval reads) and no data folder was given: pass --data-dir DIR "
            f"(or set DBLLM_DATA_DIR=DIR) where DIR/{rel} exists")
    path = os.path.join(root, rel)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: zero-shot task {task!r} reads lm-eval's {split} split ({rows} rows) from "
            f"<data-dir>/{rel}, one JSON object per line in the Hugging Face layout lm-eval reads. Put the file "
            f"there, or point --data-dir / DBLLM_DATA_DIR at the folder that holds zeroshot/")
    return path


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


def evaluate(model, tokenizer, tasks="piqa,arc_easy,arc_challenge,hellaswag,winogrande", limit=None,
             data_dir=None, batch_size=16):
    """Zero-shot accuracy of ``model`` with lm-eval on local files; returns a JSON-ready dict:
    lm-eval's version, per task {acc, acc_stderr, acc_norm, acc_norm_stderr, n, n_split, version, split},
    settings and wall time. ``limit`` scores the first ``limit`` documents of each task (lm-eval's --limit)."""
    import lm_eval
    limit = check_limit(limit)
    task_dict = build_tasks(tasks, data_dir)
    lm = lm_adapter(model, tokenizer, batch_size=batch_size)
    t0 = time.time()
    out = lm_eval.simple_evaluate(model=lm, tasks=list(task_dict.values()), num_fewshot=0, limit=limit,
                                  log_samples=False, bootstrap_iters=1000)
    seconds = time.time() - t0
    per_task = {}
    for name in task_dict:
        r = out["results"][name]
        per_task[name] = {
            "acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"],
            "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": r.get("acc_norm_stderr,none"),
            "n": out["n-samples"][name]["effective"], "n_split": out["n-samples"][name]["original"],
            "version": out["versions"][name], "split": TASKS[name][1],
        }
    return {"lm_eval_version": lm_eval.__version__,
            "model": getattr(model, "name_or_path", type(model).__name__),
            "tasks": per_task,
            "task_versions": {t: v["version"] for t, v in per_task.items()},
            "n": {t: v["n"] for t, v in per_task.items()},
            "settings": {"num_fewshot": 0, "limit": limit, "batch_size": batch_size,
                         "data": "local JSON Lines <data-dir>/zeroshot/<task>/<split>.jsonl",
                         "metrics": "lm-eval's acc and acc_norm (acc_norm: log-likelihood divided by the length of the choice in characters)"},
            "seconds": round(seconds, 1)}


def mean_accuracy(per_task, metric="acc"):
    """Unweighted mean over tasks of ``metric`` (acc_norm falls back to acc where a task has none, i.e.
    WinoGrande) and its standard error sqrt(sum se_i^2) / k, treating the tasks as independent."""
    vals, ses = [], []
    for r in per_task.values():
        m = metric if r.get(metric) is not None else "acc"
        vals.append(r[m])
        ses.append(r[m + "_stderr"])
    return sum(vals) / len(vals), sum(s * s for s in ses) ** 0.5 / len(ses)
