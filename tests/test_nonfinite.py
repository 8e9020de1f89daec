"""Documented behaviour of a NaN/Inf gradient without the loss-scale cell (spec sections 3 and 6):
the call changes nothing (parameters, moments, global_step), counts itself in skipped_steps, and
training continues exactly as if that call had not happened."""
import numpy as np
import pytest

from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb
from reference import LambReference


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_changes_nothing(mode, bad, rng):
    init = [rng.standard_normal((4, 6)), rng.standard_normal((6,))]
    params = [Parameter(Tensor(w.astype(np.float32)), name=n) for w, n in zip(init, ("fc.weight", "fc.bias"))]
    opt = Lamb(params, learning_rate=0.01, weight_decay=0.01)
    ref = LambReference([w.astype(np.float32) for w in init])
    steps = [[rng.standard_normal(p.shape) for p in params] for _ in range(4)]
    poisoned = [g.copy() for g in steps[1]]
    poisoned[1][3] = bad                                    # one element of one gradient

    for i, grads in enumerate(steps):
        if i == 2:
            before = [p.asnumpy().copy() for p in params + list(opt.moments1) + list(opt.moments2)]
            result = opt(tuple(Tensor(g.astype(np.float32)) for g in poisoned))
            assert all(bool(x) for x in result)
            after = [p.asnumpy() for p in params + list(opt.moments1) + list(opt.moments2)]
            for b, a in zip(before, after):
                np.testing.assert_array_equal(a, b)
            assert int(opt.global_step.asnumpy()[0]) == 2
            assert opt.skipped_steps == 1
            assert not ref.step(poisoned, lr=0.01, weight_decay=0.01)
        opt(tuple(Tensor(g.astype(np.float32)) for g in grads))
        assert ref.step(grads, lr=0.01, weight_decay=0.01)
    assert int(opt.global_step.asnumpy()[0]) == 4
    for p, w in zip(params, ref.w):
        assert np.isfinite(p.asnumpy()).all()
        np.testing.assert_allclose(p.asnumpy(), w, rtol=2e-5, atol=2e-6)


def test_zero_gradient_on_zero_parameter_is_a_no_op(mode):
    w = Parameter(Tensor(np.zeros((3, 3), np.float32)), name="w")
    opt = Lamb([w], learning_rate=0.1, weight_decay=0.1)
    for _ in range(3):
        opt((Tensor(np.zeros((3, 3), np.float32)),))
    np.testing.assert_array_equal(w.asnumpy(), 0.0)
    assert np.isfinite(opt.moments2[0].asnumpy()).all()
    assert opt.trust_ratios() == {"w": 1.0}
    assert opt.skipped_steps == 0
