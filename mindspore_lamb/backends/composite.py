"""The composite backend: the LAMB rule, per parameter, in primitive operators applied with HyperMap.

Symbols follow the paper (You et al., arXiv:1904.00962, Algorithm 2): m, v are the moments, r the Adam
ratio, u = r + lambda*w the update, and q = ||w|| / ||u|| the layer-wise trust ratio (docs/api/lamb.md,
"Update rule"). All math is float32; each moment is read from and stored in its slot's dtype
(``state.SLOTS``), and the parameter is written back in its own dtype.

Primitive operators only, so the same graph runs on CPU, GPU and Ascend, for float16 (and, off CPU,
bfloat16) parameters and moments too. It is the reference the other backends are tested against; the
sharded backend applies its `moments_and_update`, `trust_ratio` and `step` to a worker's piece.
"""
import mindspore.common.dtype as mstype
from mindspore import Tensor, nn
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .contract import INDEX, dtype_name, parameter_state

_reduce_sum = P.ReduceSum(keep_dims=False)
_stack = P.Stack()
_isfinite = P.IsFinite()
_mul_no_nan = P.MulNoNan()
_NO_UPDATE = Tensor([1.0, 0.0, 0.0], mstype.float32)
(_OMB1, _OMB2, _M_GRAD_SCALE, _EPS, _EPS_ROOT, _INV_BC1, _INV_BC2, _GRAD_SCALE, _IN_GRAD, _IN_UPDATE, _OUTSIDE,
 _W_NORM_MAX, _LO, _HI, _PROCEED) = (INDEX[name] for name in (
    "one_minus_beta1", "one_minus_beta2", "m_grad_scale", "eps", "eps_root", "inv_bias_c1", "inv_bias_c2",
    "grad_scale", "decay_in_grad", "decay_in_update", "decay_outside", "w_norm_max", "trust_lo", "trust_hi",
    "proceed"))

sum_of_squares = C.MultitypeFuncGraph("lamb_sum_of_squares")
lamb_update = C.MultitypeFuncGraph("lamb_update")


@sum_of_squares.register("Tensor")
def _sum_of_squares(x):
    """sum(x^2) in float32.

    A tensor of rank >= 2 is reduced over its last axis first: the same accuracy
    as one reduction over all axes, about 8x faster on CPU.
    Not SquareSumAll/L2Loss/LpNorm, which lose 2-5 % on large tensors on CPU.
    """
    sq = F.square(F.cast(x, mstype.float32))
    if F.rank(x) > 1:
        sq = _reduce_sum(sq, -1)
    return _reduce_sum(sq)


def stored(x, dtype):
    """float32 `x` as stored in `dtype` (a name: ``float32``, ``float16``, ``bfloat16``): rounded to nearest."""
    if dtype == "float16":
        return F.cast(x, mstype.float16)
    if dtype == "bfloat16":
        return F.cast(x, mstype.bfloat16)
    return x


def as_float32(x, dtype):
    """`x`, stored in `dtype` (a name), as float32 (no operation for float32)."""
    return x if dtype == "float32" else F.cast(x, mstype.float32)


def moments_and_update(scalars, wd, w, m, v, gradient, m_dtype):
    """(m, v, u) after this step, for float32 `w` and `v` of any shape (a parameter, or a shard of one) and `m`
    stored in `m_dtype` (a name); the new m is returned as stored, and u is computed from that stored m.

    `proceed` False keeps every moment; otherwise an element whose new v is not finite (its gradient is
    NaN/Inf, or its square overflows) keeps its own. u = r + lambda w with r = m^ / (sqrt(v^) + eps).
    """
    m = as_float32(m, m_dtype)
    g = F.cast(gradient, mstype.float32) * scalars[_GRAD_SCALE]           # unscale (+ NVLAMB pre-normalisation)
    g = g + (wd * scalars[_IN_GRAD]) * w                                  # L2 mode: g + lambda w
    # m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, written with the exact 1 - b only
    # (m_grad_scale = 1 / (1 - b1) without gradient averaging: m = b1 m + g)
    m_t = m + scalars[_OMB1] * (g * scalars[_M_GRAD_SCALE] - m)
    v_t = v + scalars[_OMB2] * (F.square(g) - v)
    keep_new = F.logical_and(scalars[_PROCEED], _isfinite(v_t))
    m_t = stored(F.select(keep_new, m_t, m), m_dtype)                     # m as stored (rounded to m_dtype)
    v_t = F.select(keep_new, v_t, v)
    # r = m^ / (sqrt(v^ + eps_root) + eps): eps outside the square root unless eps_inside_sqrt
    r = (as_float32(m_t, m_dtype) * scalars[_INV_BC1]) / (F.sqrt(v_t * scalars[_INV_BC2] + scalars[_EPS_ROOT])
                                                          + scalars[_EPS])
    return m_t, v_t, r + (wd * scalars[_IN_UPDATE]) * w                   # u = r + lambda w


def trust_ratio(scalars, applied, lr, w_norm, u_norm, keep, adapt):
    """(lr q to apply, q to report, keep to apply) from the norms; elementwise, so `lr`, `w_norm`, `u_norm`,
    `keep` and `adapt` (bool, or a bool Tensor) may be vectors with one entry per parameter.

    q = ||w|| / ||u|| (||w|| clamped to weight_norm_clip), 1 when either norm is 0, clipped to
    trust_ratio_clip, 1 without layer adaptation. Not applied (lr q = 0, keep = 1: w is written back as
    it is, see `step`) when the step is not `applied`, or when ||w|| or ||u|| is not finite (a NaN/Inf inside
    w, or inside its moments: a damaged checkpoint), which reports q = NaN.
    """
    w_used = F.minimum(w_norm, scalars[_W_NORM_MAX])                      # ||w|| clamped (inf when off)
    # q = 1 when either norm is 0 (zero-initialised layer, or zero update: no NaN)
    q = F.select(F.logical_and(w_used > 0.0, u_norm > 0.0), w_used / u_norm, F.ones_like(w_used))
    q = F.minimum(F.maximum(q, scalars[_LO]), scalars[_HI])               # q = clip(q, lo, hi); (0, inf) when off
    if isinstance(adapt, bool):
        if not adapt:
            q = F.ones_like(q)                                            # excluded from layer adaptation
    else:
        q = F.select(adapt, q, F.ones_like(q))
    finite = F.logical_and(_isfinite(w_norm), _isfinite(u_norm))
    reported_q = F.select(finite, q, F.fill(mstype.float32, F.shape(q), float("nan")))
    layer_applied = F.logical_and(applied, finite)
    return (F.select(layer_applied, lr * q, F.zeros_like(q)), reported_q,
            F.select(layer_applied, keep, F.ones_like(keep)))


def step(keep, w, lr_q, u):
    """w = keep w - lr q u, where lr q = 0 leaves w exactly as it is even where u is NaN or Inf (MulNoNan:
    0 * NaN is 0): a skipped step (its hyper-parameters may be NaN) or a layer with damaged moments."""
    return keep * w - _mul_no_nan(u, lr_q)


@lamb_update.register("Tuple", "Tensor", "String", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Bool", "Bool", "Bool")
def _lamb_update(scalars, applied, m_dtype, lr, weight_decay, param, m, v, gradient, decay_flag, adapt_flag, owned):
    """One LAMB step for one parameter; returns [q, ||w||, ||u||] after assigning w, m, v.

    Shared (bound with F.partial): `scalars`, the tuple of backends/contract.py (beta terms, eps, bias
    corrections, grad_scale = (1 / loss_scale) * min(1, max_grad_norm / G), clip bounds, proceed);
    `applied`, False when the weights must not move this step (skipped: q = 0, so w - lr * 0 * u = w);
    `m_dtype`, the name of the first moment's stored dtype.
    `proceed` False keeps the moments too; otherwise an element whose gradient is not finite keeps them
    (no graph `if`: a branch would keep stale parameter memory after `Parameter.set_data`).
    Per parameter: lr_s, lambda_s, w, m, v, g, and the flags (decayed, layer-adapted, owned by this rank
    under the parallel optimizer).
    """
    if not owned:
        return _NO_UPDATE  # another rank updates it; broadcast afterwards

    w = F.cast(param, mstype.float32)
    wd = weight_decay if decay_flag else 0.0                              # lambda_s, 0 if w is not decayed
    m_t, v_t, u = moments_and_update(scalars, wd, w, m, v, gradient, m_dtype)
    keep = F.reshape(1.0 - lr * wd * scalars[_OUTSIDE], ())               # decay outside q: w = keep w - lr q u
    w_norm = F.sqrt(_sum_of_squares(w)) * keep                            # ||w|| (of keep w)
    u_norm = F.sqrt(_sum_of_squares(u))                                   # ||u||, of exactly the applied update
    lr_q, reported_q, keep = trust_ratio(scalars, applied, lr, w_norm, u_norm, keep, adapt_flag)

    w_t = step(keep, w, lr_q, u)                                          # w = w - lr q u
    stats = _stack((reported_q, w_norm, u_norm))
    stats = F.depend(stats, F.assign(param, F.cast(w_t, F.dtype(param))))
    stats = F.depend(stats, F.assign(m, m_t))
    return F.depend(stats, F.assign(v, v_t))


def unavailable(params, slots, device_target):
    """(why the composite operators cannot store `slots` on `device_target`, True), or (None, False)."""
    for slot in slots or ():
        if slot.dtype == mstype.bfloat16 and device_target == "CPU":
            return (f"MindSpore 2.10 cannot write a bfloat16 Parameter on CPU (its Assign has no bfloat16 kernel), "
                    f"and the {slot.title} are bfloat16"), True
    return None, False


class SumOfSquares(nn.Cell):
    """``sum(g^2)`` over every element of every gradient, in float32 (two-stage ReduceSum + AddN)."""

    def __init__(self):
        super().__init__()
        self.hyper_map = C.HyperMap()
        self.addn = P.AddN()

    def construct(self, gradients):
        return self.addn(self.hyper_map(sum_of_squares, gradients))


class CompositeBackend(nn.Cell):
    """The update contract (contract.py) as one HyperMap of `lamb_update`."""

    name = "composite"
    SumOfSquares = SumOfSquares
    unavailable = staticmethod(unavailable)

    def __init__(self, params, slots, *, decay_flags, adapt_flags, owned_flags):
        super().__init__()
        self.n = len(params)
        self.slots = slots
        self.state = parameter_state(params, slots)
        self.m_dtype = dtype_name(slots[0].dtype)
        self.decay_flags = tuple(decay_flags)
        self.adapt_flags = tuple(adapt_flags)
        self.owned_flags = tuple(owned_flags)
        self.sum_of_squares = SumOfSquares()
        self.hyper_map = C.HyperMap()
        self.stack = P.Stack()
        self.isfinite = P.IsFinite()

    def construct(self, scalars, lr, weight_decay, params, gradients, grad_sq):
        if grad_sq is None:
            grad_sq = self.sum_of_squares(gradients)
        applied = F.logical_and(scalars[_PROCEED], self.isfinite(grad_sq))
        if not isinstance(lr, tuple):
            lr = (lr,) * self.n
        if not isinstance(weight_decay, tuple):
            weight_decay = (weight_decay,) * self.n
        # the state slot by slot, (m, v) in the order of state.SLOTS: lamb_update's
        m, v = self.state[:self.n], self.state[self.n:]
        stats = self.hyper_map(F.partial(lamb_update, scalars, applied, self.m_dtype), lr, weight_decay, params,
                               m, v, gradients, self.decay_flags, self.adapt_flags, self.owned_flags)
        return self.stack(stats), grad_sq, applied
