"""Argument validation for every Cell and helper of the package (docs/api/lamb.md, "Raises").

Every check runs in a constructor, before anything is built, so that bad input
never reaches graph compilation. Every message names the argument and the value
received. Numbers are checked as float32, the math dtype, will see them.
"""
import difflib
import inspect
import math
import re
from collections.abc import Iterable

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Parameter, Tensor
from mindspore.nn import Cell
from mindspore.nn.learning_rate_schedule import LearningRateSchedule

GROUP_KEYS = ("params", "lr", "weight_decay", "grad_centralization", "order_params", "layer_adaptation")


FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)      # smallest normal float32


def describe(value):
    """`type` and a short `repr` of a received value, for error messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


# other libraries' names for Lamb's keywords (PyTorch's lr and betas, Keras' epsilon, TF's weight_decay_rate)
KEYWORD_ALIASES = {"lr": ("learning_rate",), "betas": ("beta1", "beta2"), "epsilon": ("eps",),
                   "weight_decay_rate": ("weight_decay",)}


def _keyword_hint(name, valid):
    """'did you mean ...? ' for an unknown keyword: another library's name for it, else the closest one."""
    alias = KEYWORD_ALIASES.get(name, ())
    if alias and all(a in valid for a in alias):
        if len(alias) == 1:
            return f"did you mean '{alias[0]}'? "
        return f"did you mean {' and '.join(repr(a) for a in alias)} (one number each, not a tuple)? "
    close = difflib.get_close_matches(name, valid, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_keywords(owner, function, args, kwargs):
    """Bind `args`, `kwargs` to `function`'s signature (`args` with ``self`` for a method) as Python would, but
    name `owner` and, for an unknown keyword, the closest valid one; a TypeError either way."""
    signature = inspect.signature(function)
    shown = signature.replace(parameters=[p.replace(annotation=p.empty) for name, p in signature.parameters.items()
                                          if name != "self"], return_annotation=signature.empty)
    positional = list(signature.parameters)[:len(args)]
    valid = [name for name, p in shown.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in positional]
    for name in kwargs:
        if name not in valid:
            raise TypeError(f"For '{owner}', {name!r} is not a keyword argument: {_keyword_hint(name, valid)}"
                            f"the keywords are {', '.join(valid)}.")
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"For '{owner}', {error}; the signature is {owner}{shown}.") from None


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_float32(value):
    """`value` as float32 will see it (a Python float; inf when it overflows)."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def check_number(name, value, prim, *, low=0.0, inclusive=False, allow_none=False, normal=False):
    """A float or int (not bool), finite in float32, > low (>= low when `inclusive`); returned as float.
    `normal`: also a normal float32 (not 0, not denormal: float32 rounds 1e-50 to 0)."""
    if value is None and allow_none:
        return None
    if not is_number(value):
        kinds = "float, int or None" if allow_none else "float or int"
        raise TypeError(f"For '{prim}', the argument '{name}' must be {kinds}, but got {describe(value)}.")
    value = float(value)
    bound = f">= {low}" if inclusive else f"> {low}"
    if not math.isfinite(value) or value < low or (value == low and not inclusive):
        raise ValueError(f"For '{prim}', the argument '{name}' must be a finite number {bound}, but got {value}.")
    if abs(as_float32(value)) > FLOAT32_MAX:
        raise ValueError(f"For '{prim}', the argument '{name}' must be finite as float32 (at most {FLOAT32_MAX:.4g}), "
                         f"but got {value}.")
    if normal and abs(as_float32(value)) < FLOAT32_TINY and (value != 0.0 or not inclusive):
        raise ValueError(f"For '{prim}', the argument '{name}' must be at least {FLOAT32_TINY:.4g} (the smallest "
                         f"normal float32; float32 rounds smaller values to 0 or loses their precision), "
                         f"but got {value}.")
    return value


def check_int(name, value, prim, *, low):
    """An int (not bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"For '{prim}', the argument '{name}' must be int, but got {describe(value)}.")
    if value < low:
        raise ValueError(f"For '{prim}', the argument '{name}' must be >= {low}, but got {value}.")
    return value


def check_bool(name, value, prim="Lamb"):
    if not isinstance(value, bool):
        raise TypeError(f"For '{prim}', the argument '{name}' must be bool, but got {describe(value)}.")
    return value


def check_choice(name, value, choices, prim="Lamb"):
    """`value` must be one of `choices` (compared with ==, and bool only to bool)."""
    if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        raise ValueError(f"For '{prim}', the argument '{name}' must be one of {list(choices)}, "
                         f"but got {describe(value)}.")
    return value


def check_name_filter(name, value, prim="Lamb"):
    """None, a str or a list/tuple of str (regular expressions, `re.search`ed in parameter names, as
    TF-Addons and Keras do), or a callable name -> bool (as Paddle's exclude_from_weight_decay_fn).
    Returned as a predicate on names."""
    if value is None:
        return lambda param_name: False
    if callable(value):
        return _checked_predicate(name, value, prim)
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"For '{prim}', the argument '{name}' must be None, a callable, or a str or list of "
                        f"non-empty str (regular expressions), but got {describe(value)}.")
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as error:
        raise ValueError(f"For '{prim}', the argument '{name}' holds an invalid regular expression: "
                         f"{error} in {describe(value)}.") from error
    return lambda param_name: any(p.search(param_name) for p in compiled)


def _checked_predicate(name, predicate, prim):
    """`predicate` (name -> bool), called on each parameter name once, in the constructor: an exception or
    an answer that is not a bool (a str, an array: its truth is not what the user meant) is an error naming
    the argument and the parameter."""
    def answer(param_name):
        try:
            result = predicate(param_name)
        except Exception as error:
            raise ValueError(f"For '{prim}', the predicate '{name}' raised {type(error).__name__} on parameter "
                             f"'{param_name}': {error}") from error
        if not isinstance(result, (bool, np.bool_)):
            raise TypeError(f"For '{prim}', the predicate '{name}' must return a bool for each parameter name, "
                            f"but for '{param_name}' it returned {describe(result)}.")
        return bool(result)
    return answer


def check_float(name, value, prim="Lamb"):
    """`value` must be a Python float (MindSpore rejects ints for beta1/beta2/eps), finite."""
    if not isinstance(value, float):
        raise TypeError(f"For '{prim}', the argument '{name}' must be float, but got {describe(value)}.")
    if not math.isfinite(value):
        raise ValueError(f"For '{prim}', the argument '{name}' must be finite, but got {value}.")
    return value


def check_beta(name, value, prim="Lamb"):
    """A float in (0, 1), also as float32 (float32 rounds 1 - 1e-9 to 1.0: the moment would never decay)."""
    check_float(name, value, prim)
    if not 0.0 < value < 1.0:
        raise ValueError(f"For '{prim}', the argument '{name}' must be in the open interval (0.0, 1.0), "
                         f"but got {value}.")
    if not 0.0 < as_float32(value) < 1.0:
        raise ValueError(f"For '{prim}', the argument '{name}' must be in the open interval (0.0, 1.0) as "
                         f"float32 sees it, but got {value}, which float32 rounds to {as_float32(value)}.")
    return value


EPS_MAX = 1.0


def check_eps(name, value, prim="Lamb"):
    """A float in (0, EPS_MAX] that float32 keeps > 0 (sqrt(0) + eps must not be 0: 0 / 0 is NaN). Above 1 it
    outweighs sqrt(v^) for every gradient below 1, and r = m^ / eps shrinks with it until r^2 underflows
    float32 in ||u|| (eps=1e30: ||u|| = 0, so q = 1 and w moves by lr * 1e-30 * m^): the update is erased."""
    check_float(name, value, prim)
    value = check_number(name, value, prim, normal=True)
    if value > EPS_MAX:
        raise ValueError(f"For '{prim}', the argument '{name}' must be at most {EPS_MAX} (a larger eps outweighs "
                         f"sqrt(v) and shrinks the update m / eps until float32 loses it; typical values are "
                         f"1e-8 to 1e-6), but got {value}.")
    return value


def check_positive_float(name, value, prim="Lamb"):
    check_float(name, value, prim)
    return check_number(name, value, prim)


def check_loss_scale(name, value, prim="Lamb"):
    """A number > 0 such that it and 1 / value are finite, normal float32 numbers."""
    value = check_number(name, value, prim, normal=True)
    if not FLOAT32_TINY <= as_float32(1.0 / value) <= FLOAT32_MAX:
        raise ValueError(f"For '{prim}', the argument '{name}' must have a reciprocal that is a normal float32 "
                         f"(between {1 / FLOAT32_MAX:.4g} and {1 / FLOAT32_TINY:.4g}), but got {value}.")
    return value


def check_max_grad_norm(name, value, prim="Lamb"):
    """None, or a number > 0 that is a normal float32."""
    return check_number(name, value, prim, allow_none=True, normal=True)


def _takes_one_input(cell):
    """Whether `cell` can be called with one positional input, the step (None when its signature is unknown)."""
    try:
        signature = inspect.signature(cell.construct)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(None)
    except TypeError:
        return False
    return True


def check_schedule(name, value, prim="Lamb"):
    """A Cell given as a learning rate or weight decay: the optimizer calls it with the step (a 0-D int32 Tensor)
    and uses the scalar it returns. It must take that one input; a Cell that is not a LearningRateSchedule must
    also hold no trainable Parameter (a layer such as nn.Dense(1, 1) would fail inside the step's graph with a
    MatMul error that names neither the argument nor the Cell)."""
    if _takes_one_input(value) is False:
        raise TypeError(f"For '{prim}', the argument '{name}' as a Cell is called with the step as its only input, "
                        f"but the construct of {type(value).__name__} has the signature "
                        f"{inspect.signature(value.construct)}; give it construct(self, global_step).")
    if not isinstance(value, LearningRateSchedule):
        layers = [p.name for p in value.trainable_params()]
        if layers:
            raise TypeError(f"For '{prim}', the argument '{name}' as a Cell must be a schedule of the step (a "
                            f"LearningRateSchedule, or a Cell whose construct(global_step) returns a scalar), but "
                            f"got {type(value).__name__}, a layer with trainable parameters {layers[:3]}.")
    return value


def check_weight_decay(name, value, prim="Lamb"):
    """float or int >= 0 (finite in float32), or a Cell called with the step (dynamic weight decay)."""
    if isinstance(value, Cell):
        return check_schedule(name, value, prim)
    if not is_number(value):
        raise TypeError(f"For '{prim}', the argument '{name}' must be float, int or Cell, "
                        f"but got {describe(value)}.")
    return check_number(name, value, prim, inclusive=True)


def _check_sequence_values(name, values, prim):
    """1-D float values of a learning-rate sequence: non-empty, finite in float32, >= 0."""
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"For '{prim}', the argument '{name}' must not be empty.")
    bad = np.flatnonzero(~np.isfinite(values.astype(np.float32)) | (values < 0))
    if bad.size:
        raise ValueError(f"For '{prim}', the argument '{name}' must hold finite numbers >= 0 (as float32), but "
                         f"element {int(bad[0])} is {values[bad[0]]}.")
    return values.astype(np.float32)


def _is_real(dtype):
    """An integer or floating NumPy dtype (not bool, not complex: a rate of True or 1+2j is a mistake)."""
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def check_learning_rate(name, value, prim="Lamb"):
    """float/int >= 0, Tensor or NumPy array of an int or float dtype (0-D: fixed, 1-D: per step), Iterable of
    numbers, or LearningRateSchedule (whose construct takes the step).

    Returned as a float, a 0-D float32 Tensor, a float32 NumPy array (a per-step sequence: Lamb holds its
    last value once the steps run past its end), or the schedule."""
    if isinstance(value, LearningRateSchedule):
        return check_schedule(name, value, prim)
    if isinstance(value, bool):
        raise TypeError(f"For '{prim}', the argument '{name}' must be int, float, Tensor, Iterable or "
                        f"LearningRateSchedule, but got {describe(value)}.")
    if isinstance(value, np.generic) and _is_real(value.dtype):
        value = value.item()            # a NumPy scalar (np.float32(0.1)) as the Python number it holds
    if is_number(value):
        return check_number(name, value, prim, inclusive=True)
    if isinstance(value, (Tensor, np.ndarray)):
        kind = "Tensor" if isinstance(value, Tensor) else "NumPy array"
        array = value.asnumpy() if isinstance(value, Tensor) else value
        if not _is_real(array.dtype):
            raise TypeError(f"For '{prim}', the argument '{name}' as a {kind} must hold real numbers (an int or "
                            f"float dtype), but got a {kind} of dtype {value.dtype}.")
        if array.ndim > 1:
            raise ValueError(f"For '{prim}', the argument '{name}' must be a 0-D or 1-D {kind}, "
                             f"but got a {kind} of shape {tuple(array.shape)}.")
        values = _check_sequence_values(name, array, prim)
        return Tensor(values[0], mstype.float32) if array.ndim == 0 else values
    if isinstance(value, Cell):
        raise TypeError(f"For '{prim}', the argument '{name}' must be a LearningRateSchedule when it is a Cell, "
                        f"but got {describe(value)}.")
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, dict)):
        values = [v.item() if isinstance(v, np.generic) and _is_real(v.dtype) else v for v in value]
        if not values or not all(is_number(v) for v in values):
            raise TypeError(f"For '{prim}', the argument '{name}' as an Iterable must hold numbers, "
                            f"but got {describe(values)}.")
        return _check_sequence_values(name, values, prim)
    raise TypeError(f"For '{prim}', the argument '{name}' must be int, float, Tensor, Iterable or "
                    f"LearningRateSchedule, but got {describe(value)}.")


def _largest_fixed(value):
    """The largest value a fixed learning rate or weight decay takes (a number, Tensor or sequence), or None
    for a Cell (checked at every step instead)."""
    if isinstance(value, Cell):
        return None
    return float(np.max(value.asnumpy() if isinstance(value, Tensor) else np.asarray(value, np.float64)))


def check_decay_outside(learning_rate, weight_decay, params, prim="Lamb"):
    """With the weight decay outside the trust ratio, w = (1 - lr lambda) w - lr q u: lr lambda > 1 flips the
    weights' sign every step. Fixed values are checked here, for each group; Cells at every step."""
    groups = params if isinstance(params[0], dict) else [{}]
    for index, group in enumerate(groups):
        if "order_params" in group:
            continue
        lr, wd = _largest_fixed(group.get("lr", learning_rate)), _largest_fixed(group.get("weight_decay", weight_decay))
        if lr is not None and wd is not None and lr * wd > 1.0:
            where = f" (group {index})" if len(groups) > 1 or groups[0] else ""
            raise ValueError(f"For '{prim}', weight_decay_mode='decoupled_outside' needs learning_rate * "
                             f"weight_decay <= 1{where} (each step multiplies the weights by 1 - lr * weight_decay), "
                             f"but got learning_rate {lr} and weight_decay {wd}.")


def check_trust_ratio_clip(value, prim="Lamb"):
    """None, or (lo, hi) with 0 <= lo <= hi, lo finite in float32 (hi may be inf: no upper bound) and hi a
    normal float32 > 0 (q <= 0 would leave every weight where it is while the steps count as applied)."""
    if value is None:
        return None
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(is_number(v) for v in value)):
        raise TypeError(f"For '{prim}', the argument 'trust_ratio_clip' must be None or a pair (lo, hi) "
                        f"of numbers, but got {describe(value)}.")
    lo, hi = float(value[0]), float(value[1])
    if not (0.0 <= lo <= hi) or math.isnan(hi) or as_float32(lo) > FLOAT32_MAX:
        raise ValueError(f"For '{prim}', the argument 'trust_ratio_clip' must satisfy 0 <= lo <= hi with lo "
                         f"finite in float32, but got {value}.")
    if as_float32(hi) < FLOAT32_TINY:
        raise ValueError(f"For '{prim}', the argument 'trust_ratio_clip' must have an upper bound hi of at least "
                         f"{FLOAT32_TINY:.4g} (the smallest normal float32): the trust ratio q is clipped to at "
                         f"most hi, and q = 0 never moves the weights; use None for no clip, but got {value}.")
    return lo, hi


def _check_bool(name, value, prim, what="group key"):
    if not isinstance(value, bool):
        raise TypeError(f"For '{prim}', the {what} '{name}' must be bool, but got {describe(value)}.")


def parameter_list(members, subject, prim, empty_detail=""):
    """`members` (an iterable) as a non-empty list of Parameters; `subject` names it in the errors."""
    members = list(members)
    if not members:
        raise ValueError(f"For '{prim}', {subject} must not be empty{empty_detail}.")
    for pos, member in enumerate(members):
        if not isinstance(member, Parameter):
            raise TypeError(f"For '{prim}', {subject} must hold only Parameters, "
                            f"but got {describe(member)} at index {pos}.")
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
        wrap = " (wrap it in a list: [param])" if isinstance(params, (Parameter, dict)) else ""
        raise TypeError(f"For '{prim}', the argument 'params' must be a list of Parameter or of dict{wrap}, "
                        f"but got {describe(params)}.")
    params = list(params)
    if not params:
        raise ValueError(f"For '{prim}', the argument 'params' must not be empty, but got [].")
    for index, item in enumerate(params):
        if not isinstance(item, (Parameter, dict)):
            raise TypeError(f"For '{prim}', each element of 'params' must be a Parameter or a dict, "
                            f"but got {describe(item)} at index {index}.")
    if not all(isinstance(item, dict) for item in params):
        if any(isinstance(item, dict) for item in params):
            raise TypeError(f"For '{prim}', the argument 'params' must hold only Parameters or only dicts, "
                            f"but got a mix: {[type(item).__name__ for item in params]}.")
        check_unique(params, prim)
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
            wrap = " (wrap it in a list: [param])" if isinstance(members, Parameter) else ""
            raise TypeError(f"For '{prim}', 'params' of group {index} must be a list of Parameter{wrap}, "
                            f"but got {describe(members)}.")
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
    check_unique(grouped, prim)
    if order is not None:
        _check_order(order, grouped, prim)
    return groups


def check_unique(params, prim):
    """Each parameter once, and named on one line (the sharded state records the names one per line)."""
    seen = set()
    for param in params:
        if param.name and param.name.splitlines() != [param.name]:
            raise ValueError(f"For '{prim}', the parameter name {param.name!r} holds a line break, which "
                             f"checkpoints of the sharded state cannot record; rename the parameter.")
        if param.name in seen:
            raise ValueError(f"For '{prim}', the parameter '{param.name}' appears more than once in 'params'.")
        seen.add(param.name)


def _check_order(order, grouped, prim):
    if isinstance(order, Parameter) or not isinstance(order, Iterable):
        raise TypeError(f"For '{prim}', 'order_params' must be a list of Parameter, but got {describe(order)}.")
    order = list(order)
    for pos, member in enumerate(order):
        if not isinstance(member, Parameter):
            raise TypeError(f"For '{prim}', 'order_params' must hold only Parameters, "
                            f"but got {describe(member)} at index {pos}.")
    names = {p.name for p in grouped}
    listed = [p.name for p in order]
    missing = [name for name in listed if name not in names]
    if missing:
        raise ValueError(f"For '{prim}', 'order_params' lists parameter(s) {missing} that are in no group.")
    if len(set(listed)) != len(listed) or set(listed) != names:
        raise ValueError(f"For '{prim}', 'order_params' must list every grouped parameter exactly once; "
                         f"got {len(listed)} entries for {len(names)} grouped parameters.")


def check_param_dtypes(params, device_target, prim="Lamb"):
    """Floating parameters only; bfloat16 not on CPU (MindSpore 2.10's CPU Assign has no bfloat16 kernel) nor on
    GPU (its GPU plugin has no bfloat16 kernel)."""
    for param in params:
        if 0 in param.shape:
            raise ValueError(f"For '{prim}', parameter '{param.name}' has no element (shape {param.shape}); "
                             f"leave it out of the optimizer.")
        if param.dtype not in (mstype.float16, mstype.float32, mstype.float64, mstype.bfloat16):
            raise TypeError(f"For '{prim}', parameter '{param.name}' must be float16, float32, float64 or "
                            f"bfloat16, but got {param.dtype}.")
        if param.dtype == mstype.bfloat16 and device_target in ("CPU", "GPU"):
            why = ("MindSpore 2.10 cannot write on CPU (its CPU Assign kernel has no bfloat16)"
                   if device_target == "CPU" else
                   "MindSpore 2.10's GPU plugin has no kernel for (its CUDA library has no bfloat16 kernel, "
                   "docs/operators.md)")
            raise TypeError(f"For '{prim}', parameter '{param.name}' is bfloat16, which {why}; use float16 or "
                            f"float32 on {device_target}, bfloat16 on Ascend.")


def check_dtype(name, value, dtypes, prim="Lamb"):
    """None (the first of `dtypes`), one of `dtypes` (MindSpore dtypes) or its name (``"bfloat16"``); returned
    as the MindSpore dtype."""
    if value is None:
        return dtypes[0]
    names = {str(dtype).lower(): dtype for dtype in dtypes}
    if isinstance(value, str) and value.strip().lower() in names:
        return names[value.strip().lower()]
    if isinstance(value, mstype.Type) and value in dtypes:
        return value
    raise (TypeError if not isinstance(value, (str, mstype.Type)) else ValueError)(
        f"For '{prim}', the argument '{name}' must be None or one of {list(names)} (a str or a mindspore dtype), "
        f"but got {describe(value)}.")
