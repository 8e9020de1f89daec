"""Accuracy of Lamb's fused CPU path against tests/helpers/reference.py (LambReference), next to the composite path.

BERT-shaped parameters at hidden 128 (one 30522x128 embedding: 3.9M elements, so the kernels' threaded
slices and double-accumulated norms are exercised), 6 steps, several configurations; prints the largest
relative error of w, m, v and the trust ratios for the composite Lamb and for the fused one, and fails
if the fused error exceeds max(2 x composite error, 1e-6).

    python benchmarks/check_fused_accuracy.py
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "helpers"))

import mindspore as ms  # noqa: E402
from mindspore import Parameter, Tensor  # noqa: E402

from bench_step import bert_shapes  # noqa: E402
from mindspore_lamb import Lamb  # noqa: E402
from reference import LambReference  # noqa: E402

CONFIGS = [
    ("plain wd=0.01", {}, {}),
    ("loss_scale=1024", {"loss_scale": 1024.0}, {"loss_scale": 1024.0}),
    ("max_grad_norm=0.5", {"max_grad_norm": 0.5}, {"max_grad_norm": 0.5}),
    ("trust_ratio_clip=(0,10)", {"trust_ratio_clip": (0.0, 10.0)}, {"trust_ratio_clip": (0.0, 10.0)}),
]


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run(config, steps=6, seed=0):
    name, kw, ref_kw = config
    rng = np.random.default_rng(seed)
    shapes = bert_shapes(2, 128, 512)
    names = [n for n, _ in shapes]
    w0 = [(rng.standard_normal(s) * 0.02).astype(np.float32) + (1.0 if n.endswith("gamma") else 0.0)
          for n, s in shapes]
    w0[-1][:] = 0.0                                   # a zero parameter: q = 1
    decay = ["beta" not in n and "gamma" not in n for n in names]
    out = {}
    for path in ("composite", "fused"):
        params = [Parameter(Tensor(w.copy()), name=n) for w, n in zip(w0, names)]
        os.environ["MINDSPORE_LAMB_FUSED"] = "0" if path == "composite" else "1"
        opt = Lamb(params, learning_rate=0.01, weight_decay=0.01, **kw)
        os.environ.pop("MINDSPORE_LAMB_FUSED")
        ref = LambReference(w0, **ref_kw)
        grng = np.random.default_rng(seed + 1)
        err = {"w": 0.0, "m": 0.0, "v": 0.0, "q": 0.0}
        for _ in range(steps):
            scale = kw.get("loss_scale", 1.0)
            g = [(grng.standard_normal(s) * 0.01 * scale).astype(np.float32) for _, s in shapes]
            opt(tuple(Tensor(x) for x in g))
            ref.step(g, 0.01, 0.01, decay=decay)
            q = opt.trust_ratios()
            for i, n in enumerate(names):
                err["w"] = max(err["w"], rel(params[i].asnumpy().astype(np.float64), ref.w[i]))
                err["m"] = max(err["m"], rel(opt.moments1[i].asnumpy().astype(np.float64), ref.m[i]))
                err["v"] = max(err["v"], rel(opt.moments2[i].asnumpy().astype(np.float64), ref.v[i]))
                err["q"] = max(err["q"], abs(q[n] - ref.trust_ratios[i]) / abs(ref.trust_ratios[i]))
        out[path] = (err, getattr(opt, "fused", False))
    return name, out


def main():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ok = True
    for config in CONFIGS:
        name, out = run(config)
        (ce, _), (fe, fused) = out["composite"], out["fused"]
        line = "  ".join(f"{k} {ce[k]:.1e}/{fe[k]:.1e}" for k in ce)
        good = fused and all(fe[k] <= max(2 * ce[k], 1e-6) for k in fe)
        ok &= good
        print(f"{name:<26} composite/fused max rel err: {line}  fused path used: {fused}  {'OK' if good else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
