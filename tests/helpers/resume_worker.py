"""A training process for the save / kill / resume test (run as a script by test_checkpoint.py).

usage: resume_worker.py OUT_DIR full STEPS
       resume_worker.py OUT_DIR crash SAVE_AT          (trains, saves at SAVE_AT, then dies with os._exit)
       resume_worker.py OUT_DIR resume CKPT STEPS      (fresh net with other weights, loads CKPT, trains on)
Writes OUT_DIR/<mode>.npz with every parameter of the train cell (network, moments, global_step).
"""
import os
import sys

import numpy as np

import mindspore as ms
from mindspore import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nets import loss_fn, make_data, make_net  # noqa: E402
from mindspore_lamb import Lamb  # noqa: E402


def build(seed):
    net = make_net(seed)
    params = net.trainable_params()
    groups = [{"params": [p for p in params if "weight" in p.name], "weight_decay": 0.01},
              {"params": [p for p in params if "weight" not in p.name], "lr": 0.005}]
    opt = Lamb(groups, learning_rate=nn.PolynomialDecayLR(0.02, 0.001, 12, 2.0))
    return nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn()), opt)


def batches():
    x, labels = make_data(n=32 * 12)
    for i in range(12):
        yield ms.Tensor(x[32 * i:32 * (i + 1)]), ms.Tensor(labels[32 * i:32 * (i + 1)])


def dump(cell, path):
    np.savez(path, **{p.name: p.asnumpy().copy() for p in cell.get_parameters()})


def main():
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "resume":
        cell = build(seed=99)                       # other initial weights: everything must come from the file
        not_loaded, _ = ms.load_param_into_net(cell, ms.load_checkpoint(sys.argv[3]))
        assert not not_loaded, not_loaded
        start, stop = int(cell.optimizer.global_step.asnumpy()[0]), int(sys.argv[4])
    else:
        cell = build(seed=0)
        start, stop = 0, int(sys.argv[3])
    for step, (x, labels) in enumerate(batches()):
        if step < start:
            continue
        if step == stop:
            break
        cell(x, labels)
        if mode == "crash" and step + 1 == stop:
            ms.save_checkpoint(cell, os.path.join(out, "mid.ckpt"))
            dump(cell, os.path.join(out, "crash.npz"))
            os._exit(3)                             # killed: no clean shutdown
    dump(cell, os.path.join(out, f"{mode}.npz"))


if __name__ == "__main__":
    main()
