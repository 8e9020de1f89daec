"""Lamb with 8-bit state (optim_bits=8) against float32 state: how far the training follows (docs/memory.md,
"Accuracy of 8-bit state").

    python benchmarks/compare_optim_bits.py mlp                 # (a) 1,000 steps of a small MLP, both states
    python benchmarks/compare_optim_bits.py mlp --json out.json
    python benchmarks/compare_optim_bits.py plot runs/bits      # (b) the BERT runs' losses, float32 against 8-bit

(a) A 2-layer MLP (32 -> 128 -> 10, ReLU, softmax cross-entropy) on data generated with NumPy (a fixed random
teacher network labels Gaussian inputs), trained for --steps steps of batch 64 with LAMB (lr 0.01 with
linear decay to 0, weight decay 0.01), once with float32 moments and once with optim_bits=8 and
min_8bit_size=256, so that both weight matrices (4,096 and 1,280 elements) keep 8-bit moments and the
biases float32 ones. Both runs see the same initial weights and batches. Printed: the loss every --every
steps (training batch) for both, the final full-data loss and accuracy of each, and the largest difference of
the trust ratios q (per layer and step; absolute and relative to the float32 run's).

(b) Reads the loss logs (`loss.jsonl`, one {"step", "loss"} per step) of runs laid out as
`RUNS/seed<N>_<bits>/phase<P>/` (what the tiny recipe writes with --output_dir there), and draws each run's
loss (a running mean of 25 steps), float32 solid and 8-bit dashed, one colour per seed, phase 2's steps
after phase 1's, and below, 8-bit minus float32; saves docs/_static/optim_bits_loss.png (--out to change it) and prints each run's last
mean loss and held-out results (results.json).
"""
import argparse
import glob
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (32, 128, 10)
BATCH = 64


def make_data(n=4096, seed=0):
    """Gaussian inputs labelled by a random 2-layer teacher (argmax of its logits)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SIZES[0])).astype(np.float32)
    hidden = np.maximum(x @ rng.standard_normal((SIZES[0], 64)), 0.0)
    labels = np.argmax(hidden @ rng.standard_normal((64, SIZES[2])), axis=1).astype(np.int32)
    return x, labels


def train_mlp(optim_bits, steps, data, seed=1, every=50):
    """(per-step training losses, per-step trust ratios {name: array}, final (loss, accuracy) on all data)."""
    import mindspore as ms
    from mindspore import Tensor, nn, ops
    from mindspore_lamb import Lamb

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    rng = np.random.default_rng(seed)
    net = nn.SequentialCell([nn.Dense(SIZES[0], SIZES[1]), nn.ReLU(), nn.Dense(SIZES[1], SIZES[2])])
    for p in net.trainable_params():        # the same start for both runs, from NumPy
        fan_in = p.shape[-1] if len(p.shape) == 2 else 1
        init = rng.standard_normal(p.shape) / np.sqrt(fan_in) if len(p.shape) == 2 else np.zeros(p.shape)
        p.set_data(Tensor(init.astype(np.float32)))
    loss_fn = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
    lr = nn.PolynomialDecayLR(0.01, 0.0, steps, power=1.0)
    opt = Lamb(net.trainable_params(), lr, weight_decay=0.01, optim_bits=optim_bits, min_8bit_size=256)
    grad_fn = ms.value_and_grad(nn.WithLossCell(net, loss_fn), None, opt.parameters)

    @ms.jit
    def step(x, y):
        loss, grads = grad_fn(x, y)
        return ops.depend(loss, opt(grads))

    x, y = data
    order = np.random.default_rng(seed + 1)
    losses, ratios = [], {name: [] for name in opt.param_names}
    for s in range(steps):
        idx = order.integers(0, len(x), BATCH)
        losses.append(float(step(Tensor(x[idx]), Tensor(y[idx])).asnumpy()))
        for name, q in opt.trust_ratios().items():
            ratios[name].append(q)
        if every and (s + 1) % every == 0:
            print(f"  optim_bits={optim_bits} step {s + 1}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    logits = net(Tensor(x)).asnumpy()
    final = float(loss_fn(Tensor(logits), Tensor(y)).asnumpy()), float(np.mean(np.argmax(logits, 1) == y))
    return np.array(losses), {k: np.array(v) for k, v in ratios.items()}, final


def run_mlp(args):
    data = make_data()
    runs = {bits: train_mlp(bits, args.steps, data, every=args.every) for bits in (32, 8)}
    (l32, q32, f32), (l8, q8, f8) = runs[32], runs[8]
    print(f"2-layer MLP {SIZES}, {args.steps} LAMB steps of batch {BATCH}; 8-bit: "
          f"{', '.join(n for n in q8 if n.endswith('weight'))} (min_8bit_size=256)")
    print("step  loss float32  loss 8-bit  (mean of the last 50 training batches)")
    for s in range(args.every, args.steps + 1, args.every):
        print(f"{s:5d}  {l32[max(s - 50, 0):s].mean():12.4f}  {l8[max(s - 50, 0):s].mean():10.4f}")
    print(f"final, all {len(data[0])} examples: float32 loss {f32[0]:.4f} accuracy {f32[1]:.4f}; "
          f"8-bit loss {f8[0]:.4f} accuracy {f8[1]:.4f}")
    diff = {n: np.abs(q8[n] - q32[n]) for n in q32}
    rel = {n: diff[n] / np.abs(q32[n]) for n in q32}
    for n in q32:
        at = int(np.argmax(diff[n]))
        print(f"trust ratio {n}: max |q8 - q32| {diff[n].max():.3g} (step {at + 1}, q32 {q32[n][at]:.4g}); "
              f"max relative {rel[n].max():.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "loss32": l32.tolist(), "loss8": l8.tolist(), "final32": f32,
                       "final8": f8, "max_abs_q_diff": {n: float(d.max()) for n, d in diff.items()},
                       "max_rel_q_diff": {n: float(r.max()) for n, r in rel.items()}}, f)


def _losses(path):
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                break                      # a line torn by a kill ends the log
    return np.array([r["step"] for r in records]), np.array([r["loss"] for r in records])


def run_plot(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(d for d in glob.glob(os.path.join(args.runs, "seed*_*")) if os.path.isdir(d))
    if not runs:
        raise SystemExit(f"plot: no seed<N>_<bits> run directory under {args.runs}")
    seeds = sorted({re.match(r"seed(\d+)_", os.path.basename(d)).group(1) for d in runs})
    fig, (ax, low) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": (3, 1.3)})
    k = 25
    curves = {}
    for d in runs:
        seed, bits = re.match(r"seed(\d+)_(\d+)", os.path.basename(d)).groups()
        offset, xs, ys = 0, [], []
        for phase in (1, 2):
            log = os.path.join(d, f"phase{phase}", "loss.jsonl")
            if not os.path.isfile(log):
                continue
            steps, loss = _losses(log)
            if len(loss) >= k:
                xs.append(offset + steps[k - 1:])
                ys.append(np.convolve(loss, np.ones(k) / k, mode="valid"))
                results = os.path.join(d, f"phase{phase}", "results.json")
                said = ""
                if os.path.isfile(results):
                    after = json.load(open(results))["after"]
                    said = f"; held-out MLM {after['mlm_accuracy']:.4f}, NSP {after['nsp_accuracy']:.4f}"
                print(f"{os.path.basename(d)} phase {phase}: {len(loss)} steps, last mean loss {ys[-1][-1]:.4f}"
                      + said)
            offset += int(steps.max()) if len(steps) else 0
        if xs:
            curves[seed, bits] = np.concatenate(xs), np.concatenate(ys)
            ax.plot(*curves[seed, bits], lw=1.2, ls="-" if bits == "32" else "--",
                    color=f"C{seeds.index(seed)}", label=f"seed {seed}, {'float32' if bits == '32' else '8-bit'}")
    for seed in seeds:                   # 8-bit minus float32, on the steps both runs have reached
        if (seed, "32") in curves and (seed, "8") in curves:
            (x32, y32), (x8, y8) = curves[seed, "32"], curves[seed, "8"]
            both, i32, i8 = np.intersect1d(x32, x8, return_indices=True)
            low.plot(both, y8[i8] - y32[i32], lw=1.0, color=f"C{seeds.index(seed)}", label=f"seed {seed}")
    low.axhline(0.0, color="k", lw=0.6)
    low.set_xlabel("step (phase 2 after phase 1)")
    low.set_ylabel("8-bit - float32")
    low.grid(alpha=0.3)
    ax.set_ylabel(f"training loss (MLM + NSP),\nmean of {k} steps")
    ax.set_title("Tiny BERT with LAMB: float32 against 8-bit state")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    mlp = sub.add_parser("mlp", help="(a) 1,000 steps of a small MLP, float32 and 8-bit state")
    mlp.add_argument("--steps", type=int, default=1000)
    mlp.add_argument("--every", type=int, default=100, help="print the loss every N steps")
    mlp.add_argument("--json", help="also write the curves and figures to this file")
    plot = sub.add_parser("plot", help="(b) the BERT runs' training losses, float32 against 8-bit")
    plot.add_argument("runs", help="directory holding seed<N>_<bits>/phase<P>/loss.jsonl")
    plot.add_argument("--out", default=os.path.join(ROOT, "docs", "_static", "optim_bits_loss.png"))
    args = p.parse_args(argv)
    (run_mlp if args.what == "mlp" else run_plot)(args)


if __name__ == "__main__":
    main()
