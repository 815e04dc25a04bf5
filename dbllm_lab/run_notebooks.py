"""Run the notebook suite headless with papermill, in order (``make reproduce``).

    python -m dbllm_lab.run_notebooks [--full 0|1] [--only 00,03] [--out build/notebooks]
    python -m dbllm_lab.run_notebooks --strip-only      # strip outputs of the stored notebooks
    python -m dbllm_lab.run_notebooks --check-stripped  # fail if a stored notebook holds outputs

Quick mode (default) is the CI setting; ``--full 1`` uses each notebook's full settings.
Executed copies go to ``build/notebooks``. Figures and their tables go to ``build/figures/`` in quick mode (the
tracked tree stays unchanged) and to the committed ``figures/`` in full mode (``paths.figure_dir``).
A failing cell stops the run with the notebook and cell named.
"""
import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")


def notebooks(only=None):
    paths = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "[0-9][0-9]_*.ipynb")))
    if only:
        wanted = {o.strip() for o in only.split(",") if o.strip()}
        paths = [p for p in paths if os.path.basename(p)[:2] in wanted]
        if not paths:
            raise SystemExit(f"--only {only!r} matches no notebook in {NOTEBOOK_DIR}")
    return paths


def parameter_names(path):
    """Names assigned in the notebook's cell tagged ``parameters``."""
    import ast
    with open(path) as f:
        nb = json.load(f)
    for cell in nb.get("cells", []):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}
    return set()


def strip_outputs(path):
    """Remove outputs and execution counts in place; True if the file changed."""
    with open(path) as f:
        nb = json.load(f)
    changed = False
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            cell["outputs"], cell["execution_count"] = [], None
            changed = True
    if changed:
        with open(path, "w") as f:
            json.dump(nb, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return changed


def unstripped(paths):
    out = []
    for p in paths:
        with open(p) as f:
            nb = json.load(f)
        if any(c.get("outputs") for c in nb.get("cells", []) if c.get("cell_type") == "code"):
            out.append(p)
    return out


def run(paths, quick=True, out_dir=None, fig_dir=None, parameters=None):
    """Execute ``paths`` in order with papermill; returns [(name, seconds)]. Raises SystemExit naming the
    failing notebook and cell."""
    import papermill as pm
    from .paths import figure_dir
    out_dir = out_dir or os.path.join(ROOT, "build", "notebooks")
    fig_dir = figure_dir(fig_dir, quick)  # None: build/figures (quick) or figures/ (full)
    os.makedirs(out_dir, exist_ok=True)
    timings = []
    for path in paths:
        name = os.path.basename(path)
        params = {"QUICK": bool(quick), "FIG_DIR": fig_dir, **(parameters or {})}
        if "WIDGETS" in parameter_names(path):
            params.setdefault("WIDGETS", False)  # headless: static figures, never a live widget
        t0 = time.time()
        print(f"[run_notebooks] {name} (quick={quick}) ...", flush=True)
        try:
            pm.execute_notebook(path, os.path.join(out_dir, name), parameters=params, cwd=ROOT,
                                kernel_name="python3", progress_bar=False)
        except pm.PapermillExecutionError as e:
            raise SystemExit(f"[run_notebooks] FAILED: {name}, cell {e.exec_count} ({e.ename}: {e.evalue}). "
                             f"Executed copy with the traceback: {os.path.join(out_dir, name)}") from None
        timings.append((name, time.time() - t0))
        print(f"[run_notebooks] {name} done in {timings[-1][1]:.0f} s", flush=True)
    return timings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=int, choices=(0, 1), default=0, help="1 = full settings, 0 = quick mode")
    ap.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 00,03")
    ap.add_argument("--out", default=None, help="folder for executed copies (default build/notebooks)")
    ap.add_argument("--fig-dir", default=None,
                    help="folder for figures and tables (default: build/figures in quick mode, figures/ with --full 1)")
    ap.add_argument("--strip-only", action="store_true")
    ap.add_argument("--check-stripped", action="store_true")
    args = ap.parse_args(argv)
    paths = notebooks(args.only)
    if args.strip_only:
        for p in paths:
            if strip_outputs(p):
                print(f"stripped {os.path.relpath(p, ROOT)}")
        return 0
    if args.check_stripped:
        bad = unstripped(paths)
        if bad:
            raise SystemExit("notebooks stored with outputs (run `make strip-notebooks`): " + ", ".join(bad))
        return 0
    t0 = time.time()
    timings = run(paths, quick=not args.full, out_dir=args.out, fig_dir=args.fig_dir)
    print(f"[run_notebooks] {len(timings)} notebooks in {time.time() - t0:.0f} s: "
          + ", ".join(f"{n} {s:.0f}s" for n, s in timings))
    from .paths import figure_dir
    print(f"[run_notebooks] figures and tables in {figure_dir(args.fig_dir, not args.full)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
