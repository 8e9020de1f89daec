"""Bad steps on one worker under msrun, for tests/test_bad_steps.py (docs/distributed.md, "Bad steps").

usage: msrun --worker_num=2 --local_worker_num=2 --master_port=PORT --join=True bad_steps_worker.py OUT_DIR STEPS

Each worker (DATA_PARALLEL, gradients_mean=True) trains the same LossScaleTrainStep + Lamb twice on its shard
(``num_shards=world size``, ``shard_id=rank``) and writes ``OUT_DIR/<run>_rank<r>.npz`` with every parameter
of its train cell plus ``log.loss`` / ``log.overflow`` / ``log.scale`` per call:

* ``injected``: all STEPS batches; at the steps of :func:`bad_steps`, rank ``POISONED_RANK`` alone gets a
  NaN or an Inf in one element of its input, or in one element of its unscaled gradient (before the
  all-reduce);
* ``clean``: the same batches with those steps left out, on every worker.
"""
import os
import sys

import numpy as np

import mindspore as ms
import mindspore.dataset as ds
from mindspore import Parameter, Tensor, nn
from mindspore.ops import composite as C
from mindspore.ops import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_worker import state  # noqa: E402
from nets import loss_fn, make_data, make_net  # noqa: E402
from mindspore_lamb import Lamb, LossScaleTrainStep  # noqa: E402
from mindspore_lamb.schedules import WarmupPolynomialDecayLR  # noqa: E402

BATCH = 8                  # rows per worker and step
POISONED_RANK = 1
KINDS = ("nan_input", "inf_input", "nan_grad", "inf_grad")
INIT_SCALE = 2.0 ** 16
SCALE_WINDOW = 25          # the clean run's scale doubles every 25 steps; the injected run's backs off too
# what a skipped step may change: the loss scale's own state, Lamb's skip counter, the injection switch
SKIP_STATE = ("loss_scale", "loss_scale_good_steps", "lamb_skipped_steps", "poison_value", "poison_armed")

_poison = C.MultitypeFuncGraph("bad_steps_poison")


@_poison.register("Tensor", "Tensor", "Tensor", "Tensor")
def _poison_one(value, armed, mask, grad):
    """`grad` with `value` where `mask` holds, when `armed` (a select: the other elements are not touched)."""
    return F.select(F.logical_and(mask, armed), F.broadcast_to(value, F.shape(grad)), grad)


class PoisonedReducer(nn.Cell):
    """A train step's gradient reducer, preceded by: element 0 of the first gradient <- `value` when `armed`
    (two Parameters the host sets before a call)."""

    def __init__(self, reducer, params):
        super().__init__()
        self.reducer = reducer
        self.value = Parameter(Tensor(0.0, ms.float32), name="poison_value", requires_grad=False)
        self.armed = Parameter(Tensor(False), name="poison_armed", requires_grad=False)
        masks = [np.zeros(p.shape, np.bool_) for p in params]
        masks[0].flat[0] = True
        self.masks = tuple(Tensor(mask) for mask in masks)
        self.hyper_map = C.HyperMap()

    def construct(self, grads):
        return self.reducer(self.hyper_map(F.partial(_poison, self.value, self.armed), self.masks, grads))

    def set(self, value):
        """Poison the next call with `value` (None: leave it alone)."""
        self.armed.set_data(Tensor(value is not None))
        self.value.set_data(Tensor(np.float32(0.0 if value is None else value)))


def bad_steps(steps, fraction=0.02, seed=2026):
    """{step: kind} for a run of `steps`: the first and the last step, two steps in a row, and random others,
    ``round(fraction * steps)`` in all but at least 6; the kinds cycle through KINDS in step order."""
    rng = np.random.default_rng(seed)
    first = int(rng.integers(1, steps - 3))
    fixed = {0, first, first + 1, steps - 1}
    rest = sorted(set(range(steps)) - fixed)
    chosen = fixed | {int(s) for s in rng.choice(rest, max(6, round(fraction * steps)) - len(fixed), replace=False)}
    return {step: KINDS[i % len(KINDS)] for i, step in enumerate(sorted(chosen))}


def shard(steps, rank, world):
    """This worker's `steps` batches (x, labels), as a sharded, batched dataset gives them."""
    x, labels = make_data(n=world * BATCH * steps, seed=13)
    dataset = ds.NumpySlicesDataset({"x": x, "label": labels}, shuffle=False, num_shards=world, shard_id=rank)
    dataset = dataset.batch(BATCH, drop_remainder=True)
    return [(row["x"], row["label"]) for row in dataset.create_dict_iterator(output_numpy=True)]


def build(steps, **scale):
    """LossScaleTrainStep (dynamic scale, clipping) + Lamb with a warm-up/decay schedule over `steps`; `scale`:
    LossScaleTrainStep arguments (init_scale, scale_factor, min_scale) other than the defaults here."""
    net = make_net(seed=5)
    opt = Lamb(net.trainable_params(), learning_rate=WarmupPolynomialDecayLR(0.05, 0.0, steps // 10, steps),
               weight_decay=0.01)
    scale = dict({"init_scale": INIT_SCALE, "scale_window": SCALE_WINDOW}, **scale)
    step = LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), opt, max_grad_norm=1.0, **scale)
    step.set_train()
    return step


def train(step, batches, before_call=None):
    """Call `step` once per batch (`before_call(i)` first, if given); returns the per-call log."""
    log = {"log.loss": [], "log.overflow": [], "log.scale": []}
    for i, (x, labels) in enumerate(batches):
        if before_call is not None:
            x = before_call(i, x)
        loss, overflow, scale = step(Tensor(x), Tensor(labels))
        log["log.loss"].append(float(loss.asnumpy()))
        log["log.overflow"].append(bool(overflow.asnumpy()))
        log["log.scale"].append(float(scale.asnumpy()))
    return {k: np.array(v) for k, v in log.items()}


def run_injected(batches, plan, rank, **scale):
    """Train on every batch; at the steps of `plan`, POISONED_RANK alone gets its NaN / Inf."""
    step = build(len(batches), **scale)
    reducer = PoisonedReducer(step.grad_reducer, step.weights)
    step.grad_reducer = reducer
    poisoned = rank == POISONED_RANK

    def before_call(i, x):
        kind = plan.get(i, "") if poisoned else ""
        value = {"nan": np.nan, "inf": np.inf}.get(kind.split("_")[0])
        reducer.set(value if kind.endswith("_grad") else None)
        if kind.endswith("_input"):
            x = x.copy()
            x[0, 0] = value
        return x

    return step, train(step, batches, before_call)


def run_clean(batches, plan, **scale):
    """Train on the batches outside `plan`, with nothing injected."""
    step = build(len(batches), **scale)
    return step, train(step, [b for i, b in enumerate(batches) if i not in plan])


def main():
    out_dir, steps = sys.argv[1], int(sys.argv[2])
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindspore.communication import get_group_size, get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank, world = get_rank(), get_group_size()
    batches, plan = shard(steps, rank, world), bad_steps(steps)
    cell, log = run_injected(batches, plan, rank)
    np.savez(os.path.join(out_dir, f"injected_rank{rank}.npz"), **state(cell, log))
    cell, log = run_clean(batches, plan)
    np.savez(os.path.join(out_dir, f"clean_rank{rank}.npz"), **state(cell, log))
    print(f"bad_steps_worker rank {rank}/{world} done", flush=True)


if __name__ == "__main__":
    main()
