"""Lamb's arguments, checked once, and what follows from them.

:class:`Options` checks every argument (as float32 will see it: _validation.py) and resolves what the
constructor needs: the parameter groups to give ``nn.Optimizer``, the schedules, the name filters, the
stored dtype of each state slot, the backend asked for, and :meth:`Options.constants`, the fields of
``contract.pack`` that stay the same at every step.
"""
import math

from . import _validation as V
from .backends import NAMES as BACKEND_NAMES
from .schedules import as_schedule
from .state import MU_DTYPES

# where the weight decay goes: added to the gradient (L2), in the update u = r + lambda w (the paper's
# decoupled decay), or applied outside the trust ratio (w = (1 - lr lambda) w - lr q u); the order matters
DECAY_MODES = ("l2", "decoupled", "decoupled_outside")


class Options:
    """Every argument of Lamb (docs/api/lamb.md, "Args"), checked; raises as Lamb documents."""

    def __init__(self, params, learning_rate, beta1, beta2, eps, weight_decay, *, loss_scale, max_grad_norm,
                 trust_ratio_clip, exact_skip, bias_correction, weight_decay_mode, grad_averaging, eps_inside_sqrt,
                 weight_norm_clip, layer_adaptation, exclude_from_weight_decay, exclude_from_layer_adaptation,
                 shard_state, shard_bucket_size, mu_dtype, optim_bits, min_8bit_size, backend):
        params = V.check_params(params)
        learning_rate = V.check_learning_rate("learning_rate", learning_rate)
        V.check_beta("beta1", beta1)
        V.check_beta("beta2", beta2)
        V.check_eps("eps", eps)
        self.weight_decay = V.check_weight_decay("weight_decay", weight_decay)
        self.loss_scale = V.check_loss_scale("loss_scale", loss_scale)
        self.max_grad_norm = V.check_max_grad_norm("max_grad_norm", max_grad_norm)
        self.trust_ratio_clip = V.check_trust_ratio_clip(trust_ratio_clip)
        self.exact_skip = V.check_bool("exact_skip", exact_skip)
        self.shard_state = V.check_bool("shard_state", shard_state)
        self.shard_bucket_size = V.check_int("shard_bucket_size", shard_bucket_size, "Lamb", low=1)
        V.check_choice("bias_correction", bias_correction, (True, False, "step_size"))
        V.check_choice("weight_decay_mode", weight_decay_mode, DECAY_MODES)
        if weight_decay_mode == "decoupled_outside":
            V.check_decay_outside(learning_rate, weight_decay, params)
        self.learning_rate = as_schedule(learning_rate, "learning_rate")
        V.check_bool("grad_averaging", grad_averaging)
        V.check_bool("eps_inside_sqrt", eps_inside_sqrt)
        self.weight_norm_clip = V.check_number("weight_norm_clip", weight_norm_clip, "Lamb", allow_none=True,
                                               normal=True)
        V.check_choice("layer_adaptation", layer_adaptation, (True, False, "decayed"))
        self.excluded_from_decay = V.check_name_filter("exclude_from_weight_decay", exclude_from_weight_decay)
        self.excluded_from_adaptation = V.check_name_filter("exclude_from_layer_adaptation",
                                                            exclude_from_layer_adaptation)
        self.mu_dtype = V.check_dtype("mu_dtype", mu_dtype, MU_DTYPES)
        # the stored dtype of each state slot the options choose ({role: dtype}; None leaves a slot out: state.declare)
        self.slot_dtypes = {"m": self.mu_dtype}
        self.optim_bits, self.min_8bit_size = _check_8bit(optim_bits, min_8bit_size, mu_dtype)
        if backend is not None:
            V.check_choice("backend", backend, BACKEND_NAMES)
        self.backend = backend
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.bias_correction, self.weight_decay_mode = bias_correction, weight_decay_mode
        self.grad_averaging, self.eps_inside_sqrt, self.layer_adaptation = grad_averaging, eps_inside_sqrt, \
            layer_adaptation
        self.params, self.adapt_by_name = _groups(params)

    def constants(self):
        """{field of contract.pack: float}: the scalars of the step that never change, in float64 (each is
        rounded once, to float32, by the caller)."""
        lo, hi = self.trust_ratio_clip if self.trust_ratio_clip is not None else (0.0, math.inf)
        decay_in = {mode: float(self.weight_decay_mode == mode) for mode in DECAY_MODES}
        return dict(
            # 1 - beta in float64, rounded once (1 - float32(0.999) is 1.3e-5 off, 19 % at 1 - 1e-7)
            one_minus_beta1=1.0 - self.beta1, one_minus_beta2=1.0 - self.beta2,
            # without gradient averaging m = b1 m + g, written as m + (1 - b1) (g / (1 - b1) - m)
            m_grad_scale=1.0 if self.grad_averaging else 1.0 / (1.0 - self.beta1),
            # r = m^ / (sqrt(v^ + eps_root) + eps)
            eps=0.0 if self.eps_inside_sqrt else self.eps, eps_root=self.eps if self.eps_inside_sqrt else 0.0,
            decay_in_grad=decay_in["l2"], decay_in_update=decay_in["decoupled"],
            decay_outside=decay_in["decoupled_outside"],
            w_norm_max=math.inf if self.weight_norm_clip is None else self.weight_norm_clip,
            trust_lo=lo, trust_hi=hi)

    def adapted(self, name, decayed):
        """Whether parameter `name` gets a trust ratio (`decayed`: whether it is decayed)."""
        return (self.adapt_by_name.get(name, True) and self.layer_adaptation is not False
                and (self.layer_adaptation != "decayed" or decayed) and not self.excluded_from_adaptation(name))


def _check_8bit(optim_bits, min_8bit_size, mu_dtype):
    """(optim_bits, min_8bit_size), checked: 8-bit state stores both moments itself (docs/memory.md)."""
    V.check_choice("optim_bits", optim_bits, (32, 8))
    V.check_int("min_8bit_size", min_8bit_size, "Lamb", low=1)
    if optim_bits == 8 and mu_dtype is not None and V.check_dtype("mu_dtype", mu_dtype, MU_DTYPES) != MU_DTYPES[0]:
        raise ValueError(f"For 'Lamb', the argument 'mu_dtype' must be None or float32 with optim_bits=8 (the "
                         f"8-bit state stores the first moment itself; tensors below min_8bit_size elements keep "
                         f"float32 moments), but got {V.describe(mu_dtype)}.")
    return optim_bits, min_8bit_size


def _groups(params):
    """(the parameters or groups for nn.Optimizer, {parameter name: its group's layer_adaptation}): the group
    key ``layer_adaptation`` is this package's, so it is taken out; a group's per-step ``lr`` sequence holds its
    last value (schedules.py)."""
    adapt_by_name = {}
    if not isinstance(params[0], dict):
        return params, adapt_by_name
    for group in params:
        for param in group.get("params", ()):
            adapt_by_name[param.name] = group.get("layer_adaptation", True)
    groups = [{k: val for k, val in group.items() if k != "layer_adaptation"} for group in params]
    for index, group in enumerate(groups):
        if "lr" in group:
            group["lr"] = as_schedule(group["lr"], f"learning_rate_group_{index}")
    return groups, adapt_by_name
