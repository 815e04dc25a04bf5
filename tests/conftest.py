"""Shared fixtures: the embedded model is loaded once per test session (~25 s)."""
import os

import pytest


def _data_dir():
    d = os.environ.get("DBLLM_DATA_DIR")
    if not d:
        here = os.path.dirname(os.path.abspath(__file__))
        cand = os.path.normpath(os.path.join(here, "..", "..", "shared", "data"))
        d = cand if os.path.isdir(cand) else None
    return d


@pytest.fixture(scope="session")
def data_dir():
    """A folder holding wikitext-2-raw/wiki.test.raw: DBLLM_DATA_DIR, ../shared/data, else the shipped data/."""
    from dbllm_lab.data import SHIPPED_DIR
    d = _data_dir()
    if not d or not os.path.isfile(os.path.join(d, "wikitext-2-raw", "wiki.test.raw")):
        d = SHIPPED_DIR
    if not os.path.isfile(os.path.join(d, "wikitext-2-raw", "wiki.test.raw")):
        pytest.skip("WikiText-2 test text not found: set DBLLM_DATA_DIR to a folder holding wikitext-2-raw/wiki.test.raw")
    return d


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M; tests must not modify it (deep-copy first)."""
    from dbllm_lab.model import load_model
    return load_model()


@pytest.fixture
def tiny():
    from dbllm_lab.model import tiny_llama
    return tiny_llama()
