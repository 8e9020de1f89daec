"""msrun on two "nodes" trains exactly as msrun on one (docs/distributed.md, "Several machines").

tests/helpers/dist_worker.py (Model.train + Lamb, and LossScaleTrainStep + Lamb with an overflow on rank 1)
runs twice: as two workers of one msrun (``--local_worker_num=2``), and as one worker on each of two msrun
launches on this machine (``--local_worker_num=1 --node_rank=0`` / ``=1``, the same master address and port),
the commands of two real machines. Every parameter and every per-step log of each rank must be bit-identical.
Two launches: about a minute on a 2-core machine, so marked slow.
"""
import os

import numpy as np
import pytest

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
from msrun_launch import run_two_workers  # noqa: E402
from multinode_launch import run_two_nodes  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCH_TIMEOUT = 300          # seconds for each msrun job


def _results(out_dir):
    return {(case, rank): dict(np.load(os.path.join(out_dir, f"{case}_rank{rank}.npz")))
            for case in ("model", "loss_scale") for rank in range(2)}


def test_two_nodes_match_one_node(tmp_path):
    worker = os.path.join(HELPERS, "dist_worker.py")
    one, two = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    os.makedirs(one)
    os.makedirs(two)
    run_two_workers(one, [worker, one, "graph"], LAUNCH_TIMEOUT)
    log0, log1 = run_two_nodes(two, [worker, two, "graph"], LAUNCH_TIMEOUT)
    # --node_rank fixes the ranks: rank 0 ran on node 0, rank 1 on node 1
    assert os.listdir(log0).count("worker_0.log") == 1 and "worker_1.log" not in os.listdir(log0)
    assert os.listdir(log1).count("worker_1.log") == 1 and "worker_0.log" not in os.listdir(log1)
    single, multi = _results(one), _results(two)
    for key, expected in single.items():
        got = multi[key]
        assert sorted(got) == sorted(expected)
        assert any(name.startswith("lamb_m.") for name in expected) and "global_step" in expected
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{key} {name}: two nodes != one node")
