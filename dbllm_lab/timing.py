"""Wall-clock timing for the notebooks (chapter 07 times the packed layer on this CPU)."""
import statistics
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
