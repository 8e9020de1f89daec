"""Draw benchmarks/results.png from the recorded figures in benchmarks/results.json (nothing is measured here):
Lamb's optimizer step against nn.Adam's, median and paired ratio, for each recorded configuration.

Usage: python benchmarks/plot_results.py [--out benchmarks/results.png]   (needs matplotlib: the `plot` extra)
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results.png"))
    args = parser.parse_args(argv)
    with open(os.path.join(HERE, "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["step_ratio_to_adam"]
    fig, ax = plt.subplots(figsize=(10, 5))
    positions = range(len(rows))
    width = 0.38
    ax.bar([p - width / 2 for p in positions], [r["median"] for r in rows], width, label="median ratio")
    ax.bar([p + width / 2 for p in positions], [r["paired"] for r in rows], width, label="paired ratio")
    for p, row in zip(positions, rows):
        ax.text(p, max(row["median"], row["paired"]) + 0.03, f"{row['median']:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(positions))
    ax.set_xticklabels([f"{r['label']}\n{r['date']}" for r in rows], fontsize=7)
    ax.set_ylabel("Lamb step time / nn.Adam step time")
    ax.set_title(f"Optimizer step, fused CPU kernel, against nn.Adam (1.0)\n{results['machine']}", fontsize=9)
    ax.set_ylim(0, 2.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
