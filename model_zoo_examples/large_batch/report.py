"""Table (CSV, Markdown) and plot of the study's results."""
import csv

import numpy as np


def write_csv(path, rows):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)


def summarize(rows, optimizers, batch_sizes):
    """One row per (optimizer, batch size): the picked base rate, test accuracy mean/std over seeds."""
    out = []
    for opt in optimizers:
        for b in batch_sizes:
            picked = [r for r in rows if r["optimizer"] == opt and r["batch_size"] == b and r.get("picked")]
            if not picked:
                continue
            acc = np.array([r["test_acc"] for r in picked]) * 100
            out.append(dict(optimizer=opt, batch_size=b, steps=picked[0]["steps"], base_lr=picked[0]["base_lr"],
                            peak_lr=round(picked[0]["peak_lr"], 6), seeds=len(acc),
                            test_mean=round(float(np.mean(acc)), 2), test_std=round(float(np.std(acc, ddof=1))
                                                                                      if len(acc) > 1 else 0.0, 2)))
    return out


def write_markdown(path, table, args):
    opts = list(dict.fromkeys(r["optimizer"] for r in table))
    cell = {(r["optimizer"], r["batch_size"]): r for r in table}
    lines = [f"Test accuracy (%), mean ± std over {args.seeds} seeds; data `{args.data}`, "
             f"{args.epochs} epochs for every batch size; in brackets the picked base rate.", "",
             "| batch | steps | " + " | ".join(opts) + " |", "|---:|---:|" + "---:|" * len(opts)]
    for b in args.batch_sizes:
        steps = next((r["steps"] for r in table if r["batch_size"] == b), "")
        vals = [f"{cell[o, b]['test_mean']:.2f} ± {cell[o, b]['test_std']:.2f} ({cell[o, b]['base_lr']:g})"
                if (o, b) in cell else "" for o in opts]
        lines.append(f"| {b} | {steps} | " + " | ".join(vals) + " |")
    md = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(md)
    return md


def plot(path, table, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for opt in dict.fromkeys(r["optimizer"] for r in table):
        rs = [r for r in table if r["optimizer"] == opt]
        ax.errorbar([r["batch_size"] for r in rs], [r["test_mean"] for r in rs], yerr=[r["test_std"] for r in rs],
                    marker="o", capsize=3, label=opt)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{args.data}: {args.epochs} epochs, lr ∝ sqrt(batch), {args.seeds} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
