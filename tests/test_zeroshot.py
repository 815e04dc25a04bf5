"""Zero-shot accuracy through lm-evaluation-harness: the adapter is pinned to a direct computation with the model,
the local task configs are lm-eval's own definitions, bad input is refused clearly.

Runs on the 4-row fixtures (tests/data/zeroshot) and on the shipped sets (data/zeroshot), never on a hub."""
import copy
import hashlib
import json
import lzma
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from dbllm_lab import zeroshot  # noqa: E402
from dbllm_lab.cli import main  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# adapter log-likelihood vs direct computation: lm-eval batches right-padded sequences, the direct path runs one
# unpadded sequence; both fp32, so they agree to float rounding of a sum over a few tokens
LL_ATOL = 1e-3


def direct_loglikelihood(model, tok, context, continuation):
    """log P(continuation | context) summed over its tokens, computed with the model directly: the context's
    trailing spaces move to the continuation, the pair is tokenized whole and split after the context's tokens
    (the request definition lm-eval's causal LMs use), no special tokens. Also whether every token is the argmax."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    n_ctx = len(tok(context, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
    target = torch.tensor(whole[n_ctx:])
    rows = logp[n_ctx - 1:]
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def requests(task_dict):
    out = []
    for task in task_dict.values():
        task.build_all_requests(limit=None)
        out += task.instances
    return out


@pytest.fixture(scope="module")
def fixture_tasks():
    return zeroshot.build_tasks(list(zeroshot.TASKS), data_dir=FIXTURES)


def _same(a, b):
    if callable(a) and callable(b):
        return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)
    return a == b


@pytest.mark.parametrize("task", list(zeroshot.TASKS))
def test_config_is_lm_evals_own_except_where_documents_come_from(task):
    ours, builtin = zeroshot.task_config(task, FIXTURES), zeroshot.builtin_config(task)
    changed = {k for k in set(ours) | set(builtin) if not _same(ours.get(k), builtin.get(k))}
    assert changed <= set(zeroshot.DATA_KEYS) | {"metadata", "tag"}, changed
    assert ours["dataset_path"] == "json" and builtin["dataset_path"] not in ("json", None)
    split = zeroshot.TASKS[task][1]
    assert ours[f"{split}_split"] == split == builtin[f"{split}_split"]  # the split lm-eval scores
    assert ours["dataset_kwargs"]["data_files"][split].endswith(os.path.join("zeroshot", task, f"{split}.jsonl"))
    assert {m["metric"] for m in ours["metric_list"]} == ({"acc"} if task == "winogrande" else {"acc", "acc_norm"})


def test_documents_are_what_lm_evals_definitions_make_of_them(fixture_tasks):
    """One document per task against the prompt/choices/gold that lm-eval's task definition states."""
    def first(task, i=0):
        t = fixture_tasks[task]
        docs = list(t.eval_docs)
        assert len(docs) == 4
        d = docs[i]
        return t.doc_to_text(d), t.doc_to_choice(d), t.doc_to_target(d)

    text, choices, gold = first("piqa")
    assert text == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert choices[0].startswith("Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    assert len(choices) == 2 and gold == 0
    text, choices, gold = first("arc_easy", 3)  # NYSEDREGENTS item: choice labels "1".."4"
    row = [json.loads(x) for x in open(os.path.join(FIXTURES, "zeroshot", "arc_easy", "test.jsonl"))][3]
    assert row["choices"]["label"] == ["1", "2", "3", "4"]
    assert text == f"Question: {row['question']}\nAnswer:" and choices == row["choices"]["text"]
    assert gold == row["choices"]["label"].index(row["answerKey"])
    text, choices, gold = first("hellaswag")  # "activity: ctx_a Ctx_b", endings preprocessed
    assert text == "Roof shingle removal: A man is sitting on a roof. He"
    assert choices[3] == "starts pulling up roofing on a roof." and gold == 3
    text, choices, gold = first("winogrande")  # partial scoring: the option fills the blank, the rest is scored
    assert choices == ["Sarah was a much better surgeon than Maria so Sarah",
                       "Sarah was a much better surgeon than Maria so Maria"]
    assert gold == "always got the easier cases." and text == 1


def test_adapter_loglikelihoods_equal_direct_computation_and_lm_eval_scores_them(embedded, fixture_tasks):
    """Every request of 4 documents x 5 tasks: lm-eval's HFLM around the embedded model returns the
    log-likelihood the model gives directly; acc and acc_norm from lm-eval equal argmax over those values."""
    model, tok = embedded
    lm = zeroshot.lm_adapter(model, tok, batch_size=8)
    reqs = requests(fixture_tasks)
    assert len(reqs) == sum(len(t.doc_to_choice(d)) for t in fixture_tasks.values() for d in t.eval_docs)
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    direct = {}
    for inst, (ll, greedy) in zip(reqs, got):
        d_ll, d_greedy = direct_loglikelihood(model, tok, *inst.args)
        assert ll == pytest.approx(d_ll, abs=LL_ATOL), inst.args
        assert greedy == d_greedy
        direct[(inst.task_name, inst.doc_id, inst.idx)] = d_ll

    res = zeroshot.evaluate(model, tok, list(zeroshot.TASKS), data_dir=FIXTURES, batch_size=8)
    for name, task in fixture_tasks.items():
        acc, acc_norm = [], []
        for doc_id, doc in enumerate(task.eval_docs):
            choices, gold = task.doc_to_choice(doc), task.doc_to_target(doc)
            if name == "winogrande":  # partial scoring: gold is the context index (doc_to_text)
                gold = task.doc_to_text(doc)
            lls = np.array([direct[(name, doc_id, i)] for i in range(len(choices))])
            acc.append(float(lls.argmax() == gold))
            acc_norm.append(float((lls / np.array([len(c) for c in choices])).argmax() == gold))
        r = res["tasks"][name]
        assert r["n"] == 4 and r["n_split"] == 4
        assert r["acc"] == pytest.approx(np.mean(acc))
        assert r["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / 2)
        if name != "winogrande":
            assert r["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert res["lm_eval_version"] and set(res["task_versions"]) == set(zeroshot.TASKS)


def test_adapter_wraps_fake_quantized_and_packed_models(tmp_path, embedded):
    """FDB layers (DualBinaryLinear) and a model rebuilt from a packed checkpoint go through the same adapter."""
    from dbllm_lab.checkpoint import load_quantized, save_quantized
    from dbllm_lab.model import tiny_llama
    from dbllm_lab.quantize import quantize_model
    _, tok = embedded
    base = tiny_llama(vocab_size=len(tok), hidden=64, intermediate=128, max_pos=512)
    fdb = copy.deepcopy(base)
    quantize_model(fdb, "fdb", group_size=64, progress=False)
    save_quantized(fdb, str(tmp_path / "ckpt"))
    packed = load_quantized(str(tmp_path / "ckpt"), base_model=copy.deepcopy(base))
    reqs = requests(zeroshot.build_tasks("piqa,winogrande", data_dir=FIXTURES))
    dense = copy.deepcopy(packed)
    assert zeroshot.dense_weights(dense) == 7 * 2  # 7 linears in each of tiny_llama's 2 blocks
    assert not any(type(m).__name__ == "PackedDualBinaryLinear" for m in dense.modules())
    for model in (fdb, packed, dense):
        got = zeroshot.lm_adapter(model, tok, batch_size=4).loglikelihood(reqs, disable_tqdm=True)
        for inst, (ll, _) in zip(reqs, got):
            assert ll == pytest.approx(direct_loglikelihood(model, tok, *inst.args)[0], abs=LL_ATOL)


def test_cli_writes_versions_counts_and_settings(tmp_path, embedded, monkeypatch):
    import dbllm_lab.cli as cli
    monkeypatch.setattr(cli, "_model", lambda args: embedded)
    out = tmp_path / "zs.json"
    assert main(["eval-zeroshot", "--tasks", "piqa,winogrande", "--limit", "2", "--data-dir", FIXTURES,
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n"] == {"piqa": 2, "winogrande": 2} and r["settings"]["limit"] == 2
    assert r["lm_eval_version"] and r["task_versions"] == {"piqa": 1.0, "winogrande": 1.0}


@pytest.mark.parametrize("argv, needle", [
    (["--tasks", "piqa,mmlu"], "unknown zero-shot task(s) 'mmlu'"),
    (["--tasks", "piqa", "--limit", "0"], "limit=0"),
    (["--tasks", "piqa", "--limit", "-3"], "limit=-3"),
])
def test_bad_input_exits_2_with_a_message(argv, needle, capsys):
    assert main(["eval-zeroshot", "--data-dir", FIXTURES] + argv) == 2
    assert needle in capsys.readouterr().err


def test_missing_file_names_it_and_where_it_goes(tmp_path, monkeypatch, capsys):
    assert main(["eval-zeroshot", "--tasks", "hellaswag", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "zeroshot" / "hellaswag" / "validation.jsonl") in err and "--data-dir" in err
    monkeypatch.delenv("DBLLM_DATA_DIR", raising=False)
    monkeypatch.setattr(zeroshot, "SHIPPED_DIR", None)  # a non-editable install: no data/ folder
    with pytest.raises(FileNotFoundError, match=r"zeroshot/piqa/validation.jsonl.*--data-dir"):
        zeroshot.task_file("piqa")
    monkeypatch.setenv("DBLLM_DATA_DIR", FIXTURES)
    assert zeroshot.task_file("piqa") == os.path.join(FIXTURES, "zeroshot", "piqa", "validation.jsonl")


@pytest.mark.parametrize("limit", [0, -1, 2.5, True, "3"])
def test_check_limit_refuses_non_positive_or_non_integer(limit):
    with pytest.raises(ValueError, match="limit="):
        zeroshot.check_limit(limit)


# ---- the shipped sets (data/zeroshot) ------------------------------------------------------------------------------
@pytest.fixture
def no_data_dir(tmp_path, monkeypatch):
    """DBLLM_DATA_DIR unset and a fresh cache folder: what a bare clone sees."""
    monkeypatch.delenv("DBLLM_DATA_DIR", raising=False)
    monkeypatch.setenv("DBLLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.mark.parametrize("task", list(zeroshot.TASKS))
def test_shipped_set_is_read_by_default_and_is_the_documented_one(task, no_data_dir):
    path = zeroshot.task_file(task)
    assert path.startswith(str(no_data_dir / "cache"))
    assert zeroshot.sha256_file(path) == zeroshot.SHA256[task]
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(rows) == zeroshot.TASKS[task][2]
    folder = os.path.join(zeroshot.SHIPPED_DIR, task)
    readme = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    xz = os.path.join(folder, f"{zeroshot.TASKS[task][1]}.jsonl.xz")
    assert zeroshot.SHA256[task] in readme and zeroshot.sha256_file(xz) in readme
    assert "**License:**" in readme and "**Source of this copy:**" in readme
    sums = open(os.path.join(zeroshot.SHIPPED_DIR, "SHA256SUMS")).read().split("\n")
    assert f"{zeroshot.sha256_file(xz)}  {task}/{os.path.basename(xz)}" in sums


def test_shipped_copy_corrupt_or_missing_is_named(no_data_dir, monkeypatch):
    shipped = no_data_dir / "data"
    shutil.copytree(os.path.join(zeroshot.SHIPPED_DIR, "winogrande"), shipped / "winogrande")
    monkeypatch.setattr(zeroshot, "SHIPPED_DIR", str(shipped))
    xz = shipped / "winogrande" / "validation.jsonl.xz"
    text = lzma.decompress(xz.read_bytes())
    xz.write_bytes(lzma.compress(text.replace(b'"answer": "1"', b'"answer": "2"', 1)))  # one label changed
    with pytest.raises(ValueError, match=f"{xz} is corrupt: its text has SHA-256 .* expected {zeroshot.SHA256['winogrande']}"):
        zeroshot.task_file("winogrande")
    xz.write_bytes(b"not xz")
    with pytest.raises(ValueError, match=f"{xz} is corrupt: it is not a valid .xz file"):
        zeroshot.task_file("winogrande")
    xz.unlink()
    with pytest.raises(FileNotFoundError, match=f"{xz} is missing.*git checkout -- data/zeroshot"):
        zeroshot.task_file("winogrande")


def test_a_given_folder_takes_precedence_and_may_be_compressed(no_data_dir):
    folder = no_data_dir / "mine" / "zeroshot" / "piqa"
    folder.mkdir(parents=True)
    text = open(os.path.join(FIXTURES, "zeroshot", "piqa", "validation.jsonl"), "rb").read()
    (folder / "validation.jsonl.xz").write_bytes(lzma.compress(text))
    path = zeroshot.task_file("piqa", str(no_data_dir / "mine"))
    assert open(path, "rb").read() == text
    prov = zeroshot.data_provenance(path, "piqa")
    assert prov["sha256"] == hashlib.sha256(text).hexdigest() and prov["shipped"] is False


def test_cli_on_a_bare_clone_reads_the_shipped_set(no_data_dir, embedded, monkeypatch, capsys):
    """`dbllm-lab eval-zeroshot --limit 2` with no DBLLM_DATA_DIR and no --data-dir: the shipped WinoGrande."""
    import dbllm_lab.cli as cli
    monkeypatch.setattr(cli, "_model", lambda args: embedded)
    out = no_data_dir / "zs.json"
    assert main(["eval-zeroshot", "--tasks", "winogrande", "--limit", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["tasks"]["winogrande"]
    assert r["n"] == 2 and r["n_split"] == 1267 and r["chance"] == 0.5
    assert r["data"]["shipped"] is True and r["data"]["sha256"] == zeroshot.SHA256["winogrande"]
    assert "winogrande     n=    2" in capsys.readouterr().out


def test_at_size_takes_small_splits_whole_and_cuts_the_others():
    assert zeroshot.at_size_limits(list(zeroshot.TASKS)) == {
        "piqa": 1000, "arc_easy": 1000, "arc_challenge": None, "hellaswag": 1000, "winogrande": None}
    assert zeroshot.at_size_limits("piqa,hellaswag", 100) == {"piqa": 100, "hellaswag": 100}
    assert zeroshot.check_limits("piqa,winogrande", {"piqa": 3}) == {"piqa": 3, "winogrande": None}
    with pytest.raises(ValueError, match=r"limit names task\(s\) \['hellaswag'\]"):
        zeroshot.check_limits("piqa", {"hellaswag": 3})
    with pytest.raises(ValueError, match="limit=0"):
        zeroshot.check_limits("piqa", {"piqa": 0})


def test_chance_is_one_over_the_number_of_choices(fixture_tasks):
    assert zeroshot.chance_accuracy(fixture_tasks["piqa"], 4) == 0.5
    assert zeroshot.chance_accuracy(fixture_tasks["hellaswag"], 4) == 0.25
    assert zeroshot.chance_accuracy(fixture_tasks["winogrande"], 2) == 0.5
