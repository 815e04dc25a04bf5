"""Run the notebook suite headless with papermill, in order (``make reproduce``).

    python -m dbllm_lab.run_notebooks [--full 0|1] [--only 00,03] [--out build/notebooks] [--trained DIR]
    python -m dbllm_lab.run_notebooks --strip-only      # strip outputs of the stored notebooks
    python -m dbllm_lab.run_notebooks --check-stripped  # fail if a stored notebook holds outputs

Quick mode (default) is the CI setting; ``--full 1`` uses each notebook's full settings.
Executed copies go to ``build/notebooks``. Figures and their tables go to ``build/figures/`` in quick mode (the
tracked tree stays unchanged) and to the committed ``figures/`` in full mode (``paths.figure_dir``).
A failing cell stops the run with the notebook and cell named.

The trained student (notebooks 04, 05, 10 and 11 measure it live beside their toy runs): ``--trained DIR``
(default ``build/models/best``) is passed as ``TRAINED`` to every notebook that has that parameter. In full mode a
missing ``build/models/RECIPE`` folder is trained first (``dbllm-lab train --recipe RECIPE --save DIR``: the
`best` recipe's measured cost is in ``bench/results/dbllm_recipes.json``), and the run is recorded in
``figures/RUN.json``: commit, date, wall time, CPU-minutes, the machine, its load during the run, each notebook's
time and the student used.
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


DEFAULT_TRAINED = os.path.join("build", "models", "best")


def ensure_student(trained):
    """The packed student folder ``trained`` (relative to the project root); trained here with the recipe its
    folder is named after when missing. Returns {path, trained_now, cpu_minutes}."""
    from .recipes import RECIPES
    full = os.path.join(ROOT, trained)
    if os.path.isfile(os.path.join(full, "quant_config.json")):
        return {"path": trained, "trained_now": False}
    name = os.path.basename(os.path.normpath(full))
    if name not in RECIPES:
        raise SystemExit(f"[run_notebooks] no trained student at {trained!r}, and its folder name {name!r} is not "
                         f"a recipe to train it with ({', '.join(RECIPES)}): pass --trained build/models/RECIPE")
    import subprocess
    print(f"[run_notebooks] training the {name!r} student into {trained} (dbllm-lab train; resumable)", flush=True)
    cpu0 = resource_cpu_s()
    subprocess.run([sys.executable, "-m", "dbllm_lab.cli", "train", "--recipe", name, "--save", full], check=True,
                   cwd=ROOT)
    return {"path": trained, "trained_now": True, "cpu_minutes": round((resource_cpu_s() - cpu0) / 60, 1)}


def resource_cpu_s():
    """CPU seconds of this process and its finished children (user + system)."""
    import resource
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def git_commit():
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        # figures/ is what a full run writes, so it does not count as a change to the code that ran
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures"],
                               cwd=ROOT, capture_output=True, text=True, check=True)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def write_run_record(fig_dir, timings, wall_s, cpu_s, load, student, started, waited_s):
    """``figures/RUN.json``: what produced the committed figures."""
    import torch

    from .cpu_kernel import cpu_model, cpu_signature
    commit, dirty = git_commit()
    cpu = cpu_model() or "unknown"
    rec = {"mode": "full", "command": "make reproduce FULL=1" + (f" TRAINED={student['path']}"
                                                               if student["path"] != DEFAULT_TRAINED else ""),
           "commit": commit, "uncommitted_changes": dirty, "started_utc": started,
           "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "wall_minutes": round((wall_s - waited_s) / 60, 1), "cpu_minutes": round(cpu_s / 60, 1),
           "minutes_waiting_for_the_machine_lock": round(waited_s / 60, 1),
           "machine": {"cpu": cpu, "cpu_signature": cpu_signature(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()},
           "load_during_run": load, "trained_student": student,
           "notebooks": [{"notebook": n, "seconds": round(s)} for n, s in timings]}
    path = os.path.join(fig_dir, "RUN.json")
    tmp = path + ".tmp"  # write, then rename: never a half-written record
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


class machine_lock:
    """``with machine_lock(path):`` holds an exclusive flock on ``path`` (None: no lock), so that on a shared machine
    each notebook runs while no other locked job does; ``waited_s`` adds up the time spent waiting for it."""
    waited_s = 0.0

    def __init__(self, path):
        self.path, self.f = path, None

    def __enter__(self):
        if self.path:
            import fcntl
            t0 = time.time()
            self.f = open(self.path, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
            machine_lock.waited_s += time.time() - t0
        return self

    def __exit__(self, *exc):
        if self.f:
            self.f.close()  # releases the flock


def run(paths, quick=True, out_dir=None, fig_dir=None, parameters=None, lock=None):
    """Execute ``paths`` in order with papermill, each under ``machine_lock(lock)``; returns [(name, seconds)],
    seconds counted once the lock is held. Raises SystemExit naming the failing notebook and cell."""
    import papermill as pm
    from .paths import figure_dir
    out_dir = out_dir or os.path.join(ROOT, "build", "notebooks")
    fig_dir = figure_dir(fig_dir, quick)  # None: build/figures (quick) or figures/ (full)
    os.makedirs(out_dir, exist_ok=True)
    timings = []
    for path in paths:
        name = os.path.basename(path)
        names = parameter_names(path)
        params = {"QUICK": bool(quick), "FIG_DIR": fig_dir,
                  **{k: v for k, v in (parameters or {}).items() if k in names}}
        if "WIDGETS" in names:
            params.setdefault("WIDGETS", False)  # headless: static figures, never a live widget
        print(f"[run_notebooks] {name} (quick={quick}) ...", flush=True)
        with machine_lock(lock):
            t0 = time.time()
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
    ap.add_argument("--trained", default=None,
                    help=f"packed trained student for notebooks 04, 05, 10, 11 (default {DEFAULT_TRAINED}; full mode "
                         "trains it when missing)")
    ap.add_argument("--lock", default=None, metavar="FILE",
                    help="shared machine: run each notebook (and the training) holding an flock on FILE; RUN.json "
                         "then records the time spent waiting apart")
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
    from .paths import figure_dir
    from .timing import LoadSampler
    t0, cpu0 = time.time(), resource_cpu_s()
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    trained = args.trained or DEFAULT_TRAINED
    with LoadSampler(every=10.0) as load:
        with machine_lock(args.lock):
            uses = any("TRAINED" in parameter_names(p) for p in paths)  # e.g. --only 07 needs no student
            student = ensure_student(trained) if args.full and uses else {"path": trained}
        timings = run(paths, quick=not args.full, out_dir=args.out, fig_dir=args.fig_dir,
                      parameters={"TRAINED": trained}, lock=args.lock)
    print(f"[run_notebooks] {len(timings)} notebooks in {time.time() - t0:.0f} s: "
          + ", ".join(f"{n} {s:.0f}s" for n, s in timings))
    fig_dir = figure_dir(args.fig_dir, not args.full)
    print(f"[run_notebooks] figures and tables in {fig_dir}")
    if args.full and not args.only:
        print("[run_notebooks] run recorded in " + write_run_record(fig_dir, timings, time.time() - t0,
                                                                   resource_cpu_s() - cpu0, load.summary(), student,
                                                                   started, machine_lock.waited_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
