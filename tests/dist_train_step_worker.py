"""Worker for tests/test_train_step.py::test_data_parallel_two_workers (run by msrun, 2 CPU workers).

Each rank trains on its half of every batch; on the second batch only rank 0 sees a NaN, so both
ranks must skip that step. `run(None)` is the single-process reference on the whole batches, with
that step left out.
"""
import json
import sys

import mindspore as ms
import numpy as np
from mindspore import nn

BATCHES, BATCH = 3, 8


def build():
    from mindspore_lamb import Lamb, LossScaleTrainStep
    rng = np.random.default_rng(0)
    net = nn.Dense(3, 2)
    net.weight.set_data(ms.Tensor(rng.uniform(0.2, 0.6, (2, 3)).astype(np.float32)))
    net.bias.set_data(ms.Tensor(rng.uniform(0.1, 0.3, (2,)).astype(np.float32)))
    opt = Lamb(net.trainable_params(), learning_rate=0.05, weight_decay=0.01)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=1024.0, max_grad_norm=0.5)
    xs = [rng.standard_normal((BATCH, 3)).astype(np.float32) for _ in range(BATCHES)]
    ts = [rng.standard_normal((BATCH, 2)).astype(np.float32) for _ in range(BATCHES)]
    return net, opt, cell, xs, ts


def run(rank, size=2):
    """rank None: one process, whole batches, the NaN step skipped by hand."""
    net, opt, cell, xs, ts = build()
    overflow = []
    for i, (x, t) in enumerate(zip(xs, ts)):
        if rank is None:
            if i == 1:
                continue
            part = slice(None)
        else:
            part = slice(rank * BATCH // size, (rank + 1) * BATCH // size)
        x = x[part].copy()
        if i == 1 and rank == 0:
            x[0, 0] = np.nan
        _, flag, _ = cell(ms.Tensor(x), ms.Tensor(ts[i][part]))
        overflow.append(bool(flag.asnumpy()))
    return dict(overflow=overflow, scale=cell.get_loss_scale(), step=opt.global_step.asnumpy().item(),
                w=net.weight.asnumpy().tolist(), b=net.bias.asnumpy().tolist())


if __name__ == "__main__":
    from mindspore.communication import get_group_size, get_rank, init
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    result = run(get_rank(), get_group_size())
    with open(f"{sys.argv[1]}/rank_{get_rank()}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
