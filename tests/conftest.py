"""Shared fixtures: MindSpore execution mode and a fixed seed."""
import os
import sys

import mindspore as ms
import numpy as np
import pytest

# shared helpers (the float64 reference, small nets, subprocess workers) live in tests/helpers/
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
sys.path.insert(0, HELPERS)

os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's C++ warnings out of the test log

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
# LAMB_TEST_DEVICE=GPU runs the mode-parametrised tests on a GPU (benchmarks/gpu_check.sh); default CPU
DEVICE = os.environ.get("LAMB_TEST_DEVICE", "CPU")


@pytest.fixture(params=sorted(MODES))
def mode(request):
    """Run the test once in GRAPH_MODE and once in PYNATIVE_MODE (on CPU unless LAMB_TEST_DEVICE says)."""
    ms.set_context(mode=MODES[request.param], device_target=DEVICE)
    yield request.param
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(params=["fused_cpu", "composite"], ids=["fused", "composite"])
def path(request):
    """The backend to ask Lamb for (``Lamb(..., backend=path)``): the fused C++ kernels that float32 takes on
    CPU, or the composite graph that GPU/Ascend (and float16 here) run. Both are held to the same reference."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def set_mode(name):
    ms.set_context(mode=MODES[name], device_target=DEVICE)
