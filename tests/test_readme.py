"""Every number the README's result tables quote comes from a committed result file."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import update_readme  # noqa: E402


def test_readme_and_results_page_match_the_result_files():
    for page in update_readme.PAGES:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        assert update_readme.BLOCK.findall(text), f"{page} has no result-table blocks"
        assert update_readme.update(text) == text, f"{page} tables are stale: run `python bench/update_readme.py`"


def test_a_table_block_fails_when_its_rows_are_missing(tmp_path):
    """A block that selects rows by a field fails loudly when no row has it; a missing file says so in the page."""
    import pytest
    with pytest.raises(ValueError, match="no row has 'no_such_field'"):
        update_readme.render("bench/results/dbllm_table.json", "method", "no_such_field")
    assert "Not measured yet" in update_readme.render("bench/results/no_such_file.json", None)


def test_readme_is_a_front_door():
    """At most 250 lines, and every notebook is in its table."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 250
    for nb in sorted(os.listdir(os.path.join(ROOT, "notebooks"))):
        if nb.endswith(".ipynb"):
            assert f"notebooks/{nb}" in text, nb


def test_every_result_table_has_the_shared_layout():
    """The PPL tables the README quotes share one layout (issues 3-5)."""
    import json
    for name in ("ppl_fp.json", "ptq.json", "dbllm_table.json", "arb_table.json"):
        if not os.path.isfile(os.path.join(ROOT, "bench", "results", name)):
            continue
        with open(os.path.join(ROOT, "bench", "results", name)) as f:
            doc = json.load(f)
        assert {"machine", "settings", "rows"} <= set(doc), name
        assert {"model", "dataset", "seqlen", "windows"} <= set(doc["settings"]), name
        for row in doc["rows"]:
            assert {"method", "ppl", "bits_per_weight"} <= set(row), (name, row)
