"""BERT-style parameter groups: no weight decay for LayerNorm and bias parameters."""
from collections.abc import Iterable
from typing import List, Optional, Sequence, Union

from mindspore import Parameter
from mindspore.nn import Cell

from . import _validation as V
from ._validation import describe

_NAME = "bert_param_groups"
# MindSpore's nn.LayerNorm (and nn.BatchNorm*) name their scale and shift `<cell>.gamma` and `<cell>.beta`,
# so "layernorm" must also match those when the cell attribute is not itself called "layernorm".
_KEYWORD_LEAF_ALIASES = {"layernorm": ("gamma", "beta")}


def _check_keywords(keywords):
    if isinstance(keywords, (str, bytes)) or not isinstance(keywords, Iterable):
        raise TypeError(f"For '{_NAME}', the argument 'no_decay_keywords' must be a tuple or list of str, "
                        f"but got {describe(keywords)}.")
    keywords = tuple(keywords)
    for keyword in keywords:
        if not isinstance(keyword, str) or not keyword:
            raise TypeError(f"For '{_NAME}', the argument 'no_decay_keywords' must hold non-empty str, "
                            f"but got {describe(keyword)} in {keywords!r}.")
    return tuple(keyword.lower() for keyword in keywords)


def _check_params(params):
    if isinstance(params, Cell):
        return list(params.trainable_params())
    if isinstance(params, (Parameter, dict, str)) or not isinstance(params, Iterable):
        raise TypeError(f"For '{_NAME}', the argument 'params' must be a Cell or a list of Parameter, "
                        f"but got {describe(params)}.")
    params = V.parameter_list(params, "the argument 'params'", _NAME, empty_detail=", but got []")
    V.check_unique(params, _NAME)
    return params


def is_no_decay(name: str, no_decay_keywords: Sequence[str] = ("layernorm", "bias")) -> bool:
    """Whether the parameter called `name` is excluded from weight decay.

    True when the lower-cased name contains one of the (lower-cased) keywords, or, when
    ``"layernorm"`` is a keyword, when the last dotted component of the name is ``gamma`` or
    ``beta`` (MindSpore's LayerNorm parameter names).
    """
    keywords = _check_keywords(no_decay_keywords)
    lowered = name.lower()
    leaf = lowered.rsplit(".", 1)[-1]
    for keyword in keywords:
        if keyword in lowered or leaf in _KEYWORD_LEAF_ALIASES.get(keyword, ()):
            return True
    return False


def bert_param_groups(params: Union[Cell, List[Parameter]], weight_decay: Union[float, int, Cell],
                      no_decay_keywords: Sequence[str] = ("layernorm", "bias"), lr: Optional[object] = None) -> List[dict]:
    """Parameter groups for BERT pretraining: weight decay for all but LayerNorm and bias parameters.

    A parameter is *not* decayed when its name, lower-cased, contains one of `no_decay_keywords`
    (lower-cased; a substring match, as model-zoo BERT's ``'layernorm' not in x.name.lower()``), or,
    when ``"layernorm"`` is among the keywords, when the last dotted component of its name is ``gamma``
    or ``beta`` (how ``nn.LayerNorm`` names its parameters, whatever the attribute is called).

    Args:
        params (Union[Cell, list[Parameter]]): the parameters, in update order; a Cell gives its
            ``trainable_params()``.
        weight_decay (Union[float, int, Cell]): weight decay of the decayed group, >= 0, or a Cell
            called with the step.
        no_decay_keywords (Union[tuple[str], list[str]]): name fragments of the parameters without
            weight decay. Default: ``("layernorm", "bias")``.
        lr (Union[float, int, Tensor, Iterable, LearningRateSchedule]): if given, set as ``lr`` of
            both groups; otherwise the groups use the optimizer's `learning_rate`. Default: ``None``.

    Inputs:
        Not a Cell: a plain function.

    Outputs:
        list[dict], for :class:`mindspore_lamb.Lamb` (or any ``nn.Optimizer``): ``{'params': decayed,
        'weight_decay': weight_decay}``, ``{'params': not_decayed, 'weight_decay': 0.0}`` (each with
        ``'lr'`` when `lr` is given; a group with no parameter is left out), then
        ``{'order_params': params}`` so the update order stays that of `params`.

    Raises:
        TypeError: If `params` is neither a Cell nor a list of Parameter.
        ValueError: If `params` is empty or holds a parameter twice.
        TypeError: If `weight_decay` is neither float, int nor Cell, or `lr` has an unsupported type.
        ValueError: If `weight_decay` is < 0, or `lr` is a negative number.
        TypeError: If `no_decay_keywords` is a str or holds anything but non-empty str.

    Supported Platforms:
        ``CPU`` ``GPU`` ``Ascend`` (a plain Python function: no device code).

    Examples:
        >>> from mindspore import nn
        >>> from mindspore_lamb import Lamb, bert_param_groups
        >>> net = nn.SequentialCell([nn.Dense(4, 4), nn.LayerNorm((4,))])
        >>> groups = bert_param_groups(net.trainable_params(), weight_decay=0.01)
        >>> [p.name for p in groups[0]["params"]], [p.name for p in groups[1]["params"]]
        (['0.weight'], ['0.bias', '1.gamma', '1.beta'])
        >>> opt = Lamb(groups, learning_rate=1e-3)
    """
    params = _check_params(params)
    weight_decay = V.check_weight_decay("weight_decay", weight_decay, _NAME)
    keywords = _check_keywords(no_decay_keywords)
    if lr is not None:
        lr = V.check_learning_rate("lr", lr, _NAME)

    decay, no_decay = [], []
    for param in params:
        (no_decay if is_no_decay(param.name, keywords) else decay).append(param)

    groups = []
    for members, decay_value in ((decay, weight_decay), (no_decay, 0.0)):
        if members:  # Lamb rejects empty groups
            group = {"params": members, "weight_decay": decay_value}
            if lr is not None:
                group["lr"] = lr
            groups.append(group)
    groups.append({"order_params": params})
    return groups
