"""One compiled training graph per (optimizer, batch size), reused for every learning rate and seed.

The peak learning rate lives in a Parameter inside the schedule, so changing it (and restoring the
weights and optimizer state between runs) needs no recompilation.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore import dataset as ds
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.train import Model

from mindspore_lamb import Lamb, WarmupPolynomialDecayLR

# nn.LARS is left out: its LARSUpdate kernel does not exist on CPU (MindSpore 2.10).
OPTIMIZERS = ("lamb", "adamw", "momentum")


def _write(param, value):
    """Overwrite a Parameter in place. (``set_data`` swaps its tensor, which a graph compiled with
    mindspore_lamb.Lamb's inner jit then no longer sees; an Assign writes into the same memory.)"""
    ops.assign(param, Tensor(np.asarray(value, dtype=param.asnumpy().dtype).reshape(param.shape)))


class MLP(nn.SequentialCell):
    def __init__(self, n_in, n_out, hidden=256, depth=2):
        layers, width = [], n_in
        for _ in range(depth):
            layers += [nn.Dense(width, hidden), nn.ReLU()]
            width = hidden
        super().__init__(layers + [nn.Dense(width, n_out)])


class PeakScaled(LearningRateSchedule):
    """``peak * schedule(step)``, with `peak` a Parameter that can change between runs."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.peak = Parameter(Tensor(1.0, ms.float32), name="peak_lr", requires_grad=False)

    def construct(self, global_step):
        return self.peak * self.schedule(global_step)


def make_optimizer(name, params, lr, weight_decay):
    if name == "lamb":
        return Lamb(params, lr, weight_decay=weight_decay)
    if name == "adamw":
        return nn.AdamWeightDecay(params, lr, eps=1e-6, weight_decay=weight_decay)
    if name == "momentum":
        return nn.Momentum(params, lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(name)


class Group:
    """Everything that depends only on (optimizer, batch size, step budget): built and compiled once."""

    def __init__(self, opt, batch_size, steps, n_in, n_out, weight_decay, warmup_frac=0.1):
        self.opt, self.batch_size, self.steps = opt, batch_size, steps
        self.net = MLP(n_in, n_out)
        warmup = max(1, round(warmup_frac * steps))
        self.lr = PeakScaled(WarmupPolynomialDecayLR(1.0, 0.0, warmup, steps, power=1.0))
        self.optimizer = make_optimizer(opt, self.net.trainable_params(), self.lr, weight_decay)
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")
        self.model = Model(self.net, self.loss, self.optimizer)
        self.weights = list(self.net.trainable_params())
        # Optimizer state (moments, global_step, ...) as built: restored before every run.
        own = {id(p) for p in self.weights} | {id(self.lr.peak)}
        self.state = [(p, p.asnumpy().copy()) for _, p in self.optimizer.parameters_and_names()
                      if id(p) not in own]

    def _reset(self, seed, peak_lr):
        rng = np.random.default_rng(seed)
        for p in self.weights:  # He-normal weights, zero biases
            shape = p.shape
            w = rng.normal(0.0, math.sqrt(2.0 / shape[1]), shape) if len(shape) == 2 else np.zeros(shape)
            _write(p, w)
        for p, v in self.state:
            _write(p, v)
        _write(self.lr.peak, np.float32(peak_lr))

    def batches(self, x, y, seed):
        """`steps` batches drawn without replacement, epoch after epoch, for this seed."""
        rng = np.random.default_rng(seed + 1000)
        need = self.steps * self.batch_size
        order = np.concatenate([rng.permutation(len(y)) for _ in range(-(-need // len(y)))])[:need]
        order = order.reshape(self.steps, self.batch_size)
        return ds.NumpySlicesDataset({"x": x[order], "y": y[order]}, shuffle=False)

    def run(self, train, seed, peak_lr):
        self._reset(seed, peak_lr)
        self.model.train(1, self.batches(*train, seed), dataset_sink_mode=True)

    def accuracy(self, x, y):
        logits = self.net(Tensor(x)).asnumpy()
        ok = np.isfinite(logits).all()
        return float((logits.argmax(1) == y).mean()) if ok else float("nan")
