"""The BERT example's train step under msrun, plain data parallel against Lamb(shard_state=True).

    python benchmarks/bench_sharded_train.py                        # BERT-base, 2 workers, 4 x 128 each
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
  - `grads`: forward + backward (the train cell's network and gradient function, loss scale 1);
  - `grads + all-reduce`: the same followed by the train cell's own `DistributedGradReducer`; the
    difference to `grads` is the gradient all-reduce;
  - `optimizer`: the train cell's Lamb called alone on all-reduced gradients (the fused CPU kernel over
    all parameters, or the sharded backend);
  - sharded only, `all-gather`: an `AllGather` of one piece (L = ceil(E / N) float32) alone, and
    `all-gather + write-back`: the same followed by the backend's write-back of every parameter from the
    gathered vector (the piece gathered is the worker's piece of the current weights, so the weights do
    not change). The optimizer minus `all-gather + write-back` is the piece's update (moments, the norms'
    all-reduce, the new piece).

Separate cells, rather than MindSpore's profiler, because the profiler's CPU timeline does not attribute
time inside the fused `ops.Custom` kernels or the collectives reliably, while a cell's wall time is what a
user pays for it. The pieces do not add up to the train step exactly: the step also clips, tests for
overflow and updates the loss scale, and one graph overlaps a little where separate cells cannot.
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
    """The breakdown's cells, sharing the train cell's network, gradient function, reducer and optimizer."""
    from mindspore import nn
    from mindspore.ops import functional as F
    from mindspore.ops import operations as P

    class Grads(nn.Cell):
        """Forward + backward (+ the gradient all-reduce when `reduce`)."""

        def __init__(self, reduce):
            super().__init__()
            self.network, self.weights, self.grad = train_cell.network, train_cell.weights, train_cell.grad
            self.reduce = reduce
            self.reducer = train_cell.grad_reducer

        def construct(self, *inputs):
            loss = self.network(*inputs)
            grads = self.grad(self.network, self.weights)(*inputs, F.ones_like(loss))
            if self.reduce:
                grads = self.reducer(grads)
            return grads

    cells = {"grads": Grads(False), "grads + all-reduce": Grads(True)}
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
    start, end = (int(x) for x in backend.bounds.asnumpy())
    own = np.concatenate([p.asnumpy().reshape(-1) for p in opt.parameters])[start:end]
    return cells, np.concatenate([own, np.zeros(len(backend.positions) - len(own), np.float32)])


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

    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_cell(*inputs)
        wait()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cells, piece = _cells(train_cell, opt)
    grads = cells["grads + all-reduce"](*inputs)
    calls = {"grads": lambda: cells["grads"](*inputs), "grads + all-reduce": lambda: cells["grads + all-reduce"](*inputs),
             "optimizer": lambda: opt(grads)}
    if piece is not None:
        piece = ms.Tensor(piece)
        calls.update({k: (lambda c=cells[k]: c(piece)) for k in ("all-gather", "all-gather + write-back")})
    fns = {k: (lambda f=f: (f(), wait())) for k, f in calls.items()}
    for f in fns.values():                            # compile
        f()
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
    for shard in (False, True):
        args = [os.path.abspath(__file__), "--child", out_dir, "--config", a.config, "--batch", str(a.batch), "--seq", str(a.seq),
                "--warmup", str(a.warmup), "--steps", str(a.steps), "--rounds", str(a.rounds)]
        run_two_workers(out_dir, args + (["--shard"] if shard else []), a.timeout)
        header.append(f"# after the {'sharded' if shard else 'plain'} run: load average "
                      + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    runs = {k: [json.load(open(os.path.join(out_dir, f"{k}-rank{r}.json"))) for r in range(2)]
            for k in ("plain", "sharded")}
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
    print("breakdown, ms (rank 0 / rank 1):")
    for kind, pair in runs.items():
        parts = dict(pair[0]["breakdown_s"])
        both = [r["breakdown_s"] for r in pair]
        rows = [(k, [b[k] for b in both]) for k in parts]
        rows.insert(2, ("  all-reduce (difference)", [b["grads + all-reduce"] - b["grads"] for b in both]))
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
