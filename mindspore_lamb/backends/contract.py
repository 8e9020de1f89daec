"""The update contract: what every backend of "the LAMB update of all parameters" takes and returns.

A backend is a Cell built once per optimizer with the static facts of each parameter and the optimizer's slot
set (``state.declare``: a ``state.Slots``), whose state it allocates itself, and called once per step, inside
the optimizer's graph::

    backend = Backend(params, slots, decay_flags=..., adapt_flags=..., owned_flags=..., constants=...)
    backend.slots        # `slots`, as given
    backend.state        # a SlotState: one ParameterTuple per role (backend.state.m, backend.state["v"])
    backend.state_params # the same Parameters as one ParameterTuple, for the graph (SlotState.flat)
    layer_stats, grad_sq, applied = backend(scalars, lr, weight_decay, params, gradients, grad_sq)

``constants``: the scalars of :func:`pack` that never change, {name: value}; a backend may leave the terms of
those at their :data:`NEUTRAL` value out of its graph (:func:`terms`).

Inputs (the optimizer computes every one of them first; a backend computes no hyper-parameter):

* ``scalars``: a tuple of float32 0-D Tensors made by :func:`pack` (names in :data:`SCALARS`); ``proceed`` is
  a bool 0-D Tensor.
* ``lr``, ``weight_decay``: one float32 scalar shared by every parameter, or a tuple with one scalar per
  parameter (parameter groups). A parameter whose ``decay_flags`` entry is False is never decayed.
* ``params``: the optimizer's ParameterTuple (``w``), updated in place with the backend's own state;
  ``gradients``: the raw gradients, float32 for float32 parameters (multiplied by ``grad_scale`` inside).
* ``grad_sq``: G^2, the sum of squares of every element of every (raw) gradient, when the optimizer computed
  it before the update (with ``max_grad_norm``, an exact skip, or the parallel optimizer), passed in as a
  named scalar, apex-style; ``None`` lets the backend take it from its own pass over the gradients.

Semantics (identical for every backend; docs/architecture.md):

* ``proceed`` False: nothing changes (the caller knows the step is skipped).
* Else the moments of every element whose new ``v`` is finite take this step's gradient (the others keep
  theirs), each stored in its slot's dtype and read back from there (the update uses the moments as
  stored); the weights are updated only when ``grad_sq`` is finite. ``applied`` says whether they were.
* A parameter whose ``||w||`` is not finite (a NaN/Inf already inside the weights) is left as it is, and
  its trust ratio reads NaN in ``layer_stats``.

Outputs:

* ``layer_stats``: float32 (n, 3), ``(q, ||w||, ||u||)`` of each parameter (``||w||`` before the step);
  ``(1, 0, 0)`` for parameters another rank updates and for every parameter of a call not applied.
* ``grad_sq``: the float32 sum of squares used for the decision (for ``global_grad_norm``).
* ``applied``: bool 0-D Tensor.
"""
import inspect
import math

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Parameter, ParameterTuple, Tensor
from mindspore.common.initializer import initializer
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .. import state
from .._ops import cast


def pack(*, one_minus_beta1, one_minus_beta2, m_grad_scale, eps, eps_root, inv_bias_c1, inv_bias_c2, grad_scale,
         decay_in_grad, decay_in_update, decay_outside, w_norm_max, trust_lo, trust_hi, proceed):
    """The `scalars` tuple, in the order of this signature (the one definition of the layout).

    one_minus_beta1/2: 1 - beta computed in float64 and rounded once to float32 (the moments use only these);
    m_grad_scale: 1, or 1 / (1 - beta1) without gradient averaging (m = b1 m + g);
    eps, eps_root: r = m^ / (sqrt(v^ + eps_root) + eps);
    inv_bias_c1/2: 1 / (1 - beta^t), or 1 without bias correction;
    grad_scale: (1 / loss_scale) * min(1, max_grad_norm / G);
    decay_in_grad, decay_in_update, decay_outside: 0 or 1, where a parameter's weight decay lambda goes:
    added to the gradient (L2), to the update u = r + lambda w (the paper), or applied outside the trust
    ratio, w = (1 - lr lambda) w - lr q u;
    w_norm_max: ||w|| is clamped to it in the trust ratio (inf when off);
    trust_lo, trust_hi: clip bounds of q (0 and inf when off);
    proceed: bool, False when the step is skipped (nothing changes).
    """
    return (one_minus_beta1, one_minus_beta2, m_grad_scale, eps, eps_root, inv_bias_c1, inv_bias_c2, grad_scale,
            decay_in_grad, decay_in_update, decay_outside, w_norm_max, trust_lo, trust_hi, proceed)


# The names, in order: the float32 array handed to a compiled kernel follows it (backends/fused_cpu.py
# generates the C++ enum from it), and composite backends index the tuple with INDEX.
SCALARS = tuple(inspect.signature(pack).parameters)
INDEX = {name: i for i, name in enumerate(SCALARS)}

# Every scalar's neutral value: the value that makes its term an exact no-op (x * 1, x + 0, min(x, inf),
# max(q, 0) for q >= 0, a weight decay term times 0), or None where there is none. A scalar added to `pack`
# must be entered here (the import fails otherwise), so that no backend leaves its term out silently:
# * the fused kernel's fast loop (the paper's rule: fused_cpu.cc with kGeneral false) leaves out the terms of
#   FAST_LOOP_SKIPS, and the kernel takes the general loop whenever one of them is away from its neutral value
#   (is_general() in fused_cpu.cc is generated from GENERAL_ONLY);
# * a backend built with a scalar in its `constants` at its neutral value may leave the term out of its graph
#   (`terms`; backends/composite.py does).
NEUTRAL = {"one_minus_beta1": None, "one_minus_beta2": None, "m_grad_scale": 1.0, "eps": 0.0, "eps_root": 0.0,
           "inv_bias_c1": 1.0, "inv_bias_c2": 1.0, "grad_scale": 1.0, "decay_in_grad": 0.0, "decay_in_update": 0.0,
           "decay_outside": 0.0, "w_norm_max": math.inf, "trust_lo": 0.0, "trust_hi": math.inf, "proceed": None}
FAST_LOOP_SKIPS = ("m_grad_scale", "eps_root", "decay_in_grad", "decay_outside")
if tuple(NEUTRAL) != SCALARS:
    raise ImportError(f"mindspore_lamb.backends.contract: NEUTRAL must list the scalars of pack() in its order "
                      f"{SCALARS}, but lists {tuple(NEUTRAL)}")
GENERAL_ONLY = {name: NEUTRAL[name] for name in FAST_LOOP_SKIPS}


def terms(constants):
    """One bool per scalar of :func:`pack`: False where `constants` (the scalars known when the optimizer is
    built, {name: value}) holds it at its :data:`NEUTRAL` value, as float32 sees it, so that its term is a
    no-op at every step; True where the step reads it."""
    return tuple(not (name in constants and NEUTRAL[name] is not None
                      and float(np.float32(constants[name])) == NEUTRAL[name]) for name in SCALARS)

to_float32 = C.MultitypeFuncGraph("lamb_to_float32")
_stack = P.Stack()
_hyper_map = C.HyperMap()


@to_float32.register("Number")
def _number_to_float32(x):
    """A Python number (a fixed weight decay) as a float32 0-D Tensor."""
    return F.scalar_to_tensor(x, mstype.float32)


@to_float32.register("Tensor")
def _tensor_to_float32(x):
    """A 0-D or (1,) Tensor (lr, schedules, flags) as a float32 0-D Tensor."""
    return F.reshape(cast(x, mstype.float32), ())


def per_parameter(value, ones):
    """float32 (n,): one value per parameter, from a shared scalar or a tuple of one per parameter
    (`ones`: a float32 (n,) Tensor of ones)."""
    if isinstance(value, tuple):
        return _stack(_hyper_map(to_float32, value))
    return ones * to_float32(value)


def dtype_name(dtype):
    """``float32``, ``float16``, ``bfloat16``: a stored dtype as the kernels and the composite rule name it."""
    return str(dtype).lower()


def _zeros_like(param, slot):
    """The zero state of `slot` for `param`, named ``<prefix>.<param name>``: the parameter's clone (its
    parallel layout follows it) when it is elementwise in the parameter's dtype; 8-bit codes and block scales
    are laid out by blocks (``state.Slot.shape``)."""
    if param.dtype != slot.dtype or slot.layout != "elementwise":
        return Parameter(initializer("zeros", slot.shape(param.shape), slot.dtype), name=slot.name(param.name))
    zeros = param.clone(init="zeros")
    zeros.name = slot.name(param.name)
    return zeros


class SlotState:
    """The state of one backend, by role: one ParameterTuple per slot of `slots` (a ``state.Slots``), one
    Parameter per parameter (``lamb_m.<name>``, ...) or this worker's piece (``lamb_m.shard``).

    ``state.m`` / ``state["m"]``: the Parameters of slot ``m``; iterating gives every Parameter, slot by slot.
    A graph takes the Parameters as one ParameterTuple (:meth:`flat`) and reads them back by role through
    :func:`rows` (the one place that fixes the order: the order of `slots`)."""

    def __init__(self, slots, tuples):
        self.slots = slots
        self._by_role = dict(zip(slots.roles, tuples))

    def __getitem__(self, role):
        return self._by_role[role]

    def __getattr__(self, role):
        try:
            return self.__dict__["_by_role"][role]
        except KeyError:
            raise AttributeError(role) from None

    def __iter__(self):
        return (p for role in self.slots.roles for p in self._by_role[role])

    def flat(self):
        """Every Parameter as one ParameterTuple, slot by slot in the order of `slots` (the fused kernel's
        argument order: slot k of parameter i is entry ``k * count + i``)."""
        return ParameterTuple(self)


def _unused_scale(param, slot):
    """The scale slot of a parameter that keeps float32 moments in an 8-bit slot set: one zero that no kernel
    reads, saved with the rest (flagged as runtime state, MindSpore folds such Parameters in graphs that take
    another input, and the kernel's argument count breaks)."""
    return Parameter(Tensor(np.zeros(1, np.float32)), name=slot.name(param.name), requires_grad=False)


def _slot_for(param, slot, eight_bit):
    """The zero state of `slot` for `param`: in the 8-bit slot set, a parameter that is not `eight_bit` keeps
    float32 moments in the codes' slots (named as the float slots: ``lamb_m.<name>``, ``lamb_v.<name>``)."""
    if eight_bit or slot.layout == "elementwise":
        return _zeros_like(param, slot)
    if slot.layout == "scales":
        return _unused_scale(param, slot)
    return _zeros_like(param, next(s for s in state.SLOTS if s.role == slot.role))


def parameter_state(params, slots, eight_bit=None):
    """The state of the parameter-by-parameter backends (a :class:`SlotState`): for each slot, zeros laid out like
    each parameter (``lamb_m.<name>``, ...), or by blocks (8-bit codes and scales), in the slot's dtype.
    `eight_bit`: one bool per parameter with an 8-bit slot set (default: all True); the others keep float32
    ``lamb_m.<name>`` / ``lamb_v.<name>`` in the codes' slots, and an unused scale of one 0."""
    eight_bit = eight_bit or (True,) * len(params)
    return SlotState(slots, [ParameterTuple(_slot_for(param, slot, flag) for param, flag in zip(params, eight_bit))
                             for slot in slots])


def rows(flat, count, width):
    """The slots of each of `count` parameters, from :meth:`SlotState.flat` of `width` slots: a tuple of `count`
    tuples (one per parameter, its `width` slots in the order of the slot set), for HyperMap (graph mode)."""
    out = ()
    for i in range(count):
        row = ()
        for k in range(width):
            row += (flat[k * count + i],)
        out += (row,)
    return out


def slot_state(backend, role):
    """The Parameters of slot `role` (``"m"``, ``"v"``) in `backend.state`, one per parameter (or this worker's
    piece), for host-side readers."""
    return tuple(backend.state[role])
