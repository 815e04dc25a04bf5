"""dbllm_lab.views: the notebooks' committed-row lookups fail loudly and pick recipe rows by seed."""
import pytest

from dbllm_lab import views as V


def _rows(*seeds, recipe="best+dad", held=None):
    return {f"{recipe} s{s}": {"method": f"{recipe} s{s}", "recipe": recipe, "seed": s, "ppl": 90.0 + s,
                               "ppl_heldout": None if held is None else held[i], "bits_per_weight": 2.5}
            for i, s in enumerate(seeds)}


def test_recipe_label_takes_the_lowest_seed_present():
    files = {"dbllm_table.json": _rows(2, 1)}
    assert V.lookup(files, "best+DAD")["method"] == "best+dad s1"
    files["dbllm_table.json"].update(_rows(0))
    assert V.lookup(files, "best+DAD")["method"] == "best+dad s0"


def test_missing_recipe_rows_are_none_when_optional_and_an_error_naming_them_otherwise():
    files = {"dbllm_table.json": {}}
    assert V.lookup(files, "best+KD", optional=True) is None
    with pytest.raises(KeyError, match="best\\+kd"):
        V.lookup(files, "best+KD")
    with pytest.raises(KeyError, match="'fp' is missing from dbllm_table.json"):
        V.lookup(files, "FP")


def test_view_lists_seed_statistics_dev_and_held_out():
    rows = {"fp": {"method": "fp", "ppl": 30.0, "bits_per_weight": 16.0}, **_rows(0, 1, 2, held=[95.0, 97.0, 99.0])}
    out = {r["label"]: r for r in V.view({"dbllm_table.json": rows}, ["FP", "best+DAD", "best+KD"],
                                         optional=("best+KD",))}
    assert out["best+DAD"]["x_fp"] == pytest.approx(3.0)
    assert out["best+DAD"]["seeds"] == "3 seeds: dev mean 91.0, range 90.0-92.0; held-out mean 97.0 +- 2.0 (3 seeds)"
    assert out["best+KD"]["ppl"] is None and "not measured yet" in out["best+KD"]["row"]
