"""Project folders resolve the same wherever the code runs (a notebook opened in notebooks/, papermill from the
root, a script from anywhere)."""
import os
import subprocess
import sys

from dbllm_lab import paths


def test_figure_dir_defaults_quick_to_build_and_full_to_figures():
    root = paths.root()
    assert os.path.isfile(os.path.join(root, "pyproject.toml"))
    assert paths.figure_dir(None, quick=True) == os.path.join(root, "build", "figures")
    assert paths.figure_dir(None, quick=False) == os.path.join(root, "figures")


def test_figure_dir_given_paths(tmp_path):
    assert paths.figure_dir(str(tmp_path / "f"), quick=True) == str(tmp_path / "f")
    assert os.path.isdir(tmp_path / "f")
    rel = paths.figure_dir(os.path.join("build", "test_paths_rel"), quick=False)  # relative to the project
    assert rel == os.path.join(paths.root(), "build", "test_paths_rel") and os.path.isdir(rel)
    os.rmdir(rel)


def test_same_folders_from_another_working_directory(tmp_path):
    code = ("from dbllm_lab import paths, datafree; print(paths.figure_dir(None, True)); "
            "print(paths.bench_result('x.json')); print(datafree.DEFAULT_CACHE)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fig, bench, cache = out.stdout.split()
    root = paths.root()
    assert fig == os.path.join(root, "build", "figures")
    assert bench == os.path.join(root, "bench", "results", "x.json")
    assert cache == os.path.join(root, "data", "generated")
    assert not os.listdir(tmp_path)  # nothing written where it ran
