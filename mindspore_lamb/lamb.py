"""The LAMB optimizer Cell."""
import math

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Parameter, ParameterTuple, Tensor, jit
from mindspore.common.initializer import initializer
from mindspore.nn.optim.optimizer import Optimizer, opt_init_args_register
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P
from mindspore.ops.primitive import _primexpr

from . import _fused_cpu
from . import _validation as V
from ._update import centralize, lamb_update, sum_of_squares

_check_shape = C.MultitypeFuncGraph("lamb_check_shape")


@_primexpr
def _raise_on_count(n_grads, n_params):
    if n_grads != n_params:
        raise ValueError(f"For 'Lamb', the argument 'gradients' must hold one gradient per parameter "
                         f"({n_params}), but got {n_grads}.")


@_primexpr
def _raise_on_shape(name, param_shape, grad_shape):
    if tuple(param_shape) != tuple(grad_shape):
        raise ValueError(f"For 'Lamb', the gradient of parameter '{name}' must have the parameter's shape "
                         f"{tuple(param_shape)}, but got {tuple(grad_shape)}.")


@_primexpr
def _raise_on_flag_shape(shape):
    if len(shape) > 1 or (len(shape) == 1 and shape[0] != 1):
        raise ValueError(f"For 'Lamb', the argument 'finite' must be a bool scalar (or a 1-element Tensor), "
                         f"but got a Tensor of shape {tuple(shape)}.")


def _as_flag(finite):
    """The caller's `finite` (Python bool or 1-element Tensor) as a bool 0-D Tensor."""
    if isinstance(finite, bool):
        return F.scalar_to_tensor(finite, mstype.bool_)
    _raise_on_flag_shape(F.shape(finite))
    return F.reshape(F.cast(finite, mstype.bool_), ())


@_check_shape.register("String", "Tensor", "Tensor")
def _check_one_shape(name, param, gradient):
    _raise_on_shape(name, F.shape(param), F.shape(gradient))
    return True


def _moment(param, prefix):
    """A float32 zero moment named `<prefix>.<param name>`, laid out like the parameter."""
    moment = param.clone(init="zeros")
    moment.name = f"{prefix}.{param.name}"
    if moment.dtype != mstype.float32:
        moment = Parameter(initializer("zeros", param.shape, mstype.float32), name=moment.name)
    return moment


class Lamb(Optimizer):
    r"""LAMB: layer-wise adaptive moments for large-batch training (You et al., arXiv:1904.00962).

    For each parameter :math:`w` with gradient :math:`g`, at the call whose step counter is
    :math:`s` before the call (:math:`t = s + 1`):

    .. math::
        \begin{array}{ll}
        g \leftarrow g / \text{loss\_scale} \cdot \min(1, \text{max\_grad\_norm} / G) \\
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        r = \dfrac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}, \quad u = r + \lambda_s w \\
        q = \|w\| / \|u\| \ (1 \text{ if either norm is } 0), \quad q \leftarrow \text{clip}(q, lo, hi) \\
        w \leftarrow w - \gamma_s \, q \, u
        \end{array}

    :math:`\epsilon` is outside the square root; the trust ratio uses the norm of exactly the applied
    update; :math:`\lambda_s = 0` for parameters that are not decayed. Math is float32 whatever the
    parameter dtype; the moments are float32.

    Args:
        params (Union[list[Parameter], list[dict]]): the parameters, or parameter groups with keys
            ``params`` (required), ``lr``, ``weight_decay`` (number or Cell), ``grad_centralization``
            (bool), ``layer_adaptation`` (bool, default True; False gives the group AdamW-style steps,
            :math:`q = 1`) and ``order_params`` (alone in its dict).
        learning_rate (Union[float, int, Tensor, Iterable, LearningRateSchedule]): fixed (number >= 0 or
            0-D Tensor), per step (1-D Tensor or Iterable: element i at step i), or a schedule called with
            the step.
        beta1 (float): decay rate of the first moment, in (0, 1). Default: ``0.9``.
        beta2 (float): decay rate of the second moment, in (0, 1). Default: ``0.999``.
        eps (float): added to :math:`\sqrt{\hat v}`, > 0. Default: ``1e-6``.
        weight_decay (Union[float, int, Cell]): :math:`\lambda`, >= 0, or a Cell called with the step.
            Without groups it applies to parameters whose names contain neither ``beta`` nor ``gamma``.
            It is decoupled: never multiplied by ``loss_scale``. Default: ``0.0``.
        loss_scale (float): keyword-only; gradients are divided by it (use with
            ``FixedLossScaleManager(loss_scale, drop_overflow_update=False)``). Default: ``1.0``.
        max_grad_norm (float): keyword-only; NVLAMB pre-normalisation: gradients are scaled by
            :math:`\min(1, \text{max\_grad\_norm} / G)`, :math:`G` the global L2 norm of all unscaled
            gradients of the call. Default: ``None`` (off).
        trust_ratio_clip (tuple[float, float]): keyword-only; ``(lo, hi)`` clamps :math:`q`;
            ``(0.0, 10.0)`` reproduces MindSpore's GPU kernel. Default: ``None`` (off).
        exact_skip (bool): keyword-only; what a call with a NaN or Inf gradient leaves behind (it never
            touches the parameters or ``global_step``, and it counts in :attr:`skipped_steps`).
            ``True``: nothing at all changes; on CPU this costs one extra read of the gradients per call
            (about 10 % of the step). ``False``: the moments of the elements whose gradient is finite take
            this call's gradient, the others keep theirs. The skip is exact anyway where the finiteness
            is known before the update: with `max_grad_norm`, under the parallel optimizer, and when the
            caller passes ``finite=False`` (:class:`mindspore_lamb.LossScaleTrainStep` does on overflow).
            Default: ``False``.

    Inputs:
        - **gradients** (tuple[Tensor]) - one gradient per parameter, of the parameter's shape.
        - **finite** (Union[Tensor, bool], optional) - bool scalar (or 1-element Tensor), the caller's own
          finiteness test of `gradients` (e.g. a loss-scale cell's ``not overflow``): False skips the call
          exactly; True leaves the test to Lamb. Default: ``None``.

    Outputs:
        tuple[bool], all elements ``True``.

        A call whose gradients hold a NaN or Inf is skipped: see `exact_skip` and :attr:`skipped_steps`.

    Raises:
        TypeError: If `learning_rate` is not one of int, float, Tensor, Iterable, LearningRateSchedule.
        TypeError: If an element of `params` is neither Parameter nor dict.
        TypeError: If `beta1`, `beta2` or `eps` is not a float.
        TypeError: If `weight_decay` is neither float, int nor Cell.
        TypeError: If `loss_scale` or `max_grad_norm` is not a float or int.
        ValueError: If `eps` is less than or equal to 0.
        ValueError: If `beta1`, `beta2` is not in range (0.0, 1.0).
        ValueError: If `weight_decay` is less than 0.
        ValueError: If `loss_scale` or `max_grad_norm` is less than or equal to 0.
        KeyError: If a parameter group has an unknown key.
        TypeError: If `exact_skip` is not a bool.
        ValueError: If a parameter appears twice, or the gradients do not match the parameters.
        ValueError: If `finite` is a Tensor of more than one element.

    Supported Platforms:
        ``Ascend`` ``GPU`` ``CPU``

    Examples:
        >>> import mindspore as ms
        >>> from mindspore import nn
        >>> from mindspore_lamb import Lamb
        >>> net = nn.Dense(4, 2)
        >>> opt = Lamb(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
        >>> model = ms.train.Model(net, loss_fn=nn.MSELoss(), optimizer=opt)
    """
    _support_parallel_optimizer = True

    @opt_init_args_register
    def __init__(self, params, learning_rate, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, *,
                 loss_scale=1.0, max_grad_norm=None, trust_ratio_clip=None, exact_skip=False):
        params = V.check_params(params)
        learning_rate = V.check_learning_rate("learning_rate", learning_rate)
        V.check_open_unit_interval("beta1", beta1)
        V.check_open_unit_interval("beta2", beta2)
        V.check_positive_float("eps", eps)
        weight_decay = V.check_weight_decay("weight_decay", weight_decay)
        loss_scale = V.check_positive_number("loss_scale", loss_scale)
        if max_grad_norm is not None:
            max_grad_norm = V.check_positive_number("max_grad_norm", max_grad_norm)
        trust_ratio_clip = V.check_trust_ratio_clip(trust_ratio_clip)
        V.check_bool("exact_skip", exact_skip)

        adapt_by_name = {}
        if isinstance(params[0], dict):
            for group in params:
                for param in group.get("params", ()):
                    adapt_by_name[param.name] = group.get("layer_adaptation", True)
            params = [{k: val for k, val in group.items() if k != "layer_adaptation"} for group in params]

        # LAMB's weight decay is decoupled from the gradient, so loss_scale must not touch it; the base
        # class multiplies the weight decay by its loss_scale, hence 1.0 there and the real one here.
        super().__init__(learning_rate, params, weight_decay, loss_scale=1.0)
        self.loss_scale = loss_scale
        self.inv_loss_scale = Tensor(1.0 / loss_scale, mstype.float32)
        self.max_grad_norm = None if max_grad_norm is None else Tensor(max_grad_norm, mstype.float32)
        # G is needed before the update (NVLAMB clipping; a parallel-optimizer rank sees only its own
        # parameters' gradients in the fused pass 1): the skip is exact at no extra cost.
        self.exact_skip = exact_skip or max_grad_norm is not None or self.use_parallel
        self.trust_ratio_clip = trust_ratio_clip
        self.clip_trust = trust_ratio_clip is not None
        lo, hi = trust_ratio_clip if self.clip_trust else (0.0, math.inf)
        self.trust_lo = Tensor(lo, mstype.float32)
        self.trust_hi = Tensor(hi, mstype.float32)

        self.beta1 = Tensor(beta1, mstype.float32)
        self.beta2 = Tensor(beta2, mstype.float32)
        self.eps = Tensor(eps, mstype.float32)
        # 1 - beta^t = -expm1(t log beta): log beta taken in float64, so the bias correction keeps full
        # float32 precision (1 - float32(0.999)^1 is off by 1.3e-5 relative).
        self.log_beta1 = Tensor(math.log(beta1), mstype.float32)
        self.log_beta2 = Tensor(math.log(beta2), mstype.float32)

        self.params = self._parameters
        V.check_param_dtypes(self.params, self._target)
        self.moments1 = ParameterTuple(_moment(p, "lamb_m") for p in self.params)
        self.moments2 = ParameterTuple(_moment(p, "lamb_v") for p in self.params)
        self.param_names = tuple(p.name for p in self.params)
        self.adapt_flags = tuple(adapt_by_name.get(name, True) for name in self.param_names)
        if not self.is_group:
            self.grad_centralization_flags = (False,) * self.param_length

        # Diagnostics of the last applied step, written inside the graph (no host sync in the step).
        self.layer_stats = Parameter(Tensor(np.zeros((self.param_length, 3), np.float32)),
                                     name="lamb_layer_stats", requires_grad=False)
        self.last_grad_norm = Parameter(Tensor(0.0, mstype.float32), name="lamb_grad_norm", requires_grad=False)
        self.skipped = Parameter(Tensor(0, mstype.int32), name="lamb_skipped_steps", requires_grad=False)
        self.success = (True,) * self.param_length
        self.stack = P.Stack()
        self.addn = P.AddN()
        self.isfinite = P.IsFinite()
        # CPU, float32 parameters: the pre-pass and the step are two fused C++ kernels (_fused_cpu.cc);
        # elsewhere (GPU, Ascend, float16/bfloat16) the composite graph of _update.py. Same results.
        self.fused = _fused_cpu.usable(self.params)
        if self.fused:
            self.fused_sum_of_squares = _fused_cpu.sum_of_squares_op()
            self.fused_step = _fused_cpu.lamb_step_op(self.param_length)
            self.decay_mask = Tensor(np.array(self.decay_flags, np.float32))
            self.ones = Tensor(np.ones(self.param_length, np.float32))
            self.fused_flags = Tensor(np.array([(1.0 if adapt else 0.0) if mine else -1.0
                                                for adapt, mine in zip(self.adapt_flags, self.optim_filter)],
                                               np.float32))

    def gradients_centralization(self, gradients):
        """Centralize the gradients of groups with ``grad_centralization=True`` (rank >= 2 tensors)."""
        return self.map_(centralize, self.grad_centralization_flags, gradients)

    @jit(backend="ms_backend")
    def construct(self, gradients, finite=None):
        _raise_on_count(len(gradients), self.param_length)
        self.hyper_map(_check_shape, self.param_names, self.params, gradients)
        gradients = self.flatten_gradients(gradients)
        gradients = self.gradients_centralization(gradients)
        # the caller's finite=False skips exactly; True (or None) leaves the test of the gradients to us
        told = F.ones((), mstype.bool_) if finite is None else _as_flag(finite)
        if self.fused and not self.exact_skip:
            # no pre-pass: the kernel's pass 1 accumulates ||g||^2 and skips pass 2 when G is not finite
            return F.depend(self.success, self._apply(gradients, None, told, told))
        # G: global L2 norm of the unscaled gradients, before the update; G not finite <=> a NaN/Inf gradient
        if self.fused:
            sum_sq = F.reshape(self.fused_sum_of_squares(*gradients), ())
        else:
            sum_sq = self.addn(self.hyper_map(sum_of_squares, gradients))
        grad_norm = F.sqrt(sum_sq) * self.inv_loss_scale
        ok = F.logical_and(self.isfinite(grad_norm), told)
        # a skipped call keeps every moment when exact; else each element whose gradient is finite takes it
        accept = ok if self.exact_skip else told
        return F.depend(self.success, self._apply(gradients, grad_norm, ok, accept))

    def _apply(self, gradients, grad_norm, ok, accept):
        """The step. `ok` False: the call is skipped (weights, step and diagnostics written back unchanged);
        `accept` False: the moments too. `grad_norm` None: G comes from the fused kernel, which then also
        skips the weight update itself when G is not finite.
        The skip is arithmetic, not a graph `if`, whose branches keep stale parameter memory once
        `Parameter.set_data` (e.g. load_param_into_net) replaced it. Skipped calls count in `skipped`."""
        lr = self.get_lr()                                   # lr_s, the step before this call
        weight_decay = self.get_weight_decay()               # lambda_s
        t = F.cast(self.global_step, mstype.float32) + 1.0   # bias correction uses t = s + 1
        inv_bias_c1 = 1.0 / -F.expm1(t * self.log_beta1)     # 1 / (1 - beta1^t)
        inv_bias_c2 = 1.0 / -F.expm1(t * self.log_beta2)     # 1 / (1 - beta2^t)
        grad_scale = self.inv_loss_scale
        if self.max_grad_norm is not None:
            # NVLAMB: g * min(1, max_grad_norm / G); G == 0 gives inf -> 1
            grad_scale = grad_scale * F.minimum(self.max_grad_norm / grad_norm, 1.0)

        if self.fused:
            stats = self._fused_update(lr, weight_decay, inv_bias_c1, inv_bias_c2, grad_scale, gradients, ok)
            sums = stats[self.param_length]                  # (sum of g^2, applied, 0)
            stats = stats[:self.param_length]
            applied = sums[1] > 0.5
            if grad_norm is None:
                grad_norm = F.sqrt(sums[0]) * self.inv_loss_scale
        else:
            stats = self._composite_update(lr, weight_decay, inv_bias_c1, inv_bias_c2, grad_scale, gradients, ok,
                                           accept)
            applied = ok
        step = F.cast(applied, mstype.int32)
        stats = F.depend(stats, self.assignadd(self.global_step, self.global_step_increase_tensor * step))
        stats = F.depend(stats, F.assign_add(self.skipped, 1 - step))
        if self.use_parallel:
            stats = F.depend(stats, self.broadcast_params(stats))
        done = F.assign(self.layer_stats, F.select(applied, stats, self.layer_stats))
        return F.depend(done, F.assign(self.last_grad_norm, F.select(applied, grad_norm, self.last_grad_norm)))

    def _composite_update(self, lr, weight_decay, inv_bias_c1, inv_bias_c2, grad_scale, gradients, ok, accept):
        """_update.lamb_update applied to every parameter with HyperMap (the portable path); returns stats (n, 3)."""
        if not self.is_group_lr:
            lr = (lr,) * self.param_length
        if not self.is_group:
            weight_decay = (weight_decay,) * self.param_length
        return self.stack(self.hyper_map(F.partial(lamb_update, self.beta1, self.beta2, self.eps, inv_bias_c1,
                                                   inv_bias_c2, grad_scale, ok, accept, self.trust_lo, self.trust_hi,
                                                   self.clip_trust),
                                         lr, weight_decay, self.params, self.moments1, self.moments2, gradients,
                                         self.decay_flags, self.adapt_flags, self.optim_filter))

    def _fused_update(self, lr, weight_decay, inv_bias_c1, inv_bias_c2, grad_scale, gradients, ok):
        """The update of _update.lamb_update for all parameters in one kernel (in place); returns stats
        (n + 1, 3): (q, ||w||, ||u||) per parameter, then (sum of g^2, applied, 0)."""
        to_f32 = _fused_cpu.to_f32_scalar
        lrs = self.stack(self.hyper_map(to_f32, lr)) if self.is_group_lr else self.ones * to_f32(lr)
        if self.is_group:
            wds = self.stack(self.hyper_map(to_f32, weight_decay)) * self.decay_mask
        else:
            wds = self.decay_mask * to_f32(weight_decay)
        hyper = self.stack((self.beta1, self.beta2, self.eps, to_f32(inv_bias_c1), to_f32(inv_bias_c2),
                            to_f32(grad_scale), self.trust_lo, self.trust_hi,
                            F.cast(ok, mstype.float32),  # 0: change nothing
                            self.inv_loss_scale))
        return self.fused_step(hyper, lrs, wds, self.fused_flags,
                               *self.params, *self.moments1, *self.moments2, *gradients)

    # ---- host-side readers (each reads device memory once; call them outside the step) ----

    @property
    def skipped_steps(self):
        """Number of calls skipped: a gradient was NaN or Inf, or the caller passed ``finite=False``."""
        return int(self.skipped.asnumpy())

    def trust_ratios(self):
        """dict: parameter name -> trust ratio q applied at the last step."""
        return dict(zip(self.param_names, self.layer_stats.asnumpy()[:, 0].tolist()))

    def layer_norms(self):
        """dict: parameter name -> (q, ||w||, ||u||) of the last step; ||w|| is before the update."""
        stats = self.layer_stats.asnumpy().copy()
        return {name: tuple(row.tolist()) for name, row in zip(self.param_names, stats)}

    @property
    def global_grad_norm(self):
        """G of the last applied (not skipped) call: the global L2 norm of the unscaled gradients (before
        max_grad_norm)."""
        return float(self.last_grad_norm.asnumpy())
