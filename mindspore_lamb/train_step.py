"""A loss-scaled training step that runs on CPU (tested) and is made of operators GPU and Ascend have too.

MindSpore's ``nn.TrainOneStepWithLossScaleCell`` reads the NPU float-status
registers (``NPUGetFloatStatusV2``), which have no CPU kernel, and
``DynamicLossScaleManager`` refuses CPU. This cell detects overflow with
``IsFinite`` on the sum of squares of the gradients instead (one fused kernel on
CPU), so the same graph runs everywhere.
"""
from typing import Union

import mindspore.common.dtype as mstype
from mindspore import Parameter, ParameterTuple, Tensor, nn
from mindspore.common.initializer import initializer
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P
from mindspore.ops.primitive import _primexpr

from . import _ops
from . import _validation as V
from . import backends
from ._step import global_norm_factor

_NAME = "LossScaleTrainStep"

_unscale = C.MultitypeFuncGraph("loss_scale_unscale")
_mul = C.MultitypeFuncGraph("loss_scale_mul")
_store_accum = C.MultitypeFuncGraph("loss_scale_store_accum")


@_primexpr
def _raise_on_loss_type(length):
    raise TypeError(f"For '{_NAME}', the network must return the loss as one Tensor, but it returned a tuple "
                    f"of {length} elements: wrap it (nn.WithLossCell, or a Cell returning only the loss) so that "
                    f"the gradients are taken of one loss.")


@_primexpr
def _raise_on_loss_shape(shape):
    if len(shape) > 1 or (len(shape) == 1 and shape[0] != 1):
        raise ValueError(f"For '{_NAME}', the network must return a scalar loss (shape () or (1,)), but it "
                         f"returned a Tensor of shape {tuple(shape)}: the gradients would be those of its sum. "
                         f"Reduce it in the network, e.g. loss.mean() (nn.MSELoss(reduction='mean')).")


@_unscale.register("Tensor", "Tensor")
def _unscale_one(inv_scale, grad):
    """float32 gradient divided by the loss scale."""
    return _ops.cast(grad, mstype.float32) * inv_scale


@_mul.register("Tensor", "Tensor")
def _mul_one(factor, grad):
    return grad * factor


@_store_accum.register("Tensor", "Tensor", "Tensor")
def _store_accum_one(reset, accum, summed):
    """accum <- 0 when `reset`, else `summed`; a select, so a NaN in `summed` cannot survive a reset."""
    return _ops.assign(accum, _ops.where(F.broadcast_to(reset, F.shape(summed)), F.zeros_like(summed), summed))


class LossScaleTrainStep(nn.TrainOneStepCell):
    r"""One training step with (dynamic) loss scaling, overflow skipping, clipping and accumulation.

    Each call:

    1. computes ``loss = network(*inputs)`` and the gradients of ``loss * scale`` (``scale`` is the
       current loss scale, the Parameter ``loss_scale``);
    2. divides the gradients by ``scale``, in float32, then reduces them across devices in data/hybrid
       parallel mode (``nn.DistributedGradReducer``, as ``nn.TrainOneStepCell``);
    3. sets ``overflow`` when the sum of squares of all the unscaled gradients is not finite (``IsFinite``
       on it): some element is NaN or Inf, or the global norm exceeds float32's range (about 1.8e19). One
       pass over the gradients, a fused kernel on CPU; its sum also serves the clipping. In distributed
       mode the flag is all-reduced, so every device takes the same decision;
    4. without overflow, optionally clips the unscaled gradients by global norm,
       :math:`g \leftarrow g \cdot c / \max(\|g\|_2, c)` (the formula of ``ops.clip_by_global_norm``), and
       calls the optimizer. On overflow the optimizer is **not** called, so weights, moments,
       ``global_step``, the learning-rate schedule and the bias correction all stay where they were;
    5. updates the scale when `dynamic`: on overflow ``scale = max(scale / scale_factor, min_scale)`` and
       the good-step counter restarts; after `scale_window` consecutive steps without overflow
       ``scale = scale * scale_factor`` (unless that would be Inf) and the counter restarts.

    With ``accumulation_steps = k > 1`` the unscaled gradients of k consecutive calls are summed in
    float32 Parameters (``accum_grad.<param name>``); every k-th call, the mean (sum / k) is clipped
    and passed to the optimizer, unless any of the k calls overflowed, in which case the whole
    accumulated step is dropped. The accumulators restart after every k-th call either way. The loss
    scale is updated once per k calls (on the k-th, from the overflow of any of the k), so
    `scale_window` counts optimizer steps, as with PyTorch's ``GradScaler``.

    Use the optimizer without loss scale of its own (``loss_scale=1.0``): the gradients it receives are
    already unscaled.

    An optimizer whose class sets ``accepts_finite_flag = True`` (:class:`mindspore_lamb.Lamb` does) is,
    with ``accumulation_steps=1``, called on every step with this cell's verdict (``finite = not
    overflow``) and skips an overflowing one exactly by itself, so the step has no graph branch and
    ``load_param_into_net`` into a cell that has already run is seen by later steps. Other optimizers,
    and accumulation, are called inside a graph ``if``: there, load checkpoints before the first step
    (MindSpore 2.10 keeps stale parameter memory in such a branch after ``set_data``).

    The scale stays where ``1 / scale`` is a normal float32 (about 1.2e-38 to 8.5e37): `init_scale` and
    `min_scale` outside that range are refused, and growth stops at its top.

    Args:
        network (Cell): the network with its loss (e.g. ``nn.WithLossCell``), returning a scalar loss.
        optimizer (Cell): the optimizer, e.g. :class:`mindspore_lamb.Lamb`, with ``loss_scale=1.0``.
        init_scale (Union[float, int]): initial loss scale, > 0 and >= `min_scale`. Default: ``2.0 ** 16``.
        scale_factor (Union[float, int]): backoff divisor and growth multiplier, > 1. Default: ``2.0``.
        scale_window (int): steps without overflow before the scale grows, >= 1. Default: ``1000``.
        min_scale (Union[float, int]): the scale never drops below it, > 0. Default: ``1.0``.
        dynamic (bool): update the scale; False keeps `init_scale` (overflowing steps are still
            skipped). Default: ``True``.
        max_grad_norm (Union[float, int, None]): clip the unscaled gradients to this global L2 norm, > 0;
            None disables clipping. Default: ``None``.
        accumulation_steps (int): micro-batches per optimizer step, >= 1. Default: ``1``.

    Inputs:
        - **\*inputs** (Tuple(Tensor)) - the inputs of `network`.

    Outputs:
        Tuple of 3 Tensors ``(loss, overflow, scale)``:

        - **loss** (Tensor) - the unscaled loss of this call.
        - **overflow** (Tensor) - bool scalar: True when this step is skipped because of NaN/Inf;
          with accumulation, True once any call of the current k-call window has overflowed
          (on the k-th call: whether the accumulated step was dropped).
        - **scale** (Tensor) - float32 scalar: the loss scale this call used (before its update), as
          ``nn.TrainOneStepWithLossScaleCell`` returns it.

    Raises:
        TypeError: If `network` or `optimizer` is not a Cell, or `dynamic` is not a bool.
        TypeError: If `init_scale`, `scale_factor`, `min_scale` or `max_grad_norm` is not a float or int,
            or `scale_window` or `accumulation_steps` is not an int.
        ValueError: If `init_scale` or `min_scale` is not > 0, `init_scale` < `min_scale`,
            `scale_factor` is not > 1, `scale_window` or `accumulation_steps` is < 1,
            or `max_grad_norm` is not > 0.
        ValueError: If the optimizer has a ``loss_scale`` other than 1.0, or a ``max_grad_norm`` of its own
            while `max_grad_norm` is set here too.
        ValueError: If the network returns a loss of more than one element (at the first call: reduce it,
            e.g. with ``mean``).

    Supported Platforms:
        ``CPU`` (tested). ``GPU`` ``Ascend``: the composite backend, made of primitive operators for them, has not
        yet run on either device.

    Examples:
        >>> from mindspore import float32, nn, ops, train
        >>> from mindspore_lamb import Lamb, LossScaleTrainStep
        >>> net = nn.Dense(4, 1)
        >>> opt = Lamb(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
        >>> step = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=2.0 ** 12,
        ...                           scale_window=100, max_grad_norm=1.0)
        >>> model = train.Model(step)   # model.train(epochs, dataset), or in a loop:
        >>> x, y = ops.ones((8, 4), float32), ops.zeros((8, 1), float32)
        >>> loss, overflow, scale = step(x, y)
    """

    def __init__(self, network: nn.Cell, optimizer: nn.Cell, *, init_scale: Union[float, int] = 2.0 ** 16,
                 scale_factor: Union[float, int] = 2.0, scale_window: int = 1000, min_scale: Union[float, int] = 1.0,
                 dynamic: bool = True, max_grad_norm: Union[float, int, None] = None,
                 accumulation_steps: int = 1) -> None:
        if not isinstance(network, nn.Cell):
            raise TypeError(f"For '{_NAME}', the argument 'network' must be a Cell, but got {V.describe(network)}.")
        if not isinstance(optimizer, nn.Cell):
            raise TypeError(f"For '{_NAME}', the argument 'optimizer' must be a Cell (an nn.Optimizer), "
                            f"but got {V.describe(optimizer)}.")
        # every scale this cell can reach keeps 1 / scale a normal float32 (the unscaling multiplies by it)
        init_scale = V.check_loss_scale("init_scale", init_scale, _NAME)
        scale_factor = V.check_number("scale_factor", scale_factor, _NAME, low=1.0)
        scale_window = V.check_int("scale_window", scale_window, _NAME, low=1)
        min_scale = V.check_loss_scale("min_scale", min_scale, _NAME)
        if init_scale < min_scale:
            raise ValueError(f"For '{_NAME}', the argument 'init_scale' must be >= 'min_scale' ({min_scale}), "
                             f"but got {init_scale}.")
        V.check_bool("dynamic", dynamic, _NAME)
        max_grad_norm = V.check_max_grad_norm("max_grad_norm", max_grad_norm, _NAME)
        accumulation_steps = V.check_int("accumulation_steps", accumulation_steps, _NAME, low=1)
        opt_scale = getattr(optimizer, "loss_scale", 1.0)
        if V.is_number(opt_scale) and opt_scale != 1.0:
            raise ValueError(f"For '{_NAME}', the optimizer must have loss_scale=1.0 (this cell unscales the "
                             f"gradients itself), but got an optimizer with loss_scale={opt_scale}.")
        if max_grad_norm is not None and getattr(optimizer, "max_grad_norm", None) is not None:
            raise ValueError(f"For '{_NAME}', clip the gradients in one place: the argument 'max_grad_norm' is "
                             f"{max_grad_norm}, and the optimizer has max_grad_norm={optimizer.max_grad_norm} too.")

        super().__init__(network, optimizer, sens=None)
        self.dynamic = dynamic
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps

        self.loss_scale = Parameter(Tensor(init_scale, mstype.float32), name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, mstype.int32), name="loss_scale_good_steps", requires_grad=False)
        self.factor = Tensor(scale_factor, mstype.float32)
        self.window = Tensor(scale_window, mstype.int32)
        self.min_scale_t = Tensor(min_scale, mstype.float32)
        self.max_scale_t = Tensor(1.0 / V.FLOAT32_TINY, mstype.float32)
        self.clip = max_grad_norm is not None
        self.clip_norm = Tensor(max_grad_norm if self.clip else 1.0, mstype.float32)

        self.accumulate = accumulation_steps > 1
        # the protocol (docs/loss_scaling.md): an optimizer with `accepts_finite_flag` is called on every
        # step as optimizer(gradients, finite) and skips a step told finite=False itself: no graph branch
        self.branch_free = bool(getattr(optimizer, "accepts_finite_flag", False))
        if self.accumulate:
            self.accum_grads = ParameterTuple(
                Parameter(initializer("zeros", p.shape, mstype.float32), name=f"accum_grad.{p.name}",
                          requires_grad=False) for p in self.weights)
            self.micro_step = Parameter(Tensor(0, mstype.int32), name="accum_micro_step", requires_grad=False)
            self.accum_overflow = Parameter(Tensor(False, mstype.bool_), name="accum_overflow",
                                            requires_grad=False)
            self.inv_steps = Tensor(1.0 / accumulation_steps, mstype.float32)
            self.steps_t = Tensor(accumulation_steps, mstype.int32)

        self.hyper_map = C.HyperMap()
        self.isfinite = P.IsFinite()
        # sum of squares of the (float32, unscaled) gradients, from the optimizer's backend, or the one Lamb
        # would pick for another optimizer (one fused kernel on CPU: benchmarks/README.md has what an IsFinite
        # per gradient costs instead)
        own = getattr(getattr(optimizer, "backend", None), "SumOfSquares", None)
        self.grad_sq_cell = own() if own is not None else backends.sum_of_squares_cell()
        if self.reducer_flag:
            self.allreduce = P.AllReduce()

    def construct(self, *inputs):
        scale = self.loss_scale * 1.0   # a copy: the scale this call uses, returned after the update
        loss = self.network(*inputs)
        if isinstance(loss, (tuple, list)):
            _raise_on_loss_type(len(loss))
        _raise_on_loss_shape(F.shape(loss))
        sens = F.ones_like(loss) * _ops.cast(scale, F.dtype(loss))
        grads = self.grad(self.network, self.weights)(*inputs, sens)
        grads = self.hyper_map(F.partial(_unscale, 1.0 / scale), grads)
        grads = self.grad_reducer(grads)
        grad_sq = self.grad_sq_cell(grads)
        overflow = self._overflow(grad_sq)
        if self.accumulate:
            overflow = self._accumulate_step(grads, overflow)
        elif self.branch_free:
            # Lamb skips the call exactly when told, without a graph branch (a branch keeps stale parameter
            # memory after Parameter.set_data, e.g. load_param_into_net), and needs no pre-pass for it
            loss = F.depend(loss, self.optimizer(self._clip(grads, grad_sq), F.logical_not(overflow)))
            loss = F.depend(loss, self._update_scale(overflow, None))
        else:
            if not overflow:
                loss = F.depend(loss, self.optimizer(self._clip(grads, grad_sq)))
            loss = F.depend(loss, self._update_scale(overflow, None))
        return loss, overflow, scale

    def _overflow(self, grad_sq):
        """bool scalar: the sum of squares is not finite (a NaN/Inf element, or a norm beyond float32),
        on some device in distributed mode."""
        bad = _ops.cast(F.logical_not(self.isfinite(grad_sq)), mstype.float32)
        if self.reducer_flag:
            bad = self.allreduce(bad)
        return bad > 0.5

    def _clip(self, grads, grad_sq=None):
        """g * c / max(||g||, c) over all gradients (no-op without max_grad_norm); `grad_sq` = sum of g^2 if
        already known."""
        if not self.clip:
            return grads
        if grad_sq is None:
            grad_sq = self.grad_sq_cell(grads)
        factor = global_norm_factor(F.sqrt(grad_sq), self.clip_norm)
        return self.hyper_map(F.partial(_mul, factor), grads)

    def _accumulate_step(self, grads, overflow):
        """Sum this call's gradients; on the k-th call, step on the mean unless any call overflowed."""
        micro = self.micro_step + 1
        boundary = micro >= self.steps_t
        any_overflow = F.logical_or(self.accum_overflow, overflow)
        summed = self.hyper_map(F.add, self.accum_grads, grads)
        if F.logical_and(boundary, F.logical_not(any_overflow)):
            mean = self.hyper_map(F.partial(_mul, self.inv_steps), summed)
            any_overflow = F.depend(any_overflow, self.optimizer(self._clip(mean)))
        done = self.hyper_map(F.partial(_store_accum, boundary), self.accum_grads, summed)
        any_overflow = F.depend(any_overflow, done)
        any_overflow = F.depend(any_overflow, _ops.assign(self.micro_step, _ops.where(boundary, F.zeros_like(micro),
                                                                                 micro)))
        any_overflow = F.depend(any_overflow, _ops.assign(self.accum_overflow,
                                                       F.logical_and(any_overflow, F.logical_not(boundary))))
        return F.depend(any_overflow, self._update_scale(any_overflow, boundary))

    def _update_scale(self, overflow, apply):
        """Backoff on overflow, growth after `scale_window` good steps; only where `apply` (None: always)."""
        if not self.dynamic:
            return overflow
        scale = self.loss_scale * 1.0
        good = self.good_steps + 1
        grow = good >= self.window
        grown = scale * self.factor
        grown = _ops.where(grown <= self.max_scale_t, grown, scale)   # 1 / scale stays a normal float32
        backed_off = F.maximum(scale / self.factor, self.min_scale_t)
        new_scale = _ops.where(overflow, backed_off, _ops.where(grow, grown, scale))
        new_good = _ops.where(F.logical_or(overflow, grow), F.zeros_like(good), good)
        if apply is not None:
            new_scale = _ops.where(apply, new_scale, scale)
            new_good = _ops.where(apply, new_good, good - 1)
        done = _ops.assign(self.loss_scale, new_scale)
        return F.depend(done, _ops.assign(self.good_steps, new_good))

    # ---- host-side readers ----

    def get_loss_scale(self) -> float:
        """float: the current loss scale (one host read)."""
        return float(self.loss_scale.asnumpy())
