"""Resharding on resume: a ``Lamb(shard_state=True)`` run checkpointed on two msrun workers continues on
another number of workers, and matches the run that went on unchanged on two.

msrun launches tests/helpers/reshard_worker.py as two CPU workers: STEPS_BEFORE steps, every worker
saves its checkpoint, then STEPS_AFTER more steps (the unchanged run). The checkpoints are merged with
the command line (``python -m mindspore_lamb.sharding merge``, the files given in reverse order) and
training resumes from the merged one for the same STEPS_AFTER steps on the same global batches:

* in one process without sharding (``ms.load_param_into_net`` of the merged checkpoint): default run;
* on three msrun workers with sharding (each loads ``sharding.cut(merged, opt)``): marked slow.

Each resumed run must end at the unchanged run's weights, moments and global_step, within float32 rounding
of the gradient reduction order (the global batch is the same, cut 2 / 1 / 3 ways).
"""
import os

import numpy as np
import pytest

import mindspore as ms

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
import reshard_worker as R  # noqa: E402
from msrun_launch import run_two_workers  # noqa: E402
from mindspore_lamb import sharding  # noqa: E402

pytestmark = pytest.mark.distributed

LAUNCH_TIMEOUT = 300
WORKER = os.path.join(HELPERS, "reshard_worker.py")
# max |resumed - unchanged| over the weights, and over each moment, relative to that kind's largest magnitude.
# Measured (2026-12-01, 2-core AMD EPYC): 2 -> 1 process 2.5e-8 (weights), 9.4e-8 (m), 6.8e-8 (v); 2 -> 3
# workers 5.0e-8, 9.4e-8, 6.8e-8: under one float32 ulp (1.2e-7) of the largest element. A resume that lost
# the moments is off by 6.5e-2 (weights), one that restarted global_step by 9.6e-2 (docs/distributed.md).
TOLERANCE = 1e-6


def _full(states):
    """{name: float64 array} of the merged workers' states (Parameters or arrays)."""
    return {name: sharding._array(value).astype(np.float64) for name, value in sharding.merge(states).items()}


def _assert_resumes_unchanged_run(resumed, unchanged):
    """Weights, lamb_m.*, lamb_v.* within TOLERANCE of the unchanged run's; the same global_step."""
    assert resumed["global_step"].item() == unchanged["global_step"].item() == R.W.STEPS
    weights = [name[len("lamb_m."):] for name in unchanged if name.startswith("lamb_m.")]
    assert len(weights) == 6
    for prefix in ("", "lamb_m.", "lamb_v."):
        names = [prefix + name for name in weights]
        gap = max(np.abs(resumed[name] - unchanged[name]).max() for name in names)
        scale = max(np.abs(unchanged[name]).max() for name in names)
        assert gap <= TOLERANCE * scale, f"{prefix or 'weights'}: max abs difference {gap:.3g}, largest {scale:.3g}"


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """The two-worker run: (out_dir, merged checkpoint path, unchanged run's final full state)."""
    out_dir = str(tmp_path_factory.mktemp("reshard"))
    run_two_workers(out_dir, [WORKER, out_dir, "train"], LAUNCH_TIMEOUT)
    merged = os.path.join(out_dir, "merged.ckpt")
    sharding.main(["merge", merged] + [os.path.join(out_dir, f"rank{rank}.ckpt") for rank in (1, 0)])
    unchanged = _full([dict(np.load(os.path.join(out_dir, f"unchanged_rank{rank}.npz"))) for rank in range(2)])
    return out_dir, merged, unchanged


def test_two_workers_resume_in_one_process_without_sharding(checkpointed):
    """The merged checkpoint loads into a non-sharded Lamb (this process) and training goes on as on 2."""
    _, merged, unchanged = checkpointed
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cell, opt = R.build(shard_state=False)
    not_loaded, unused = ms.load_param_into_net(cell, ms.load_checkpoint(merged))
    assert not_loaded == [] and unused == []          # a plain Lamb checkpoint: nothing missing, nothing extra
    assert int(opt.global_step.asnumpy()[0]) == R.STEPS_BEFORE
    R.train(cell, R.batches(0, 1, R.STEPS_BEFORE, R.W.STEPS))
    _assert_resumes_unchanged_run({p.name: p.asnumpy().astype(np.float64) for p in cell.get_parameters()}, unchanged)


@pytest.mark.slow
def test_two_workers_resume_on_three_workers(checkpointed):
    """Each of 3 workers loads its cut of the merged checkpoint (76 / 76 / 75 of the 227 elements' moments;
    layers cut at other places than on 2 workers) and training goes on as on 2."""
    out_dir, merged, unchanged = checkpointed
    run_two_workers(out_dir, [WORKER, out_dir, "resume", merged], LAUNCH_TIMEOUT, workers=3)
    resumed = _full([dict(np.load(os.path.join(out_dir, f"resumed3_rank{rank}.npz"))) for rank in range(3)])
    _assert_resumes_unchanged_run(resumed, unchanged)
