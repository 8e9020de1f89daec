"""1 - beta is exact: with a constant gradient, v and the step stay at their exact values to float32 rounding.

With a constant gradient g, exact arithmetic gives m = (1 - beta1^t) g, v = (1 - beta2^t) g^2 and a step
r = m^ / (sqrt(v^) + eps) = g / (|g| + eps). float32 cannot hold beta2 close to 1 (1 - float32(1 - 1e-7)
is 19 % away from 1e-7), so an update written as beta2 * v + (1 - beta2) * g^2 misses these values by
far more than float32 rounding; Lamb's does not (docs/api/lamb.md, "Update rule").
"""
import numpy as np
import pytest

from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb

STEPS = 20
BETA1 = 0.9
EPS = 1e-6


@pytest.mark.parametrize("beta2", [0.999, 0.99999, 1 - 1e-7])
def test_constant_gradient_is_exact_to_float32(mode, path, beta2):
    g = (np.geomspace(1e-3, 1e3, 32) * np.tile([1.0, -1.0], 16)).astype(np.float32)
    w = Parameter(Tensor(np.zeros(32, np.float32)), name="w")
    # layer_adaptation=False and no weight decay: q = 1, so a step with lr = 1 moves w by exactly -r
    # (w stays below 2 * STEPS: its float32 rounding is below 2e-6 of a step)
    opt = Lamb([{"params": [w], "layer_adaptation": False}], learning_rate=1.0, beta1=BETA1, beta2=beta2,
               eps=EPS, backend=path)
    assert opt.backend.name == path
    g64 = g.astype(np.float64)
    want_r = g64 / (np.abs(g64) + EPS)
    worst_v = worst_r = 0.0
    for t in range(1, STEPS + 1):
        before = w.asnumpy().astype(np.float64)          # a copy (asnumpy shares memory on CPU)
        opt((Tensor(g),))
        want_v = (1.0 - beta2 ** t) * g64 ** 2
        got_v = opt.moments2[0].asnumpy().astype(np.float64)
        got_r = before - w.asnumpy().astype(np.float64)
        worst_v = max(worst_v, float(np.max(np.abs(got_v / want_v - 1.0))))
        worst_r = max(worst_r, float(np.max(np.abs(got_r / want_r - 1.0))))
        np.testing.assert_allclose(opt.moments1[0].asnumpy(), (1.0 - BETA1 ** t) * g64, rtol=2e-6)
    assert worst_v <= 2e-6, f"v off by {worst_v:.3g} (relative) at beta2={beta2}"
    assert worst_r <= 8e-6, f"step off by {worst_r:.3g} (relative) at beta2={beta2}"
