"""Timing helpers: wall-clock medians for the notebooks (chapter 07 times the packed layer on this CPU) and the
machine's load during a timed run (every bench row and the FULL run record it)."""
import os
import statistics
import threading
import time


def time_ms(fn, repeats=5, warmup=1):
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class LoadSampler:
    """Samples the 1-min load average and the running-thread count (/proc/stat procs_running) every ``every``
    seconds on a daemon thread while a ``with`` block runs; ``summary()`` gives min / median / mean / max of each."""

    def __init__(self, every=1.0):
        self.every, self.load, self.running, self._stop = every, [], [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            self.load.append(os.getloadavg()[0])
            try:
                with open("/proc/stat") as f:
                    self.running.append(next(int(ln.split()[1]) for ln in f if ln.startswith("procs_running")))
            except (OSError, StopIteration):
                pass
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        def stats(v):
            return ({"min": min(v), "median": statistics.median(v), "mean": round(statistics.mean(v), 2),
                     "max": max(v), "samples": len(v)} if v else None)
        return {"loadavg_1min": stats(self.load), "procs_running": stats(self.running)}
