"""The per-parameter LAMB update (docs/api/lamb.md, "Update rule"), applied to all parameters with HyperMap.

Symbols follow the paper (You et al., arXiv:1904.00962, Algorithm 2):
m, v are the moments, r the Adam ratio, u = r + lambda*w the update, and
q = ||w|| / ||u|| the layer-wise trust ratio. All math is float32; the moments
are stored in float32 and the parameter is written back in its own dtype.
"""
import mindspore.common.dtype as mstype
from mindspore import Tensor
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P

from .backends.contract import INDEX

_reduce_sum = P.ReduceSum(keep_dims=False)
_reduce_mean = P.ReduceMean(keep_dims=True)
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
to_float32 = C.MultitypeFuncGraph("lamb_to_float32")
_hyper_map = C.HyperMap()
centralize = C.MultitypeFuncGraph("lamb_grad_centralization")
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


def moments_and_update(scalars, wd, w, m, v, gradient):
    """(m, v, u) after this step, for float32 `w`, `m`, `v` of any shape (a parameter, or a shard of one).

    `proceed` False keeps every moment; otherwise an element whose new v is not finite (its gradient is
    NaN/Inf, or its square overflows) keeps its own. u = r + lambda w with r = m^ / (sqrt(v^) + eps).
    """
    g = F.cast(gradient, mstype.float32) * scalars[_GRAD_SCALE]           # unscale (+ NVLAMB pre-normalisation)
    g = g + (wd * scalars[_IN_GRAD]) * w                                  # L2 mode: g + lambda w
    # m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2, written with the exact 1 - b only
    # (m_grad_scale = 1 / (1 - b1) without gradient averaging: m = b1 m + g)
    m_t = m + scalars[_OMB1] * (g * scalars[_M_GRAD_SCALE] - m)
    v_t = v + scalars[_OMB2] * (F.square(g) - v)
    keep_new = F.logical_and(scalars[_PROCEED], _isfinite(v_t))
    m_t = F.select(keep_new, m_t, m)
    v_t = F.select(keep_new, v_t, v)
    # r = m^ / (sqrt(v^ + eps_root) + eps): eps outside the square root unless eps_inside_sqrt
    r = (m_t * scalars[_INV_BC1]) / (F.sqrt(v_t * scalars[_INV_BC2] + scalars[_EPS_ROOT]) + scalars[_EPS])
    return m_t, v_t, r + (wd * scalars[_IN_UPDATE]) * w                   # u = r + lambda w


def trust_ratio(scalars, apply, lr, w_norm, u_norm, keep, adapt):
    """(lr q to apply, q to report, keep to apply) from the norms; elementwise, so `lr`, `w_norm`, `u_norm`,
    `keep` and `adapt` (bool, or a bool Tensor) may be vectors with one entry per parameter.

    q = ||w|| / ||u|| (||w|| clamped to weight_norm_clip), 1 when either norm is 0, clipped to
    trust_ratio_clip, 1 without layer adaptation. Not applied (lr q = 0, keep = 1: w is written back as
    it is, see `step`) when the step is skipped, or when ||w|| or ||u|| is not finite (a NaN/Inf inside w,
    or inside its moments: a damaged checkpoint), which reports q = NaN.
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
    go = F.logical_and(apply, finite)
    return F.select(go, lr * q, F.zeros_like(q)), reported_q, F.select(go, keep, F.ones_like(keep))


def step(keep, w, lr_q, u):
    """w = keep w - lr q u, where lr q = 0 leaves w exactly as it is even where u is NaN or Inf (MulNoNan:
    0 * NaN is 0): a skipped step (its hyper-parameters may be NaN) or a layer with damaged moments."""
    return keep * w - _mul_no_nan(u, lr_q)


def expm1(x):
    """exp(x) - 1 in float32 to a few ulp, also for tiny |x|, on every backend.

    MindSpore's CPU Expm1 kernel is not accurate for small |x| (6.8e-4 relative at x = -1e-5, the
    bias correction of beta2 = 0.99999 at t = 1): below |x| = 0.1 a Taylor polynomial to x^5 (truncation
    below 2e-8 relative), above it exp(x) - 1 (cancellation below 7e-7 relative).
    """
    series = x * (1.0 + x / 2.0 * (1.0 + x / 3.0 * (1.0 + x / 4.0 * (1.0 + x / 5.0))))
    return F.select(F.abs(x) < 0.1, series, F.exp(x) - 1.0)


def global_norm_factor(global_norm, max_norm):
    """min(1, max_norm / G) as max_norm / max(G, max_norm): 1 when G = 0, 0 when G is Inf, NaN when G is
    NaN. The one clipping formula of the package (Lamb's max_grad_norm and the loss-scale cell's)."""
    return max_norm / F.maximum(global_norm, max_norm)


@to_float32.register("Number")
def _number_to_float32(x):
    """A Python number (a fixed weight decay) as a float32 0-D Tensor."""
    return F.scalar_to_tensor(x, mstype.float32)


@to_float32.register("Tensor")
def _tensor_to_float32(x):
    """A 0-D or (1,) Tensor (lr, schedules, flags) as a float32 0-D Tensor."""
    return F.reshape(F.cast(x, mstype.float32), ())


def per_parameter(value, ones):
    """float32 (n,): one value per parameter, from a shared scalar or a tuple of one per parameter
    (`ones`: a float32 (n,) Tensor of ones)."""
    if isinstance(value, tuple):
        return _stack(_hyper_map(to_float32, value))
    return ones * to_float32(value)


@centralize.register("Bool", "Tensor")
def _centralize(flag, gradient):
    """Gradient centralization: g - mean(g) over every axis but the first (rank >= 2 only).

    Composite ops, so it runs on CPU too (the base class's Centralization op has no CPU kernel).
    """
    if flag and F.rank(gradient) > 1:
        axes = F.make_range(1, F.rank(gradient))
        return gradient - _reduce_mean(gradient, axes)
    return gradient


@lamb_update.register("Tuple", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Bool", "Bool", "Bool")
def _lamb_update(scalars, apply, lr, weight_decay, param, m, v, gradient, decay_flag, adapt_flag, owned):
    """One LAMB step for one parameter; returns [q, ||w||, ||u||] after assigning w, m, v.

    Shared (bound with F.partial): `scalars`, the tuple of backends/contract.py (beta terms, eps, bias
    corrections, grad_scale = (1 / loss_scale) * min(1, max_grad_norm / G), clip bounds, proceed);
    `apply`, False when the weights must not move this step (skipped: q = 0, so w - lr * 0 * u = w).
    `proceed` False keeps the moments too; otherwise an element whose gradient is not finite keeps them
    (no graph `if`: a branch would keep stale parameter memory after `Parameter.set_data`).
    Per parameter: lr_s, lambda_s, w, m, v, g, and the flags (decayed, layer-adapted, owned by this rank
    under the parallel optimizer).
    """
    if not owned:
        return _NO_UPDATE  # another rank updates it; broadcast afterwards

    w = F.cast(param, mstype.float32)
    wd = weight_decay if decay_flag else 0.0                              # lambda_s, 0 if w is not decayed
    m_t, v_t, u = moments_and_update(scalars, wd, w, m, v, gradient)
    keep = F.reshape(1.0 - lr * wd * scalars[_OUTSIDE], ())               # decay outside q: w = keep w - lr q u
    w_norm = F.sqrt(_sum_of_squares(w)) * keep                            # ||w|| (of keep w)
    u_norm = F.sqrt(_sum_of_squares(u))                                   # ||u||, of exactly the applied update
    lr_q, reported_q, keep = trust_ratio(scalars, apply, lr, w_norm, u_norm, keep, adapt_flag)

    w_t = step(keep, w, lr_q, u)                                          # w = w - lr q u
    stats = _stack((reported_q, w_norm, u_norm))
    stats = F.depend(stats, F.assign(param, F.cast(w_t, F.dtype(param))))
    stats = F.depend(stats, F.assign(m, m_t))
    return F.depend(stats, F.assign(v, v_t))
