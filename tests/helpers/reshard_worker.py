"""Workers for tests/test_reshard.py: a ``Lamb(shard_state=True)`` run checkpointed on two workers and
resumed on another number of workers.

usage (under msrun):
    reshard_worker.py OUT_DIR train          two workers: STEPS_BEFORE steps, save OUT_DIR/rank<r>.ckpt, then
                                             STEPS_AFTER more (the unchanged run): OUT_DIR/unchanged_rank<r>.npz
    reshard_worker.py OUT_DIR resume CKPT    any number N of workers: load cut(CKPT) (CKPT: the merged
                                             checkpoint), train the STEPS_AFTER steps: OUT_DIR/resumed<N>_rank<r>.npz

Every step has the same global batch whatever the number of workers (GLOBAL_BATCH rows, worker r of N takes
the r-th of N equal slices), so a resumed run sees the data of the unchanged one. The model is the ``model``
case of dist_worker.py (parameter groups, a polynomial-decay learning rate over the STEPS_BEFORE +
STEPS_AFTER steps, NVLAMB ``max_grad_norm``), trained by calling its train cell once per batch.
"""
import os
import sys

import numpy as np

import mindspore as ms

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_worker as W  # noqa: E402
from nets import make_data  # noqa: E402
from mindspore_lamb import sharding  # noqa: E402

GLOBAL_BATCH = 12     # rows per step over all workers: 6 on each of 2, 4 on each of 3, 12 in one process
STEPS_BEFORE = 3      # steps before the checkpoint
STEPS_AFTER = 3       # steps after it
assert STEPS_BEFORE + STEPS_AFTER == W.STEPS    # the learning rate decays over the whole run


def batches(rank, world, start, stop):
    """Worker `rank` of `world`'s batches (x, labels) of steps start..stop-1."""
    x, labels = make_data(n=GLOBAL_BATCH * W.STEPS, seed=11)
    rows = GLOBAL_BATCH // world
    firsts = [step * GLOBAL_BATCH + rank * rows for step in range(start, stop)]
    return [(x[i:i + rows], labels[i:i + rows]) for i in firsts]


def build(shard_state):
    """The train cell (Model's, built with the optimizer) and its Lamb."""
    model, opt = W.build_model_case(shard_state)
    cell = model.train_network
    cell.set_train()
    return cell, opt


def train(cell, steps):
    for x, labels in steps:
        cell(ms.Tensor(x), ms.Tensor(labels))


def main():
    out_dir, command = sys.argv[1], sys.argv[2]
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    cell, opt = build(shard_state=True)
    if command == "train":
        train(cell, batches(rank, world, 0, STEPS_BEFORE))
        ms.save_checkpoint(cell, os.path.join(out_dir, f"rank{rank}.ckpt"))
        name = "unchanged"
    else:
        # what a user runs on each worker of the new run
        not_loaded, _ = ms.load_param_into_net(cell, sharding.cut(ms.load_checkpoint(sys.argv[3]), opt))
        assert not_loaded == [], not_loaded
        assert int(opt.global_step.asnumpy()[0]) == STEPS_BEFORE
        name = f"resumed{world}"
    train(cell, batches(rank, world, STEPS_BEFORE, W.STEPS))
    np.savez(os.path.join(out_dir, f"{name}_rank{rank}.npz"), **W.state(cell, {}))
    print(f"reshard_worker {command} rank {rank}/{world} done", flush=True)


if __name__ == "__main__":
    main()
