"""Peak memory of one msrun worker running Lamb, plain against shard_state=True, fused kernels against the
composite graph, phase by phase (docs/distributed.md, "Where a sharded worker's memory goes").

    python benchmarks/bench_sharded_memory.py                     # 4 msrun jobs, 2 CPU workers each, one table
    python benchmarks/bench_sharded_memory.py --configs sharded-fused,plain-fused --json
    python benchmarks/bench_sharded_memory.py --configs sharded-composite --set half
    python benchmarks/bench_sharded_memory.py --configs sharded-fused --bucket 1048576   # Lamb's shard_bucket_size
    python benchmarks/bench_sharded_memory.py --configs plain-fused,sharded-fused --optim-bits 8   # 8-bit state

Each configuration runs in its own msrun job (one at a time), so no optimizer's buffers hide another's. Each
worker builds benchmarks/bench_step.py's parameters and gradients (float32; the gradients stand for
all-reduced ones), then reads VmRSS and VmHWM from /proc/self/status around three phases:

* build:  the optimizer constructed (its state, and whatever the backend prepares);
* first:  the first call (compilation and the first run);
* steady: calls 2 to 4.

The high-water mark is reset between phases (writing "5" to /proc/self/clear_refs), so each phase's peak is
its own; where the kernel refuses that, the peaks are cumulative and the table says so. "growth" is the
worker's peak RSS over the 4 calls minus its RSS just before the optimizer was built. Also reported: the bytes
of the optimizer's state Parameters, and every Tensor of 1 MiB or more that the backend Cell holds (the
arrays it made at build). Rank 0's figures are printed (rank 1's are in --json).

A watchdog in this process kills the msrun job (scheduler and workers) when MemAvailable (/proc/meminfo)
drops below --min-available GiB; that configuration is then reported as "stopped by the watchdog".
`--set half` (half the BERT-base parameters, in the same layer shapes) is for a configuration that does not
fit twice in the machine's memory; per-parameter figures carry over.

The probes (`--configs probe-allgather,probe-writeback,probe-gather-writeback,probe-sumsq`) run one part of a
sharded step without buckets alone, in a compiled cell of its own, on the same parameters and measured the same
way: the all-gather of a worker's whole piece, the write-back of a gathered vector into every parameter (a
slice and an assign each), both in one graph, and the composite sum of the squares of the gradients: what
backends/sharded.py's buckets, its in-place write-back and the fused sum of squares replace.
"""
import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "helpers"))
os.environ.setdefault("GLOG_v", "3")

from msrun_launch import descendants, sigkill  # noqa: E402  (msrun starts the workers with setsid)

CONFIGS = ("plain-fused", "sharded-fused", "plain-composite", "sharded-composite")
# one buffer of the sharded step alone, in a compiled cell of its own, on the same parameters (--configs)
PROBES = ("probe-allgather", "probe-writeback", "probe-gather-writeback", "probe-sumsq")
MIB = 2 ** 20


def status():
    """(VmRSS, VmHWM) of this process, in bytes."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak():
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (peaks are then cumulative)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def half_shapes():
    """Half of BERT-base's parameters in BERT-base's layer shapes: 6 encoder layers, half the vocabulary."""
    from bench_step import bert_shapes
    return bert_shapes(6, 768, 3072, vocab=30522 // 2, positions=256)


def held_tensors(cell, floor=MIB):
    """[(attribute, shape, dtype, bytes)] of the Tensors (not Parameters) of `cell`'s own attributes with at
    least `floor` bytes."""
    from mindspore import Parameter, Tensor
    found = []
    for key, value in vars(cell).items():
        if isinstance(value, Tensor) and not isinstance(value, Parameter) and value.nbytes >= floor:
            found.append((key, list(value.shape), str(value.dtype), int(value.nbytes)))
    return found


def probe(config, params):
    """(cell, inputs) of one part of a sharded step without buckets (see the module's docstring): the all-gather of
    a worker's piece (L float32 in, E out), the write-back of the gathered vector into every parameter (a slice
    and an assign each), both in one graph, or the composite sum of the squares of the gradients."""
    import numpy as np
    from mindspore import ParameterTuple, Tensor, nn, ops
    from mindspore.communication import get_group_size
    from mindspore.ops import functional as F
    from mindspore_lamb.backends import composite
    sizes = [int(p.size) for p in params]
    offsets = [int(x) for x in np.cumsum([0] + sizes)]
    shapes = [tuple(p.shape) for p in params]
    length = -(-offsets[-1] // get_group_size())

    class Probe(nn.Cell):
        def __init__(self, gather, write):
            super().__init__()
            self.gather, self.write = gather, write
            self.targets = ParameterTuple(params)
            self.all_gather = ops.AllGather()
            self.sum_of_squares = composite.SumOfSquares()

        def construct(self, x):
            if self.gather:
                x = self.all_gather(x)
            if not self.write:
                return x
            done = ()
            for i in range(len(shapes)):
                done += (ops.assign(self.targets[i], F.reshape(x[offsets[i]:offsets[i + 1]], shapes[i])),)
            return F.depend(x[0:1], done)

    if config == "probe-sumsq":
        cell = composite.SumOfSquares()
        return cell, lambda grads: (grads,)
    if config == "probe-writeback":
        flat = Tensor(np.concatenate([p.asnumpy().reshape(-1) for p in params]))
        return Probe(False, True), lambda grads: (flat,)
    piece = Tensor(np.zeros(length, np.float32) + 0.01)
    return Probe(True, config == "probe-gather-writeback"), lambda grads: (piece,)


def worker(out_dir, config, set_name, calls, bucket=None, optim_bits=32):
    import mindspore as ms
    from _timing import wait
    from mindspore.communication import get_group_size, get_rank, init
    import bench_step
    from mindspore_lamb import Lamb
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    bench_step.SETS["half"] = half_shapes
    params, grads = bench_step.build(set_name)
    sharded, backend = config.split("-", 1)
    gc.collect()
    base, _ = status()
    resettable = reset_peak()
    phases = {}

    def phase(name):
        gc.collect()
        rss, hwm = status()
        phases[name] = {"rss": rss, "hwm": hwm}
        reset_peak()

    if config in PROBES:
        cell, inputs = probe(config, params)
        call = lambda: cell(*inputs(grads))     # noqa: E731
    else:
        extra = {"shard_bucket_size": bucket} if bucket and sharded == "sharded" else {}
        opt = Lamb(params, learning_rate=1e-7, weight_decay=0.01, shard_state=sharded == "sharded",
                   backend="fused_cpu" if backend == "fused" else "composite", optim_bits=optim_bits, **extra)
        call = lambda: opt(grads)               # noqa: E731
    phase("build")
    call()
    wait()
    phase("first")
    for _ in range(calls - 1):
        call()
        wait()
    phase("steady")
    if config in PROBES:
        state, held, name = 0, [], config
    else:
        state = sum(int(p.nbytes) for p in opt.backend.state)      # moments, or 8-bit codes and scales
        held = held_tensors(opt.backend)
        name = opt.backend.name
    result = {"rank": rank, "world": world, "config": config, "set": set_name, "calls": calls, "optim_bits": optim_bits,
              "backend": name, "n_params": len(params), "n_elems": sum(p.size for p in params),
              "param_bytes": sum(int(p.nbytes) for p in params), "base_rss": base, "resettable": resettable,
              "phases": phases, "state_bytes": state, "held_tensors": held}
    with open(os.path.join(out_dir, f"{config}.rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle)


# ---------------------------------------------------------------- the launcher

def mem_available():
    """MemAvailable of the machine, in bytes."""
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def kill_job(proc):
    """SIGKILL msrun's workers and scheduler first (they hold the memory), then msrun."""
    sigkill(proc, descendants(proc.pid))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_config(config, a, out_dir):
    """Run one configuration as an msrun job; (status, [per-rank results]) with status "ok", "stopped by the
    watchdog", "timed out" or "failed (exit N)"."""
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    log_dir = os.path.join(out_dir, f"logs-{config}")
    cmd = [msrun, f"--worker_num={a.workers}", f"--local_worker_num={a.workers}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--join=True", "--cluster_time_out=120", f"--log_dir={log_dir}",
           os.path.abspath(__file__), "--child", out_dir, "--configs", config, "--set", a.set,
           "--calls", str(a.calls)]
    cmd += ["--bucket", str(a.bucket)] if a.bucket else []
    cmd += ["--optim-bits", str(a.optim_bits)]
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    verdict, lowest = None, mem_available()
    deadline = time.monotonic() + a.timeout
    while proc.poll() is None:
        available = mem_available()
        lowest = min(lowest, available)
        if available < a.min_available * 2 ** 30:
            verdict = "stopped by the watchdog"
        elif time.monotonic() > deadline:
            verdict = "timed out"
        if verdict:
            kill_job(proc)
            proc.wait()
            break
        time.sleep(0.2)
    if verdict is None:
        verdict = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}; logs in {log_dir})"
    ranks = []
    for r in range(a.workers):
        path = os.path.join(out_dir, f"{config}.rank{r}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                ranks.append(json.load(handle))
    return verdict, ranks, lowest


def summary(result):
    """Peak growth over the calls and per phase (MiB above the RSS before the optimizer was built)."""
    base = result["base_rss"]
    phases = result["phases"]
    peak = max(p["hwm"] for p in phases.values())
    return {"growth": peak - base,
            "per_param": (peak - base) / result["n_elems"],
            "phases": {k: {"peak": p["hwm"] - base, "after": p["rss"] - base} for k, p in phases.items()}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, of {', '.join(CONFIGS + PROBES)}")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", default="base", help="bench_step.py's base or large, or half (half of base)")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--bucket", type=int, help="Lamb's shard_bucket_size for the sharded configurations "
                                               "(default: Lamb's default)")
    ap.add_argument("--optim-bits", type=int, default=32, choices=(32, 8),
                    help="Lamb's optim_bits (8: the composite configurations refuse shard_state)")
    ap.add_argument("--min-available", type=float, default=3.0, help="watchdog: GiB of MemAvailable")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per msrun job")
    ap.add_argument("--json", action="store_true", help="also print one machine-readable line")
    ap.add_argument("--child", help=argparse.SUPPRESS)   # (msrun would take "--worker" for its own)
    a = ap.parse_args()
    if a.child:
        worker(a.child, a.configs, a.set, a.calls, a.bucket, a.optim_bits)
        return
    configs = a.configs.split(",")
    unknown = [c for c in configs if c not in CONFIGS + PROBES]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS + PROBES)}")
    from _timing import cpu_header
    out_dir = tempfile.mkdtemp(prefix="bench_sharded_memory-")
    results = {}
    for config in configs:
        verdict, ranks, lowest = run_config(config, a, out_dir)
        results[config] = {"status": verdict, "ranks": ranks, "lowest_available": lowest}
        print(f"# {config}: {verdict} (lowest MemAvailable {lowest / 2**30:.1f} GiB)", flush=True)
    print(cpu_header())
    first = next((r["ranks"][0] for r in results.values() if r["ranks"]), None)
    if first is None:
        raise SystemExit("no configuration finished")
    print(f"# set {a.set}: {first['n_params']} tensors, {first['n_elems'] / 1e6:.1f}M float32 parameters "
          f"({first['param_bytes'] / MIB:,.1f} MiB); optim_bits={a.optim_bits}; {a.workers} msrun workers; rank 0; "
          f"MiB above the RSS just "
          f"before the optimizer was built; peaks {'per phase' if first['resettable'] else 'CUMULATIVE'}")
    print(f"{'configuration':<19}{'peak growth':>12}{'B/param':>9}{'build pk/after':>16}{'first pk/after':>16}"
          f"{'steady pk/after':>17}{'state':>9}{'held':>8}")
    for config, r in results.items():
        if not r["ranks"]:
            print(f"{config:<19}  {r['status']}")
            continue
        rank0 = r["ranks"][0]
        s = summary(rank0)
        cells = "".join(f"{s['phases'][k]['peak'] / MIB:>9,.0f}/{s['phases'][k]['after'] / MIB:<,.0f}".rjust(w)
                        for k, w in (("build", 16), ("first", 16), ("steady", 17)))
        held = sum(t[3] for t in rank0["held_tensors"])
        print(f"{config:<19}{s['growth'] / MIB:>12,.0f}{s['per_param']:>9.1f}{cells}"
              f"{rank0['state_bytes'] / MIB:>9,.1f}{held / MIB:>8,.1f}"
              + ("" if r["status"] == "ok" else f"  ({r['status']})"))
        r["summary"] = s
    for kind in ("fused", "composite"):
        plain, shard = results.get(f"plain-{kind}"), results.get(f"sharded-{kind}")
        if plain and shard and "summary" in plain and "summary" in shard:
            print(f"{kind}: sharded / plain peak growth {shard['summary']['growth'] / plain['summary']['growth']:.2f}; "
                  f"state {shard['ranks'][0]['state_bytes'] / MIB:,.1f} / {plain['ranks'][0]['state_bytes'] / MIB:,.1f} MiB")
    for config, r in results.items():
        for name, shape, dtype, nbytes in (r["ranks"][0]["held_tensors"] if r["ranks"] else []):
            print(f"  {config}: backend Tensor {name} {dtype}{shape}: {nbytes / MIB:,.1f} MiB")
    if a.json:
        print(json.dumps({"set": a.set, "workers": a.workers, "calls": a.calls, "results": results}))


if __name__ == "__main__":
    main()
