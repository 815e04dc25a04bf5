"""Copy the result tables into README.md and docs/results.md: every block

    <!-- table: bench/results/NAME.json [col,col,...] having=KEY -->
    ...
    <!-- /table -->

is replaced by the markdown table of that JSON's rows (chosen columns, in order; with ``having=KEY`` only the rows
where KEY is set) and a line naming its settings and machine, so every number these pages quote comes from a
committed result file.

    python bench/update_readme.py [--check]     # --check: exit 1 if a page is out of date
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- table: (\S+)(?: \[([^\]]*)\])?(?: having=(\w+))? -->\n)(.*?)(<!-- /table -->)", re.S)
PAGES = ("README.md", "docs/results.md")
SETTING_KEYS = ("model", "dataset", "split", "seqlen", "windows", "group_size", "calib", "train_budget", "engine",
                "docs_per_task", "note")


def render(path, columns, having=None):
    if not os.path.isfile(os.path.join(ROOT, path)):
        script = "bench/" + os.path.basename(path).split(".")[0].split("_")[0] + "*.py"
        return f"*Not measured yet: `{path}` does not exist (run the matching `{script}`).*\n"
    with open(os.path.join(ROOT, path)) as f:
        doc = json.load(f)
    cols = [c.strip() for c in columns.split(",")] if columns else None
    m, s = doc.get("machine", {}), doc.get("settings", {})
    where = ", ".join(f"{k}: {s[k]}" for k in SETTING_KEYS if s.get(k) not in (None, ""))
    machine = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
    rows = [r for r in doc["rows"] if not having or r.get(having) is not None]
    if having and not rows:
        raise ValueError(f"{path}: no row has {having!r}; the table would be empty")
    return (markdown_table(rows, cols) +
            f"\n<sub>From `{path}` ({where + '; ' if where else ''}machine: {machine}; {m.get('date', '')}).</sub>\n")


def update(text):
    return BLOCK.sub(lambda mt: mt.group(1) + render(mt.group(2), mt.group(3), mt.group(4)) + mt.group(6), text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    for page in PAGES:
        path = os.path.join(ROOT, page)
        with open(path) as f:
            old = f.read()
        new = update(old)
        if args.check:
            if new != old:
                sys.exit(f"{page} tables are out of date: run `python bench/update_readme.py`")
            continue
        with open(path, "w") as f:
            f.write(new)
        print(f"{page}: {len(BLOCK.findall(new))} tables refreshed")


if __name__ == "__main__":
    main()
