"""Interleaved timing shared by the benchmark scripts: every round calls each function once, in an order
rotated by one each round, so that slow phases of a shared machine hit every function alike."""
import statistics
import time


def wait():
    """Return when every step launched so far has finished, on any device target. ms.runtime.synchronize()
    does nothing on CPU (it logs "CPU device is not supported"), and in PYNATIVE_MODE a call can return
    before its work is done: a timing that stopped there would measure the launch only."""
    import mindspore as ms
    if ms.get_context("device_target") == "CPU":
        from mindspore.graph.api import _pynative_executor   # noqa: PLC0415 (MindSpore's own wait)
        _pynative_executor.sync()
    else:
        ms.runtime.synchronize()


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


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return "", set()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith(("model name", "Model", "CPU part"))), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    return model, set(flags)


def isa_level(flags):
    """The x86-64 micro-architecture level the CPU flags reach (v1 .. v4), or the machine name elsewhere."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        return platform.machine()
    levels = [("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
              ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"}),
              ("x86-64-v2", {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})]
    reached = "x86-64-v1"
    for name, needed in reversed(levels):
        if needed <= flags:
            reached = name
    return reached


def cpu_header():
    """One line naming the CPU every figure of a run comes from: model, ISA level, cores, L3, the -march
    the fused kernel is built for (MINDSPORE_LAMB_MARCH, default native), and the load average."""
    import os
    model, flags = _cpu_flags()
    l3 = "?"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size", encoding="utf-8") as handle:
            l3 = handle.read().strip()
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"# CPU: {model}; ISA {isa_level(flags)}; {os.cpu_count()} cores; L3 {l3}; kernel built with "
            f"-march={os.environ.get('MINDSPORE_LAMB_MARCH', 'native')}; load average {load}")
