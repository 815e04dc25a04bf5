import os

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


def test_missing_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DBLLM_DATA_DIR", raising=False)
    monkeypatch.setattr("dbllm_lab.data._hub_lines", lambda *a: None)
    with pytest.raises(FileNotFoundError, match=r"wikitext-2-raw/wiki\.test\.raw"):
        load_text("wikitext2", "test", str(tmp_path))


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
