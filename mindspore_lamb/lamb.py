"""The LAMB optimizer Cell."""
import functools
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

import mindspore as ms
import mindspore.common.dtype as mstype
from mindspore import Parameter, ParameterTuple, Tensor, jit
from mindspore.nn import Cell
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.nn.optim.optimizer import Optimizer, opt_init_args_register
from mindspore.ops import composite as C
from mindspore.ops import functional as F
from mindspore.ops import operations as P
from mindspore.ops.primitive import _primexpr

from . import _ops
from . import _validation as V
from . import backends, presets
from ._options import Options
from ._step import centralize, expm1, global_norm_factor, schedule_step
from .backends import contract
from .backends.contract import per_parameter
from .state import SLOTS_8BIT, check_slots, declare, held

_check_gradient = C.MultitypeFuncGraph("lamb_check_gradient")
_FLOATS = (mstype.float16, mstype.bfloat16, mstype.float32, mstype.float64)


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


@_primexpr
def _raise_on_flag_type(finite):
    raise TypeError(f"For 'Lamb', the argument 'finite' must be None, a bool or a bool Tensor, but got "
                    f"{type(finite).__name__} {finite!r}.")


@_primexpr
def _raise_on_value_shape(name, shape):
    if len(shape) > 1 or (len(shape) == 1 and shape[0] != 1):
        raise ValueError(f"For 'Lamb', the {name} must be a scalar (a Tensor of shape () or (1,)) at every step, "
                         f"but its Cell returned a Tensor of shape {tuple(shape)}.")


def _scalar(name, value):
    """A learning-rate or weight-decay Cell's value at this step, as a 0-D Tensor (shape () or (1,) only)."""
    _raise_on_value_shape(name, F.shape(value))
    return F.reshape(value, ())


def _as_flag(finite):
    """The caller's `finite` (Python bool or 1-element Tensor) as a bool 0-D Tensor."""
    if isinstance(finite, bool):
        return F.scalar_to_tensor(finite, mstype.bool_)
    if not isinstance(finite, Tensor):
        _raise_on_flag_type(finite)
    _raise_on_flag_shape(F.shape(finite))
    return F.reshape(_ops.cast(finite, mstype.bool_), ())


@_primexpr
def _raise_on_dtype(name, param_dtype, grad_dtype):
    if grad_dtype not in _FLOATS:
        raise TypeError(f"For 'Lamb', the gradient of parameter '{name}' ({param_dtype}) must be a floating "
                        f"Tensor (float16, bfloat16, float32 or float64), but got {grad_dtype}.")


@_check_gradient.register("String", "String", "Tensor", "None")
def _check_missing_gradient(name, param_dtype, param, gradient):
    """A None gradient: the network's output does not depend on the parameter (or a custom step dropped it)."""
    _raise_on_missing_gradient(name)


@_primexpr
def _raise_on_missing_gradient(name):
    raise TypeError(f"For 'Lamb', the gradient of parameter '{name}' is None: every parameter given to Lamb "
                    f"needs a gradient Tensor (is it used in the network's output? Pass only the parameters "
                    f"that train, e.g. net.trainable_params()).")


@_primexpr
def _is_float32(dtype):
    return dtype == mstype.float32


@_check_gradient.register("String", "String", "Tensor", "Tensor")
def _check_one_gradient(name, param_dtype, param, gradient):
    """The gradient of `param`, checked (shape, floating dtype) and cast to float32, the math dtype: the
    same cast on every backend, whatever the gradient's floating dtype. (`param_dtype` is a string made
    on the host: F.dtype of a Parameter is not a constant inside a graph branch in data-parallel mode.)"""
    _raise_on_shape(name, F.shape(param), F.shape(gradient))
    _raise_on_dtype(name, param_dtype, F.dtype(gradient))
    if _is_float32(F.dtype(gradient)):
        return gradient                 # no Cast node at all (PYNATIVE_MODE would copy the gradient)
    return _ops.cast(gradient, mstype.float32)


_true_after = C.MultitypeFuncGraph("true_after")


@_true_after.register("Tensor", "Bool")
def _true_after_update(update, success):
    """``True`` once `update` has run: the output of MindSpore's own optimizers, element by element. In
    PYNATIVE_MODE this makes the call return when the step is done, as nn.Adam's does: a graph whose output
    is a constant returns at once and the next call waits for it in a busy loop, taking one of the cores
    the update runs on (docs/architecture.md, "PYNATIVE_MODE")."""
    return F.depend(success, update)


def _refuse_state_names(names, own=("global_step", "learning_rate")):
    """A parameter named like the optimizer's own state would be taken for it in the graph and in checkpoints."""
    clash = sorted(set(names) & set(own))
    if clash:
        raise ValueError(f"For 'Lamb', the parameter name '{clash[0]}' is also the name of the optimizer's own "
                         f"state (its step counter, moments, learning rates, diagnostics: global_step, "
                         f"learning_rate, lamb_m.*, lamb_v.*, lamb_*): a checkpoint could not tell them apart. "
                         f"Rename the parameter.")


def _registered(init):
    """MindSpore's ``opt_init_args_register`` (it records the constructor's arguments as ``init_params`` and
    ``init_args``) keeping `init`'s name, docstring and signature (``__wrapped__``: ``inspect.signature``,
    ``help()`` and IDEs show every argument), with an unknown keyword named, and the closest valid one."""
    register = opt_init_args_register(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        V.check_keywords(type(self).__name__, init, (self, *args), kwargs)
        register(self, *args, **kwargs)
    return wrapper


# the types the arguments accept (docstring "Args")
Params = Union[List[Parameter], List[dict]]
LearningRate = Union[float, int, Tensor, Iterable, LearningRateSchedule]
NameFilter = Union[str, List[str], Callable[[str], bool], None]


# MindSpore compiles a HyperMap over the parameters as nested calls, and the composite rule is several calls deep
# per parameter (measured: a float32 state fits 110 parameters in MindSpore's default max_call_depth of 1000, an
# 8-bit state 80); Lamb raises the limit to this many calls a parameter, never lowers it (docs/api/lamb.md)
CALLS_PER_PARAMETER = 16


def _allow_call_depth(count):
    """Raise MindSpore's max_call_depth to what the step's graph over `count` parameters needs."""
    needed = CALLS_PER_PARAMETER * count + 200
    if ms.get_context("max_call_depth") < needed:
        ms.set_context(max_call_depth=needed)


def _runtime_state(value, name):
    """A Parameter the graph writes (diagnostics) that checkpoints neither save nor expect: MindSpore's
    save/load skip parameters flagged as pipeline-shared, the flag this sets."""
    state = Parameter(Tensor(value), name=name, requires_grad=False)
    state.param_info.is_pipeline_shared_param = True
    return state


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
    parameter dtype; the moments are stored in float32 (the first one in `mu_dtype` when asked).

    Args:
        params (Union[list[Parameter], list[dict]]): the parameters, or parameter groups with keys
            ``params`` (required), ``lr``, ``weight_decay`` (number or Cell), ``grad_centralization``
            (bool), ``layer_adaptation`` (bool, default True; False gives the group AdamW-style steps,
            :math:`q = 1`) and ``order_params`` (alone in its dict).
        learning_rate (Union[float, int, Tensor, Iterable, LearningRateSchedule]): fixed (number >= 0, or
            0-D Tensor or NumPy array), per step (1-D Tensor, NumPy array or Iterable: element i at step i),
            or a schedule called with the step. Tensors and arrays must have an int or float dtype.
        beta1 (float): decay rate of the first moment, in (0, 1). Default: ``0.9``.
        beta2 (float): decay rate of the second moment, in (0, 1). Default: ``0.999``.
        eps (float): added to :math:`\sqrt{\hat v}`, in (0, 1] (a larger one erases the update). Default:
            ``1e-6``.
        weight_decay (Union[float, int, Cell]): :math:`\lambda`, >= 0, or a Cell called with the step (a
            LearningRateSchedule, or a Cell without trainable parameters whose construct takes the step).
            Without groups it applies to parameters whose names contain neither ``beta`` nor ``gamma``.
            It is decoupled: never multiplied by ``loss_scale``. Default: ``0.0``.
        loss_scale (float): keyword-only; gradients are divided by it (use with
            ``FixedLossScaleManager(loss_scale, drop_overflow_update=False)``). Default: ``1.0``.
        max_grad_norm (float): keyword-only; NVLAMB pre-normalisation: gradients are scaled by
            :math:`\min(1, \text{max\_grad\_norm} / G)`, :math:`G` the global L2 norm of all unscaled
            gradients of the call. Default: ``None`` (off).
        trust_ratio_clip (tuple[float, float]): keyword-only; ``(lo, hi)``, ``0 <= lo <= hi``, ``hi > 0``,
            clamps :math:`q`;
            ``(0.0, 10.0)`` reproduces MindSpore's GPU kernel. Default: ``None`` (off).
        exact_skip (bool): keyword-only; what a call with a NaN or Inf gradient leaves behind (it never
            touches the parameters or ``global_step``, and it counts in :attr:`skipped_steps`).
            ``True``: nothing at all changes; on CPU this costs one extra read of the gradients per call
            (about 10 % of the step). ``False``: the moments of the elements whose gradient is finite take
            this call's gradient, the others keep theirs. The skip is exact anyway where the finiteness
            is known before the update: with `max_grad_norm`, under the parallel optimizer, on the
            composite graph (GPU, Ascend, float16 parameters), and when the caller passes ``finite=False``
            (:class:`mindspore_lamb.LossScaleTrainStep` does on overflow).
            Default: ``False``.
        bias_correction (Union[bool, str]): keyword-only; False drops the bias corrections
            :math:`1 - \beta^t` (as apex, timm and DeepSpeed offer); ``"step_size"`` leaves the moments
            uncorrected and multiplies the learning rate by :math:`\sqrt{1 - \beta_2^t} / (1 - \beta_1^t)`
            instead (DeepSpeed, torch-optimizer's ``debias``). Default: ``True``.
        weight_decay_mode (str): keyword-only; where :math:`\lambda` goes: ``"decoupled"`` (the paper,
            :math:`u = r + \lambda w`), ``"l2"`` (:math:`g + \lambda w` before the moments) or
            ``"decoupled_outside"`` (Keras 3: :math:`w \leftarrow (1 - \gamma \lambda) w` first, outside
            the trust ratio). Default: ``"decoupled"``.
        grad_averaging (bool): keyword-only; False gives :math:`m = \beta_1 m + g`. Default: ``True``.
        eps_inside_sqrt (bool): keyword-only; True gives :math:`r = \hat m / \sqrt{\hat v + \epsilon}`.
            Default: ``False``.
        weight_norm_clip (float): keyword-only; :math:`\|w\|` is clamped to at most this in :math:`q`.
            Default: ``None`` (off).
        layer_adaptation (Union[bool, str]): keyword-only; True: every parameter gets a trust ratio (a
            group's ``layer_adaptation`` key may still turn it off); False: none; ``"decayed"``: only the
            decayed parameters (apex, timm). Default: ``True``.
        exclude_from_weight_decay (Union[str, list[str], Callable]): keyword-only; regular expressions
            searched in parameter names, or a predicate on names: matching parameters are not decayed.
            Default: ``None``.
        exclude_from_layer_adaptation (Union[str, list[str], Callable]): keyword-only; the same, for the
            trust ratio (:math:`q = 1`). :meth:`parameter_table` shows what was resolved. Default: ``None``.
        shard_state (bool): keyword-only; data-parallel training under msrun: each of the N workers keeps
            the moments of 1/N of the parameter elements (layers may be cut between workers; their
            norms are combined exactly), see docs/distributed.md. Default: ``False``.
        shard_bucket_size (int): keyword-only; with ``shard_state=True``, the elements of each worker's piece
            that one all-gather carries: the new weights are made, all-gathered and written into the
            parameters bucket by bucket, so the step's buffers for them scale with this, not with the model.
            Any value gives the same weights and moments, bit for bit. Default: ``2 ** 22`` (16 MiB of
            float32 per worker; docs/distributed.md says why).
        mu_dtype (Union[str, mindspore.dtype]): keyword-only; the dtype the first moment :math:`m` is stored in:
            ``None`` or ``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the mindspore dtype), as optax's
            ``mu_dtype``. It is computed in float32, rounded to nearest when stored, and the step uses it as
            stored; checkpoints hold it in this dtype. A 16-bit one saves 2 bytes per parameter element.
            float16 stores an :math:`|m|` above 65504 as Inf, which the next step makes NaN: that parameter
            is frozen from then on (see Outputs).
            bfloat16 on CPU needs the fused CPU backend (MindSpore 2.10 cannot write a bfloat16 Parameter
            on CPU); it is refused on GPU (no bfloat16 kernel in MindSpore 2.10's GPU plugin).
            Default: ``None`` (float32).
        optim_bits (int): keyword-only; ``32`` or ``8``, as bitsandbytes' ``optim_bits``: 8 stores both moments
            of every parameter of at least `min_8bit_size` elements as 8-bit codes, in blocks of 256 elements
            with one float32 scale each (about 2 bytes per element instead of 8; docs/memory.md). The step
            is computed in float32 from the moments as stored, so each layer's step keeps the norm
            ``lr * ||w||`` of LAMB. Not with `mu_dtype` other than float32. With `shard_state` each worker
            keeps its piece of the codes and scales, cut on block boundaries (fused CPU kernels only).
            Default: ``32``.
        min_8bit_size (int): keyword-only; with ``optim_bits=8``, parameters with fewer elements keep float32
            moments (bitsandbytes' ``min_8bit_size``). Default: ``4096``.
        backend (str): keyword-only; the backend of the update, ``"fused_cpu"`` (one C++ kernel: CPU,
            float32 parameters, a C++ compiler) or ``"composite"`` (primitive operators: every device and
            dtype); ``None`` takes the first that can run, which ``MINDSPORE_LAMB_FUSED`` can steer (see
            docs/api/lamb.md). Default: ``None``.

    Inputs:
        - **gradients** (tuple[Tensor]) - one gradient per parameter, of the parameter's shape and of a
          floating dtype (cast to float32, the math dtype, on every backend).
        - **finite** (Union[Tensor, bool], optional) - bool scalar (or 1-element Tensor), the caller's own
          finiteness test of `gradients` (e.g. a loss-scale cell's ``not overflow``): False skips the call
          exactly; True leaves the test to Lamb. Default: ``None``.

    Outputs:
        tuple[bool], all elements ``True``.

        A call whose gradients hold a NaN or Inf is skipped: see `exact_skip` and :attr:`skipped_steps`.
        So is a call whose learning-rate or weight-decay Cell returns NaN, Inf or a negative value, or whose
        ``global_step`` is negative (:attr:`invalid_steps`). A parameter that already holds a NaN or Inf, in
        its weights or its moments, is left as it is; its trust ratio reads NaN (:meth:`nonfinite_parameters`
        names it, :meth:`check_state` names damaged moments). Such a call still counts as applied for the
        other parameters (``global_step`` advances), so that parameter stays frozen until its state is repaired.

    Raises:
        TypeError: If `learning_rate` is not one of int, float, Tensor, Iterable, LearningRateSchedule.
        TypeError: If an element of `params` is neither Parameter nor dict.
        TypeError: If `beta1`, `beta2` or `eps` is not a float.
        TypeError: If `weight_decay` is neither float, int nor Cell.
        TypeError: If `loss_scale` or `max_grad_norm` is not a float or int.
        ValueError: If `eps` is less than or equal to 0, or greater than 1.
        TypeError: If a learning-rate Tensor or NumPy array has a bool or complex dtype.
        TypeError: If a Cell given as `learning_rate` or `weight_decay` cannot take the step as its only input,
            or is not a LearningRateSchedule and has trainable parameters (a layer, not a schedule).
        ValueError: If `trust_ratio_clip` is not ``0 <= lo <= hi`` with ``hi`` a normal float32 > 0.
        ValueError: If `beta1`, `beta2` is not in range (0.0, 1.0).
        ValueError: If `weight_decay` is less than 0.
        ValueError: If `loss_scale` or `max_grad_norm` is less than or equal to 0.
        KeyError: If a parameter group has an unknown key.
        TypeError: If `exact_skip`, `grad_averaging` or `eps_inside_sqrt` is not a bool.
        TypeError: If `shard_bucket_size` is not an int.
        ValueError: If `shard_bucket_size` is less than 1.
        ValueError: If `bias_correction`, `weight_decay_mode` or `layer_adaptation` is not one of its
            documented values.
        TypeError: If an exclusion is neither None, a str, a list of str nor a callable.
        ValueError: If an exclusion holds an invalid regular expression.
        ValueError: If a number is degenerate as float32 sees it (``eps`` or ``max_grad_norm`` below the
            smallest normal float32, ``beta`` rounding to 1, ``1 / loss_scale`` not a normal float32, a
            value beyond float32's range), or a learning-rate Tensor or sequence holds a NaN, Inf or
            negative value.
        ValueError: If a parameter has no element.
        TypeError: If a gradient is not a floating Tensor.
        ValueError: If a parameter appears twice, or the gradients do not match the parameters.
        ValueError: If a parameter name holds a line break.
        ValueError: If `finite` is a Tensor of more than one element.
        TypeError: If `finite` is neither None, a bool nor a Tensor, or a gradient is None.
        ValueError: If a learning-rate or weight-decay Cell returns a Tensor of more than one element.
        ValueError: If `weight_decay_mode` is ``"decoupled_outside"`` and a fixed learning rate times the weight
            decay is above 1.
        ValueError: If an exclusion predicate raises.
        TypeError: If an exclusion predicate returns something other than a bool.
        ValueError: If a parameter is named like the optimizer's own state (``global_step``, ``learning_rate``,
            ``lamb_m.*``, ...).
        TypeError: If `mu_dtype` is not None, a str or a mindspore dtype.
        ValueError: If `mu_dtype` is not one of float32, float16, bfloat16.
        ValueError: If `optim_bits` is not 32 or 8, or `min_8bit_size` is below 1 (TypeError: not an int).
        ValueError: If `optim_bits` is 8 and `mu_dtype` is not float32, or `shard_state` is True on the composite
            graph.
        ValueError: If `backend` is not None, ``"fused_cpu"`` or ``"composite"``.
        RuntimeError: If the backend asked for cannot run the parameters here (the message says why).
        TypeError: If no backend can run the parameters with the state asked for (a bfloat16 `mu_dtype` on
            GPU, or on CPU without the fused CPU backend).

    Supported Platforms:
        ``CPU`` (tested). ``GPU`` ``Ascend``: the composite backend, made of primitive operators for them, has not
        yet run on either device.

    Examples:
        >>> import mindspore as ms
        >>> from mindspore import nn
        >>> from mindspore_lamb import Lamb
        >>> net = nn.Dense(4, 2)
        >>> opt = Lamb(net.trainable_params(), learning_rate=1e-3, weight_decay=0.01)
        >>> model = ms.train.Model(net, loss_fn=nn.MSELoss(), optimizer=opt)
    """
    _support_parallel_optimizer = True
    # The loss-scale cell's protocol (docs/loss_scaling.md): this optimizer takes `finite` as a second
    # input and skips a step told finite=False exactly, so the cell needs no graph branch around it.
    accepts_finite_flag = True

    @_registered
    def __init__(self, params: Params, learning_rate: LearningRate, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-6, weight_decay: Union[float, int, Cell] = 0.0, *, loss_scale: float = 1.0,
                 max_grad_norm: Optional[float] = None, trust_ratio_clip: Optional[Tuple[float, float]] = None,
                 exact_skip: bool = False, bias_correction: Union[bool, str] = True,
                 weight_decay_mode: str = "decoupled", grad_averaging: bool = True, eps_inside_sqrt: bool = False,
                 weight_norm_clip: Optional[float] = None, layer_adaptation: Union[bool, str] = True,
                 exclude_from_weight_decay: NameFilter = None, exclude_from_layer_adaptation: NameFilter = None,
                 shard_state: bool = False, shard_bucket_size: int = 2 ** 22,
                 mu_dtype: Union[str, mstype.Type, None] = None, optim_bits: int = 32, min_8bit_size: int = 4096,
                 backend: Optional[str] = None) -> None:
        options = Options(params, learning_rate, beta1, beta2, eps, weight_decay, loss_scale=loss_scale,
                          max_grad_norm=max_grad_norm, trust_ratio_clip=trust_ratio_clip, exact_skip=exact_skip,
                          bias_correction=bias_correction, weight_decay_mode=weight_decay_mode,
                          grad_averaging=grad_averaging, eps_inside_sqrt=eps_inside_sqrt,
                          weight_norm_clip=weight_norm_clip, layer_adaptation=layer_adaptation,
                          exclude_from_weight_decay=exclude_from_weight_decay,
                          exclude_from_layer_adaptation=exclude_from_layer_adaptation, shard_state=shard_state,
                          shard_bucket_size=shard_bucket_size, mu_dtype=mu_dtype, optim_bits=optim_bits,
                          min_8bit_size=min_8bit_size, backend=backend)
        # the base class registers the user's parameters by name over its own `global_step` / `learning_rate`
        _refuse_state_names(p.name for group in options.params
                            for p in (group.get("params", ()) if isinstance(group, dict) else (group,)))
        # LAMB's weight decay is decoupled from the gradient, so loss_scale must not touch it; the base
        # class multiplies the weight decay by its loss_scale, hence 1.0 there and the real one here.
        super().__init__(options.learning_rate, options.params, options.weight_decay, loss_scale=1.0)
        self.params = self._parameters
        V.check_param_dtypes(self.params, self._target)
        self._keep(options)
        self._resolve_flags(options)
        self._add_diagnostics()
        self._add_step_helpers()
        # the backend of the update, chosen once; it allocates the declared state (backends/__init__.py)
        self.backend = backends.create(self.params, declare(options.slot_dtypes), decay_flags=self.decay_flags,
                                       adapt_flags=self.adapt_flags, owned_flags=self.optim_filter,
                                       constants=self.constants, shard_state=self.shard_state,
                                       shard_bucket_size=options.shard_bucket_size,
                                       parallel_optimizer=self.use_parallel, name=options.backend,
                                       quantized=self._quantized_state(options))
        self.fused = self.backend.name == "fused_cpu"
        _allow_call_depth(len(self.params))
        self._check_state_names()

    def _quantized_state(self, options):
        """(the 8-bit slot set, which parameters take it) with optim_bits=8, else None: every parameter of at
        least min_8bit_size elements (docs/memory.md)."""
        if options.optim_bits != 8:
            return None
        return declare({}, SLOTS_8BIT), tuple(int(np.prod(p.shape)) >= options.min_8bit_size for p in self.params)

    def _keep(self, options):
        """The options the step reads, and the step's constant scalars as float32 Tensors."""
        self.loss_scale = options.loss_scale
        self.max_grad_norm = options.max_grad_norm
        self.exact_skip = options.exact_skip
        self.bias_correction = options.bias_correction
        self.weight_decay_mode = options.weight_decay_mode
        self.shard_state = options.shard_state
        self.mu_dtype = options.mu_dtype
        self.optim_bits, self.min_8bit_size = options.optim_bits, options.min_8bit_size
        # G is computed before the update when it is needed there: NVLAMB clipping, an exact skip, or the
        # parallel optimizer (a rank's backend sees only its own parameters' gradients).
        self.norm_first = self.exact_skip or self.max_grad_norm is not None or self.use_parallel
        f32 = lambda x: Tensor(x, mstype.float32)  # noqa: E731
        # the fields of contract.pack that never change (the backend may specialise its graph on them)
        self.constants = options.constants()
        if self.max_grad_norm is None:
            self.constants["grad_scale"] = 1.0 / self.loss_scale
        if self.bias_correction is not True:
            self.constants.update(inv_bias_c1=1.0, inv_bias_c2=1.0)
        # the step's fixed scalars (contract.pack's fields that never change), each a float32 Tensor
        fixed = {name: f32(value) for name, value in options.constants().items()}
        self.one_minus_beta1, self.one_minus_beta2 = fixed.pop("one_minus_beta1"), fixed.pop("one_minus_beta2")
        self.m_grad_scale = fixed.pop("m_grad_scale")                  # 1, or 1 / (1 - b1) without averaging
        # r = m^ / (sqrt(v^ + eps_root) + eps_outside): one of the two is eps, the other 0 (eps_inside_sqrt)
        self.eps_outside, self.eps_root = fixed.pop("eps"), fixed.pop("eps_root")
        self.decay_in_grad, self.decay_in_update, self.decay_outside = (
            fixed.pop("decay_in_grad"), fixed.pop("decay_in_update"), fixed.pop("decay_outside"))  # 0 or 1 each
        self.w_norm_max = fixed.pop("w_norm_max")                      # ||w|| clipped at this (inf: none)
        self.trust_lo, self.trust_hi = fixed.pop("trust_lo"), fixed.pop("trust_hi")   # q clipped to [lo, hi]
        assert not fixed, f"Options.constants() has fields the step does not read: {sorted(fixed)}"
        # nn.Lamb's attributes, with its types: the arguments as 1-element float32 Tensors, the device flag
        self.beta1, self.beta2, self.eps = (Tensor(np.array([x], np.float32)) for x in (options.beta1,
                                                                                        options.beta2, options.eps))
        self.device_ascend = self._target == "Ascend"
        self.inv_loss_scale = f32(1.0 / self.loss_scale)
        self.max_grad_norm_t = f32(self.max_grad_norm if self.max_grad_norm is not None else 1.0)
        self.one = f32(1.0)
        # 1 - beta^t = -expm1(t log beta), log beta taken in float64
        self.log_beta1, self.log_beta2 = f32(math.log(options.beta1)), f32(math.log(options.beta2))

    def _resolve_flags(self, options):
        """Which parameter is decayed and which gets a trust ratio: resolved once, here (parameter_table())."""
        self.param_names = tuple(p.name for p in self.params)
        self.param_dtypes = tuple(str(p.dtype) for p in self.params)
        self.decay_flags = tuple(decay and not options.excluded_from_decay(name)
                                 for decay, name in zip(self.decay_flags, self.param_names))
        self.adapt_flags = tuple(options.adapted(name, decay) for name, decay in zip(self.param_names,
                                                                                      self.decay_flags))
        if not self.is_group:
            self.grad_centralization_flags = (False,) * self.param_length

    def _add_diagnostics(self):
        """The diagnostics of the last applied step, written inside the graph (no host sync in the step). They
        are runtime state, left out of checkpoints (which keep nn.Lamb's layout: docs/api/lamb.md). NaN until
        the first applied step: 0.0 would read as "no update" (an applied step always has a finite G)."""
        self.layer_stats = _runtime_state(np.full((self.param_length, 3), np.nan, np.float32), "lamb_layer_stats")
        self.last_grad_norm = _runtime_state(np.float32(np.nan), "lamb_grad_norm")
        self.skipped = _runtime_state(np.int32(0), "lamb_skipped_steps")
        self.invalid = _runtime_state(np.int32(0), "lamb_invalid_steps")

    def _add_step_helpers(self):
        """Constant tensors and operators the step uses (one per parameter where it says so)."""
        self.ones = Tensor(np.ones(self.param_length, np.float32))
        self.zeros = Tensor(np.zeros(self.param_length, np.float32))
        self.decay_mask = Tensor(np.array(self.decay_flags, np.bool_))
        self.reduce_all = P.ReduceAll()
        self.success = (True,) * self.param_length
        self.isfinite = P.IsFinite()

    @property
    def moments1(self) -> ParameterTuple:
        """ParameterTuple: the first moments (``lamb_m.<name>``, one per parameter; ``lamb_m.shard`` with
        ``shard_state=True``), stored in `mu_dtype`."""
        return ParameterTuple(contract.slot_state(self.backend, "m"))

    @property
    def moments2(self) -> ParameterTuple:
        """ParameterTuple: the second moments (``lamb_v.<name>``; ``lamb_v.shard``), float32."""
        return ParameterTuple(contract.slot_state(self.backend, "v"))

    def _check_state_names(self):
        """The optimizer's own state (moments, schedules' values, diagnostics) named like a parameter."""
        trained = {id(p) for p in self.params}
        _refuse_state_names(self.param_names, {p.name for p in self.get_parameters() if id(p) not in trained})

    @classmethod
    def preset(cls, name: str, params: Params, learning_rate: LearningRate, **overrides) -> "Lamb":
        """A Lamb that reproduces another library's LAMB (docs/variants.md): ``name`` is one of
        ``paper``, ``mindspore_gpu``, ``apex``, ``timm``, ``optax``, ``keras``, ``tfa``, ``paddle``,
        ``torch_optimizer``, ``deepspeed``. The preset's default hyper-parameters (betas, eps, weight
        decay) apply unless given in `overrides`, which take any keyword of Lamb.

        Examples:
            >>> from mindspore import nn
            >>> from mindspore_lamb import Lamb
            >>> opt = Lamb.preset("timm", nn.Dense(4, 2).trainable_params(), 1e-3)
            >>> opt.max_grad_norm, opt.layer_adapted_names()
            (1.0, ('weight', 'bias'))
        """
        V.check_keywords(f"{cls.__name__}.preset", cls.__init__, (None, params, learning_rate), overrides)
        return cls(params, learning_rate, **presets.resolve(name, overrides))

    def gradients_centralization(self, gradients):
        """Centralize the gradients of groups with ``grad_centralization=True`` (rank >= 2 tensors)."""
        return self.map_(centralize, self.grad_centralization_flags, gradients)

    @jit(backend="ms_backend")
    def construct(self, gradients, finite=None):
        _raise_on_count(len(gradients), self.param_length)
        gradients = self.hyper_map(_check_gradient, self.param_names, self.param_dtypes, self.params, gradients)
        gradients = self.flatten_gradients(gradients)
        gradients = self.gradients_centralization(gradients)
        # the caller's finite=False skips the step exactly; True (or None) leaves the test to us
        proceed = F.ones((), dtype=mstype.bool_) if finite is None else _as_flag(finite)
        grad_sq = None
        if self.norm_first:
            # G = ||g|| / loss_scale, before the update; not finite <=> a NaN/Inf gradient: skip exactly
            grad_sq = self.backend.grad_sq_cell(gradients)
            proceed = F.logical_and(proceed, self.isfinite(grad_sq))

        s = self.global_step                                # 0-based step before this call
        t = F.reshape(_ops.cast(s, mstype.float32), ()) + 1.0  # bias correction uses t = s + 1
        inv_bias_c1, inv_bias_c2 = self._inverse_bias_corrections(t)
        lr = self.get_lr()                                  # lr_s
        weight_decay = self.get_weight_decay()              # lambda_s
        # a step the hyper-parameters or the counter make meaningless is skipped and counted, never applied
        valid = self._valid_step(t, lr, weight_decay)
        proceed = F.logical_and(proceed, valid)
        if self.bias_correction == "step_size":
            # DeepSpeed, torch-optimizer(debias): lr_s sqrt(1 - beta2^t) / (1 - beta1^t), moments uncorrected
            factor = F.sqrt(-expm1(t * self.log_beta2)) / -expm1(t * self.log_beta1)
            lr = tuple(x * factor for x in lr) if isinstance(lr, tuple) else lr * factor
        grad_scale = self.inv_loss_scale                    # g / loss_scale
        if self.max_grad_norm is not None:
            grad_scale = grad_scale * global_norm_factor(F.sqrt(grad_sq) * self.inv_loss_scale,
                                                         self.max_grad_norm_t)
        scalars = contract.pack(one_minus_beta1=self.one_minus_beta1, one_minus_beta2=self.one_minus_beta2,
                                m_grad_scale=self.m_grad_scale, eps=self.eps_outside, eps_root=self.eps_root,
                                inv_bias_c1=inv_bias_c1, inv_bias_c2=inv_bias_c2, grad_scale=grad_scale,
                                decay_in_grad=self.decay_in_grad,
                                decay_in_update=self.decay_in_update, decay_outside=self.decay_outside,
                                w_norm_max=self.w_norm_max, trust_lo=self.trust_lo, trust_hi=self.trust_hi,
                                proceed=proceed)
        layer_stats, grad_sq, applied = self.backend(scalars, lr, weight_decay, self.params, gradients, grad_sq)
        return self.hyper_map(F.partial(_true_after, self._record(layer_stats, grad_sq, applied, valid)),
                              self.success)

    def get_lr(self):
        """lr_s: the learning rate of each parameter group at this step (a Cell's value checked to be a scalar)."""
        if not self.dynamic_lr:
            return self.learning_rate
        step = schedule_step(self.global_step)
        if self.is_group_lr:
            lr = ()
            for schedule in self.learning_rate:
                lr += (_scalar("learning rate", schedule(step)),)
            return lr
        return _scalar("learning rate", self.learning_rate(step))

    def get_weight_decay(self):
        """lambda_s: the weight decay of each parameter group at this step (a Cell's value checked to be a
        scalar)."""
        if not self.dynamic_weight_decay:
            return self.weight_decay
        step = schedule_step(self.global_step)
        if self.is_group:
            weight_decay = ()
            for value, dynamic in zip(self.weight_decay, self.dynamic_decay_flags):
                weight_decay += (_scalar("weight decay", value(step)) if dynamic else value,)
            return weight_decay
        return _scalar("weight decay", self.weight_decay(step))

    def _valid_step(self, t, lr, weight_decay):
        """False when this step must not be applied: the step counter is negative (a damaged checkpoint), or a
        learning-rate or weight-decay Cell returned NaN, Inf or a negative value (or lr * lambda > 1 with the
        decay outside the trust ratio, which would flip the weights' sign). Fixed values were checked in
        the constructor; only Cells are checked here, at every step."""
        valid = t >= 1.0
        if self.dynamic_lr or self.dynamic_weight_decay:
            lr_vec = per_parameter(lr, self.ones)
            wd_vec = _ops.where(self.decay_mask, per_parameter(weight_decay, self.ones), self.zeros)
            each = F.logical_and(self.isfinite(lr_vec), lr_vec >= 0.0)
            each = F.logical_and(each, F.logical_and(self.isfinite(wd_vec), wd_vec >= 0.0))
            if self.weight_decay_mode == "decoupled_outside":
                each = F.logical_and(each, lr_vec * wd_vec <= 1.0)    # decay_factor = 1 - lr lambda >= 0
            valid = F.logical_and(valid, self.reduce_all(each))
        return valid

    def _inverse_bias_corrections(self, t):
        """1 / (1 - beta1^t), 1 / (1 - beta2^t); both 1 with bias_correction False or "step_size"."""
        if self.bias_correction is not True:
            return self.one, self.one
        # 1 - beta^t = -expm1(t log beta), log beta taken in float64: full float32 precision even when
        # beta^t is close to 1 (1 - float32(beta)^t would lose it all at beta = 1 - 1e-7)
        return 1.0 / -expm1(t * self.log_beta1), 1.0 / -expm1(t * self.log_beta2)

    def _record(self, layer_stats, grad_sq, applied, valid):
        """Count the step (or the skip, and why) and keep the diagnostics of an applied step."""
        applied_count = _ops.cast(applied, mstype.int32)                       # 1, or 0 for a skipped call
        increase = self.global_step_increase_tensor * applied_count
        layer_stats = F.depend(layer_stats, self.assignadd(self.global_step, increase))
        layer_stats = F.depend(layer_stats, _ops.assign_add(self.skipped, 1 - applied_count))
        layer_stats = F.depend(layer_stats, _ops.assign_add(self.invalid, 1 - _ops.cast(valid, mstype.int32)))
        if self.use_parallel:
            layer_stats = F.depend(layer_stats, self.broadcast_params(layer_stats))
        grad_norm = F.sqrt(grad_sq) * self.inv_loss_scale
        done = _ops.assign(self.layer_stats, _ops.where(_ops.broadcast_to(applied, F.shape(layer_stats)), layer_stats,
                                                        self.layer_stats))
        return F.depend(done, _ops.assign(self.last_grad_norm, _ops.where(applied, grad_norm, self.last_grad_norm)))

    # ---- host-side readers (each reads device memory once; call them outside the step) ----

    @property
    def skipped_steps(self) -> int:
        """int: how many calls were skipped (a gradient was NaN or Inf, the caller passed ``finite=False``, or the
        step was invalid, :attr:`invalid_steps`)."""
        return int(self.skipped.asnumpy())

    @property
    def invalid_steps(self) -> int:
        """int: how many calls were skipped because the step itself was invalid (a learning-rate or weight-decay Cell
        returned NaN, Inf or a negative value, or lr * weight decay > 1 with ``weight_decay_mode="decoupled_outside"``,
        or ``global_step`` was negative, a damaged checkpoint that :meth:`check_state` names). Counted in
        :attr:`skipped_steps` too."""
        return int(self.invalid.asnumpy())

    def nonfinite_parameters(self) -> List[str]:
        """list[str]: parameters whose ||w|| or ||u|| was NaN or Inf at the last applied step (a NaN/Inf inside
        the weights, or inside their moments, e.g. from a bad checkpoint: :meth:`check_state` says which): Lamb
        leaves them as they are and reports their trust ratio as NaN; :class:`mindspore_lamb.TrustRatioMonitor`
        warns and stops training when it sees one. Empty before the first applied step."""
        if math.isnan(self.global_grad_norm):
            return []                   # no step applied yet: the stats are NaN by construction
        stats = self.layer_stats.asnumpy()
        return [name for name, row in zip(self.param_names, stats[:, 1:].tolist()) if not all(map(math.isfinite, row))]

    def check_state(self) -> None:
        """Raise ValueError naming every damaged entry of this optimizer's state: ``global_step`` < 0, a NaN or
        Inf in a moment, a negative second moment (:func:`mindspore_lamb.check_state`, which also checks a
        checkpoint before it is loaded). Call it after loading a checkpoint; one host read of the state."""
        state = {p.name: p for p in (self.global_step, *self.backend.state)}
        check_slots(state, "the state of this Lamb", held(self.backend.slots))

    def parameter_table(self) -> str:
        """str: one row per parameter, in update order: name, shape, dtype, whether it is decayed (and how),
        whether it gets a trust ratio. Resolved once, in the constructor."""
        rows = [("parameter", "shape", "dtype", "weight decay", "trust ratio")]
        for param, decay, adapt in zip(self.params, self.decay_flags, self.adapt_flags):
            rows.append((param.name, str(tuple(param.shape)), str(param.dtype),
                         self.weight_decay_mode if decay else "no", "yes" if adapt else "no (q = 1)"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    def layer_adapted_names(self) -> Tuple[str, ...]:
        """tuple[str]: the parameters that get a trust ratio (the others have layer_adaptation=False)."""
        return tuple(name for name, adapt in zip(self.param_names, self.adapt_flags) if adapt)

    def trust_ratios(self) -> Dict[str, float]:
        """dict: parameter name -> trust ratio q applied at the last applied step; NaN before the first one (in
        this process: the diagnostics are not checkpointed)."""
        return dict(zip(self.param_names, self.layer_stats.asnumpy()[:, 0].tolist()))

    def layer_norms(self) -> Dict[str, Tuple[float, float, float]]:
        """dict: parameter name -> (q, ||w||, ||u||) of the last applied step; ||w|| is before the update. NaN
        before the first applied step (in this process)."""
        stats = self.layer_stats.asnumpy().copy()
        return {name: tuple(row.tolist()) for name, row in zip(self.param_names, stats)}

    @property
    def global_grad_norm(self) -> float:
        """float: :math:`G` of the last applied (not skipped) call, the global L2 norm of the unscaled gradients (before
        max_grad_norm); NaN before the first applied call (in this process)."""
        return float(self.last_grad_norm.asnumpy())
