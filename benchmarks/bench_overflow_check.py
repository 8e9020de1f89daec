"""The overflow test of LossScaleTrainStep on BERT-base-sized gradients (CPU, GRAPH_MODE).

Interleaved call by call in one process, each followed by ``_timing.wait()`` (the result is ready):

* ``IsFinite + ReduceAll per gradient``: the element-wise test the cell used first (199 x 2 kernels, a
  bool tensor per gradient, then AddN of the 199 flags);
* ``fused sum of squares``: what the cell does now on CPU - one ``LambSumSq`` kernel over all the
  gradients, then IsFinite on the sum (its square root is also the clipping norm);
* ``HyperMap sum of squares``: the same on the composite path (GPU/Ascend; ``MINDSPORE_LAMB_FUSED=0``);
* ``Lamb step``: one fused ``mindspore_lamb.Lamb`` call on the same gradients, for scale.

Run:  python benchmarks/bench_overflow_check.py [--repeats 15]
"""
import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mindspore as ms  # noqa: E402
import mindspore.common.dtype as mstype  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402
from mindspore.ops import composite as C  # noqa: E402
from mindspore.ops import functional as F  # noqa: E402
from mindspore.ops import operations as P  # noqa: E402

from _timing import interleave, summary, wait  # noqa: E402
from bench_step import build  # noqa: E402
from mindspore_lamb import Lamb  # noqa: E402
from mindspore_lamb.backends import composite, fused_cpu  # noqa: E402

_all_finite = C.MultitypeFuncGraph("bench_all_finite")


@_all_finite.register("Tensor")
def _all_finite_one(grad):
    return F.cast(P.ReduceAll(False)(P.IsFinite()(grad)), mstype.float32)


class ElementWise(nn.Cell):
    def __init__(self, n):
        super().__init__()
        self.hyper_map = C.HyperMap()
        self.addn = P.AddN()
        self.n = Tensor(float(n), mstype.float32)

    def construct(self, grads):
        return self.n - self.addn(self.hyper_map(_all_finite, grads)) > 0.5


class Overflow(nn.Cell):
    """The loss-scale cell's test: the sum of squares of all gradients is not finite."""

    def __init__(self, grad_sq_cell):
        super().__init__()
        self.grad_sq_cell = grad_sq_cell

    def construct(self, grads):
        return F.logical_not(P.IsFinite()(self.grad_sq_cell(grads)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    params, grads = build("base")
    cells = {"IsFinite + ReduceAll per gradient": ElementWise(len(grads)),
             "fused sum of squares": Overflow(fused_cpu.SumOfSquares()),
             "HyperMap sum of squares": Overflow(composite.SumOfSquares()),
             "Lamb step": Lamb(params, learning_rate=1e-7, weight_decay=0.01)}
    for cell in cells.values():
        cell(grads)
        wait()
    def run(cell):
        return lambda: (cell(grads), wait())

    times = interleave({k: run(cell) for k, cell in cells.items()}, a.repeats)
    print(f"BERT-base gradients: {len(grads)} tensors, {sum(g.size for g in grads) / 1e6:.1f}M elements; "
          f"{a.repeats} interleaved calls each")
    for k, med, low, ratio in summary(times, "Lamb step"):
        print(f"{k:<36} median {med:8.1f} ms  min {low:8.1f} ms  x Lamb step {ratio:5.2f}")


if __name__ == "__main__":
    main()
