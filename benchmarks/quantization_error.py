"""How much of LAMB's moments the 8-bit formats keep: ours (power maps, docs/memory.md) against bitsandbytes'
dynamic map (its block-wise 8-bit optimizers' format), on the moments of a real training run.

Moments: a 64-256-256-10 MLP (generated data: 10 classes from a fixed random linear map of 64 features, plus
noise) trained 300 steps with float32 ``Lamb`` (batch 64, lr 0.01, weight decay 0.01); its m and v after steps
10, 100 and 300. Each format stores them block-wise (256 elements, the block's largest magnitude as its scale),
and they are read back:

* ``power`` (this package): m on a square map (int8), v on a fourth-power map (uint8), ``tests/helpers/blockwise.py``
  is the definition;
* ``dynamic`` (bitsandbytes): the nearest value of its dynamic map, signed for m and unsigned for v, built as
  its ``create_dynamic_map`` documents it (7 exponent levels of powers of ten, a linear fraction in [0.1, 1]
  in each, shrinking by one bit per level), nearest-value rounding (its deterministic mode).

Printed per step and format: the median and 99th percentile relative error of the stored m and of sqrt(v)
over the elements where the exact value is not 0, and the error of the update direction
u = m / (sqrt(v) + eps) (bias-corrected) of each weight: 1 - cos(u_stored, u), and ||u_stored - u|| / ||u||.

Run:  python benchmarks/quantization_error.py        (about a minute on CPU)
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "helpers"))

import blockwise  # noqa: E402  (the format's definition)

BLOCK = 256


def dynamic_map(signed, exponent_levels=7, bits=8):
    """bitsandbytes' dynamic map (float64, sorted): 0, 1 and, for each level i, the midpoints of a linear grid on
    [0.1, 1] scaled by 10^(i - levels + 1), with 2^(i + free) + 1 points (free = the bits left by the sign and
    the exponent levels; unsigned: one more bit each)."""
    values = []
    free = bits - 1 - exponent_levels
    for i in range(exponent_levels):
        count = 2 ** (i + free) + 1 if signed else 2 ** (i + free + 1) + 1
        edges = np.linspace(0.1, 1.0, count)
        means = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - exponent_levels + 1)
        values += list(means) + (list(-means) if signed else [])
    extra = 2 ** free - 1
    if extra > 0:
        edges = np.linspace(0.1, 1.0, extra + 1)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += list(means) + (list(-means) if signed else [])
    values += [0.0, 1.0]
    return np.unique(np.asarray(values))


def stored_dynamic(x, signed):
    """x (float32) stored block-wise on the dynamic map and read back (nearest value)."""
    table = dynamic_map(signed)
    flat = np.asarray(x, np.float64).reshape(-1)
    pad = (-flat.size) % BLOCK
    blocks = np.concatenate([flat, np.zeros(pad)]).reshape(-1, BLOCK)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    normal = blocks / np.where(scale > 0, scale, 1.0)
    index = np.clip(np.searchsorted(table, normal), 1, table.size - 1)
    nearest = np.where(np.abs(table[index - 1] - normal) <= np.abs(table[index] - normal), index - 1, index)
    return (table[nearest] * scale).reshape(-1)[:flat.size].reshape(np.shape(x))


def stored_power(x, signed):
    return (blockwise.stored_signed if signed else blockwise.stored_unsigned)(x)


def train(steps_kept=(10, 100, 300), seed=0):
    """{step: [(name, m, v), ...]} of the MLP's weights."""
    import mindspore as ms
    from mindspore import Tensor, nn
    from mindspore_lamb import Lamb
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4096, 64)).astype(np.float32)
    labels = (x @ rng.standard_normal((64, 10)) + 0.5 * rng.standard_normal((4096, 10))).argmax(1).astype(np.int32)
    net = nn.SequentialCell([nn.Dense(64, 256), nn.ReLU(), nn.Dense(256, 256), nn.ReLU(), nn.Dense(256, 10)])
    opt = Lamb(net.trainable_params(), 0.01, weight_decay=0.01)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, nn.SoftmaxCrossEntropyWithLogits(sparse=True,
                                                                                     reduction="mean")), opt)
    kept = {}
    for s in range(1, max(steps_kept) + 1):
        pick = rng.integers(0, len(x), 64)
        step(Tensor(x[pick]), Tensor(labels[pick]))
        if s in steps_kept:
            kept[s] = [(p.name, m.asnumpy().astype(np.float64), v.asnumpy().astype(np.float64))
                       for p, m, v in zip(opt.params, opt.moments1, opt.moments2) if p.name.endswith("weight")]
    return kept


def errors(m, v, step, beta1=0.9, beta2=0.999, eps=1e-6):
    """{format: (m median, m p99, sqrt(v) median, sqrt(v) p99, 1 - cos u, ||du|| / ||u||)}."""
    out = {}
    for name, store in (("power", stored_power), ("dynamic", stored_dynamic)):
        ms_, vs_ = store(m, True), store(v, False)
        nz_m, nz_v = m != 0, v != 0
        rel_m = np.abs(ms_ - m)[nz_m] / np.abs(m)[nz_m]
        rel_r = np.abs(np.sqrt(vs_) - np.sqrt(v))[nz_v] / np.sqrt(v)[nz_v]
        c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
        u = (m / c1) / (np.sqrt(v / c2) + eps)
        us = (ms_ / c1) / (np.sqrt(vs_ / c2) + eps)
        cos = float(np.sum(u * us) / (np.linalg.norm(u) * np.linalg.norm(us)))
        out[name] = (np.median(rel_m), np.quantile(rel_m, 0.99), np.median(rel_r), np.quantile(rel_r, 0.99),
                     1.0 - cos, float(np.linalg.norm(us - u) / np.linalg.norm(u)))
    return out


def main():
    print("| step | weight | format | m: median, p99 rel. error | sqrt(v): median, p99 | 1 - cos(u) | "
          "rel. error of u |")
    print("|---|---|---|---|---|---|---|")
    for step, weights in train().items():
        for name, m, v in weights:
            for fmt, e in errors(m, v, step).items():
                print(f"| {step} | {name} | {fmt} | {e[0]:.4f}, {e[1]:.3f} | {e[2]:.4f}, {e[3]:.3f} | {e[4]:.1e} | "
                      f"{e[5]:.3f} |")


if __name__ == "__main__":
    main()
