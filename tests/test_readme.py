"""Every number the README's result tables quote comes from a committed result file."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import update_readme  # noqa: E402


def test_readme_tables_match_the_result_files():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    assert update_readme.BLOCK.findall(text), "README has no result-table blocks"
    assert update_readme.update(text) == text, "README tables are stale: run `python bench/update_readme.py`"


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
