"""The composite backend: the LAMB rule, per parameter, in primitive operators applied with HyperMap.

Symbols follow the paper (You et al., arXiv:1904.00962, Algorithm 2): m, v are the moments, r the Adam
ratio, u = r + lambda*w the update, and q = ||w|| / ||u|| the layer-wise trust ratio (docs/api/lamb.md,
"Update rule"). All math is float32; each moment is read from and stored in its slot's dtype (the
optimizer's ``state.Slots``, read by role), and the parameter is written back in its own dtype.

Primitive operators only, so the same graph runs on CPU, GPU and Ascend, for float16 (and, off CPU,
bfloat16) parameters and moments too. It is the reference the other backends are tested against; the
sharded backend applies its `moments_and_update`, `trust_ratio` and `new_weight` to a worker's piece.

Few parameter-sized temporaries (docs/architecture.md, "The composite graph"): the terms of options held at
a neutral value are left out of the graph (`contract.terms`), the bias corrections are one factor per step
(`rescale`), a skipped step multiplies the moments' change by 0 (MulNoNan; on Ascend, where MulNoNan is
AICPU only, it selects: `SELECT_SKIP`, docs/operators.md), and the trust ratios of all parameters are computed
at once, between a pass that writes the moments and returns each u' and a pass that writes the weights.
"""
import numpy as np

import mindspore as ms
import mindspore.common.dtype as mstype
from mindspore import Tensor, nn
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .._ops import Unstack, assign, assign_sub, broadcast_to, cast, lerp, nan_to_zero, where
from .blockwise import dequantize, quantize
from .contract import INDEX, parameter_state, per_parameter, rows, terms

_reduce_sum = P.ReduceSum(keep_dims=False)
_stack = P.Stack()
_isfinite = P.IsFinite()
_mul_no_nan = P.MulNoNan()
# x / y of tensors: RealDiv, the same float32 quotients as Div (`/`), whose CPU kernel in MindSpore 2.10 keeps
# several times its operands' bytes allocated after it runs (docs/distributed.md)
_divide = P.RealDiv()
# the devices whose graph selects where the others use MulNoNan: MindSpore's Ascend libraries hold only an AICPU
# MulNoNan (docs/operators.md); CPU and GPU have native ones, faster than the selects on CPU
SELECT_SKIP = ("Ascend",)
_ZERO = Tensor(0.0, mstype.float32)
_NAN = Tensor(float("nan"), mstype.float32)
(_OMB1, _OMB2, _M_GRAD_SCALE, _EPS, _EPS_ROOT, _INV_BC1, _INV_BC2, _GRAD_SCALE, _IN_GRAD, _IN_UPDATE, _OUTSIDE,
 _W_NORM_MAX, _LO, _HI, _PROCEED) = (INDEX[name] for name in (
    "one_minus_beta1", "one_minus_beta2", "m_grad_scale", "eps", "eps_root", "inv_bias_c1", "inv_bias_c2",
    "grad_scale", "decay_in_grad", "decay_in_update", "decay_outside", "w_norm_max", "trust_lo", "trust_hi",
    "proceed"))

tensor_sum_of_squares = C.MultitypeFuncGraph("lamb_tensor_sum_of_squares")
lamb_moments = C.MultitypeFuncGraph("lamb_moments")
lamb_apply = C.MultitypeFuncGraph("lamb_apply")
_owned_tensor_sum_of_squares = C.MultitypeFuncGraph("lamb_owned_tensor_sum_of_squares")


@tensor_sum_of_squares.register("Tensor")
def _tensor_sum_of_squares(x):
    """sum(x^2) in float32.

    A tensor of rank >= 2 is reduced over its last axis first: the same accuracy
    as one reduction over all axes, about 8x faster on CPU.
    Not SquareSumAll/L2Loss/LpNorm, which lose 2-5 % on large tensors on CPU.
    """
    sq = F.square(cast(x, mstype.float32))
    if F.rank(x) > 1:
        sq = _reduce_sum(sq, -1)
    return _reduce_sum(sq)


def stored(x, dtype):
    """float32 `x` as stored in `dtype` (a name: ``float32``, ``float16``, ``bfloat16``): rounded to nearest."""
    if dtype == "float16":
        return cast(x, mstype.float16)
    if dtype == "bfloat16":
        return cast(x, mstype.bfloat16)
    return x


def as_float32(x, dtype):
    """`x`, stored in `dtype` (a name), as float32 (no operation for float32)."""
    return x if dtype == "float32" else cast(x, mstype.float32)


def times(u, lr_q, masked):
    """u * lr_q for a float32 0-D `lr_q`, exactly 0 where lr_q is 0 even where u is NaN or Inf (0 * NaN is 0).

    MulNoNan where it has a native kernel (CPU, GPU). `masked` (the devices of SELECT_SKIP: Ascend has only an
    AICPU MulNoNan, docs/operators.md): NanToNum of the product, for the u and lr q of `trust_ratio`, where lr q
    is 0 wherever u holds a NaN or Inf (||u|| is not finite): every NaN of the product is a 0 * NaN or 0 * Inf,
    made 0, and elsewhere the product is untouched."""
    if masked:
        return nan_to_zero(u * lr_q)
    return _mul_no_nan(u, lr_q)


def rescale(scalars, present_terms):
    """(c, e) of the update as the composite rule computes it: u = c u' and u' = m / (den + e) + (lambda / c) w,
    with den = sqrt(v) (eps outside the square root) or sqrt(v^ + eps_root); None where c is 1 or e is 0.

    The trust ratio needs u only up to a positive factor (lr q u = (lr c) (||w|| / ||u'||) u'), so the bias
    corrections leave the per-element math: with eps outside the square root sqrt(v^) = sqrt(v) sqrt(1 / bc2),
    hence r = c m / (sqrt(v) + e) with c = (1 / bc1) / sqrt(1 / bc2) and e = eps / sqrt(1 / bc2) (a few float32
    roundings apart from the literal form). One pair per step, shared by every parameter.
    """
    if present_terms[_EPS_ROOT]:                                          # eps inside the square root
        return ((scalars[_INV_BC1] if present_terms[_INV_BC1] else None),
                (scalars[_EPS] if present_terms[_EPS] else None))
    c, e = None, (scalars[_EPS] if present_terms[_EPS] else None)
    if present_terms[_INV_BC2]:
        root = F.sqrt(scalars[_INV_BC2])
        c = 1.0 / root
        e = None if e is None else e / root
    if present_terms[_INV_BC1]:
        c = scalars[_INV_BC1] if c is None else scalars[_INV_BC1] * c
    return c, e


def rates(scalars, applied, masked):
    """(gate (1 - b1), gate (1 - b2), applied, masked): the moments' rates of this step, with gate 1 when the step
    is `applied`, 0 when it is not (the caller's verdict, or a NaN/Inf in the gradients: G not finite); `masked`
    (a bool): the graph selects instead of using MulNoNan (SELECT_SKIP). Once per step."""
    gate = cast(applied, mstype.float32)
    return scalars[_OMB1] * gate, scalars[_OMB2] * gate, applied, masked


def _codes(slot, role, roles):
    """Whether moment `role`'s slot holds 8-bit codes (an 8-bit slot set, ``<role>_scale`` among the roles, and
    this parameter at least min_8bit_size elements: the smaller ones keep float32 moments there)."""
    return role + "_scale" in roles and (F.dtype(slot) == mstype.int8 or F.dtype(slot) == mstype.uint8)


def _float_dtype(layout, role):
    """The float dtype moment `role` is kept in where it is not codes: its slot's, or float32 (the small tensors
    of an 8-bit slot set)."""
    roles, dtypes = layout
    return "float32" if role + "_scale" in roles else dtypes[roles.index(role)]


def read_moment(state, layout, role, shape):
    """Moment `role` (``"m"``, ``"v"``) of one parameter (or piece) of `shape`, as float32, from its slots
    `state` laid out as `layout` (``state.Slots.layout``): stored in a float dtype, or 8-bit codes with their
    block scales (slot ``<role>_scale``: blockwise.py)."""
    roles = layout[0]
    slot = state[roles.index(role)]
    if _codes(slot, role, roles):
        return dequantize(slot, state[roles.index(role + "_scale")], shape, role == "m")
    return as_float32(slot, _float_dtype(layout, role))


def store_moment(state, layout, role, value):
    """Assign float32 `value` to moment `role`'s slots (rounded to its dtype, or quantized: blockwise.py) and
    return it as stored, read back as float32, after the assignments."""
    roles = layout[0]
    slot = state[roles.index(role)]
    if _codes(slot, role, roles):
        scale_slot = state[roles.index(role + "_scale")]
        codes, scale = quantize(value, role == "m")
        done = F.depend(assign(slot, codes), assign(scale_slot, scale))
        return F.depend(dequantize(codes, scale, F.shape(value), role == "m"), done)
    dtype = _float_dtype(layout, role)
    kept = stored(value, dtype)
    kept = F.depend(kept, assign(slot, kept))
    return as_float32(kept, dtype)


def new_moments(scalars, present_terms, step_rates, wd, w, state, layout, gradient):
    """(v, m): the new moments of float32 `w` (of any shape) as float32, not yet stored; `state` holds the old
    ones (read by role through `layout`). The first half of `moments_and_update`, which says how."""
    shape = F.shape(w)
    v = read_moment(state, layout, "v", shape)
    g = cast(gradient, mstype.float32)
    if present_terms[_GRAD_SCALE]:
        g = g * scalars[_GRAD_SCALE]                                      # unscale (+ NVLAMB pre-normalisation)
    if wd is not None and present_terms[_IN_GRAD]:
        g = g + (wd * scalars[_IN_GRAD]) * w                              # L2 mode: g + lambda w
    # v = v + (1 - b2) (g^2 - v): the exact 1 - b only; v as it was when the step is not applied
    applied = broadcast_to(step_rates[2], shape) if step_rates[3] else None
    if step_rates[3]:
        v_t = where(applied, lerp(v, F.square(g), step_rates[1]), v)
    else:
        v_t = v + _mul_no_nan(F.square(g) - v, step_rates[1])
    # m = m + (1 - b1) (g - m) (without gradient averaging m = b1 m + g, as m + (1 - b1) (g / (1 - b1) - m))
    if present_terms[_M_GRAD_SCALE]:
        g = g * scalars[_M_GRAD_SCALE]
    m32 = read_moment(state, layout, "m", shape)
    if step_rates[3]:
        m_t = where(applied, lerp(m32, g, step_rates[0]), m32)
    else:
        m_t = m32 + _mul_no_nan(g - m32, step_rates[0])
    return v_t, m_t


def update(scalars, present_terms, rescaled, wd, w, v_t, m_t):
    """u' (`rescale`: u = c u') of float32 `w` from its moments as stored (float32 `v_t`, `m_t`). The second half
    of `moments_and_update`."""
    c, e = rescaled
    # den = sqrt(v) + e, or sqrt(v^ + eps_root) (see `rescale`)
    if present_terms[_EPS_ROOT]:
        den = F.sqrt((v_t * scalars[_INV_BC2] if present_terms[_INV_BC2] else v_t) + scalars[_EPS_ROOT])
    else:
        den = F.sqrt(v_t)
    if e is not None:
        den = den + e
    # u' = m / den + (lambda / c) w
    u = _divide(m_t, den)
    if wd is not None and present_terms[_IN_UPDATE]:
        decay = wd * scalars[_IN_UPDATE]
        u = u + (decay if c is None else _divide(decay, c)) * w
    return u


def moments_and_update(scalars, present_terms, rescaled, step_rates, wd, w, state, layout, gradient):
    """u' of this step (`rescale`: u = c u'), for float32 `w` of any shape (a parameter, or a shard of one),
    after assigning the new moments to its slots `state` (a tuple, read by role through `layout`,
    ``state.Slots.layout``: (roles, stored dtype names)): float32 `v`, and `m` stored in its slot's dtype (the
    new m rounded to it), or both as 8-bit codes with block scales (blockwise.py); u' is computed from the
    moments as stored. Slots the rule does not name are left as they are. `present_terms` (contract.terms): the
    scalars whose terms the graph computes; `rescaled`: (c, e) of `rescale`; `wd`: lambda, None when w is not
    decayed.

    `step_rates` (`rates`): each moment moves by gate (1 - b) (x - moment), and MulNoNan makes 0 (x - moment)
    exactly 0 even where x is NaN or Inf: a skipped step leaves both moments exactly as they were. Masked
    (Ascend, SELECT_SKIP): each moment is Lerp(moment, x, gate (1 - b)) (the same float32 operations), selected
    against the moment as it was with the step's verdict, broadcast to the moment's shape first (on CPU a
    Select of a 0-D mask takes several times the tensor's memory): the same moments, bit for bit.
    """
    v_t, m_t = new_moments(scalars, present_terms, step_rates, wd, w, state, layout, gradient)
    v_t = store_moment(state, layout, "v", v_t)                           # v as stored
    m_t = store_moment(state, layout, "m", m_t)                           # m as stored (rounded)
    return update(scalars, present_terms, rescaled, wd, w, v_t, m_t)


def trust_ratio(scalars, present_terms, applied, lr, w_norm, u_norm, decay_factor, adapt):
    """(lr q to apply, q to report, decay_factor to apply) from the norms; elementwise, so `lr`, `w_norm`,
    `u_norm`, `decay_factor` (1 - lr lambda) and `adapt` (bool, or a bool Tensor) may be vectors with one entry
    per parameter; `decay_factor` None (decay not outside the trust ratio) stays None.

    q = ||w|| / ||u|| (||w|| clamped to weight_norm_clip), 1 when either norm is 0, clipped to
    trust_ratio_clip, 1 without layer adaptation. Not applied (lr q = 0, decay_factor = 1: w is written back
    as it is, see `new_weight`) when the step is not `applied`, or when ||w|| or ||u|| is not finite (a NaN/Inf inside
    w, or inside its moments: a damaged checkpoint), which reports q = NaN.
    """
    w_used = F.minimum(w_norm, scalars[_W_NORM_MAX]) if present_terms[_W_NORM_MAX] else w_norm  # ||w|| clamped
    # q = 1 when either norm is 0 (zero-initialised layer, or zero update: no NaN)
    q = where(F.logical_and(w_used > 0.0, u_norm > 0.0), w_used / u_norm, F.ones_like(w_used))
    if present_terms[_LO]:
        q = F.maximum(q, scalars[_LO])                                    # q = clip(q, lo, hi)
    if present_terms[_HI]:
        q = F.minimum(q, scalars[_HI])
    if isinstance(adapt, bool):
        if not adapt:
            q = F.ones_like(q)                                            # excluded from layer adaptation
    else:
        q = where(adapt, q, F.ones_like(q))
    finite = F.logical_and(_isfinite(w_norm), _isfinite(u_norm))
    reported_q = where(finite, q, _NAN)
    layer_applied = F.logical_and(applied, finite)
    if decay_factor is not None:
        decay_factor = where(layer_applied, decay_factor, F.ones_like(decay_factor))
    return where(layer_applied, lr * q, F.zeros_like(q)), reported_q, decay_factor


def new_weight(decay_factor, w, lr_q, u, masked):
    """The new weight decay_factor w - lr q u (`decay_factor` None: 1), where lr q = 0 leaves w exactly as it is
    even where u is NaN or Inf (`times`: 0 * NaN is 0): a skipped step (its hyper-parameters may be NaN) or a
    layer with damaged moments."""
    return (w if decay_factor is None else decay_factor * w) - times(u, lr_q, masked)


@lamb_moments.register("Tuple", "Tuple", "Tuple", "Tuple", "Tuple", "Tensor", "Tensor", "Tuple", "Tensor", "Bool",
                       "Bool")
def _lamb_moments(scalars, present_terms, rescaled, step_rates, layout, weight_decay, param, state, gradient,
                  decay_flag, owned):
    """Pass 1 for one parameter: assign its moments and return u' (see `rescale`), after the assignments.

    Shared (bound with F.partial): `scalars`, the tuple of backends/contract.py; `present_terms`, which of them the
    graph computes (contract.terms: the others are constants at a neutral value); `rescaled`, (c, e) of
    `rescale`; the moments' `rates` of this step; `layout`, the slots' roles and stored dtypes
    (``state.Slots.layout``). Per parameter: lambda_s, w, its slots (a tuple, `contract.rows`), g and the flags
    (decayed, owned by this rank under the parallel optimizer).
    """
    if not owned:
        return _ZERO                                                      # another rank updates it
    wd = weight_decay if decay_flag else None                             # lambda_s, None if w is not decayed
    return moments_and_update(scalars, present_terms, rescaled, step_rates, wd, cast(param, mstype.float32), state,
                              layout, gradient)


@_owned_tensor_sum_of_squares.register("Tensor", "Bool")
def _owned_param_sum_of_squares(param, owned):
    """sum(w^2) of a parameter this rank updates, else 0."""
    return _tensor_sum_of_squares(param) if owned else _ZERO


@lamb_apply.register("Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Bool")
def _lamb_apply(masked, decay_factor, lr_q, param, u, owned):
    """Pass 2 for one parameter: w = decay_factor w - (lr q) u', written back in the parameter's dtype (`masked`:
    see `times`)."""
    if not owned:
        return u                                                          # broadcast afterwards
    w = new_weight(decay_factor, cast(param, mstype.float32), lr_q, u, masked)
    return assign(param, cast(w, F.dtype(param)))


@lamb_apply.register("Bool", "Tensor", "Tensor", "Tensor", "Bool")
def _lamb_apply_no_decay_factor(masked, lr_q, param, u, owned):
    """Pass 2 without weight decay outside the trust ratio: w = w - (lr q) u' (in place for float32 w)."""
    if not owned:
        return u
    if F.dtype(param) == mstype.float32:
        return assign_sub(param, times(u, lr_q, masked))                  # see `new_weight`
    return assign(param, cast(new_weight(None, cast(param, mstype.float32), lr_q, u, masked), F.dtype(param)))


def unavailable(params, slots, device_target):
    """(why the composite operators cannot store `slots` on `device_target`, True), or (None, False)."""
    for slot in slots or ():
        if slot.dtype == mstype.bfloat16 and device_target == "CPU":
            return (f"MindSpore 2.10 cannot write a bfloat16 Parameter on CPU (its Assign has no bfloat16 kernel), "
                    f"and the {slot.title} are bfloat16"), True
        if slot.dtype == mstype.bfloat16 and device_target == "GPU":
            return (f"MindSpore 2.10's GPU plugin has no bfloat16 kernel (its CUDA library has none, "
                    f"docs/operators.md), and the {slot.title} are bfloat16"), True
    return None, False


class SumOfSquares(nn.Cell):
    """``sum(g^2)`` over every element of every gradient, in float32 (two-stage ReduceSum + AddN)."""

    def __init__(self):
        super().__init__()
        self.hyper_map = C.HyperMap()
        self.addn = P.AddN()

    def construct(self, gradients):
        return self.addn(self.hyper_map(tensor_sum_of_squares, gradients))


class CompositeBackend(nn.Cell):
    """The update contract (contract.py) in two HyperMaps over the parameters: pass 1 (`lamb_moments`: the
    moments and u'), the trust ratios of all parameters at once (`trust_ratio` on vectors), pass 2
    (`lamb_apply`: the weights)."""

    name = "composite"
    SumOfSquares = SumOfSquares
    unavailable = staticmethod(unavailable)

    def __init__(self, params, slots, *, decay_flags, adapt_flags, owned_flags, constants, eight_bit=None):
        super().__init__()
        self.n = len(params)
        self.present_terms = terms(constants)  # the graph leaves out the terms of constants at a neutral value
        self.slots = slots
        self.state = parameter_state(params, slots, eight_bit)   # by role (contract.SlotState)
        self.state_params = self.state.flat()
        self.layout = slots.layout()
        self.masked = ms.get_context("device_target") in SELECT_SKIP     # selects instead of MulNoNan
        self.decay_flags = tuple(decay_flags)
        self.owned_flags = tuple(owned_flags)
        self.decay_mask = Tensor(np.array(decay_flags, np.float32))
        self.adapt = Tensor(np.array(adapt_flags, np.bool_))
        self.ones = Tensor(np.ones(self.n, np.float32))
        self.grad_sq_cell = SumOfSquares()
        self.hyper_map = C.HyperMap()
        self.stack = P.Stack()
        self.stack1 = P.Stack(axis=1)
        self.unstack = Unstack()
        self.isfinite = P.IsFinite()

    def construct(self, scalars, lr, weight_decay, params, gradients, grad_sq):
        if grad_sq is None:
            grad_sq = self.grad_sq_cell(gradients)
        # G is known before the update here: a skipped step (the caller's verdict, or a NaN/Inf gradient) changes
        # nothing, the moments included
        applied = F.logical_and(scalars[_PROCEED], self.isfinite(grad_sq))
        per_param_wd = weight_decay if isinstance(weight_decay, tuple) else (weight_decay,) * self.n
        # pass 1: the moments, and u' = u / c; each parameter's slots as one tuple, read by role (self.layout)
        state = rows(self.state_params, self.n, len(self.layout[0]))
        rescaled = rescale(scalars, self.present_terms)
        step_rates = rates(scalars, applied, self.masked)
        u = self.hyper_map(F.partial(lamb_moments, scalars, self.present_terms, rescaled, step_rates, self.layout),
                           per_param_wd, params, state, gradients, self.decay_flags, self.owned_flags)
        # the trust ratios of all parameters at once
        w_norm = F.sqrt(self.stack(self.hyper_map(_owned_tensor_sum_of_squares, params, self.owned_flags)))
        u_norm = F.sqrt(self.stack(self.hyper_map(tensor_sum_of_squares, u)))
        lr = per_parameter(lr, self.ones)
        decay_factor = None
        if self.present_terms[_OUTSIDE]:
            decay_factor = 1.0 - lr * per_parameter(weight_decay, self.ones) * self.decay_mask * scalars[_OUTSIDE]
            w_norm = w_norm * decay_factor                                # ||w|| (of decay_factor w)
        c = rescaled[0]
        if c is not None:
            u_norm, lr = u_norm * c, lr * c                               # ||u|| = c ||u'||, lr q u = (lr c) q u'
        lr_q, reported_q, decay_factor = trust_ratio(scalars, self.present_terms, applied, lr, w_norm, u_norm,
                                                     decay_factor, self.adapt)
        # pass 2: the weights
        if decay_factor is None:
            done = self.hyper_map(F.partial(lamb_apply, self.masked), self.unstack(lr_q), params, u,
                                  self.owned_flags)
        else:
            done = self.hyper_map(F.partial(lamb_apply, self.masked), self.unstack(decay_factor), self.unstack(lr_q),
                                  params, u, self.owned_flags)
        return F.depend(self.stack1((reported_q, w_norm, u_norm)), done), grad_sq, applied
