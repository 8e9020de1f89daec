"""msrun worker for tests/test_optim_bits_sharded.py: Lamb(optim_bits=8, shard_state=True) against Lamb(optim_bits=8).

usage: msrun --worker_num=N --local_worker_num=N ... shard8_worker.py OUT_DIR

Each worker builds, for each configuration of CONFIGS, three optimizers on three copies of the same parameters
(three 8-bit tensors, two with a partial last block, one cut between the workers' pieces, and two float32 ones
below min_8bit_size; in ``small``, every tensor below it): unsharded 8-bit, sharded 8-bit with the default bucket, and sharded 8-bit with buckets of
BUCKET elements (rounded up to whole blocks). All three take the same gradients (the same generator on every
worker; one step has a NaN), and the worker writes ``OUT_DIR/<config>_rank<r>.npz``: after each step, every
optimizer's weights and state, as ``<opt>.<step>.<name>``. The ``default`` configuration's unsharded and
sharded state are saved as checkpoints too (``plain_rank<r>.ckpt``, ``sharded_rank<r>.ckpt``).
"""
import os
import sys

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb

SHAPES = (("a.weight", (40, 37)), ("a.bias", (37,)), ("b.weight", (3, 300)), ("c.weight", (17, 31)),
          ("ln.gamma", (31,)))
MIN_SIZE = 256          # 8-bit: a.weight (6 blocks), b.weight (4), c.weight (3); pieces of 7 blocks for 2 workers
BUCKET = 300            # rounded up to 512: two blocks a bucket
STEPS = 5
NAN_STEP = 2            # a NaN in a.weight's gradient: the step is skipped, the other elements' moments move
CONFIGS = {
    "default": dict(learning_rate=0.01, weight_decay=0.01, exclude_from_weight_decay=["bias", "gamma"]),
    "general": dict(learning_rate=0.02, weight_decay=0.01, weight_decay_mode="decoupled_outside",
                    eps_inside_sqrt=True, trust_ratio_clip=(0.0, 5.0), max_grad_norm=1.0, loss_scale=8.0),
    "small": dict(learning_rate=0.01, weight_decay=0.01, min_8bit_size=10 ** 6),   # no 8-bit tensor: K = 0
}


def min_size(config):
    """min_8bit_size of `config`."""
    return CONFIGS[config].get("min_8bit_size", MIN_SIZE)


def initial():
    rng = np.random.default_rng(5)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES}


def gradients(step):
    """The gradients of `step`, the same on every worker: magnitudes over three decades."""
    rng = np.random.default_rng(100 + step)
    grads = [(rng.normal(size=shape) * 10.0 ** rng.uniform(-2, 1, size=shape)).astype(np.float32)
             for _, shape in SHAPES]
    if step == NAN_STEP:
        grads[0][3, 4] = np.nan
    return grads


def main(out_dir):
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindspore.communication import get_rank, init
    init()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True)
    rank = get_rank()
    start = initial()
    for config, kwargs in CONFIGS.items():
        opts = {}
        for label, extra in (("plain", {}), ("sharded", dict(shard_state=True)),
                             ("bucketed", dict(shard_state=True, shard_bucket_size=BUCKET))):
            params = [Parameter(Tensor(start[name].copy()), name=name) for name, _ in SHAPES]
            opts[label] = Lamb(params, optim_bits=8, **dict(dict(min_8bit_size=MIN_SIZE), **kwargs), **extra)
        record = {}
        for step in range(STEPS):
            grads = tuple(Tensor(g) for g in gradients(step))
            for label, opt in opts.items():
                opt(grads)
                for p in (*opt.params, *opt.backend.state):
                    record[f"{label}.{step}.{p.name}"] = p.asnumpy().copy()
        np.savez(os.path.join(out_dir, f"{config}_rank{rank}.npz"), **record)
        if config == "default":
            for label in ("plain", "sharded"):
                opt = opts[label]
                entries = [*opt.params, opt.global_step, *opt.backend.state]
                if label == "sharded":
                    entries += [opt.backend.shard_names, opt.backend.shard_rank]
                ms.save_checkpoint(list(entries), os.path.join(out_dir, f"{label}_rank{rank}.ckpt"))


if __name__ == "__main__":
    main(sys.argv[1])
