"""Prototype (issue 7): mindspore_lamb.Lamb with its step done by the fused CPU kernels of _fused_cpu.py.

A subclass, so that lamb.py stays untouched; benchmarks/integrate_fused.patch puts the same code into
Lamb itself. Usable as ``python benchmarks/bench_step.py --opts Lamb,bench:proto_fused.FusedLamb,Adam,...``.
"""
import os

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Tensor, jit
from mindspore.ops import functional as F

from mindspore_lamb import Lamb
from mindspore_lamb import _fused_cpu
from mindspore_lamb._fused_cpu import to_f32_scalar as _to_f32
from mindspore_lamb._update import sum_of_squares
from mindspore_lamb.lamb import _check_shape, _raise_on_count

class FusedLamb(Lamb):
    """Lamb whose pre-pass and update are the two fused CPU kernels (when usable; else the composite)."""

    defines = ()
    src = _fused_cpu._SRC

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = _fused_cpu.usable(self.params)
        if self.fused:
            n = self.param_length
            self.fused_sumsq = _fused_cpu.sum_of_squares_op()
            self.fused_step = _fused_cpu.lamb_step_op(n, self.defines, self.src)
            self.decay_mask = Tensor(np.array(self.decay_flags, np.float32))
            self.ones_n = Tensor(np.ones(n, np.float32))
            self.fused_flags = Tensor(np.array([(1.0 if a else 0.0) if f else -1.0
                                                for a, f in zip(self.adapt_flags, self.optim_filter)], np.float32))

    @jit(backend="ms_backend")
    def construct(self, gradients):
        _raise_on_count(len(gradients), self.param_length)
        self.hyper_map(_check_shape, self.param_names, self.params, gradients)
        gradients = self.flatten_gradients(gradients)
        gradients = self.gradients_centralization(gradients)
        if self.fused:
            grad_norm = F.sqrt(F.reshape(self.fused_sumsq(*gradients), ())) * self.inv_loss_scale
        else:
            grad_norm = F.sqrt(self.addn(self.hyper_map(sum_of_squares, gradients))) * self.inv_loss_scale
        finite = self.isfinite(grad_norm)
        if finite:
            done = F.depend(finite, self._apply(gradients, grad_norm))
        else:
            done = F.depend(finite, F.assign_add(self.skipped, 1))
        return F.depend(self.success, done)

    def _apply(self, gradients, grad_norm):
        if not self.fused:
            return super()._apply(gradients, grad_norm)
        lr = self.get_lr()
        weight_decay = self.get_weight_decay()
        t = F.cast(self.global_step, mstype.float32) + 1.0
        bias_c1 = -F.expm1(t * self.log_beta1)
        bias_c2 = -F.expm1(t * self.log_beta2)
        grad_scale = self.inv_loss_scale
        if self.max_grad_norm is not None:
            grad_scale = grad_scale * F.minimum(self.max_grad_norm / grad_norm, 1.0)
        self.assignadd(self.global_step, self.global_step_increase_tensor)

        if self.is_group_lr:
            lrs = self.stack(self.hyper_map(_to_f32, lr))
        else:
            lrs = self.ones_n * _to_f32(lr)
        if self.is_group:
            wds = self.stack(self.hyper_map(_to_f32, weight_decay)) * self.decay_mask
        else:
            wds = self.decay_mask * _to_f32(weight_decay)
        hyper = self.stack((self.beta1, self.beta2, self.eps, _to_f32(bias_c1), _to_f32(bias_c2), _to_f32(grad_scale),
                            self.trust_lo, self.trust_hi))
        stats = self.fused_step(hyper, lrs, wds, self.fused_flags,
                                *self.params, *self.moments1, *self.moments2, *gradients)
        if self.use_parallel:
            stats = F.depend(stats, self.broadcast_params(stats))
        done = F.assign(self.layer_stats, stats)
        return F.depend(done, F.assign(self.last_grad_norm, grad_norm))



class FusedLambStatic(FusedLamb):
    """Variant (measured, not kept): static per-thread slices instead of dynamic chunks; source given by
    $LAMB_STATIC_SRC (git show 9f467d4:mindspore_lamb/_fused_cpu.cc > /tmp/fused_static.cc)."""
    src = os.environ.get("LAMB_STATIC_SRC", "/tmp/fused_static.cc")
