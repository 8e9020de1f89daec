"""The BERT example's train step under msrun, plain data parallel against Lamb(shard_state=True).

    python benchmarks/bench_sharded_train.py --rounds 3             # BERT-base, 2 workers, 4 x 128 each
    python benchmarks/bench_sharded_train.py --batch 2 --steps 5

Launches msrun twice (a free port each time, tests/helpers/msrun_launch.py), two CPU workers each: the
example's `train.py --distributed` train cell, and the same with `--shard_state`. The cell is built as
model_zoo_examples/bert/train.py builds it (BertPreTraining at the `base` config's shapes, the BERT parameter
groups, Lamb with the warm-up + decay schedule, LossScaleTrainStep with clipping at 1.0, one micro-batch per
step) on a fixed random batch per worker. Each worker reports:

* **train step**: median over `--steps` calls after `--warmup` calls (the first compiles);
* **peak RSS** (ru_maxrss) right after those steps, before anything else is built;
* **the breakdown**, from separately compiled cells run in the same worker processes after the train
  steps, `--rounds` rounds, the order rotated each round (benchmarks/_timing.py), median of each:
  - `all-reduce`: the train cell's own `DistributedGradReducer` alone, on a tuple of gradients of the
    parameters' shapes;
  - `optimizer`: the train cell's Lamb called alone on those (all-reduced) gradients: the fused CPU kernel
    over all parameters, or the sharded backend;
  - sharded only, `all-gather`: an `AllGather` of one piece (L = ceil(E / N) float32) alone, and
    `all-gather + write-back`: the same followed by the backend's write-back of every parameter from the
    gathered vector (the piece gathered is the worker's piece of the current weights, so the weights do
    not change). The optimizer minus `all-gather + write-back` is the piece's update (moments, the
    norms' all-reduce, the new piece);
  - sharded only, `unsharded optimizer`: an unsharded Lamb (the fused kernel) on the same parameters and
    gradients, so that the ratio is also measured under one load: the sharded train step against the same
    step with the unsharded optimizer's time in place of the sharded one's (printed as "paired");
  - `train step` again, in the same rounds, and `forward + backward and the rest` by difference: that train
    step minus `all-reduce` and `optimizer`.
    Besides the forward and backward passes it holds the loss-scale cell's own passes over the gradients
    (unscaling, the sum of squares for the overflow test and clipping, the clipping itself).

Forward + backward is not timed in a cell of its own because a second compiled BERT-base graph costs about
4.4 GB more per worker here (measured: 5.4 GB to 9.8 GB RSS), more than two workers and other jobs leave on
a 24 GB machine; the cells above hold no activations. Separate cells rather than MindSpore's profiler: a
cell's wall time is what the user pays, measured as in the other benchmarks. `--min_available` stops a run
(msrun and its workers) before the machine runs out of memory.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "model_zoo_examples", "bert"))
os.environ.setdefault("GLOG_v", "3")


def _batch(cfg, batch, seq, vocab, rng):
    n_pred = cfg["data"]["max_predictions_per_seq"]
    return (rng.integers(5, vocab, (batch, seq)).astype(np.int32), np.ones((batch, seq), np.int32),
            np.zeros((batch, seq), np.int32), rng.integers(0, 2, (batch,)).astype(np.int32),
            rng.integers(1, seq, (batch, n_pred)).astype(np.int32),
            rng.integers(5, vocab, (batch, n_pred)).astype(np.int32), np.ones((batch, n_pred), np.float32))


def _cells(train_cell, opt):
    """The breakdown's cells, sharing the train cell's reducer and optimizer, and the piece they gather."""
    from mindspore import nn
    from mindspore.ops import functional as F
    from mindspore.ops import operations as P

    class Reduce(nn.Cell):
        def __init__(self):
            super().__init__()
            self.reducer = train_cell.grad_reducer

        def construct(self, grads):
            return self.reducer(grads)

    cells = {"all-reduce": Reduce()}
    backend = opt.backend
    if backend.name != "sharded":
        return cells, None

    class Gather(nn.Cell):
        """The sharded backend's all-gather of one piece, and optionally its write-back of every parameter."""

        def __init__(self, write_back):
            super().__init__()
            self.write_back = write_back
            self.params = opt.parameters
            self.n, self.offsets, self.shapes = backend.n, backend.offsets, backend.shapes
            self.all_gather = P.AllGather()

        def construct(self, piece):
            flat = self.all_gather(piece)
            if not self.write_back:
                return flat[:1]
            done = ()
            for i in range(self.n):
                full = F.reshape(flat[self.offsets[i]:self.offsets[i + 1]], self.shapes[i])
                done += (F.assign(self.params[i], F.cast(full, F.dtype(self.params[i]))),)
            return F.depend(flat[:1], done)

    cells.update({"all-gather": Gather(False), "all-gather + write-back": Gather(True)})
    from mindspore_lamb.backends.sharded import piece_length
    start, end = (int(x) for x in backend.bounds.asnumpy())
    piece = np.zeros(piece_length(backend.offsets[-1], backend.world), np.float32)  # this worker's weights
    for p, lo, hi in zip(opt.parameters, backend.offsets, backend.offsets[1:]):
        a, b = max(lo, start), min(hi, end)              # the part of this parameter in the piece
        if a < b:
            piece[a - start:b - start] = p.asnumpy().reshape(-1)[a - lo:b - lo]
    return cells, piece


def _rss_mib():
    """(current RSS, peak RSS) of this process, MiB."""
    with open("/proc/self/statm") as handle:
        current = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _log(rank, what):
    print(f"[rank {rank}] {what}: RSS %.0f MiB, peak %.0f MiB" % _rss_mib(), flush=True)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:                                   # gone meanwhile
        return b""


def _watch(out_dir, kind, min_available_mib):
    """Wait in the launching process until both workers' results of `kind` are written or no worker is left;
    raise (msrun and its workers are then killed) when the machine's available memory drops below
    `min_available_mib`, before the kernel's OOM killer picks a process of someone else."""
    files = [os.path.join(out_dir, f"{kind}-rank{r}.json") for r in range(2)]
    seen = False
    while not all(os.path.exists(f) for f in files):
        with open("/proc/meminfo") as handle:
            available = next(int(line.split()[1]) for line in handle if line.startswith("MemAvailable")) / 1024
        if available < min_available_mib:
            raise MemoryError(f"only {available:.0f} MiB of memory available (--min_available {min_available_mib}): "
                              f"the {kind} run was stopped")
        alive = any(out_dir.encode() in _cmdline(pid) for pid in os.listdir("/proc") if pid.isdigit())
        if seen and not alive:
            return
        seen = seen or alive
        time.sleep(2)


def worker(out_dir, config, shard, batch, seq, warmup, steps, rounds):
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    from _timing import interleave, wait
    from model import BertConfig, BertPreTraining, BertPretrainLoss
    from train import build_optimizer, build_train_cell, load_config

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    cfg = load_config(argparse.Namespace(config=config, epochs=None, batch_size=None, accumulation_steps=None,
                                         max_documents=None, set=[]))
    vocab = cfg["data"]["vocab_size"]
    cfg["model"]["max_position_embeddings"] = max(cfg["model"]["max_position_embeddings"], seq)
    ms.set_seed(1)                                   # the same initial weights on every worker
    net = BertPreTraining(BertConfig.from_dict({**cfg["model"], "vocab_size": vocab, "dropout_seed": rank}))
    tcfg = dict(cfg["train"], accumulation_steps=1, shard_state=shard)
    opt = build_optimizer(net, tcfg, 10_000)
    train_cell = build_train_cell(BertPretrainLoss(net), opt, tcfg)
    inputs = tuple(ms.Tensor(x) for x in _batch(cfg, batch, seq, vocab, np.random.default_rng(rank)))

    _log(rank, "built")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_cell(*inputs)
        wait()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        _log(rank, f"train step {i}: {time.perf_counter() - t0:.2f} s")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cells, piece = _cells(train_cell, opt)
    rng = np.random.default_rng(0)                   # gradients of the parameters' shapes, the same on every worker
    grads = tuple(ms.Tensor(rng.standard_normal(p.shape, np.float32) * 1e-3) for p in opt.parameters)
    calls = {"train step": lambda: train_cell(*inputs), "all-reduce": lambda: cells["all-reduce"](grads),
             "optimizer": lambda: opt(grads)}
    if piece is not None:
        # the unsharded Lamb on the same parameters, timed in the same rounds: the plain step under the same load
        # is the sharded step with one optimizer call replaced by the other
        plain_opt = build_optimizer(net, dict(tcfg, shard_state=False), 10_000)
        calls["unsharded optimizer"] = lambda: plain_opt(grads)
        piece = ms.Tensor(piece)
        calls.update({k: (lambda c=cells[k]: c(piece)) for k in ("all-gather", "all-gather + write-back")})
    fns = {k: (lambda f=f: (f(), wait())) for k, f in calls.items()}
    for k, f in fns.items():                          # compile
        f()
        _log(rank, f"compiled {k}")
    breakdown = {k: statistics.median(v) for k, v in interleave(fns, rounds).items()}
    result = {"rank": rank, "world": world, "shard": shard, "n_elems": int(sum(p.size for p in opt.parameters)),
              "n_params": len(opt.parameters), "step_s": statistics.median(times), "steps_s": times,
              "breakdown_s": breakdown, "peak_rss_mib": peak_rss,
              "state_mib": sum(m.size * m.itemsize for m in list(opt.moments1) + list(opt.moments2)) / 2**20}
    with open(os.path.join(out_dir, f"{'sharded' if shard else 'plain'}-rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base", help="the example's config (tiny: a quick check of the script)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per worker and step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--warmup", type=int, default=2, help="train steps before the timed ones (the first compiles)")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the breakdown's cells")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds for each msrun launch")
    ap.add_argument("--min_available", type=int, default=2048,
                    help="MiB: stop the run when the machine's available memory drops below this")
    ap.add_argument("--runs", default="plain,sharded", help="which configurations to launch (comma-separated)")
    ap.add_argument("--child", help=argparse.SUPPRESS)   # (msrun would take "--worker" for its own)
    ap.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        worker(a.child, a.config, a.shard, a.batch, a.seq, a.warmup, a.steps, a.rounds)
        return
    sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
    from _timing import cpu_header
    from msrun_launch import run_two_workers

    out_dir = tempfile.mkdtemp(prefix="bench_sharded_train-")
    header = [cpu_header()]
    kinds = a.runs.split(",")
    for shard in [kind == "sharded" for kind in kinds]:
        args = [os.path.abspath(__file__), "--child", out_dir, "--config", a.config, "--batch", str(a.batch),
                "--seq", str(a.seq), "--warmup", str(a.warmup), "--steps", str(a.steps), "--rounds", str(a.rounds)]
        kind = "sharded" if shard else "plain"
        run_two_workers(out_dir, args + (["--shard"] if shard else []), a.timeout,
                        during=lambda kind=kind: _watch(out_dir, kind, a.min_available))
        header.append(f"# after the {'sharded' if shard else 'plain'} run: load average "
                      + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    runs = {k: [json.load(open(os.path.join(out_dir, f"{k}-rank{r}.json"))) for r in range(2)]
            for k in kinds}
    if len(runs) < 2:
        print("\n".join(header))
        for result in runs[kinds[0]]:
            print(json.dumps(result))
        return
    first = runs["plain"][0]
    print("\n".join(header))
    print(f"# BERT {a.config}: {first['n_params']} tensors, {first['n_elems'] / 1e6:.1f}M parameters; 2 msrun "
          f"CPU workers, {a.batch} x {a.seq} tokens per worker and step; train step: median of {a.steps} after "
          f"{a.warmup}; breakdown: median of {a.rounds} rounds")
    print(f"{'rank':<6}{'plain ms':>10}{'sharded ms':>12}{'ratio':>7}{'RSS MiB plain':>15}{'sharded':>9}"
          f"{'state MiB plain':>17}{'sharded':>9}")
    for p, s in zip(runs["plain"], runs["sharded"]):
        print(f"{p['rank']:<6}{p['step_s'] * 1e3:>10.0f}{s['step_s'] * 1e3:>12.0f}{s['step_s'] / p['step_s']:>7.2f}"
              f"{p['peak_rss_mib']:>15.0f}{s['peak_rss_mib']:>9.0f}{p['state_mib']:>17.1f}{s['state_mib']:>9.1f}")
    extra = [s["breakdown_s"]["optimizer"] - p["breakdown_s"]["optimizer"]
             for p, s in zip(runs["plain"], runs["sharded"])]
    print("the plain step plus the optimizers' difference (less sensitive to a change of load between the runs): "
          + " / ".join(f"{(p['step_s'] + e) * 1e3:.0f} ms, ratio {(p['step_s'] + e) / p['step_s']:.2f}"
                       for p, e in zip(runs["plain"], extra)))
    paired = [b["train step"] / (b["train step"] - b["optimizer"] + b["unsharded optimizer"])
              for b in (r["breakdown_s"] for r in runs["sharded"])]
    print("paired, in the sharded run's rounds: train step / (train step - optimizer + unsharded optimizer): "
          + " / ".join(f"{x:.2f}" for x in paired))
    print("breakdown, ms (rank 0 / rank 1):")
    for kind, pair in runs.items():
        parts = dict(pair[0]["breakdown_s"])
        both = [r["breakdown_s"] for r in pair]
        rows = [(k, [b[k] for b in both]) for k in parts]
        rows.insert(1, ("  forward + backward and the rest (difference)",
                        [b["train step"] - b["all-reduce"] - b["optimizer"] for b in both]))
        if "all-gather" in parts:
            rows.append(("  write-back (difference)", [b["all-gather + write-back"] - b["all-gather"] for b in both]))
            rows.append(("  piece update (optimizer - gather - write-back)",
                         [b["optimizer"] - b["all-gather + write-back"] for b in both]))
        print(f"  {kind}:")
        for name, values in rows:
            print(f"    {name:<50}" + " / ".join(f"{v * 1e3:8.0f}" for v in values))
    print(f"# raw per-worker results: {out_dir}")


if __name__ == "__main__":
    main()
