"""LAMB's large-batch claim on BERT itself: held-out accuracy against batch size, LAMB against AdamW.

    python model_zoo_examples/bert/batch_study.py           # the study (about 2 hours on 2 cores; resumable)
    python model_zoo_examples/bert/batch_study.py --quick   # smoke test: tiny model, 40 documents (~2 min)
    python model_zoo_examples/bert/batch_study.py --report  # the table and plot of the runs finished so far

Tiny BERT (configs/tiny.yaml, phase 1: 32-token sequences) on the KJV, trained by train.py once per
(optimizer, batch size, learning rate, seed), with everything else as in the main job:

* every batch size sees the same number of training sequences (`--sequences`), so the number of
  optimizer steps is sequences / batch; batches above `--micro_batch` use gradient accumulation;
* peak learning rate from a grid per (optimizer, batch size): centre * {1/3, 1, 3}, the centre
  following the square-root rule from the main job's rate at batch 128 (LAMB 0.006, AdamW 0.001:
  `nn.AdamWeightDecay` with the same parameter groups, warm-up and decay, clipping and loss scale);
  where the best rate is on the grid's edge, one more rate (x3 or /3) beyond it (not where every rate
  gives the same accuracy);
* the rate is picked on the *dev* half of the held-out chapters (seed 0); the picked rate is run again
  with the other seeds; the table reports the *test* half (the other held-out chapters), mean over seeds;
* `--jobs` runs at a time, each pinned to its own CPU core (on 2 cores, two single-core runs train
  about 1.5x the tokens per second of one run on both).

Every finished run is a line of OUTPUT_DIR/runs.jsonl; a rerun skips those, so an interrupted study
continues where it stopped. Writes table.md and batch_study.png next to it (docs/bert_large_batch.md
shows the measured ones).
"""
import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BASE_LR = {"lamb": 0.006, "adamw": 0.001}   # the rates at batch 128 that the centres scale from
GRID = (1 / 3, 1.0, 3.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 40 documents, a 32-wide model, batch 8 and 32, "
                                                         "a 2-point grid, 2 seeds")
    p.add_argument("--batch_sizes", help="comma-separated (default 32,256,1024,4096)")
    p.add_argument("--sequences", type=int, help="training sequences per run, the same for every batch size "
                                                 "(default 98304: 3072 steps of 32 ... 24 steps of 4096)")
    p.add_argument("--micro_batch", type=int, default=1024, help="largest batch computed at once")
    p.add_argument("--optimizers", default="lamb,adamw")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--extend", type=int, default=1, help="where the best rate is on the grid's edge, try up to "
                                                         "this many more rates beyond it (default 1)")
    p.add_argument("--report", action="store_true", help="train nothing: the table and plot of the finished runs")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at a time, one core each")
    p.add_argument("--output_dir", default=os.path.join("runs", "bert_batch_study"))
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("8,32" if args.quick else "32,256,1024,4096")).split(",")]
    args.sequences = args.sequences or (256 if args.quick else 98304)
    args.optimizers = args.optimizers.split(",")
    args.grid = GRID[1:] if args.quick else GRID
    for b in args.batch_sizes:
        if args.sequences % (2 * b) or (b > args.micro_batch and b % args.micro_batch):
            raise SystemExit(f"--batch_sizes {b}: --sequences ({args.sequences}) must split into 2 epochs of whole "
                             f"batches, and a batch above --micro_batch ({args.micro_batch}) into micro-batches")
    return args


def common_options(args):
    """train.py options shared by every run of the study (config, data, shared cache)."""
    out = os.path.abspath(args.output_dir)
    opts = ["--config", os.path.join(HERE, "configs", "tiny.yaml"), "--device_target", "CPU",
            "--corpus", os.path.join(out, "kjv.txt"), "--data_dir", os.path.join(out, "data"),
            "--set", "data.test_split=true", "--set", "train.keep_checkpoint_max=2"]
    if args.quick:
        opts += ["--max_documents", "40", "--set", "data.eval_every=5", "--set", "data.vocab_size=600",
                 "--set", "model.hidden_size=32", "--set", "model.intermediate_size=64"]
    return opts


def run_options(args, opt, batch, lr, seed):
    micro = min(batch, args.micro_batch)
    steps_per_epoch = args.sequences // 2 // micro            # micro-batches; 2 epochs
    return ["--epochs", "2", "--max_steps_per_epoch", str(steps_per_epoch),
            "--batch_size", str(micro), "--accumulation_steps", str(batch // micro),
            "--set", f"train.optimizer={opt}", "--set", f"train.learning_rate={lr:.6g}",
            "--set", f"train.seed={seed}", "--set", f"train.log_every={max(1, steps_per_epoch // 5)}",
            "--set", f"train.trust_ratio_every={max(1, steps_per_epoch // 10)}"]


def prepare(args):
    """Corpus and MindRecord cache once, before the runs share them."""
    import train
    from corpus import write_kjv_text
    from pretrain_data import prepare_data
    a = train.parse_args(common_options(args))
    cfg = train.load_config(a)
    if not os.path.isfile(a.corpus):
        write_kjv_text(a.corpus)
    return prepare_data(a.data_dir, a.corpus, cfg["data"])


def final_loss(run_dir):
    """Mean training loss over the last 5 % of the micro-batches."""
    from evaluate import read_loss_log
    losses = [r["loss"] for r in read_loss_log(os.path.join(run_dir, "loss.jsonl"))]
    return float(np.mean(losses[-max(1, len(losses) // 20):]))


class Runner:
    def __init__(self, args):
        self.args, self.out = args, os.path.abspath(args.output_dir)
        self.log = os.path.join(self.out, "runs.jsonl")
        self.done = {}
        if os.path.isfile(self.log):
            with open(self.log) as f:
                for line in f:
                    r = json.loads(line)
                    self.done[r["name"]] = r
        self.cores = queue.Queue()               # a run takes a core and gives it back: --jobs at a time
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
        for i in range(args.jobs):
            self.cores.put(cores[i % len(cores)])

    def __call__(self, opt, batch, lr, seed):
        name = f"{opt}_b{batch}_lr{lr:.3g}_s{seed}"
        if name in self.done:
            return self.done[name]
        run_dir = os.path.join(self.out, "runs", name)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--output_dir", run_dir] + \
            common_options(self.args) + run_options(self.args, opt, batch, lr, seed)
        core = self.cores.get()
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOG_v=os.environ.get("GLOG_v", "3"))
        pin = (lambda: os.sched_setaffinity(0, {core})) if self.args.jobs > 1 and hasattr(os, "sched_setaffinity") \
            else None
        t0 = time.time()
        try:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "train.log"), "w") as log:
                rc = subprocess.call(cmd + ["--resume"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=pin)
        finally:
            self.cores.put(core)
        if rc != 0:
            raise RuntimeError(f"{name} failed (exit {rc}); see {os.path.join(run_dir, 'train.log')}")
        with open(os.path.join(run_dir, "results.json")) as f:
            res = json.load(f)
        row = dict(name=name, optimizer=opt, batch_size=batch, lr=lr, seed=seed,
                   steps=self.args.sequences // batch, dev_mlm=res["after"]["mlm_accuracy"],
                   test_mlm=res["test"]["mlm_accuracy"], test_nsp=res["test"]["nsp_accuracy"],
                   final_loss=final_loss(run_dir), seconds=round(time.time() - t0, 1))
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        with open(self.log, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.done[name] = row
        return row


def best(rows):
    """The run with the best dev MLM accuracy; on a tie the smaller rate (the order runs finish in is not fixed)."""
    return max(rows, key=lambda r: (r["dev_mlm"], -r["lr"]))


def centre(opt, batch):
    return BASE_LR[opt] * (batch / 128) ** 0.5


def study(args, runner):
    """Per batch size, for every optimizer at once: the grid (seed 0), one more rate beyond the grid's edge
    where the best rate is on that edge (up to `--extend` times), then the other seeds at the picked rate."""
    ratio = args.grid[-1] / args.grid[-2]

    def chain(opt, batch):
        tried = list(pool.map(lambda lr: runner(opt, batch, lr, 0), [centre(opt, batch) * g for g in args.grid]))
        for _ in range(args.extend):
            lr, rates = best(tried)["lr"], sorted(r["lr"] for r in tried)
            if lr not in (rates[0], rates[-1]) or len({r["dev_mlm"] for r in tried}) == 1:
                break                                    # inside the grid, or no rate better than another
            tried.append(runner(opt, batch, lr * ratio if lr == rates[-1] else lr / ratio, 0))
        lr = best(tried)["lr"]
        list(pool.map(lambda seed: runner(opt, batch, lr, seed), range(1, args.seeds)))

    # the runner takes a free core for each run, so at most --jobs train at a time; while one optimizer
    # tries a rate beyond its grid, the other's seeds use the other core
    width = len(args.optimizers) * max(len(args.grid), args.seeds)
    with ThreadPoolExecutor(len(args.optimizers)) as chains, ThreadPoolExecutor(width) as pool:
        for batch in args.batch_sizes:
            list(chains.map(lambda opt: chain(opt, batch), args.optimizers))
    return table(args, list(runner.done.values()))


def table(args, rows):
    """One line per (optimizer, batch size): picked rate, test MLM/NSP and final loss (mean over seeds)."""
    out = []
    for opt, batch in itertools.product(args.optimizers, args.batch_sizes):
        grid = [r for r in rows if (r["optimizer"], r["batch_size"], r["seed"]) == (opt, batch, 0)]
        if len(grid) < len(args.grid):
            continue
        lr = best(grid)["lr"]
        seeds = [r for r in rows if (r["optimizer"], r["batch_size"], r["lr"]) == (opt, batch, lr)]
        mean = {k: float(np.mean([r[k] for r in seeds])) for k in ("test_mlm", "test_nsp", "final_loss")}
        mean["seconds"] = best(grid)["seconds"]          # seed 0's run (a resumed run's time would be partial)
        spread = float(np.ptp([r["test_mlm"] for r in seeds]))
        out.append(dict(optimizer=opt, batch_size=batch, steps=seeds[0]["steps"], lr=lr, seeds=len(seeds),
                        grid=" ".join(f"{r['lr']:.3g}:{r['dev_mlm']:.3f}" for r in sorted(grid, key=lambda r: r["lr"])),
                        mlm_spread=spread, **mean))
    return out


def write_markdown(path, rows, args):
    lines = [f"Test split (held-out chapters not used to pick the rate): MLM accuracy and NSP accuracy, mean over "
             f"the seeds; final loss = mean training loss over the last 5 % of the run. {args.sequences:,} training "
             f"sequences of 32 tokens for every batch size.", "",
             "| optimizer | batch | steps | picked lr | seeds | test MLM | (max - min) | test NSP | final loss "
             "| s/run | grid, lr: dev MLM |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['batch_size']} | {r['steps']} | {r['lr']:.3g} | {r['seeds']} | "
                     f"{r['test_mlm']:.4f} | {r['mlm_spread']:.4f} | {r['test_nsp']:.4f} | {r['final_loss']:.3f} | "
                     f"{r['seconds']:.0f} | {r['grid']} |")
    md = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(md)
    return md


def plot(path, rows, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for opt in args.optimizers:
        rs = [r for r in rows if r["optimizer"] == opt]
        for ax, key in zip(axes, ("test_mlm", "final_loss")):
            ax.plot([r["batch_size"] for r in rs], [r[key] for r in rs], marker="o", label=opt)
    for ax, label in zip(axes, ("test MLM accuracy", "final training loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"tiny BERT, {args.sequences:,} sequences per run, best rate per batch size, "
                 f"mean of {args.seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.time()
    if args.report:
        rows = table(args, list(Runner(args).done.values()))
    else:
        info = prepare(args)
        if args.sequences // 2 > info["train_rows"]:   # an epoch would end early: fewer tokens than promised
            raise SystemExit(f"--sequences {args.sequences}: more than 2 epochs of the {info['train_rows']} "
                             f"training rows")
        print(f"data: {info['train_rows']} train rows; {args.sequences:,} sequences per run; batch sizes "
              f"{args.batch_sizes}; {args.jobs} runs at a time", flush=True)
        rows = study(args, Runner(args))
    md = write_markdown(os.path.join(args.output_dir, "table.md"), rows, args)
    print(md + f"plot: {plot(os.path.join(args.output_dir, 'batch_study.png'), rows, args)}\n"
          f"total {time.time() - t0:.0f} s", flush=True)
    return rows


if __name__ == "__main__":
    main()
