"""The method registry (dbllm_lab/quantize.py): every method declared once, quantizes the tiny LLaMA and reports its
bits from the registry; bad settings are refused before any work; no import cycle inside the package."""
import ast
import copy
import os

import pytest
import torch

import dbllm_lab
from dbllm_lab import quantize as Q
from dbllm_lab.cli import build_parser
from dbllm_lab.model import quantizable_linears
from dbllm_lab.quantize import METHODS, check_args, quantize_model

PKG = os.path.dirname(dbllm_lab.__file__)


def _calib(method):
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0)) \
        if METHODS[method].needs_calib(METHODS[method].options) else None


def test_each_method_declared_once_and_cli_choices_are_the_registry():
    assert {"rtn", "gptq", "sign", "fdb", "billm", "arb", "arb-x", "arb-rc"} <= set(METHODS)
    assert all(name == m.name for name, m in METHODS.items())
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["quantize"]
    assert next(a for a in sub._actions if a.dest == "method").choices == list(METHODS)
    # no other module spells out the method list
    for fname in os.listdir(PKG):
        if fname.endswith(".py") and fname != "quantize.py":
            src = open(os.path.join(PKG, fname)).read()
            assert '"rtn", "gptq", "sign"' not in src and "'rtn', 'gptq', 'sign'" not in src, fname


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_quantizes_the_tiny_llama_with_registry_bits(tiny, method):
    model, m = copy.deepcopy(tiny), METHODS[method]
    group = 32 if m.group_size is not None else None
    rep = quantize_model(model, method, group_size=group, calib_windows=_calib(method), progress=False)
    layers = quantizable_linears(model)
    assert rep["n_layers"] == len(layers) == 14 and rep["bits"] == m.bits[0]
    assert not any(isinstance(x, torch.nn.Linear) for x in layers.values())
    if m.bits_per_weight is not None:  # fixed formats: exactly the registry's rule, on every layer
        assert rep["bits_per_weight"] == m.bits_per_weight(m.bits[0], 32)
        assert all(x.bits_per_weight == m.bits_per_weight(m.bits[0], 32) for x in layers.values())
    else:  # ARB: counted per layer; the model figure is the weighted mean of the layers'
        n = sum(x.weight.numel() for x in layers.values())
        assert rep["bits_per_weight"] == pytest.approx(
            sum(x.bits_per_weight * x.weight.numel() for x in layers.values()) / n)
    assert rep["bits_rule"] == m.bits_rule
    assert torch.isfinite(model(torch.randint(0, 256, (1, 8))).logits).all()


class _Untouchable:
    """A model that fails if anything reads its layers: proves a setting was refused before any work."""
    def __getattr__(self, name):
        raise AssertionError(f"quantize_model touched the model ({name}) before refusing the settings")


@pytest.mark.parametrize("method, kw, match", [
    ("fdb", dict(group_size=48, packed=True), "multiple of 32"),
    ("rtn", dict(group_size=32, packed=True), "no packed format"),
    ("fdb", dict(group_size=0), "group_size=0"),
    ("fdb", dict(bits=3), "bits=3"),
    ("arb", dict(group_size=64), "no group size"),
    ("arb", dict(bits=2), "bits=2"),
    ("billm", dict(iters=5), "does not take \\['iters'\\]"),
    ("rtn", dict(init="clip"), "does not take \\['init'\\]"),
    ("fdb", dict(init="gptq", orientation="fixed"), "does not use \\['orientation'\\]"),
    ("fdb", dict(init="clip", percdamp=0.1), "does not use \\['percdamp'\\]"),
    ("fdb", dict(init="random"), "init='random'"),
    ("int3", {}, "method='int3'"),
])
def test_bad_settings_are_refused_before_any_work(method, kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_model(_Untouchable(), method, **kw)


def test_group_size_not_dividing_a_layer_is_refused_before_quantizing(tiny):
    model = copy.deepcopy(tiny)
    before = {n: id(m) for n, m in quantizable_linears(model).items()}
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quantize_model(model, "fdb", group_size=48, progress=False)
    assert {n: id(m) for n, m in quantizable_linears(model).items()} == before


def test_calibration_data_is_required_or_refused(tiny):
    with pytest.raises(ValueError, match="needs calib_windows"):
        quantize_model(copy.deepcopy(tiny), "gptq", progress=False)
    with pytest.raises(ValueError, match="does not use calibration data"):
        quantize_model(copy.deepcopy(tiny), "rtn", calib_windows=torch.zeros(1, 8, dtype=torch.long), progress=False)


def test_check_args_fills_method_defaults():
    m, bits, g, opts = check_args("fdb")
    assert (m.name, bits, g, opts["init"], opts["orientation"]) == ("fdb", 2, 64, "clip", "per-group")
    m, bits, g, opts = check_args("billm")
    assert (bits, g) == (1, None) and "iters" not in opts and opts["cgb"] is False


def test_cli_refuses_an_unpackable_group_size_before_loading_the_model(capsys):
    from dbllm_lab.cli import main
    assert main(["quantize", "--method", "fdb", "--group-size", "48", "--out", "nowhere"]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert main(["quantize", "--method", "arb", "--group-size", "64"]) == 2
    assert "no group size" in capsys.readouterr().err


def _imports(path, modname):
    """dbllm_lab modules imported anywhere in one file (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module.split(".")[0] if node.module else None
                out |= {base} if base else {a.name for a in node.names}
            elif node.module and node.module.startswith("dbllm_lab"):
                parts = node.module.split(".")
                out |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dbllm_lab.")}
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}
    return (out & mods) - {modname, "__init__"}


def test_no_import_cycle_in_the_package():
    mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"}
    graph = {m: _imports(os.path.join(PKG, m + ".py"), m) for m in mods}
    assert graph["quantize"] >= {"arb", "layers"} and "quantize" not in graph["arb"] | graph["layers"]
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
