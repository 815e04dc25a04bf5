import hashlib
import os
import subprocess
import sys

import pytest

from dbllm_lab.data import load_text


def test_wikitext_official_layout(data_dir):
    text = load_text("wikitext2", "test", data_dir)
    assert "\r" not in text
    assert text.startswith(" = Robert Boulter = ")
    assert len(text.split("\n\n")) >= 2891


def test_wikitext_env_variable(monkeypatch, data_dir):
    monkeypatch.setenv("DBLLM_DATA_DIR", data_dir)
    assert load_text("wikitext2", "test") == load_text("wikitext2", "test", data_dir)


def test_parquet_layout(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    d = tmp_path / "wikitext" / "wikitext-2-raw-v1"
    d.mkdir(parents=True)
    pd.DataFrame({"text": [" = A = \r\n", " b line \n"]}).to_parquet(d / "test-00000-of-00001.parquet")
    assert load_text("wikitext2", "test", str(tmp_path)) == " = A = \n\n\n b line \n"


def test_crlf_normalised_and_local_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a\r\nb\rc\n")
    assert load_text(str(f)) == "a\nb\nc\n"


def test_shipped_test_split_loads_from_anywhere(tmp_path):
    """A fresh machine: no DBLLM_DATA_DIR, no ../shared, run from an unrelated folder, the hub unreachable."""
    env = {k: v for k, v in os.environ.items() if k != "DBLLM_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = ("import hashlib; from dbllm_lab.data import load_text, SHIPPED_DIR; t = load_text('wikitext2', 'test'); "
            "print(SHIPPED_DIR); print(len(t.split(chr(10) * 2))); print(t[:20])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    shipped, n, head = out.stdout.splitlines()[:3]
    assert not os.path.exists(tmp_path / ".." / "shared")
    assert os.path.isfile(os.path.join(shipped, "wikitext-2-raw", "wiki.test.raw"))
    assert int(n) >= 2891 and head.startswith(" = Robert Boulter =")


def test_shipped_file_is_the_documented_one():
    from dbllm_lab.data import SHIPPED_DIR
    path = os.path.join(SHIPPED_DIR, "wikitext-2-raw", "wiki.test.raw")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    readme = open(os.path.join(SHIPPED_DIR, "README.md")).read()
    assert digest in readme and "CC BY-SA" in readme


def test_missing_file_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv("DBLLM_DATA_DIR", raising=False)
    monkeypatch.setattr("dbllm_lab.data._hub_lines", lambda *a: (None, "stub: no hub in this test"))
    with pytest.raises(FileNotFoundError, match=r"File not found: looked for wikitext-2-raw/wiki\.valid\.raw in "
                                                r".*put the file at <DIR>/wikitext-2-raw/wiki\.valid\.raw"):
        load_text("wikitext2", "validation", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        load_text("c4", "validation", str(tmp_path))
    msg = str(e.value)
    assert "<DIR>/c4/c4-validation.00000-of-00008.json.gz" in msg and "WikiText" not in msg


def test_missing_datasets_package_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("DBLLM_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(FileNotFoundError, match="`datasets` package is not installed"):
        load_text("wikitext2", "validation", str(tmp_path))


def test_unreachable_hub_is_named(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("DBLLM_DATA_DIR", raising=False)

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="hub was not reachable"):
        load_text("wikitext2", "validation", str(tmp_path))


def test_local_file_result_names_the_file_without_a_split(tiny, tmp_path):
    from dbllm_lab.ppl import perplexity
    f = tmp_path / "some.txt"
    f.write_text("word " * 400)
    res = perplexity(tiny, _ByteTokenizer(), dataset=str(f), seqlen=32, max_windows=2, progress=False)
    assert res.split == "" and f"on {f} (" in str(res) and "some.txt/test" not in str(res)


class _ByteTokenizer:
    """Bytes as token ids (enough for the tiny model's vocabulary)."""
    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        import torch
        from types import SimpleNamespace
        return SimpleNamespace(input_ids=torch.tensor([list(text.encode())]) % 256)


def test_bad_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="dataset='ptb'"):
        load_text("ptb")
    with pytest.raises(ValueError, match="split='dev'"):
        load_text("wikitext2", "dev", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text("wikitext2", "test", str(tmp_path / "nope"))


def test_unreadable_file_is_a_clear_error(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ValueError, match="could not read"):
        load_text(str(f))
