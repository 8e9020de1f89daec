"""Prototype (issue 7): composite-graph candidates, measured against mindspore_lamb.Lamb.

LambFoldedBias: bias corrections folded into two scalars, r = m * (sqrt(bc2) / bc1) / (sqrt(v) + eps sqrt(bc2))
(algebraically equal to (m / bc1) / (sqrt(v / bc2) + eps); 4 element-wise ops instead of 5) and no casts
for float32 parameters. Only _apply's per-parameter function changes.
"""
import mindspore.common.dtype as mstype
from mindspore.ops import composite as C
from mindspore.ops import functional as F

from mindspore_lamb import Lamb
from mindspore_lamb._update import _NO_UPDATE, _ONE, _stack, _sum_of_squares

_folded = C.MultitypeFuncGraph("lamb_update_folded")


@_folded.register("Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool",
                  "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Bool", "Bool", "Bool")
def _update_folded(beta1, beta2, c1, eps2, _unused, grad_scale, trust_lo, trust_hi, clip_trust,
                   lr, weight_decay, param, m, v, gradient, decay_flag, adapt_flag, optim_filter):
    if not optim_filter:
        return _NO_UPDATE
    w = param if F.dtype(param) == mstype.float32 else F.cast(param, mstype.float32)
    g = gradient if F.dtype(gradient) == mstype.float32 else F.cast(gradient, mstype.float32)
    g = g * grad_scale
    m_t = beta1 * m + (1.0 - beta1) * g
    v_t = beta2 * v + (1.0 - beta2) * F.square(g)
    r = (m_t * c1) / (F.sqrt(v_t) + eps2)
    u = r + weight_decay * w if decay_flag else r
    w_norm = F.sqrt(_sum_of_squares(w))
    u_norm = F.sqrt(_sum_of_squares(u))
    q = F.select(F.logical_and(w_norm > 0.0, u_norm > 0.0), w_norm / u_norm, _ONE)
    if clip_trust:
        q = F.minimum(F.maximum(q, trust_lo), trust_hi)
    if not adapt_flag:
        q = _ONE
    w_t = w - lr * q * u
    stats = _stack((q, w_norm, u_norm))
    stats = F.depend(stats, F.assign(param, F.cast(w_t, F.dtype(param))))
    stats = F.depend(stats, F.assign(m, m_t))
    return F.depend(stats, F.assign(v, v_t))


class LambFoldedBias(Lamb):
    def _apply(self, gradients, grad_norm):
        lr = self.get_lr()
        weight_decay = self.get_weight_decay()
        t = F.cast(self.global_step, mstype.float32) + 1.0
        bias_c1 = -F.expm1(t * self.log_beta1)
        bias_c2 = -F.expm1(t * self.log_beta2)
        sqrt_bc2 = F.sqrt(bias_c2)
        c1 = sqrt_bc2 / bias_c1
        eps2 = self.eps * sqrt_bc2
        grad_scale = self.inv_loss_scale
        if self.max_grad_norm is not None:
            grad_scale = grad_scale * F.minimum(self.max_grad_norm / grad_norm, 1.0)
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if not self.is_group_lr:
            lr = (lr,) * self.param_length
        if not self.is_group:
            weight_decay = (weight_decay,) * self.param_length
        stats = self.hyper_map(F.partial(_folded, self.beta1, self.beta2, c1, eps2, bias_c2, grad_scale,
                                         self.trust_lo, self.trust_hi, self.clip_trust),
                               lr, weight_decay, self.params, self.moments1, self.moments2, gradients,
                               self.decay_flags, self.adapt_flags, self.optim_filter)
        done = F.assign(self.layer_stats, self.stack(stats))
        return F.depend(done, F.assign(self.last_grad_norm, grad_norm))
