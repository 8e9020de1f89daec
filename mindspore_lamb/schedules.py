"""The BERT learning-rate schedule: linear warm-up, then polynomial decay."""
from typing import Union

import numpy as np

import mindspore.common.dtype as mstype
from mindspore import Parameter, Tensor
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.ops import functional as F

from . import _ops
from . import _validation as V

_NAME = "WarmupPolynomialDecayLR"


class HeldSequenceLR(LearningRateSchedule):
    """A learning rate per step from a sequence (a 1-D Tensor or an Iterable): element ``s`` at step ``s``,
    and the last element at every step past the end (MindSpore's own optimizers fail there with an index
    error about ``Gather``). Lamb builds it from a sequence `learning_rate`; the values live in the
    Parameter `name` (``learning_rate``, as in MindSpore's optimizers), so checkpoints keep them."""

    def __init__(self, values, name="learning_rate"):
        super().__init__()
        values = np.asarray(values, np.float32).reshape(-1)
        self.learning_rate = Parameter(Tensor(values), name)
        self.last = Tensor(values.size - 1, mstype.int32)

    def construct(self, global_step):
        index = F.minimum(_ops.cast(global_step, mstype.int32), self.last)
        return _ops.gather(self.learning_rate, index, 0)


def as_schedule(learning_rate, name):
    """A checked learning rate (see _validation.check_learning_rate) as the optimizer base class takes it:
    a per-step sequence becomes a HeldSequenceLR."""
    if isinstance(learning_rate, np.ndarray):
        return HeldSequenceLR(learning_rate, name)
    return learning_rate


class WarmupPolynomialDecayLR(LearningRateSchedule):
    r"""The BERT pretraining schedule: linear warm-up, then polynomial decay.

    The same function as MindSpore model-zoo BERT's ``BertLearningRate`` (and Google's BERT
    ``create_optimizer``): the polynomial decay runs over the *global* step from 0 (it does not
    restart after the warm-up), and the warm-up ramp replaces it for the first `warmup_steps` steps.
    For step :math:`s` (0-based, the optimizer's ``global_step`` before the update):

    .. math::
        \text{lr}(s) = \begin{cases}
        \text{learning\_rate} \cdot s / \text{warmup\_steps} & s < \text{warmup\_steps} \\
        (\text{learning\_rate} - \text{end\_learning\_rate})
        (1 - \min(s, \text{decay\_steps}) / \text{decay\_steps})^{\text{power}}
        + \text{end\_learning\_rate} & s \ge \text{warmup\_steps}
        \end{cases}

    So:

    - at step 0 the rate is ``0.0`` when ``warmup_steps > 0`` (the first update is a no-op for the
      weights; the moments still move), and `learning_rate` when ``warmup_steps == 0``;
    - the last warm-up step ``warmup_steps - 1`` has ``learning_rate * (warmup_steps - 1) / warmup_steps``;
      at the boundary ``s == warmup_steps`` the decay branch takes over with
      ``(learning_rate - end_learning_rate) * (1 - warmup_steps / decay_steps) ** power + end_learning_rate``
      (slightly below `learning_rate`, as in BERT);
    - at and after ``s == decay_steps`` the rate stays at `end_learning_rate` forever.

    Args:
        learning_rate (Union[float, int]): peak rate, > 0.
        end_learning_rate (Union[float, int]): final rate, >= 0.
        warmup_steps (int): length of the linear warm-up, >= 0 and <= `decay_steps`; 0 disables it.
        decay_steps (int): step at which the decay reaches `end_learning_rate`, > 0 (in BERT, the
            total number of training steps).
        power (Union[float, int]): exponent of the decay, > 0; 1.0 is linear decay. Default: ``1.0``.

    Inputs:
        - **global_step** (Tensor) - the step :math:`s`, a scalar int or float Tensor.

    Outputs:
        Tensor, a float32 scalar: the learning rate at `global_step`.

    Raises:
        TypeError: If `learning_rate`, `end_learning_rate` or `power` is not a float or int.
        TypeError: If `warmup_steps` or `decay_steps` is not an int.
        ValueError: If `learning_rate` or `power` is not > 0, or `end_learning_rate` is < 0.
        ValueError: If `decay_steps` is not > 0, `warmup_steps` is < 0, or `warmup_steps` > `decay_steps`.

    Supported Platforms:
        ``CPU`` ``GPU`` ``Ascend``: a few scalar arithmetic operators per step (tested on CPU).

    Examples:
        >>> import mindspore as ms
        >>> from mindspore import nn
        >>> from mindspore_lamb import Lamb, WarmupPolynomialDecayLR
        >>> lr = WarmupPolynomialDecayLR(1e-3, 0.0, warmup_steps=100, decay_steps=1000, power=1.0)
        >>> round(float(lr(ms.Tensor(50, ms.int32))), 8)  # 1e-3 * 50 / 100
        0.0005
        >>> opt = Lamb(nn.Dense(4, 2).trainable_params(), learning_rate=lr, weight_decay=0.01)
    """

    def __init__(self, learning_rate: Union[float, int], end_learning_rate: Union[float, int], warmup_steps: int,
                 decay_steps: int, power: Union[float, int] = 1.0) -> None:
        super().__init__()
        learning_rate = V.check_number("learning_rate", learning_rate, _NAME)
        end_learning_rate = V.check_number("end_learning_rate", end_learning_rate, _NAME, inclusive=True)
        warmup_steps = V.check_int("warmup_steps", warmup_steps, _NAME, low=0)
        decay_steps = V.check_int("decay_steps", decay_steps, _NAME, low=1)
        power = V.check_number("power", power, _NAME)
        if warmup_steps > decay_steps:
            raise ValueError(f"For '{_NAME}', the argument 'warmup_steps' must be <= 'decay_steps' "
                             f"({decay_steps}), but got {warmup_steps}.")
        self.learning_rate = learning_rate
        self.end_learning_rate = end_learning_rate
        self.warmup_steps = warmup_steps
        self.decay_steps = decay_steps
        self.power = power
        self.use_warmup = warmup_steps > 0
        self.peak = Tensor(learning_rate, mstype.float32)
        self.end = Tensor(end_learning_rate, mstype.float32)
        self.diff = Tensor(learning_rate - end_learning_rate, mstype.float32)
        self.warmup = Tensor(float(max(warmup_steps, 1)), mstype.float32)
        self.decay = Tensor(float(decay_steps), mstype.float32)
        self.exponent = Tensor(power, mstype.float32)

    def construct(self, global_step):
        step = _ops.cast(global_step, mstype.float32)
        progress = F.minimum(step, self.decay) / self.decay
        lr = self.diff * F.pow(1.0 - progress, self.exponent) + self.end
        if self.use_warmup:
            lr = _ops.where(step < self.warmup, self.peak * step / self.warmup, lr)
        return lr

    def extend_repr(self):
        return (f"learning_rate={self.learning_rate}, end_learning_rate={self.end_learning_rate}, "
                f"warmup_steps={self.warmup_steps}, decay_steps={self.decay_steps}, power={self.power}")
