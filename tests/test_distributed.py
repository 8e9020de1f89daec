"""Data-parallel training under msrun: two CPU workers against one process over the combined batch.

msrun launches tests/helpers/dist_worker.py as two workers (`mindspore.communication.init()`, DATA_PARALLEL,
gradients_mean=True), each on its shard of the data (`num_shards=2`). Both must end with identical
parameters (weights, LAMB moments, global_step, loss scale), equal within float32 rounding to a
single process that trains on the union of the two workers' batches of each step:

* Model.train with Lamb (parameter groups, decaying lr, NVLAMB max_grad_norm: the optimizer's global
  gradient norm must be the one of the reduced gradients);
* LossScaleTrainStep with Lamb (dynamic loss scale, global-norm clipping of the reduced gradients),
  where at one step only rank 1 overflows and both ranks must skip it and back off the scale.

The launch takes about 25 s (GRAPH_MODE); the PYNATIVE_MODE launch is marked slow as well.
"""
import os

import numpy as np
import pytest

import mindspore as ms

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
import dist_worker as W  # noqa: E402
from msrun_launch import run_two_workers  # noqa: E402

pytestmark = pytest.mark.distributed

LAUNCH_TIMEOUT = 300          # seconds for the whole msrun job (about 25 s when the machine is idle)
RTOL, ATOL = 1e-4, 1e-6       # float32 reduction order: worker vs. combined-batch reference


def _references():
    """Single-process runs over the combined batches (GRAPH_MODE, this process, no communication)."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model_cell, model_log = W.run_model_case(W.combined("model"))
    loss_cell, loss_log = W.run_loss_scale_case(W.combined("loss_scale"))
    return {"model": W.state(model_cell, model_log), "loss_scale": W.state(loss_cell, loss_log)}


@pytest.fixture(scope="module", params=["graph", pytest.param("pynative", marks=pytest.mark.slow)])
def launched(request, tmp_path_factory):
    """Run the two msrun workers (mode: request.param) and, meanwhile, the single-process references.

    Returns (workers, references): workers[case][rank] and references[case] are {name: array}.
    """
    mode = request.param
    out_dir = str(tmp_path_factory.mktemp(f"msrun_{mode}"))
    references = run_two_workers(out_dir, [os.path.join(HELPERS, "dist_worker.py"), out_dir, mode], LAUNCH_TIMEOUT,
                                 during=_references)   # the references train while the workers start
    workers = {}
    for case in ("model", "loss_scale"):
        workers[case] = [dict(np.load(os.path.join(out_dir, f"{case}_rank{rank}.npz"))) for rank in range(W.WORLD)]
    return workers, references


def _check_against_reference(workers, reference):
    rank0, rank1 = workers
    assert sorted(rank0) == sorted(rank1) == sorted(reference)
    params = [name for name in reference if not name.startswith("log.")]
    assert any(name.startswith("lamb_m.") for name in params) and "global_step" in params
    for name in params:
        # data parallel: every rank applies the same reduced gradients -> bit-identical state
        np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=f"{name}: rank 0 != rank 1")
        np.testing.assert_allclose(rank0[name].astype(np.float64), reference[name].astype(np.float64),
                                   rtol=RTOL, atol=ATOL, err_msg=f"{name}: 2 workers != 1 process, combined batch")
    # the workers trained on different shards (their local losses differ), whose union is the reference batch
    finite = np.isfinite(reference["log.loss"])
    assert not np.allclose(rank0["log.loss"][finite], rank1["log.loss"][finite])
    np.testing.assert_allclose((rank0["log.loss"] + rank1["log.loss"])[finite] / 2, reference["log.loss"][finite],
                               rtol=1e-5)


def test_model_train_two_workers_match_combined_batch(launched):
    workers, references = launched
    _check_against_reference(workers["model"], references["model"])
    ref = references["model"]
    assert ref["global_step"].item() == W.STEPS and ref["lamb_skipped_steps"].item() == 0
    # NVLAMB pre-normalisation was active, on the norm of the reduced (mean) gradients
    assert ref["lamb_grad_norm"].item() > 0.05


def test_loss_scale_train_step_two_workers_match_combined_batch(launched):
    workers, references = launched
    _check_against_reference(workers["loss_scale"], references["loss_scale"])
    rank0, rank1 = workers["loss_scale"]
    ref = references["loss_scale"]
    # only rank 1 overflowed locally at OVERFLOW_STEP (its loss is NaN, rank 0's finite) ...
    assert np.isnan(rank1["log.loss"][W.OVERFLOW_STEP]) and np.isfinite(rank0["log.loss"][W.OVERFLOW_STEP])
    assert np.isfinite(np.delete(rank1["log.loss"], W.OVERFLOW_STEP)).all()
    # ... yet both ranks report the overflow, skip that step and back off the scale, like the reference
    expected = np.arange(W.STEPS) == W.OVERFLOW_STEP
    for log in (rank0, rank1, ref):
        np.testing.assert_array_equal(log["log.overflow"], expected)
    np.testing.assert_array_equal(rank0["log.scale"], ref["log.scale"])
    np.testing.assert_array_equal(rank1["log.scale"], ref["log.scale"])
    assert rank0["global_step"].item() == rank1["global_step"].item() == W.STEPS - 1
    assert rank0["loss_scale"].item() == ref["loss_scale"].item()
