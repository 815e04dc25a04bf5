"""bench/common.py's results_lock: runner processes that share one results file merge their rows one at a time."""
import fcntl
import multiprocessing
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import common, dbllm_table  # noqa: E402


def _try_lock(folder, q):
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        q.put("got it")
    except BlockingIOError:
        q.put("blocked")
    finally:
        os.close(fd)


def _other_process(folder):
    q = multiprocessing.get_context("fork").Queue()
    p = multiprocessing.get_context("fork").Process(target=_try_lock, args=(folder, q))
    p.start()
    p.join(30)
    return q.get(timeout=5)


def test_results_lock_excludes_another_process_until_released(tmp_path):
    out = str(tmp_path / "results" / "table.json")
    with common.results_lock(out):
        assert os.path.isdir(tmp_path / "results")  # the folder is made if missing
        assert _other_process(str(tmp_path / "results")) == "blocked"
    assert _other_process(str(tmp_path / "results")) == "got it"


def _save(out, i):
    dbllm_table.OUT = out
    dbllm_table.save_row({"method": f"row {i}", "ppl": float(i)}, {"note": "test"})


def test_parallel_save_row_keeps_every_row(tmp_path, monkeypatch, n=6):
    out = str(tmp_path / "table.json")
    monkeypatch.setattr(dbllm_table, "OUT", out)  # this process's module is restored after the test
    _save(out, n)  # a row already there
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save, args=(out, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    methods = [r["method"] for r in common.load_results(out)]
    assert methods[0] == f"row {n}" and sorted(methods[1:]) == sorted(f"row {i}" for i in range(n))
