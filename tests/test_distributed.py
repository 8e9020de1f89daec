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


def _references(world=W.WORLD):
    """Single-process runs over the combined batches (GRAPH_MODE, this process, no communication)."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model_cell, model_log = W.run_model_case(W.combined("model", world))
    loss_cell, loss_log = W.run_loss_scale_case(W.combined("loss_scale", world))
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


# ---- Lamb(shard_state=True): each worker keeps half of the moments ----

@pytest.fixture(scope="module", params=["fused", "composite"])
def launched_sharded(request, tmp_path_factory):
    """The same two cases with shard_state=True (GRAPH_MODE), on the fused CPU kernels or the composite
    graph that GPU/Ascend run; returns (out_dir, workers, references)."""
    out_dir = str(tmp_path_factory.mktemp(f"msrun_sharded_{request.param}"))
    os.environ["MINDSPORE_LAMB_FUSED"] = "1" if request.param == "fused" else "0"   # inherited by msrun
    try:
        references = run_two_workers(out_dir, [os.path.join(HELPERS, "dist_worker.py"), out_dir, "graph",
                                               "sharded"], LAUNCH_TIMEOUT, during=_references)
    finally:
        os.environ.pop("MINDSPORE_LAMB_FUSED", None)
    workers = {case: [dict(np.load(os.path.join(out_dir, f"{case}_sharded_rank{rank}.npz")))
                      for rank in range(W.WORLD)] for case in ("model", "loss_scale")}
    return out_dir, workers, references


def _check_sharded(ranks, reference, case, m_rtol=RTOL):
    """The workers end bit-identical to each other, each holds 1/N of the moments, and the merged state
    equals one process on the combined batch (the first moments within `m_rtol`)."""
    from mindspore_lamb import sharding
    merged = {name: value.asnumpy() for name, value in sharding.merge(ranks).items()}
    pieces = {rank["lamb_m.shard"].size for rank in ranks}
    moments = sum(reference[n].size for n in reference if n.startswith("lamb_m."))
    assert pieces == {-(-moments // len(ranks))}                   # 1/N of the elements each (rounded up)
    for name, value in reference.items():
        if name.startswith("log.") or name in ("lamb_layer_stats", "lamb_grad_norm"):
            continue
        for other in ranks[1:]:
            if not name.startswith(("lamb_m.", "lamb_v.")):
                np.testing.assert_array_equal(ranks[0][name], other[name], err_msg=f"{name}: ranks differ")
        rtol = m_rtol if name.startswith("lamb_m.") else RTOL
        np.testing.assert_allclose(merged[name].astype(np.float64), value.astype(np.float64), rtol=rtol,
                                   atol=ATOL, err_msg=f"{name}: {len(ranks)} sharded workers != 1 process")
    for other in ranks[1:]:
        np.testing.assert_array_equal(ranks[0]["lamb_layer_stats"], other["lamb_layer_stats"])
    np.testing.assert_allclose(ranks[0]["lamb_layer_stats"], reference["lamb_layer_stats"], rtol=RTOL, atol=ATOL)
    if case == "loss_scale":                                       # the NaN on rank 1 only: all skipped it
        assert {rank["global_step"].item() for rank in ranks} == {W.STEPS - 1}


@pytest.mark.parametrize("case", ["model", "loss_scale"])
def test_sharded_state_matches_one_process(launched_sharded, case):
    """Layers cut between the workers, groups, a decaying lr, max_grad_norm (model case); dynamic loss scale,
    clipping and an overflow on rank 1 only (loss_scale case)."""
    _, workers, references = launched_sharded
    _check_sharded(workers[case], references[case], case)


def test_sharded_buckets_smaller_than_a_parameter_change_nothing(launched_sharded, request, tmp_path, monkeypatch):
    """shard_bucket_size=64 on the 227-element nets (pieces of 114: two buckets, the first layer's 128 weights split
    over both buckets and both workers): the same weights, moments and logs, bit for bit, as the default bucket
    (one bucket), on the fused kernels and on the composite graph."""
    out_dir, default, _ = launched_sharded
    kernels = request.node.callspec.params["launched_sharded"]
    monkeypatch.setenv("LAMB_TEST_SHARD_BUCKET", "64")                 # inherited by msrun
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "1" if kernels == "fused" else "0")
    small = str(tmp_path)
    run_two_workers(small, [os.path.join(HELPERS, "dist_worker.py"), small, "graph", "sharded"], LAUNCH_TIMEOUT)
    for case in ("model", "loss_scale"):
        for rank in range(W.WORLD):
            bucketed = dict(np.load(os.path.join(small, f"{case}_sharded_rank{rank}.npz")))
            assert default[case][rank]["log.buckets"] == 1 and bucketed.pop("log.buckets") == 2
            assert sorted(bucketed) == sorted(n for n in default[case][rank] if n != "log.buckets")
            for name, value in bucketed.items():
                np.testing.assert_array_equal(value, default[case][rank][name], err_msg=f"{case} rank {rank}: {name}")


@pytest.mark.parametrize("kernels, mu_dtype", [("fused", "bfloat16"),
                                               pytest.param("composite", "float16", marks=pytest.mark.slow)])
def test_sharded_state_with_a_16_bit_first_moment(tmp_path, monkeypatch, kernels, mu_dtype):
    """Lamb(shard_state=True, mu_dtype=...): each worker stores its piece of the first moments in mu_dtype,
    its checkpoint carries that dtype, and the merged state matches one process with the same mu_dtype
    (the first moments within one unit in their last place: the reduced gradients of the workers and of the
    combined batch round differently)."""
    from mindspore_lamb import sharding
    monkeypatch.setenv("LAMB_TEST_MU_DTYPE", mu_dtype)                  # inherited by msrun, read by both
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "1" if kernels == "fused" else "0")
    out_dir = str(tmp_path)
    references = run_two_workers(out_dir, [os.path.join(HELPERS, "dist_worker.py"), out_dir, "graph", "sharded"],
                                 LAUNCH_TIMEOUT, during=_references)
    ulp = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}[mu_dtype]
    for case in ("model", "loss_scale"):
        ranks = [dict(np.load(os.path.join(out_dir, f"{case}_sharded_rank{r}.npz"))) for r in range(2)]
        _check_sharded(ranks, references[case], case, m_rtol=ulp)
    paths = [os.path.join(out_dir, f"model_sharded_rank{r}.ckpt") for r in range(2)]
    saved = ms.load_checkpoint(paths[0])
    assert saved["lamb_m.shard"].dtype == getattr(ms, mu_dtype) and saved["lamb_v.shard"].dtype == ms.float32
    merged = sharding.merge(paths)
    assert {merged[n].dtype for n in merged if n.startswith("lamb_m.")} == {getattr(ms, mu_dtype)}


@pytest.mark.slow
def test_sharded_state_three_workers_uneven_split(tmp_path, monkeypatch):
    """Three workers: 227 elements cut 76 / 76 / 75 (the last piece padded), layers cut twice."""
    monkeypatch.setenv("LAMB_TEST_WORLD", "3")
    out_dir = str(tmp_path)
    references = run_two_workers(out_dir, [os.path.join(HELPERS, "dist_worker.py"), out_dir, "graph", "sharded"],
                                 LAUNCH_TIMEOUT, during=lambda: _references(3), workers=3)
    for case in ("model", "loss_scale"):
        ranks = [dict(np.load(os.path.join(out_dir, f"{case}_sharded_rank{r}.npz"))) for r in range(3)]
        _check_sharded(ranks, references[case], case)


def test_sharded_checkpoints_merge_and_resume_without_sharding(launched_sharded, tmp_path):
    """The workers' checkpoints merge (python -m mindspore_lamb.sharding merge) into one that a non-sharded
    Lamb loads with nothing missing, holding exactly the workers' moments; training continues from it."""
    from mindspore_lamb import sharding
    out_dir, workers, _ = launched_sharded
    merged_path = str(tmp_path / "merged.ckpt")
    sharding.main(["merge", merged_path] + [os.path.join(out_dir, f"model_sharded_rank{r}.ckpt") for r in range(2)])
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model, opt = W.build_model_case()
    state = ms.load_checkpoint(merged_path)
    not_loaded, _ = ms.load_param_into_net(model.train_network, state)
    assert not_loaded == []
    flat = np.concatenate([opt.moments1[i].asnumpy().reshape(-1) for i in range(len(opt.params))])
    pieces = np.concatenate([workers["model"][r]["lamb_m.shard"] for r in range(2)])[:flat.size]
    np.testing.assert_array_equal(flat, pieces)                    # nothing lost, bit for bit
    assert int(opt.global_step.asnumpy()[0]) == W.STEPS
    before = {p.name: p.asnumpy().copy() for p in opt.params}
    x, labels = W.combined("model")[0]
    model.train_network(ms.Tensor(x), ms.Tensor(labels))
    assert int(opt.global_step.asnumpy()[0]) == W.STEPS + 1
    assert all(np.isfinite(p.asnumpy()).all() and not np.array_equal(p.asnumpy(), before[p.name])
               for p in opt.params)
