"""Shared fixtures: MindSpore execution mode and a fixed seed."""
import os

import mindspore as ms
import numpy as np
import pytest

os.environ.setdefault("GLOG_v", "3")  # keep MindSpore's C++ warnings out of the test log

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@pytest.fixture(params=sorted(MODES))
def mode(request):
    """Run the test once in GRAPH_MODE and once in PYNATIVE_MODE on CPU."""
    ms.set_context(mode=MODES[request.param], device_target="CPU")
    yield request.param
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def set_mode(name):
    ms.set_context(mode=MODES[name], device_target="CPU")
