"""The per-parameter LAMB update (spec section 3), applied to all parameters with HyperMap.

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

_reduce_sum = P.ReduceSum(keep_dims=False)
_reduce_mean = P.ReduceMean(keep_dims=True)
_stack = P.Stack()
_isfinite = P.IsFinite()
_ONE = Tensor(1.0, mstype.float32)
_ZERO = Tensor(0.0, mstype.float32)
_NO_UPDATE = Tensor([1.0, 0.0, 0.0], mstype.float32)

sum_of_squares = C.MultitypeFuncGraph("lamb_sum_of_squares")
centralize = C.MultitypeFuncGraph("lamb_grad_centralization")
lamb_update = C.MultitypeFuncGraph("lamb_update")


@sum_of_squares.register("Tensor")
def _sum_of_squares(x):
    """sum(x^2) in float32.

    A tensor of rank >= 2 is reduced over its last axis first: the same accuracy
    as one reduction over all axes, about 8x faster on CPU (spec section 8).
    Not SquareSumAll/L2Loss/LpNorm, which lose 2-5 % on large tensors on CPU.
    """
    sq = F.square(F.cast(x, mstype.float32))
    if F.rank(x) > 1:
        sq = _reduce_sum(sq, -1)
    return _reduce_sum(sq)


@centralize.register("Bool", "Tensor")
def _centralize(flag, gradient):
    """Gradient centralization: g - mean(g) over every axis but the first (rank >= 2 only).

    Composite ops, so it runs on CPU too (the base class's Centralization op has no CPU kernel).
    """
    if flag and F.rank(gradient) > 1:
        axes = F.make_range(1, F.rank(gradient))
        return gradient - _reduce_mean(gradient, axes)
    return gradient


@lamb_update.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Tensor", "Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Bool", "Bool", "Bool")
def _lamb_update(beta1, beta2, eps, inv_bias_c1, inv_bias_c2, grad_scale, apply, accept, trust_lo, trust_hi,
                 clip_trust, lr, weight_decay, param, m, v, gradient, decay_flag, adapt_flag, optim_filter):
    """One LAMB step for one parameter; returns [q, ||w||, ||u||] after assigning w, m, v.

    Shared (bound with F.partial): beta1, beta2, eps; inv_bias_c1 = 1 / (1 - beta1^t) and
    inv_bias_c2 = 1 / (1 - beta2^t) (one division per call, not two per element);
    grad_scale = (1 / loss_scale) * min(1, max_grad_norm / G);
    `apply`, False for a skipped call (a NaN/Inf gradient): q = 0, so w is written back unchanged;
    `accept`, False when a skipped call must not change the moments either (an exact skip); else the
    elements whose gradient is finite take it (no graph `if`: a branch would keep stale parameter
    memory after `Parameter.set_data`); the trust-ratio clip bounds and whether to clip.
    Per parameter: lr_s, lambda_s, w, m, v, g, and the flags (decayed, layer-adapted,
    owned by this rank under the parallel optimizer).
    """
    if not optim_filter:
        return _NO_UPDATE  # another rank updates it; broadcast afterwards

    w = F.cast(param, mstype.float32)
    g = F.cast(gradient, mstype.float32) * grad_scale                     # unscale (+ NVLAMB pre-normalisation)

    m_t = beta1 * m + (1.0 - beta1) * g                                   # m = b1 m + (1 - b1) g
    v_t = beta2 * v + (1.0 - beta2) * F.square(g)                         # v = b2 v + (1 - b2) g^2
    # g NaN/Inf (or g^2 overflowing) makes v NaN/Inf: that element keeps its moments (the call is
    # skipped: G is not finite either); an exact skip keeps all of them
    keep_new = F.logical_and(accept, _isfinite(v_t))
    m_t = F.select(keep_new, m_t, m)
    v_t = F.select(keep_new, v_t, v)
    r = (m_t * inv_bias_c1) / (F.sqrt(v_t * inv_bias_c2) + eps)           # r = m^ / (sqrt(v^) + eps)
    u = r + weight_decay * w if decay_flag else r                         # u = r + lambda w

    w_norm = F.sqrt(_sum_of_squares(w))                                   # ||w||
    u_norm = F.sqrt(_sum_of_squares(u))                                   # ||u||, of exactly the applied update
    # q = ||w|| / ||u||; q = 1 when either norm is 0 (zero-initialised layer, or zero update: no NaN)
    q = F.select(F.logical_and(w_norm > 0.0, u_norm > 0.0), w_norm / u_norm, _ONE)
    if clip_trust:
        q = F.minimum(F.maximum(q, trust_lo), trust_hi)                   # q = clip(q, lo, hi)
    if not adapt_flag:
        q = _ONE                                                          # excluded from layer adaptation (AdamW step)
    q = F.select(apply, q, _ZERO)                                         # skipped call: w - lr * 0 * u = w

    w_t = w - lr * q * u                                                  # w = w - lr q u
    stats = _stack((q, w_norm, u_norm))
    stats = F.depend(stats, F.assign(param, F.cast(w_t, F.dtype(param))))
    stats = F.depend(stats, F.assign(m, m_t))
    return F.depend(stats, F.assign(v, v_t))
