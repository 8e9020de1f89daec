"""Documented behaviour of a NaN/Inf gradient without the loss-scale cell (docs/api/lamb.md "Non-finite gradients"):
the call never touches the weights or global_step and counts
in skipped_steps; with exact_skip (or max_grad_norm, or the caller's finite=False) it changes nothing at
all (on the composite path always), else each moment element whose new value is finite takes the gradient.
Training then continues as tests/reference.py says, on both the fused and the composite path."""
import numpy as np
import pytest

from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb
from reference import LambReference

BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf,
       "g2_overflow": 1e20}   # finite, but g^2 (and G's sum of squares) overflows float32

# Lamb keyword arguments of each way to skip (`_exact`: whether the moments are kept exactly)
SKIPS = {"default": {}, "exact_skip": {"exact_skip": True}, "max_grad_norm": {"max_grad_norm": 1e30}}


def _state(opt):
    return [x.asnumpy().copy() for x in list(opt.params) + list(opt.moments1) + list(opt.moments2)]


def _build(rng, **kwargs):
    init = [rng.standard_normal((4, 6)), rng.standard_normal((6,))]
    params = [Parameter(Tensor(w.astype(np.float32)), name=n) for w, n in zip(init, ("fc.weight", "fc.bias"))]
    opt = Lamb(params, learning_rate=0.01, weight_decay=0.01, **kwargs)
    ref = LambReference([w.astype(np.float32) for w in init], max_grad_norm=kwargs.get("max_grad_norm"),
                        exact_skip=_exact(kwargs))
    return opt, ref


def _exact(kwargs):
    """Whether a skipped call keeps the moments exactly: with exact_skip or max_grad_norm, and always on the
    composite path, which has G before the update anyway (docs/api/lamb.md, "Non-finite gradients")."""
    return (kwargs.get("exact_skip", False) or kwargs.get("max_grad_norm") is not None
            or kwargs.get("backend") == "composite")


def _call(opt, grads, finite=None):
    grads = tuple(Tensor(np.asarray(g, np.float32)) for g in grads)
    return opt(grads) if finite is None else opt(grads, Tensor(finite))


def _assert_matches(opt, ref):
    for i in range(len(ref.w)):
        for got, want in ((opt.params[i], ref.w[i]), (opt.moments1[i], ref.m[i])):
            assert np.isfinite(got.asnumpy()).all()
            np.testing.assert_allclose(got.asnumpy(), want, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(opt.moments2[i].asnumpy(), ref.v[i], rtol=2e-5, atol=1e-10)


@pytest.mark.parametrize("skip", sorted(SKIPS))
@pytest.mark.parametrize("bad", sorted(BAD))
def test_nonfinite_call_is_skipped(mode, path, skip, bad, rng):
    kwargs = dict(SKIPS[skip], backend=path)
    exact = _exact(kwargs)
    opt, ref = _build(rng, **kwargs)
    assert opt.backend.name == path
    steps = [[rng.standard_normal(p.shape) for p in opt.params] for _ in range(4)]
    poisoned = [g.copy() for g in steps[1]]
    poisoned[0][1, 3] = BAD[bad]                            # one element of one gradient

    for i, grads in enumerate(steps):
        if i == 2:
            before = _state(opt)
            result = _call(opt, poisoned)
            assert all(bool(x) for x in result)
            after = _state(opt)
            assert not ref.step(poisoned, lr=0.01, weight_decay=0.01)
            n = len(ref.w)
            for b, a in zip(before[:n], after[:n]):             # the weights never move
                np.testing.assert_array_equal(a, b)
            for k in range(1, 3):                               # the poisoned element keeps its moments
                np.testing.assert_array_equal(after[k * n][1, 3], before[k * n][1, 3])
            if exact:
                for b, a in zip(before[n:], after[n:]):
                    np.testing.assert_array_equal(a, b)
            else:
                assert not np.array_equal(after[n + 1], before[n + 1])  # the bias's moments took its gradient
            _assert_matches(opt, ref)
            assert int(opt.global_step.asnumpy()[0]) == 2
            assert opt.skipped_steps == 1
        _call(opt, grads)
        assert ref.step(grads, lr=0.01, weight_decay=0.01)
        _assert_matches(opt, ref)
    assert int(opt.global_step.asnumpy()[0]) == 4
    assert opt.skipped_steps == 1


def test_callers_verdict(mode, path, rng):
    """finite=False (a loss-scale cell's overflow) skips exactly even with finite gradients; finite=True
    leaves the test to Lamb: finite gradients step as usual, a NaN is still skipped."""
    opt, ref = _build(rng, backend=path)
    grads = [rng.standard_normal(p.shape) for p in opt.params]
    _call(opt, grads)
    assert ref.step(grads, lr=0.01, weight_decay=0.01)

    before = _state(opt)
    _call(opt, grads, finite=False)
    for b, a in zip(before, _state(opt)):
        np.testing.assert_array_equal(a, b)
    assert (int(opt.global_step.asnumpy()[0]), opt.skipped_steps) == (1, 1)

    _call(opt, grads, finite=True)
    assert ref.step(grads, lr=0.01, weight_decay=0.01)
    _assert_matches(opt, ref)

    poisoned = [g.copy() for g in grads]
    poisoned[1][0] = np.nan
    _call(opt, poisoned, finite=True)
    assert not ref.step(poisoned, lr=0.01, weight_decay=0.01)
    _assert_matches(opt, ref)
    assert (int(opt.global_step.asnumpy()[0]), opt.skipped_steps) == (2, 2)


def test_zero_gradient_on_zero_parameter_is_a_no_op(mode, path):
    w = Parameter(Tensor(np.zeros((3, 3), np.float32)), name="w")
    opt = Lamb([w], learning_rate=0.1, weight_decay=0.1, backend=path)
    for _ in range(3):
        opt((Tensor(np.zeros((3, 3), np.float32)),))
    np.testing.assert_array_equal(w.asnumpy(), 0.0)
    assert np.isfinite(opt.moments2[0].asnumpy()).all()
    assert opt.trust_ratios() == {"w": 1.0}
    assert opt.skipped_steps == 0
