"""The training process that tools/kill_resume.py and tests/test_kill_resume.py kill with SIGKILL and resume.

usage: kill_resume_worker.py OUT_DIR [--resume] [--distributed] [--shard_state] [--optim_bits 8]

``Model.train`` of a SmallClassifier (tests/helpers/nets.py, hidden width WIDTH so that a checkpoint takes a
few milliseconds to write) with :class:`mindspore_lamb.LossScaleTrainStep` (dynamic loss scale growing every
3 steps, gradient clipping, 2 accumulation steps) and :class:`mindspore_lamb.Lamb` (two parameter groups,
warmup + polynomial decay), on a dataset reshuffled every epoch, with a random perturbation drawn from (epoch, row
id) as the BERT example's dynamic masks. Checkpoints every EVERY steps (odd: some land
between the two micro-batches of an accumulated step) with :class:`mindspore_lamb.resume.StepCheckpoint`;
``--resume`` follows docs/resume.md. Under msrun (``--distributed``), each worker trains on its shard;
``--shard_state`` keeps half of the moments on each worker, which then checkpoints and resumes its own piece;
``--optim_bits 8`` keeps the moments of the tensors of 64 elements or more in 8 bits.

Writes OUT_DIR/ckpt/rank<r>/ (checkpoints; rank 0 only unless --shard_state), OUT_DIR/loss_rank<r>.jsonl
(global step, loss, scale: one line per step, continued on resume) and prints ``resumed from step S``.
"""
import argparse
import json
import os
import sys

import numpy as np

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn
from mindspore.train import Callback, Model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nets import SmallClassifier, loss_fn, make_data  # noqa: E402
from mindspore_lamb import Lamb, LossScaleTrainStep, WarmupPolynomialDecayLR  # noqa: E402
from mindspore_lamb.resume import GlobalStep, StepCheckpoint, resume  # noqa: E402

WIDTH = 1 << 15     # hidden units: a 7 MiB checkpoint (weights, moments, accumulators)
BATCH = 16          # per worker and step
EPOCHS = 5
STEPS_PER_EPOCH = 16
EVERY = 5           # steps between checkpoints
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
SEED = 5


def build(shard_state, optim_bits=32):
    net = SmallClassifier(hidden=WIDTH)
    rng = np.random.default_rng(SEED)
    for param in net.trainable_params():
        if "norm" not in param.name:
            param.set_data(ms.Tensor(rng.standard_normal(param.shape).astype(np.float32) / np.sqrt(param.shape[-1])))
    params = net.trainable_params()
    groups = [{"params": [p for p in params if "weight" in p.name and "norm" not in p.name], "weight_decay": 0.01},
              {"params": [p for p in params if "weight" not in p.name or "norm" in p.name]}]
    steps = TOTAL_STEPS // 2
    opt = Lamb(groups, WarmupPolynomialDecayLR(0.02, 0.0, warmup_steps=3, decay_steps=steps, power=1.0),
               shard_state=shard_state, optim_bits=optim_bits, min_8bit_size=64)
    return LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), opt, init_scale=2.0 ** 10, scale_window=3,
                              max_grad_norm=1.0, accumulation_steps=2)


def perturb(x, labels, rows, batch_info):
    """Noise drawn from (epoch, row id) alone, as the BERT example's dynamic masks: what set_init_step restores.
    (A stateful RNG would restart on resume; BatchInfo.get_batch_num() restarts at 0 in the epoch a resumed
    GeneratorDataset skips into.)"""
    epoch = batch_info.get_epoch_num()
    noise = [np.random.default_rng([SEED, epoch, int(row)]).standard_normal(xi.shape).astype(np.float32)
             for xi, row in zip(x, rows)]
    return [xi + 0.1 * n for xi, n in zip(x, noise)], labels


def dataset(world, rank):
    x, labels = make_data(n=world * BATCH * STEPS_PER_EPOCH, seed=11)
    rows = np.arange(len(x), dtype=np.int64)
    data = ds.NumpySlicesDataset({"x": x, "label": labels, "row": rows}, shuffle=True, num_shards=world,
                                 shard_id=rank)
    return data.batch(BATCH, drop_remainder=True, per_batch_map=perturb, input_columns=["x", "label", "row"],
                      output_columns=["x", "label"])


class LossLog(Callback):
    """One JSON line per step (global step, loss, loss scale); drops lines beyond `initial_step` (the steps
    the resumed run does again) and a torn last line."""

    def __init__(self, path, initial_step):
        super().__init__()
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if record["step"] > initial_step:
                break
            kept.append(line + "\n")
        with open(path, "w") as f:
            f.writelines(kept)
        self.path = path

    def on_train_step_end(self, run_context):
        cb = run_context.original_args()
        loss, _, scale = cb.net_outputs
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": cb.cur_step_num, "loss": float(loss.asnumpy()),
                                "scale": float(scale.asnumpy())}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--shard_state", action="store_true")
    p.add_argument("--optim_bits", type=int, default=32)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(SEED)
    world, rank = 1, 0
    if args.distributed:
        from mindspore.communication import get_group_size, get_rank, init
        init()
        ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
        world, rank = get_group_size(), get_rank()
    cell = build(args.shard_state, args.optim_bits)
    data = dataset(world, rank)
    # one checkpoint directory per worker that owns state; without shard_state rank 0's serves all
    dirs = [os.path.join(args.out_dir, "ckpt", f"rank{r}") for r in range(world if args.shard_state else 1)]
    own = dirs[rank] if args.shard_state else dirs[0]
    step = 0
    if args.resume:
        step = resume(cell, own, "ckpt", data, peers=[d for d in dirs if d != own])
        print(f"resumed from step {step}", flush=True)
    owner = rank == 0 or args.shard_state
    callbacks = [StepCheckpoint(own, "ckpt", EVERY, initial_step=step) if owner else GlobalStep(step),
                 LossLog(os.path.join(args.out_dir, f"loss_rank{rank}.jsonl"), step)]
    if step < TOTAL_STEPS:
        Model(cell).train(EPOCHS, data, callbacks=callbacks, dataset_sink_mode=False,
                          initial_epoch=step // STEPS_PER_EPOCH)
    print("done", flush=True)


if __name__ == "__main__":
    main()
