"""What a call returns, and when, in GRAPH_MODE and PYNATIVE_MODE (docs/architecture.md, "PYNATIVE_MODE")."""
import ctypes

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from conftest import DEVICE
from mindspore_lamb import Lamb

N = 1 << 22   # 16 MiB: an update that takes milliseconds, long enough to be caught unfinished


def _weights(n_params):
    return [Parameter(Tensor(np.ones(N if i == 0 else 8, np.float32)), name=f"w{i}") for i in range(n_params)]


def test_output_is_one_true_per_parameter(mode, path):
    params = _weights(3)
    opt = Lamb(params, learning_rate=0.1, backend=path)
    out = opt(tuple(Tensor(np.full(p.shape, 0.5, np.float32)) for p in params))
    assert isinstance(out, tuple) and len(out) == 3
    assert all(x is True or (isinstance(x, Tensor) and bool(x.asnumpy())) for x in out), out


@pytest.mark.skipif(DEVICE != "CPU", reason="reads the parameter's host memory directly")
def test_pynative_call_returns_when_the_update_is_done(path):
    """A PYNATIVE_MODE call must not return before its update has run: the weights' memory, read directly
    (no MindSpore sync) right after the call, already holds the new values. A call that returned at once
    and left the graph running would make the next call wait in a busy loop that takes a core from the
    update (1.8x nn.Adam's step instead of 1.4x on 2 cores)."""
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    try:
        (w,) = params = _weights(1)
        opt = Lamb(params, learning_rate=0.1, backend=path)
        grads = (Tensor(np.full(N, 0.5, np.float32)),)
        opt(grads)                                     # compiles
        for _ in range(3):
            before = float(w.asnumpy()[-1])            # waits for everything launched so far
            last = ctypes.c_float.from_address(w.data_ptr() + 4 * (N - 1))
            opt(grads)
            seen = last.value                          # no wait: whatever the memory holds now
            assert seen != before, "the call returned before its update had run"
            assert seen == float(w.asnumpy()[-1])
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
