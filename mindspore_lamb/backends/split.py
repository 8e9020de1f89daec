"""The split backend: the update contract (contract.py) over parameters whose state is stored differently.

With ``optim_bits=8`` the moments of each parameter of at least ``min_8bit_size`` elements are 8-bit codes
with block scales, and the smaller ones keep float32 moments (docs/memory.md). Each kind of state has its
own slot set (``state.Slots``) and its own backend (the fused CPU kernel or the composite graph, whichever
``backends.select`` picks for it); this Cell runs them as one update: the global gradient norm G is taken
once over every gradient and handed to each part as the named scalar ``grad_sq``, the step proceeds in
every part or in none (``proceed`` and G finite), and the per-layer results come back in the parameters'
order. A layer's trust ratio is its own, so splitting the parameters changes nothing else.
"""
import numpy as np

from mindspore import ParameterTuple, Tensor, nn
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .._ops import gather
from ..state import Slots
from .contract import INDEX

_PROCEED = INDEX["proceed"]


class SplitState:
    """The state of a :class:`SplitBackend`, as a backend's ``SlotState`` reads: iterating gives every
    Parameter; ``state[role]`` the Parameters of `role` of every part that has it, in the parameters' order."""

    def __init__(self, parts, indices):
        self._parts, self._indices = parts, indices

    def __iter__(self):
        return (p for part in self._parts for p in part.state)

    def __getitem__(self, role):
        found = {}
        for part, indices in zip(self._parts, self._indices):
            if role in part.slots.roles:
                found.update(zip(indices, part.state[role]))
        return tuple(found[i] for i in sorted(found))


def _take(values, indices):
    """The entries `indices` of a tuple (static indices, graph mode)."""
    out = ()
    for i in indices:
        out += (values[i],)
    return out


class SplitBackend(nn.Cell):
    """Two backends, each over its own parameters (`parts`: ((indices, backend), ...), in any order), as one.

    ``slots``: every part's slots (distinct checkpoint prefixes); ``state``: a :class:`SplitState`."""

    def __init__(self, parts, count, params):
        super().__init__(auto_prefix=False)         # the state keeps its checkpoint names (lamb_m8.<name>, ...)
        (self.first_indices, self.first), (self.second_indices, self.second) = parts
        self.name = self.first.name if self.first.name == self.second.name else "split"
        self.slots = Slots(self.first.slots + self.second.slots)
        self.state = SplitState((self.first, self.second), (self.first_indices, self.second_indices))
        self.SumOfSquares = type(self.first).SumOfSquares
        self.grad_sq_cell = self.SumOfSquares()
        order = np.array(self.first_indices + self.second_indices)
        assert sorted(order.tolist()) == list(range(count))
        self.inverse = Tensor(np.argsort(order).astype(np.int32))       # the parts' stats, back in order
        self.isfinite = P.IsFinite()
        self.concat = P.Concat()
        # each part's parameters as a ParameterTuple of its own: a tuple taken from the optimizer's inside the
        # graph makes MindSpore copy the parameters the kernels update in place (measured: +1x the parameters)
        self.first_params = ParameterTuple(params[i] for i in self.first_indices)
        self.second_params = ParameterTuple(params[i] for i in self.second_indices)

    def _part(self, indices, value):
        """`value` (one shared scalar, or a tuple with one entry per parameter) for the parameters `indices`."""
        return _take(value, indices) if isinstance(value, tuple) else value

    def construct(self, scalars, lr, weight_decay, params, gradients, grad_sq):
        if grad_sq is None:
            grad_sq = self.grad_sq_cell(gradients)                       # G^2 over every gradient, once
        # every part proceeds, or none: a non-finite G skips the whole step (the moments included)
        proceed = F.logical_and(scalars[_PROCEED], self.isfinite(grad_sq))
        scalars = scalars[:_PROCEED] + (proceed,) + scalars[_PROCEED + 1:]
        first, first_sq, applied = self.first(scalars, self._part(self.first_indices, lr),
                                       self._part(self.first_indices, weight_decay),
                                       self.first_params, _take(gradients, self.first_indices), grad_sq)
        second, second_sq, second_applied = self.second(scalars, self._part(self.second_indices, lr),
                                   self._part(self.second_indices, weight_decay),
                                   self.second_params, _take(gradients, self.second_indices), grad_sq)
        # both parts are told the same G^2 and the same verdict: their outputs agree (each is read, so that
        # neither part's graph is dropped as unused)
        applied = F.logical_and(applied, second_applied)
        grad_sq = F.depend(grad_sq, (first_sq, second_sq))
        return gather(self.concat((first, second)), self.inverse, 0), grad_sq, applied
