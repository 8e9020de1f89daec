"""Does LAMB keep its accuracy as the batch grows? A small-scale version of the LAMB paper's claim.

    python model_zoo_examples/large_batch/study.py            # full study (5-8 min on 2 shared CPU cores)
    python model_zoo_examples/large_batch/study.py --quick    # smoke test (< 1 min)

The same MLP (2 hidden layers of 256) is trained with mindspore_lamb.Lamb, nn.AdamWeightDecay,
nn.Momentum at batch sizes from small to very large, with the paper's recipe (nn.LARS is left out: its
LARSUpdate kernel does not exist on CPU in MindSpore 2.10):
the same epoch budget for every batch size, peak learning rate = base * sqrt(batch / smallest batch),
linear warm-up over the first 10% of the steps, then linear decay to 0 (WarmupPolynomialDecayLR).
For every optimizer and batch size the base rate is picked from a small grid by validation accuracy
(seed 0), then the picked rate is trained with the other seeds; the table reports test accuracy,
mean and standard deviation over all seeds. Writes runs.csv, table.csv, table.md and
accuracy_vs_batch.png under --output_dir.
"""
import argparse
import os
import sys
import time

import mindspore as ms
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
from report import plot, summarize, write_csv, write_markdown  # noqa: E402
from train import OPTIMIZERS, Group  # noqa: E402

# Base peak learning rates at the smallest batch size (a factor of ~3 apart; wide enough that
# the pick is inside the grid, not at its edge, in a first run).
LR_GRID = {"lamb": (3e-3, 1e-2, 3e-2), "adamw": (1e-3, 3e-3, 1e-2, 3e-2),
           "momentum": (0.03, 0.1, 0.3, 1.0)}
# Decoupled decay for Lamb/AdamW, L2 (added to the gradient) for Momentum.
WEIGHT_DECAY = {"lamb": 0.01, "adamw": 0.01, "momentum": 1e-4}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke-test setting (digits, 2 batch sizes, "
                                                        "middle rate only, 2 seeds, 4 epochs)")
    p.add_argument("--data", choices=("letter", "digits"), help="default: letter (digits with --quick)")
    p.add_argument("--data_file", help="path to LetterRecognition.rda (default: r-cran-mlbench's)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--batch_sizes", help="comma-separated; default 256,...,8192 (64,512 with --quick)")
    p.add_argument("--epochs", type=int, help="epoch budget, the same for every batch size (default 20)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    p.add_argument("--output_dir", default=os.path.join("runs", "large_batch"))
    args = p.parse_args(argv)
    q = args.quick
    args.data = args.data or ("digits" if q else "letter")
    args.optimizers = args.optimizers.split(",")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("64,512" if q else "256,512,1024,2048,4096,8192"))
                        .split(",")]
    args.epochs = args.epochs or (4 if q else 20)
    args.seeds = args.seeds or (2 if q else 3)
    return args


def main(argv=None):
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    os.makedirs(args.output_dir, exist_ok=True)
    sets, n_classes = data.splits(args.data, args.data_file)
    y_tr, n_in = sets["train"][1], sets["train"][0].shape[1]
    b0 = min(args.batch_sizes)
    print(f"data {args.data}: train {len(y_tr)}, val {len(sets['val'][1])}, test {len(sets['test'][1])}; "
          f"{args.epochs} epochs; lr = base * sqrt(batch / {b0})", flush=True)
    rows, start = [], time.time()
    for opt in args.optimizers:
        grid = LR_GRID[opt][1:2] if args.quick else LR_GRID[opt]
        for batch in args.batch_sizes:
            steps = max(1, args.epochs * len(y_tr) // batch)
            group = Group(opt, batch, steps, n_in, n_classes, WEIGHT_DECAY[opt])
            scale = (batch / b0) ** 0.5

            def run(base, seed):
                t0 = time.time()
                group.run(sets["train"], seed, base * scale)
                row = dict(optimizer=opt, batch_size=batch, steps=steps, base_lr=base, peak_lr=base * scale,
                           seed=seed, val_acc=group.accuracy(*sets["val"]),
                           test_acc=group.accuracy(*sets["test"]), seconds=round(time.time() - t0, 2))
                rows.append(row)
                print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)
                return row

            # Pick the base rate on seed 0's validation accuracy (NaN = diverged = worst).
            tried = [run(base, 0) for base in grid]
            best = max(tried, key=lambda r: -1.0 if np.isnan(r["val_acc"]) else r["val_acc"])
            for r in tried:
                r["picked"] = r is best
            for seed in range(1, args.seeds):
                run(best["base_lr"], seed)["picked"] = True
    print(f"total {time.time() - start:.0f} s", flush=True)
    write_csv(os.path.join(args.output_dir, "runs.csv"), rows)
    table = summarize(rows, args.optimizers, args.batch_sizes)
    write_csv(os.path.join(args.output_dir, "table.csv"), table)
    md = write_markdown(os.path.join(args.output_dir, "table.md"), table, args)
    plot(os.path.join(args.output_dir, "accuracy_vs_batch.png"), table, args)
    print(md)
    return table


if __name__ == "__main__":
    main()
