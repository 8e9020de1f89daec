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


def summary(times, ref):
    """Rows (name, median ms, min ms, median / median of `ref`), in the order of `times`."""
    ref_ms = statistics.median(times[ref]) * 1e3
    for name, seconds in times.items():
        med = statistics.median(seconds) * 1e3
        yield name, med, min(seconds) * 1e3, med / ref_ms
