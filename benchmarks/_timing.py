"""Interleaved timing shared by the benchmark scripts: every round calls each function once, in an order
rotated by one each round, so that slow phases of a shared machine hit every function alike."""
import statistics
import time


def interleave(fns, repeats):
    """fns: dict name -> zero-argument callable (it must wait for its own result). Returns name -> list of
    seconds, `repeats` calls each."""
    names = list(fns)
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def median_ms(seconds):
    return statistics.median(seconds) * 1e3
