"""Where the project's folders are, independent of the working directory (a notebook opened in notebooks/,
papermill run from the root, a script run from anywhere).

In a clone or an editable install (``pip install -e .``) the project root is the folder above the package (it
holds ``pyproject.toml``); a non-editable install has no project folder, so the working directory stands in.
"""
import os

_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_ROOT = _PARENT if os.path.isfile(os.path.join(_PARENT, "pyproject.toml")) else None


def root():
    """The project folder, or the working directory when the package is installed without one."""
    return PROJECT_ROOT or os.getcwd()


def figure_dir(fig_dir=None, quick=True):
    """Absolute folder for a notebook's figures and tables, created if missing.

    ``None`` -> ``figures/`` of the project in full mode (the committed figures the README shows) and
    ``build/figures/`` in quick mode (so a quick run leaves the tracked tree unchanged). A relative path is taken
    relative to the project folder, not the working directory.
    """
    if fig_dir is None:
        fig_dir = "figures" if not quick else os.path.join("build", "figures")
    path = os.path.normpath(os.path.join(root(), os.path.expanduser(str(fig_dir))))
    os.makedirs(path, exist_ok=True)
    return path


def bench_result(name):
    """Absolute path of ``bench/results/<name>`` in the project (it may not exist)."""
    return os.path.join(root(), "bench", "results", name)
