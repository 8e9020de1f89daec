"""Data-parallel worker for tests/test_distributed.py, launched by msrun (two CPU workers).

usage: msrun --worker_num=2 --local_worker_num=2 --master_port=PORT --join=True dist_worker.py OUT_DIR [MODE [sharded]]

MODE is ``graph`` (default) or ``pynative``; ``sharded`` builds every Lamb with ``shard_state=True``
(each worker keeps half of the moments), writes ``<case>_sharded_rank<r>.npz`` instead, and saves the
``model`` case's train cell as ``model_sharded_rank<r>.ckpt`` too. Each worker trains two cases on its shard of the data
(``num_shards=world size``, ``shard_id=rank``) and writes ``OUT_DIR/<case>_rank<r>.npz`` with every
parameter of its train cell (network weights, LAMB moments, global_step, loss scale, ...) plus
``log.loss`` / ``log.overflow`` / ``log.scale`` per step:

* ``model``: ``Model.train`` with :class:`mindspore_lamb.Lamb` (parameter groups, NVLAMB ``max_grad_norm``);
* ``loss_scale``: :class:`mindspore_lamb.LossScaleTrainStep` (dynamic scale, global-norm clipping) with
  Lamb; at step ``OVERFLOW_STEP`` only rank 1 gets an Inf in its input, so only its local gradients
  overflow, and both ranks must skip that step.

Every Lamb stores its first moments in ``$LAMB_TEST_MU_DTYPE`` (``mu_dtype``; unset: float32); a sharded one
all-gathers buckets of ``$LAMB_TEST_SHARD_BUCKET`` elements (``shard_bucket_size``; unset: the default), and its
worker records the number of buckets as ``log.buckets``.

The builders below are imported by the test to run the single-process reference over the combined
batch (the union of the workers' batches of each step).
"""
import os
import sys

import numpy as np

import mindspore as ms
import mindspore.dataset as ds
from mindspore import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nets import loss_fn, make_data, make_net  # noqa: E402
from mindspore_lamb import Lamb, LossScaleTrainStep  # noqa: E402

WORLD = int(os.environ.get("LAMB_TEST_WORLD", "2"))   # workers (3 in the slow uneven-split test)


def mu_dtype():
    """Lamb's mu_dtype for this run (read when a case is built: the test sets it for workers and reference)."""
    return os.environ.get("LAMB_TEST_MU_DTYPE")


def bucket_args():
    """Lamb's shard_bucket_size for this run, as keyword arguments ({} where unset: the default)."""
    bucket = os.environ.get("LAMB_TEST_SHARD_BUCKET")
    return {"shard_bucket_size": int(bucket)} if bucket else {}


BATCH = 8             # per worker and step
STEPS = 6             # steps of each case
OVERFLOW_STEP = 2     # the loss_scale case's step where rank 1 (only) overflows
OVERFLOW_RANK = 1


def data(case, world=WORLD):
    """(x, labels) for all workers together: world * BATCH * STEPS rows."""
    x, labels = make_data(n=world * BATCH * STEPS, seed={"model": 11, "loss_scale": 12}[case])
    return x, labels


def shard(case, rank, world=WORLD):
    """The batches (x, labels) of one worker, as msrun workers see them: a sharded, batched dataset."""
    x, labels = data(case, world)
    dataset = ds.NumpySlicesDataset({"x": x, "label": labels}, shuffle=False, num_shards=world, shard_id=rank)
    dataset = dataset.batch(BATCH, drop_remainder=True)
    return [(row["x"], row["label"]) for row in dataset.create_dict_iterator(output_numpy=True)]


def with_overflow(batches, rank):
    """Put an Inf into the input of OVERFLOW_STEP on OVERFLOW_RANK (its gradients become NaN/Inf)."""
    if rank == OVERFLOW_RANK:
        x, labels = batches[OVERFLOW_STEP]
        x = x.copy()
        x[0, 0] = np.inf
        batches[OVERFLOW_STEP] = (x, labels)
    return batches


def combined(case, world=WORLD):
    """The single-process reference's batches: step k is the union of every worker's step-k batch."""
    shards = [shard(case, rank, world) for rank in range(world)]
    if case == "loss_scale":
        shards = [with_overflow(batches, rank) for rank, batches in enumerate(shards)]
    return [tuple(np.concatenate(parts) for parts in zip(*step)) for step in zip(*shards)]


def build_model_case(shard_state=False):
    """Model.train with Lamb: decayed weights / undecayed rest, a decaying lr, NVLAMB pre-normalisation."""
    net = make_net(seed=3)
    params = net.trainable_params()
    groups = [{"params": [p for p in params if "weight" in p.name and "norm" not in p.name], "weight_decay": 0.01},
              {"params": [p for p in params if "weight" not in p.name or "norm" in p.name]}]
    # max_grad_norm well below the gradient norm: the pre-normalisation must use the reduced gradients
    opt = Lamb(groups, learning_rate=nn.PolynomialDecayLR(0.05, 0.005, STEPS, 1.0), max_grad_norm=0.05,
               shard_state=shard_state, mu_dtype=mu_dtype(), **bucket_args())
    return ms.train.Model(net, loss_fn=loss_fn(), optimizer=opt), opt


def build_loss_scale_case(shard_state=False):
    """LossScaleTrainStep + Lamb: dynamic scale growing every 2 good steps, clipping by global norm."""
    net = make_net(seed=4)
    opt = Lamb(net.trainable_params(), learning_rate=0.05, weight_decay=0.01, shard_state=shard_state,
               mu_dtype=mu_dtype(), **bucket_args())
    return LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), opt, init_scale=2.0 ** 10, scale_window=2,
                              max_grad_norm=0.05)


def run_model_case(batches, shard_state=False):
    """Train the `model` case on `batches` with Model.train; returns (train cell, per-step log)."""
    model, _ = build_model_case(shard_state)
    x = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    dataset = ds.NumpySlicesDataset({"x": x, "label": labels}, shuffle=False).batch(len(batches[0][0]))
    losses = []

    class Record(ms.train.Callback):
        def on_train_step_end(self, run_context):
            losses.append(float(run_context.original_args().net_outputs.asnumpy()))

    model.train(1, dataset, callbacks=[Record()], dataset_sink_mode=False)
    return model.train_network, {"log.loss": np.array(losses)}


def run_loss_scale_case(batches, shard_state=False):
    """Call LossScaleTrainStep once per batch; returns (train cell, per-step log)."""
    step = build_loss_scale_case(shard_state)
    step.set_train()
    log = {"log.loss": [], "log.overflow": [], "log.scale": []}
    for x, labels in batches:
        loss, overflow, scale = step(ms.Tensor(x), ms.Tensor(labels))
        log["log.loss"].append(float(loss.asnumpy()))
        log["log.overflow"].append(bool(overflow.asnumpy()))
        log["log.scale"].append(float(scale.asnumpy()))
    return step, {k: np.array(v) for k, v in log.items()}


def state(cell, log):
    """{name: copy} of every parameter of the train cell (asnumpy shares memory on CPU; bfloat16 as float32,
    which NumPy files hold), plus the log."""
    out = {p.name: (p.float() if p.dtype == ms.bfloat16 else p).asnumpy().copy() for p in cell.get_parameters()}
    out.update(log)
    return out


def main():
    out_dir = sys.argv[1]
    mode = sys.argv[2] if len(sys.argv) > 2 else "graph"
    ms.set_context(mode={"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}[mode], device_target="CPU")
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    assert world == WORLD, f"expected {WORLD} workers, got {world}"

    sharded = len(sys.argv) > 3 and sys.argv[3] == "sharded"
    tag = "_sharded" if sharded else ""

    cell, log = run_model_case(shard("model", rank, world), sharded)
    if sharded:
        log["log.buckets"] = np.array(len(cell.optimizer.backend.buckets))
    np.savez(os.path.join(out_dir, f"model{tag}_rank{rank}.npz"), **state(cell, log))
    if sharded:
        ms.save_checkpoint(cell, os.path.join(out_dir, f"model{tag}_rank{rank}.ckpt"))

    cell, log = run_loss_scale_case(with_overflow(shard("loss_scale", rank, world), rank), sharded)
    if sharded:
        log["log.buckets"] = np.array(len(cell.optimizer.backend.buckets))
    np.savez(os.path.join(out_dir, f"loss_scale{tag}_rank{rank}.npz"), **state(cell, log))
    print(f"dist_worker rank {rank}/{world} done", flush=True)


if __name__ == "__main__":
    main()
