"""Bad steps change nothing but the loss scale (docs/distributed.md, "Bad steps on one worker").

tests/helpers/bad_steps_worker.py trains LossScaleTrainStep + Lamb (dynamic scale, factor 2) twice: once on
every batch, with rank 1 alone getting a NaN or an Inf at the steps of `bad_steps` (in one input element, or in
one element of its unscaled gradient before the all-reduce), and once on the same batches with those steps left
out. Weights, LAMB moments, global_step and the optimizer's diagnostics must end bit-identical, and so must the
loss of every step both runs took, although the two runs' loss scales part ways: scales that differ by a power
of two give the same unscaled gradients. Under msrun with two CPU workers: 80 steps in the default run, the
1,000-step proof marked slow. In one process: the same on Lamb's composite graph, and a scale factor of 3 as
the counter-example.
"""
import os

import numpy as np
import pytest

import mindspore as ms

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
import bad_steps_worker as W  # noqa: E402
from msrun_launch import run_two_workers  # noqa: E402

LAUNCH_TIMEOUT = 600          # seconds for the whole msrun job (1,000 steps: about 70 s on a loaded 2-core machine)


def _check_same_training(injected, clean, plan, steps):
    """`injected` (every batch, bad steps in `plan`) and `clean` (the others) trained identically."""
    good = np.array([i not in plan for i in range(steps)])
    np.testing.assert_array_equal(injected["log.overflow"], ~good)       # skipped exactly the bad steps
    assert not clean["log.overflow"].any()
    np.testing.assert_array_equal(injected["log.loss"][good], clean["log.loss"])   # the same loss, step by step
    names = [n for n in clean if not n.startswith("log.") and n not in W.SKIP_STATE]
    assert sorted(names) == sorted(n for n in injected if not n.startswith("log.") and n not in W.SKIP_STATE)
    assert any(n.startswith("lamb_m.") for n in names) and "lamb_layer_stats" in names
    for name in names:
        np.testing.assert_array_equal(injected[name], clean[name], err_msg=f"{name}: injected run != clean run")
        assert np.isfinite(clean[name]).all(), name
    assert injected["global_step"].item() == clean["global_step"].item() == steps - len(plan)
    assert injected["lamb_skipped_steps"].item() == len(plan) and clean["lamb_skipped_steps"].item() == 0
    # not one scale: every backoff halved the injected run's scale, the clean run's only grew
    assert not np.array_equal(injected["log.scale"][good], clean["log.scale"])
    assert injected["loss_scale"].item() < clean["loss_scale"].item()


@pytest.mark.distributed
@pytest.mark.parametrize("steps", [80, pytest.param(1000, marks=pytest.mark.slow)])
def test_bad_steps_on_one_worker_change_nothing(tmp_path, steps):
    out_dir = str(tmp_path)
    run_two_workers(out_dir, [os.path.join(HELPERS, "bad_steps_worker.py"), out_dir, str(steps)], LAUNCH_TIMEOUT)
    runs = {run: [dict(np.load(os.path.join(out_dir, f"{run}_rank{rank}.npz"))) for rank in range(2)]
            for run in ("injected", "clean")}
    plan = W.bad_steps(steps)
    assert len(plan) == max(6, round(0.02 * steps)) and set(plan.values()) == set(W.KINDS)
    for run in ("injected", "clean"):
        rank0, rank1 = runs[run]
        for name in rank0:                                              # both ranks took the same steps
            if name not in ("log.loss", "poison_value", "poison_armed"):
                np.testing.assert_array_equal(rank0[name], rank1[name], err_msg=f"{run} {name}: rank 0 != rank 1")
    for rank in range(2):
        _check_same_training(runs["injected"][rank], runs["clean"][rank], plan, steps)
    # only rank 1 was poisoned: rank 0's loss is finite everywhere; an Inf input makes rank 1's loss NaN
    # (a NaN input does not: ReLU maps NaN to 0 on CPU, yet the gradients of that row are NaN)
    assert np.isfinite(runs["injected"][0]["log.loss"]).all()
    inf_inputs = [s for s, kind in plan.items() if kind == "inf_input"]
    assert np.isnan(runs["injected"][1]["log.loss"][inf_inputs]).all()


def _one_process(steps, scale_factor):
    """(injected, clean, plan) trained in this process (no all-reduce), the poisoned rank's batches."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    batches, plan = W.shard(steps, W.POISONED_RANK, 2), W.bad_steps(steps)
    injected = W.state(*W.run_injected(batches, plan, W.POISONED_RANK, scale_factor=scale_factor))
    clean = W.state(*W.run_clean(batches, plan, scale_factor=scale_factor))
    return injected, clean, plan


def test_bad_steps_change_nothing_on_the_composite_graph(monkeypatch):
    """The same property in one process on Lamb's composite graph (the path GPU and Ascend take; the msrun
    test runs the default, fused CPU kernel)."""
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "0")
    injected, clean, plan = _one_process(60, 2.0)
    _check_same_training(injected, clean, plan, 60)


def test_scale_factor_three_is_not_bit_identical():
    """The counter-example: scales 3**k apart round the scaled gradients differently, so the two runs drift
    apart by float32 rounding (and no more) from the first step their scales differ."""
    injected, clean, plan = _one_process(60, 3.0)
    good = np.array([i not in plan for i in range(60)])
    assert not np.array_equal(injected["log.loss"][good], clean["log.loss"])
    weights = [n for n in clean if n.startswith(("fc1.", "fc2.", "norm."))]
    assert any(not np.array_equal(injected[n], clean[n]) for n in weights)
    for name in weights:
        np.testing.assert_allclose(injected[name], clean[name], rtol=1e-2, atol=1e-5, err_msg=name)
