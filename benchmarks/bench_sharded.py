"""Lamb(shard_state=True) under msrun against the unsharded Lamb: optimizer-state memory per worker,
step time, and the bytes each step communicates, on BERT-base shapes (benchmarks/bench_step.py's set).

    python benchmarks/bench_sharded.py --workers 2            # launches msrun itself, prints one table
    python benchmarks/bench_sharded.py --workers 3 --repeats 5

Each worker builds the same parameters and gradients (the gradients stand for all-reduced ones), times
`repeats` optimizer calls with shard_state=True and, in the same process, with shard_state=False (the
unsharded step every worker would otherwise run; fused CPU kernel), interleaved; and reads the optimizer
state's size from its Parameters. Peak RSS per worker is reported too (it includes the parameters, the
gradients and MindSpore's own buffers).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("GLOG_v", "3")


def worker(out_dir, set_name, repeats):
    import mindspore as ms
    from _timing import wait
    from mindspore.communication import get_group_size, get_rank, init
    from bench_step import build
    from mindspore_lamb import Lamb
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    params, grads = build(set_name)
    opts = {"sharded": Lamb(params, learning_rate=1e-7, weight_decay=0.01, shard_state=True),
            "unsharded": Lamb(params, learning_rate=1e-7, weight_decay=0.01)}
    state = {k: sum(m.size * 4 for m in list(o.moments1) + list(o.moments2)) for k, o in opts.items()}
    times = {k: [] for k in opts}
    for k, opt in opts.items():                      # compile + warm up
        opt(grads)
        wait()
    for r in range(repeats):
        for k in (list(opts) if r % 2 == 0 else list(opts)[::-1]):
            t0 = time.perf_counter()
            opts[k](grads)
            wait()
            times[k].append(time.perf_counter() - t0)
    n_elems = sum(p.size for p in params)
    result = {"rank": rank, "world": world, "n_params": len(params), "n_elems": n_elems, "state_bytes": state,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", default="base")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)   # (msrun would take "--worker" for its own)
    a = ap.parse_args()
    if a.child:
        worker(a.child, a.set, a.repeats)
        return
    from _timing import cpu_header
    out_dir = tempfile.mkdtemp(prefix="bench_sharded-")
    msrun = os.path.join(os.path.dirname(sys.executable), "msrun")
    cmd = [msrun, f"--worker_num={a.workers}", f"--local_worker_num={a.workers}", "--master_addr=127.0.0.1",
           "--master_port=8129", "--join=True", f"--log_dir={out_dir}/logs", os.path.abspath(__file__),
           "--child", out_dir, "--set", a.set, "--repeats", str(a.repeats)]
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(a.workers)]
    first = ranks[0]
    n, elems = first["n_params"], first["n_elems"]
    print(cpu_header())
    print(f"# set {a.set}: {n} tensors, {elems / 1e6:.1f}M parameters; {a.workers} msrun workers, "
          f"{a.repeats} interleaved calls each")
    print(f"{'rank':<6}{'state MiB sharded':>19}{'unsharded':>11}{'step ms sharded':>17}{'unsharded':>11}"
          f"{'ratio':>7}{'peak RSS MiB':>14}")
    for r in ranks:
        s, u = r["median_s"]["sharded"] * 1e3, r["median_s"]["unsharded"] * 1e3
        print(f"{r['rank']:<6}{r['state_bytes']['sharded'] / 2**20:>19.1f}{r['state_bytes']['unsharded'] / 2**20:>11.1f}"
              f"{s:>17.1f}{u:>11.1f}{s / u:>7.2f}{r['peak_rss_mib']:>14.0f}")
    piece = -(-elems // a.workers)
    print(f"communication per step and worker (besides the gradients' all-reduce): all-reduce of {n} x 2 "
          f"float32 ({n * 8} bytes), all-gather of {piece} float32 in and {piece * (a.workers - 1) * 4 / 2**20:.1f} "
          f"MiB received")


if __name__ == "__main__":
    main()
