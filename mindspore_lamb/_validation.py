"""Argument validation for :class:`mindspore_lamb.Lamb` (spec section 4).

Every check runs in the constructor, before anything is built, so that bad
input never reaches graph compilation. Every message names the argument and
the value received.
"""
import math
from collections.abc import Iterable

from mindspore import Parameter, Tensor
from mindspore.nn import Cell
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

GROUP_KEYS = ("params", "lr", "weight_decay", "grad_centralization", "order_params", "layer_adaptation")


def _describe(value):
    """`type` and a short `repr` of a received value, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_float(name, value, prim="Lamb"):
    """`value` must be a Python float (MindSpore rejects ints for beta1/beta2/eps)."""
    if not isinstance(value, float):
        raise TypeError(f"For '{prim}', the argument '{name}' must be float, but got {_describe(value)}.")
    if not math.isfinite(value):
        raise ValueError(f"For '{prim}', the argument '{name}' must be finite, but got {value}.")
    return value


def check_open_unit_interval(name, value, prim="Lamb"):
    check_float(name, value, prim)
    if not 0.0 < value < 1.0:
        raise ValueError(f"For '{prim}', the argument '{name}' must be in the open interval (0.0, 1.0), "
                         f"but got {value}.")
    return value


def check_positive_float(name, value, prim="Lamb"):
    check_float(name, value, prim)
    if value <= 0.0:
        raise ValueError(f"For '{prim}', the argument '{name}' must be greater than 0, but got {value}.")
    return value


def check_positive_number(name, value, prim="Lamb"):
    """float or int (not bool), finite and > 0; returned as float."""
    if not _is_number(value):
        raise TypeError(f"For '{prim}', the argument '{name}' must be float or int, but got {_describe(value)}.")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"For '{prim}', the argument '{name}' must be a finite number greater than 0, "
                         f"but got {value}.")
    return value


def check_weight_decay(name, value, prim="Lamb"):
    """float or int >= 0, or a Cell called with the step (dynamic weight decay)."""
    if isinstance(value, Cell):
        return value
    if not _is_number(value):
        raise TypeError(f"For '{prim}', the argument '{name}' must be float, int or Cell, "
                        f"but got {_describe(value)}.")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"For '{prim}', the argument '{name}' must be a finite number >= 0, but got {value}.")
    return value


def check_learning_rate(name, value, prim="Lamb"):
    """float/int >= 0, 0-D or 1-D Tensor, Iterable of numbers, or LearningRateSchedule."""
    if isinstance(value, LearningRateSchedule):
        return value
    if isinstance(value, bool):
        raise TypeError(f"For '{prim}', the argument '{name}' must be int, float, Tensor, Iterable or "
                        f"LearningRateSchedule, but got {_describe(value)}.")
    if _is_number(value):
        value = float(value)
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"For '{prim}', the argument '{name}' must be a finite number >= 0, but got {value}.")
        return value
    if isinstance(value, Tensor):
        if value.ndim > 1:
            raise ValueError(f"For '{prim}', the argument '{name}' must be a 0-D or 1-D Tensor, "
                             f"but got a Tensor of shape {value.shape}.")
        return value
    if isinstance(value, Cell):
        raise TypeError(f"For '{prim}', the argument '{name}' must be a LearningRateSchedule when it is a Cell, "
                        f"but got {_describe(value)}.")
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        values = list(value)
        if not values or not all(_is_number(v) for v in values):
            raise TypeError(f"For '{prim}', the argument '{name}' as an Iterable must hold numbers, "
                            f"but got {_describe(values)}.")
        return values
    raise TypeError(f"For '{prim}', the argument '{name}' must be int, float, Tensor, Iterable or "
                    f"LearningRateSchedule, but got {_describe(value)}.")


def check_trust_ratio_clip(value, prim="Lamb"):
    """None, or (lo, hi) with 0 <= lo <= hi (hi may be inf)."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise TypeError(f"For '{prim}', the argument 'trust_ratio_clip' must be None or a pair (lo, hi) "
                        f"of numbers, but got {_describe(value)}.")
    lo, hi = float(value[0]), float(value[1])
    if not (0.0 <= lo <= hi) or math.isnan(hi):
        raise ValueError(f"For '{prim}', the argument 'trust_ratio_clip' must satisfy 0 <= lo <= hi, "
                         f"but got {value}.")
    return lo, hi


def _check_bool(name, value, prim, what="group key"):
    if not isinstance(value, bool):
        raise TypeError(f"For '{prim}', the {what} '{name}' must be bool, but got {_describe(value)}.")


def check_bool(name, value, prim="Lamb"):
    _check_bool(name, value, prim, what="argument")


def parameter_list(members, subject, prim, empty_detail=""):
    """`members` (an iterable) as a non-empty list of Parameters; `subject` names it in the errors."""
    members = list(members)
    if not members:
        raise ValueError(f"For '{prim}', {subject} must not be empty{empty_detail}.")
    for pos, member in enumerate(members):
        if not isinstance(member, Parameter):
            raise TypeError(f"For '{prim}', {subject} must hold only Parameters, "
                            f"but got {_describe(member)} at index {pos}.")
    return members


def check_params(params, prim="Lamb"):
    """Validate `params` (a list of Parameter, or of group dicts) and return it as a list.

    Group dicts are returned as copies with `params` made a list and `lr`
    normalised (an Iterable becomes a list, so a generator is read only once).

    Groups: keys from GROUP_KEYS only; `params` required and made of Parameters; no
    parameter in two groups; `order_params` alone in its dict and naming exactly
    the grouped parameters.
    """
    if isinstance(params, (Parameter, dict)) or not isinstance(params, Iterable):
        raise TypeError(f"For '{prim}', the argument 'params' must be a list of Parameter or of dict, "
                        f"but got {_describe(params)}.")
    params = list(params)
    if not params:
        raise ValueError(f"For '{prim}', the argument 'params' must not be empty, but got [].")
    for index, item in enumerate(params):
        if not isinstance(item, (Parameter, dict)):
            raise TypeError(f"For '{prim}', each element of 'params' must be a Parameter or a dict, "
                            f"but got {_describe(item)} at index {index}.")
    if not all(isinstance(item, dict) for item in params):
        if any(isinstance(item, dict) for item in params):
            raise TypeError(f"For '{prim}', the argument 'params' must hold only Parameters or only dicts, "
                            f"but got a mix: {[type(item).__name__ for item in params]}.")
        _check_unique(params, prim)
        return params

    grouped, order, groups = [], None, []
    for index, group in enumerate(params):
        unknown = [key for key in group if key not in GROUP_KEYS]
        if unknown:
            raise KeyError(f"For '{prim}', group {index} of 'params' has unknown key(s) {unknown}; "
                           f"allowed keys are {list(GROUP_KEYS)}.")
        if "order_params" in group:
            if len(group) != 1:
                raise ValueError(f"For '{prim}', the dict holding 'order_params' must hold nothing else, "
                                 f"but group {index} has keys {list(group)}.")
            order = group["order_params"]
            groups.append(group)
            continue
        if "params" not in group:
            raise KeyError(f"For '{prim}', group {index} of 'params' has no 'params' key; got keys {list(group)}.")
        members = group["params"]
        if isinstance(members, Parameter) or not isinstance(members, Iterable):
            raise TypeError(f"For '{prim}', 'params' of group {index} must be a list of Parameter, "
                            f"but got {_describe(members)}.")
        group = dict(group, params=parameter_list(members, f"'params' of group {index}", prim))
        if "lr" in group:
            group["lr"] = check_learning_rate(f"lr (group {index})", group["lr"], prim)
        if "weight_decay" in group:
            check_weight_decay(f"weight_decay (group {index})", group["weight_decay"], prim)
        for key in ("grad_centralization", "layer_adaptation"):
            if key in group:
                _check_bool(f"{key} (group {index})", group[key], prim)
        grouped.extend(members)
        groups.append(group)
    if not grouped:
        raise ValueError(f"For '{prim}', the argument 'params' has no group with parameters.")
    _check_unique(grouped, prim)
    if order is not None:
        _check_order(order, grouped, prim)
    return groups


def _check_unique(params, prim):
    seen = set()
    for param in params:
        if param.name in seen:
            raise ValueError(f"For '{prim}', the parameter '{param.name}' appears more than once in 'params'.")
        seen.add(param.name)


def _check_order(order, grouped, prim):
    if isinstance(order, Parameter) or not isinstance(order, Iterable):
        raise TypeError(f"For '{prim}', 'order_params' must be a list of Parameter, but got {_describe(order)}.")
    order = list(order)
    for pos, member in enumerate(order):
        if not isinstance(member, Parameter):
            raise TypeError(f"For '{prim}', 'order_params' must hold only Parameters, "
                            f"but got {_describe(member)} at index {pos}.")
    names = {p.name for p in grouped}
    listed = [p.name for p in order]
    missing = [name for name in listed if name not in names]
    if missing:
        raise ValueError(f"For '{prim}', 'order_params' lists parameter(s) {missing} that are in no group.")
    if len(set(listed)) != len(listed) or set(listed) != names:
        raise ValueError(f"For '{prim}', 'order_params' must list every grouped parameter exactly once; "
                         f"got {len(listed)} entries for {len(names)} grouped parameters.")


def check_param_dtypes(params, device_target, prim="Lamb"):
    """Floating parameters only; bfloat16 not on CPU (MindSpore 2.10's CPU Assign has no bfloat16 kernel)."""
    from mindspore.common import dtype as mstype
    for param in params:
        if param.dtype not in (mstype.float16, mstype.float32, mstype.float64, mstype.bfloat16):
            raise TypeError(f"For '{prim}', parameter '{param.name}' must be float16, float32, float64 or "
                            f"bfloat16, but got {param.dtype}.")
        if param.dtype == mstype.bfloat16 and device_target == "CPU":
            raise TypeError(f"For '{prim}', parameter '{param.name}' is bfloat16, which MindSpore 2.10 cannot "
                            f"write on CPU (its CPU Assign kernel has no bfloat16); use float16 or float32 "
                            f"on CPU, bfloat16 on GPU/Ascend.")
