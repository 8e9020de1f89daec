"""The composite backend: the per-parameter update of ``_update.py`` applied with HyperMap.

Primitive operators only, so the same graph runs on CPU, GPU and Ascend, for float16 (and, off CPU,
bfloat16) parameters too. It is the reference the other backends are tested against.
"""
from mindspore import nn
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .._update import lamb_update, sum_of_squares
from .contract import INDEX

_PROCEED = INDEX["proceed"]


class SumOfSquares(nn.Cell):
    """``sum(g^2)`` over every element of every gradient, in float32 (two-stage ReduceSum + AddN)."""

    def __init__(self):
        super().__init__()
        self.hyper_map = C.HyperMap()
        self.addn = P.AddN()

    def construct(self, gradients):
        return self.addn(self.hyper_map(sum_of_squares, gradients))


class CompositeBackend(nn.Cell):
    """The update contract (contract.py) as one HyperMap of `_update.lamb_update`."""

    name = "composite"
    SumOfSquares = SumOfSquares

    @staticmethod
    def unavailable(params, device_target):
        """Always available."""
        return None, False

    def __init__(self, params, *, decay_flags, adapt_flags, owned_flags):
        super().__init__()
        self.n = len(params)
        self.decay_flags = tuple(decay_flags)
        self.adapt_flags = tuple(adapt_flags)
        self.owned_flags = tuple(owned_flags)
        self.sum_of_squares = SumOfSquares()
        self.hyper_map = C.HyperMap()
        self.stack = P.Stack()
        self.isfinite = P.IsFinite()

    def construct(self, scalars, lr, weight_decay, params, moments1, moments2, gradients, grad_sq):
        if grad_sq is None:
            grad_sq = self.sum_of_squares(gradients)
        applied = F.logical_and(scalars[_PROCEED], self.isfinite(grad_sq))
        if not isinstance(lr, tuple):
            lr = (lr,) * self.n
        if not isinstance(weight_decay, tuple):
            weight_decay = (weight_decay,) * self.n
        stats = self.hyper_map(F.partial(lamb_update, scalars, applied), lr, weight_decay, params, moments1,
                               moments2, gradients, self.decay_flags, self.adapt_flags, self.owned_flags)
        return self.stack(stats), grad_sq, applied
