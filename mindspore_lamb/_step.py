"""Float32 helpers of the optimizer's step, shared by Lamb and LossScaleTrainStep: expm1 (bias corrections),
global_norm_factor (clipping by global norm), schedule_step (the step a schedule reads) and gradient
centralization. The per-parameter rule itself lives with the composite backend (backends/composite.py)."""
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from ._ops import where

_reduce_mean = P.ReduceMean(keep_dims=True)
centralize = C.MultitypeFuncGraph("lamb_grad_centralization")


def expm1(x):
    """exp(x) - 1 in float32 to a few ulp, also for tiny |x|, on every backend.

    MindSpore's CPU Expm1 kernel is not accurate for small |x| (6.8e-4 relative at x = -1e-5, the
    bias correction of beta2 = 0.99999 at t = 1): below |x| = 0.1 a Taylor polynomial to x^5 (truncation
    below 2e-8 relative), above it exp(x) - 1 (cancellation below 7e-7 relative).
    """
    series = x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0))))
    return where(F.abs(x) < 0.1, series, F.exp(x) - 1.0)


def global_norm_factor(global_norm, max_norm):
    """min(1, max_norm / G) as max_norm / max(G, max_norm): 1 when G = 0, 0 when G is Inf, NaN when G is
    NaN. The one clipping formula of the package (Lamb's max_grad_norm and the loss-scale cell's)."""
    return max_norm / F.maximum(global_norm, max_norm)


def schedule_step(global_step):
    """The step at which the learning-rate and weight-decay schedules are read: ``global_step``, 0 where it is
    negative (a damaged checkpoint's counter: that step is invalid and skipped, docs/api/lamb.md). A per-step
    sequence of rates is a Gather at this index, and a negative one is an error on GPU and undefined on
    Ascend (on CPU it counts from the end)."""
    return F.maximum(global_step, 0)


@centralize.register("Bool", "Tensor")
def _centralize(flag, gradient):
    """Gradient centralization: g - mean(g) over every axis but the first (rank >= 2 only).

    Composite ops, so it runs on CPU too (the base class's Centralization op has no CPU kernel).
    """
    if flag and F.rank(gradient) > 1:
        axes = F.make_range(1, F.rank(gradient))
        return gradient - _reduce_mean(gradient, axes)
    return gradient
