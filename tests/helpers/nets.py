"""Small networks and a real mindspore.dataset pipeline shared by the integration tests."""
import numpy as np

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn


class SmallClassifier(nn.Cell):
    """Dense -> ReLU -> LayerNorm (gamma/beta: not decayed) -> Dense."""

    def __init__(self, n_in=8, hidden=16, n_out=3):
        super().__init__()
        self.fc1 = nn.Dense(n_in, hidden)
        self.relu = nn.ReLU()
        self.norm = nn.LayerNorm((hidden,))
        self.fc2 = nn.Dense(hidden, n_out)

    def construct(self, x):
        return self.fc2(self.norm(self.relu(self.fc1(x))))


def make_net(seed=0):
    """A SmallClassifier whose weights depend only on `seed`."""
    net = SmallClassifier()
    rng = np.random.default_rng(seed)
    for param in net.trainable_params():
        if "norm" not in param.name:
            param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) * 0.3))
    return net


def make_data(n=256, seed=7):
    """A separable 3-class problem: labels from a fixed random linear map."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    labels = np.argmax(x @ rng.standard_normal((8, 3)), axis=1).astype(np.int32)
    return x, labels


def make_dataset(batch_size=32, n=256, seed=7):
    """A mindspore.dataset pipeline (GeneratorDataset over random-access numpy rows, batched, in order)."""
    x, labels = make_data(n, seed)
    dataset = ds.NumpySlicesDataset({"x": x, "label": labels}, shuffle=False)
    return dataset.batch(batch_size, drop_remainder=True)


def loss_fn():
    return nn.SoftmaxCrossEntropyWithLogits(sparse=True, reduction="mean")


def params_of(cell):
    """{name: float64 copy} of a cell's trainable parameters (asnumpy shares memory on CPU)."""
    return {p.name: p.asnumpy().astype(np.float64) for p in cell.trainable_params()}
