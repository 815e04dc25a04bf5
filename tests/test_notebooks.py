"""The notebook suite: stored stripped, parameterised, and executed headless in quick mode (as `make reproduce`
does), then the tables the notebooks wrote are checked for what the notebooks claim to show.

The suite runs once per test session into a temporary folder (~10-15 min on 2 CPU cores, plus a few CPU
minutes for the live training in 04 and 05). Set
DBLLM_SKIP_NOTEBOOKS=1 to skip the execution (the static checks still run).
"""
import ast
import glob
import json
import os
import re
import subprocess
import time

import pandas as pd
import pytest

from dbllm_lab import run_notebooks

NOTEBOOKS = run_notebooks.notebooks()


def test_suite_is_numbered_and_complete():
    names = [os.path.basename(p)[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(len(names))], names
    assert len(names) == 12, f"expected notebooks 00..11, found {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_stored_stripped_with_a_parameters_cell(path):
    assert not run_notebooks.unstripped([path]), f"{path} is stored with outputs: run `make strip-notebooks`"
    with open(path) as f:
        nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", []), "first code cell must be tagged `parameters`"
    src = "".join(code[0]["source"])
    for name in ("QUICK", "FIG_DIR", "SEED"):
        assert f"{name} =" in src, f"parameters cell lacks {name}"
    assert nb["cells"][0]["cell_type"] == "markdown", "a notebook opens with what it shows and why"


def _parameters(path):
    """[(name, default source)] of the notebook's parameters cell; each line must be `NAME = <literal>`."""
    with open(path) as f:
        nb = json.load(f)
    src = "".join(next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))["source"])
    out = []
    for node in ast.parse(src).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), \
            f"parameters cell: {ast.get_source_segment(src, node)!r} is not one `NAME = literal`"
        value = ast.get_source_segment(src, node.value)
        ast.literal_eval(value)  # a plain literal, as papermill can override it
        out.append((node.targets[0].id, value))
    for line in src.splitlines():
        assert "#" not in line or line.lstrip().startswith("#"), f"comment on an assignment line: {line!r}"
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_papermill_lists_every_parameter_with_its_default(path, caplog):
    """`papermill --help-notebook` (its command, run in-process) lists every parameter with the cell's default."""
    from click.testing import CliRunner
    from papermill.cli import papermill
    params = _parameters(path)
    assert {"QUICK", "FIG_DIR", "SEED"} <= {n for n, _ in params}
    assert dict(params)["FIG_DIR"] == "None", "FIG_DIR defaults to None (paths.figure_dir picks the folder)"
    out = CliRunner().invoke(papermill, ["--help-notebook", path])
    assert out.exit_code == 0, out.output
    assert "Unable to parse" not in out.output + caplog.text, out.output + caplog.text
    listed = dict(re.findall(r"^  (\w+): .*\(default (.*)\)$", out.output, flags=re.M))
    for name, value in params:
        assert listed.get(name) == value, f"papermill lists {name} as {listed.get(name)!r}, the cell says {value!r}"


def test_quick_run_from_notebooks_folder_leaves_tracked_tree_clean(tmp_path):
    """Run one cheap notebook as JupyterLab would (working directory notebooks/, FIG_DIR left at None): its figures
    land in the project's build/figures/, nothing tracked changes and no notebooks/figures/ appears."""
    import papermill as pm
    root = run_notebooks.ROOT
    if not os.path.isdir(os.path.join(root, ".git")):
        pytest.skip("not a git checkout")
    status = lambda: subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout
    before = status()
    path = next(p for p in NOTEBOOKS if os.path.basename(p).startswith("00_"))
    png = os.path.join(root, "build", "figures", "00_ppl_windows.png")
    t0 = time.time()
    pm.execute_notebook(path, str(tmp_path / "00.ipynb"), parameters={"QUICK": True},
                        cwd=run_notebooks.NOTEBOOK_DIR, kernel_name="python3", progress_bar=False)
    assert os.path.getmtime(png) >= t0 - 1, "the quick run did not write its figure to build/figures/"
    assert not os.path.exists(os.path.join(run_notebooks.NOTEBOOK_DIR, "figures"))
    assert status() == before


@pytest.fixture(scope="session")
def executed(tmp_path_factory, data_dir):
    if os.environ.get("DBLLM_SKIP_NOTEBOOKS"):
        pytest.skip("DBLLM_SKIP_NOTEBOOKS is set")
    root = tmp_path_factory.mktemp("suite")
    figs = root / "figures"
    run_notebooks.run(NOTEBOOKS, quick=True, out_dir=str(root / "notebooks"), fig_dir=str(figs),
                      parameters={"DATA_DIR": data_dir})
    return figs


def test_every_notebook_ran_and_wrote_a_figure_with_its_table(executed):
    files = os.listdir(executed)
    for path in NOTEBOOKS:
        nn = os.path.basename(path)[:2]
        pngs = [f for f in files if f.startswith(nn + "_") and f.endswith(".png")]
        assert pngs, f"notebook {nn} wrote no figure"
        for png in pngs:
            stem = png[:-4]
            assert any(f.startswith(stem) and f.endswith((".csv", ".json")) for f in files), \
                f"figure {png} has no table (CSV/JSON) beside it"


def test_00_reference_perplexity_is_sane(executed):
    r = json.load(open(executed / "00_ppl.json"))
    assert 5 < r["ppl"] < 100 and r["seqlen"] > 0 and r["windows"] >= 1


def test_02_per_group_orientation_never_worse_than_fixed(executed):
    t = pd.read_csv(executed / "02_init_choices.csv").set_index(["layer", "method"])["weight_rel_error"]
    for layer in t.index.get_level_values(0).unique():
        for init in ("minmax", "clip"):
            assert t[(layer, f"fdb {init}/per-group")] <= t[(layer, f"fdb {init}/fixed")] + 1e-6


def test_03_fdb_basin_is_wider_than_binarization(executed):
    t = pd.read_csv(executed / "03_basin_widths.csv")
    width = t.groupby("quantizer")["basin_abs"].mean()
    assert width["fdb_both"] > width["sign"], width.to_dict()


def test_06_fdb_bitplanes_sparser_than_plain_2bit_code(executed):
    t = pd.read_csv(executed / "06_sparsity.csv")
    assert (t.fdb_ones_per_weight < t.rtn2_ones_per_weight).all()
    assert t.fdb_both_zero.mean() > t.rtn2_both_zero.mean()


def test_07_kernel_matches_reference(executed):
    t = pd.read_csv(executed / "07_kernel_check.csv")
    assert len(t) >= 2 and (t.max_rel_err < 1e-3).all()


def _empty_figure(png):
    """Why ``png`` looks empty (too small, one colour, or no coloured pixel: axes without data), or None."""
    from PIL import Image
    with Image.open(png) as im:
        w, h = im.size
        if w < 100 or h < 100:
            return f"{w}x{h} px"
        lo, hi = im.convert("L").getextrema()
        if hi - lo < 16:
            return "a single colour"
        saturation = im.convert("RGB").convert("HSV").split()[1].histogram()
        coloured = 1 - sum(saturation[:40]) / (w * h)
        if coloured < 0.001:
            return f"{coloured:.2%} coloured pixels: axes without data"
    return None


def test_empty_figure_check_catches_empty_axes(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_title("no data"); ax.set_yscale("log")
    fig.savefig(tmp_path / "empty.png", dpi=110)
    ax.plot([1, 2, 3], [1, 3, 2], "o-")
    fig.savefig(tmp_path / "data.png", dpi=110)
    plt.close(fig)
    assert _empty_figure(tmp_path / "empty.png")
    assert _empty_figure(tmp_path / "data.png") is None


@pytest.mark.parametrize("png", sorted(glob.glob(os.path.join(run_notebooks.ROOT, "figures", "*.png"))),
                         ids=os.path.basename)
def test_committed_figure_is_not_empty(png):
    assert _empty_figure(png) is None, f"{png}: {_empty_figure(png)}"


def test_executed_figures_are_not_empty(executed):
    bad = {f: _empty_figure(executed / f) for f in os.listdir(executed) if f.endswith(".png")}
    assert not {f: why for f, why in bad.items() if why}, bad
