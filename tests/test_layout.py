"""The layout the project keeps: small files, and one default per parameter everywhere it is restated."""
import ast
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("folder,limit", [("bench", 300), ("dbllm_lab", 450)])
def test_files_stay_small(folder, limit):
    """No bench script over 300 lines and no package module over 450 (C++ sources not counted)."""
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, folder, name)) as f:
                n = len(f.read().splitlines())
            assert n <= limit, f"{folder}/{name} has {n} lines (at most {limit})"


def _parameters(nb):
    """{NAME: literal value} of a notebook's papermill ``parameters`` cell."""
    with open(os.path.join(ROOT, "notebooks", nb)) as f:
        cells = json.load(f)["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    out = {}
    for node in ast.parse("".join(cell["source"])).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def test_cli_configs_and_notebooks_agree_on_group_size_gamma_and_seqlen():
    """The one default of each: quant.GROUP_SIZE (the registry's), TrainConfig.gamma, and the protocol's seqlen 512
    (ppl.perplexity's). The CLI uses the same values, and every notebook's parameters cell that sets GROUP_SIZE.
    Apart on purpose (APART below): notebooks 04, 05 and 09 start gamma at 0.5, because at the default 0 DAD is
    plain KD and those notebooks show what the gamma term does; notebook 10 runs at seqlen 256 to keep its per-token
    activation scans small. The test fails if another notebook parts from a default, or if one of these comes back
    to it without leaving the list. Every notebook's TRAINED default is the suite runner's."""
    import inspect

    from dbllm_lab.cli import build_parser
    from dbllm_lab.ppl import perplexity
    from dbllm_lab.quant import GROUP_SIZE
    from dbllm_lab.quantize import METHODS
    from dbllm_lab.run_notebooks import DEFAULT_TRAINED
    from dbllm_lab.train import TrainConfig
    seqlen = inspect.signature(perplexity).parameters["seqlen"].default
    assert {m.group_size for m in METHODS.values() if m.group_size is not None} == {GROUP_SIZE}
    for cmd in ("eval-ppl", "quantize", "train"):
        assert build_parser().parse_args([cmd]).seqlen == seqlen
    assert build_parser().parse_args(["train"]).gamma is None  # unset: the recipe's, else TrainConfig.gamma
    nbs = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
    for nb in nbs:
        p = _parameters(nb)
        for name, value in (("GROUP_SIZE", GROUP_SIZE), ("GAMMA", TrainConfig.gamma), ("SEQLEN", seqlen)):
            if name in p:
                differs = p[name] != value
                assert differs == ((nb[:2], name) in APART), \
                    f"{nb}: {name} = {p[name]!r}, the project's default is {value!r} (APART: {sorted(APART)})"
        if "TRAINED" in p:
            assert p["TRAINED"] == DEFAULT_TRAINED, f"{nb}: TRAINED = {p['TRAINED']!r}, the runner's is {DEFAULT_TRAINED!r}"


APART = {("04", "GAMMA"), ("05", "GAMMA"), ("09", "GAMMA"), ("10", "SEQLEN")}  # see the docstring
