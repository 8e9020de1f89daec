"""Smoke test of an installed wheel (run by .ci/run from outside the checkout, in a fresh environment):
the package imports from site-packages, takes the fused CPU path, and a step changes the weights."""
import os
import sys
import warnings

import numpy as np

import mindspore as ms
from mindspore import nn

warnings.simplefilter("error", RuntimeWarning)         # a silent fallback to the composite path fails here
ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
import mindspore_lamb  # noqa: E402
from mindspore_lamb import Lamb, LossScaleTrainStep  # noqa: E402

here = os.path.dirname(os.path.abspath(mindspore_lamb.__file__))
assert "site-packages" in here, f"mindspore_lamb imported from {here}, not from the installed wheel"
net = nn.Dense(8, 2)
opt = Lamb(net.trainable_params(), learning_rate=0.01, weight_decay=0.01)
assert opt.fused, "the installed wheel does not take the fused CPU path"
step = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=1024.0)
before = net.weight.asnumpy().copy()
x, y = ms.Tensor(np.ones((4, 8), np.float32)), ms.Tensor(np.zeros((4, 2), np.float32))
loss, overflow, _ = step(x, y)
assert not bool(overflow.asnumpy()) and not np.array_equal(net.weight.asnumpy(), before)
print(f"wheel smoke test passed: mindspore_lamb {mindspore_lamb.__version__} from {here}, fused path, "
      f"loss {float(loss.asnumpy()):.4f}", file=sys.stderr)
