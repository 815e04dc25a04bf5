"""Checked claims (dbllm_lab.check.expect) and the notebooks' "what you should see" cells that use it: a false
claim must fail, naming the claim and the measured value."""
import json
import os
from types import SimpleNamespace

import pandas as pd
import pytest

from dbllm_lab.check import expect
from dbllm_lab.run_notebooks import NOTEBOOK_DIR


def test_expect_passes_a_true_claim(capsys):
    assert expect("ppl in the tens", 29.0, "10 <= PPL < 100", 10 <= 29.0 < 100) is None
    assert "[ok] ppl in the tens: 29 (10 <= PPL < 100)" in capsys.readouterr().out


def test_expect_fails_a_false_claim_naming_claim_and_value():
    with pytest.raises(AssertionError, match=r"claim failed: ppl in the tens: measured 5000, expected 10 <= PPL < 100"):
        expect("ppl in the tens", 5000.0, "10 <= PPL < 100", 10 <= 5000.0 < 100)


def test_full_only_claims_are_skipped_in_quick_mode_and_checked_in_full(capsys):
    expect("kd excess", -0.1, "> 0", False, full_only=True, quick=True)
    assert "not checked in quick mode" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="kd excess"):
        expect("kd excess", -0.1, "> 0", False, full_only=True, quick=False)


def test_expect_rejects_a_non_boolean_truth():
    import torch
    with pytest.raises(TypeError, match="ok must be a bool"):
        expect("x", 1, "> 0", torch.tensor([True, False]))


def _code_cell_with(name, text):
    """The code cell of notebook ``name`` that contains ``text`` (its checks; Takeaways come after it)."""
    with open(os.path.join(NOTEBOOK_DIR, name)) as f:
        nb = json.load(f)
    return next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code" and text in "".join(c["source"]))


def _run_00_checks(ppl, per_window):
    prompt = "The capital of France is"
    ns = {"expect": expect, "prompt": prompt, "sentence": prompt + " Paris. It is the largest city.",
          "result": SimpleNamespace(ppl=ppl, windows=len(per_window), seqlen=512),
          "table": pd.DataFrame({"ppl": per_window})}
    exec(_code_cell_with("00_setup_and_model.ipynb", "perplexity in the tens"), ns)


def test_notebook_00_checks_pass_on_true_values_and_fail_on_a_wrong_one():
    _run_00_checks(29.0, [20.8, 36.4, 34.7, 33.9])  # the committed quick-run values hold
    with pytest.raises(AssertionError, match=r"perplexity in the tens: measured 5000"):
        _run_00_checks(5000.0, [20.8, 36.4, 34.7, 33.9])
    with pytest.raises(AssertionError, match=r"the windows differ"):
        _run_00_checks(29.0, [30.0, 30.1, 29.9, 30.0])
