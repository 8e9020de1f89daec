"""WarmupPolynomialDecayLR against hand-computed values, and as Lamb's learning rate."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindspore_lamb import Lamb, WarmupPolynomialDecayLR

# lr=0.1, end=0.01, warmup=4, decay=10, power=2, worked out by hand:
#   s < 4 : 0.1 * s / 4
#   s >= 4: 0.09 * (1 - min(s, 10) / 10) ** 2 + 0.01
HAND_POWER2 = {
    0: 0.0,         # warm-up starts at 0
    1: 0.025,
    3: 0.075,       # last warm-up step
    4: 0.0424,      # boundary: 0.09 * 0.6**2 + 0.01
    7: 0.0181,      # 0.09 * 0.3**2 + 0.01
    9: 0.0109,      # 0.09 * 0.1**2 + 0.01
    10: 0.01,       # end of decay
    25: 0.01,       # constant afterwards
}
# lr=0.1, end=0, no warm-up, decay=10, power=1 (linear): 0.1 * (1 - min(s, 10) / 10)
HAND_LINEAR = {0: 0.1, 1: 0.09, 5: 0.05, 9: 0.01, 10: 0.0, 12: 0.0}
# lr=2e-3, end=1e-4, warmup=3, decay=7, power=0.5
#   s=3: 1.9e-3 * sqrt(4/7) + 1e-4 ; s=6: 1.9e-3 * sqrt(1/7) + 1e-4
HAND_SQRT = {0: 0.0, 2: 2e-3 * 2 / 3, 3: 1.9e-3 * (4 / 7) ** 0.5 + 1e-4, 6: 1.9e-3 * (1 / 7) ** 0.5 + 1e-4,
             7: 1e-4, 100: 1e-4}


@pytest.mark.parametrize("args, expected", [
    ((0.1, 0.01, 4, 10, 2.0), HAND_POWER2),
    ((0.1, 0.0, 0, 10, 1.0), HAND_LINEAR),
    ((2e-3, 1e-4, 3, 7, 0.5), HAND_SQRT),
])
def test_hand_computed_values(mode, args, expected):
    schedule = WarmupPolynomialDecayLR(*args)
    for step, want in expected.items():
        got = schedule(ms.Tensor(step, ms.int32))
        assert got.shape == ()
        assert got.dtype == ms.float32
        np.testing.assert_allclose(float(got), want, rtol=1e-6, atol=1e-9, err_msg=f"step {step}")


def test_int_arguments_and_default_power():
    schedule = WarmupPolynomialDecayLR(1, 0, 0, 4)  # ints accepted; power defaults to 1.0 (linear)
    assert float(schedule(ms.Tensor(1, ms.int32))) == pytest.approx(0.75)
    assert float(schedule(ms.Tensor(3.0, ms.float32))) == pytest.approx(0.25)


def _numpy_lamb(w, grads, lrs, beta1=0.9, beta2=0.999, eps=1e-6):
    """Independent NumPy LAMB (no weight decay) on one parameter, in float64."""
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        r = (m / (1 - beta1 ** t)) / (np.sqrt(v / (1 - beta2 ** t)) + eps)
        q = np.linalg.norm(w) / np.linalg.norm(r)
        w = w - lr * q * r
    return w


def test_as_lamb_learning_rate(mode, rng):
    w0 = rng.standard_normal((3, 4)).astype(np.float32)
    grads = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
    weight = ms.Parameter(ms.Tensor(w0), name="w")
    schedule = WarmupPolynomialDecayLR(0.1, 0.0, warmup_steps=2, decay_steps=5, power=1.0)
    opt = Lamb([weight], learning_rate=schedule)
    for g in grads:
        opt((ms.Tensor(g),))
    # lr per step, by hand: s=0: 0, s=1: 0.05 (warm-up), s=2: 0.1 * (1 - 2/5) = 0.06, s=3: 0.1 * 0.4 = 0.04
    expected = _numpy_lamb(w0, grads, [0.0, 0.05, 0.06, 0.04])
    np.testing.assert_allclose(weight.asnumpy(), expected, rtol=1e-5, atol=1e-6)
    assert opt.global_step.asnumpy().item() == 4


def test_first_warmup_step_leaves_weights(mode, rng):
    net = nn.Dense(3, 2)
    before = [p.asnumpy().copy() for p in net.trainable_params()]
    opt = Lamb(net.trainable_params(), WarmupPolynomialDecayLR(0.5, 0.0, 3, 10))
    opt(tuple(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in net.trainable_params()))
    for old, p in zip(before, net.trainable_params()):
        np.testing.assert_array_equal(p.asnumpy(), old)  # lr(0) == 0


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(learning_rate="0.1"), TypeError, ["'learning_rate'", "'0.1'"]),
    (dict(learning_rate=True), TypeError, ["'learning_rate'", "True"]),
    (dict(learning_rate=0.0), ValueError, ["'learning_rate'", "0.0"]),
    (dict(learning_rate=float("nan")), ValueError, ["'learning_rate'", "nan"]),
    (dict(end_learning_rate=-1e-3), ValueError, ["'end_learning_rate'", "-0.001"]),
    (dict(end_learning_rate=None), TypeError, ["'end_learning_rate'", "None"]),
    (dict(warmup_steps=1.5), TypeError, ["'warmup_steps'", "1.5"]),
    (dict(warmup_steps=-1), ValueError, ["'warmup_steps'", "-1"]),
    (dict(warmup_steps=11), ValueError, ["'warmup_steps'", "11", "10"]),
    (dict(decay_steps=0), ValueError, ["'decay_steps'", "0"]),
    (dict(decay_steps=10.0), TypeError, ["'decay_steps'", "10.0"]),
    (dict(power=0.0), ValueError, ["'power'", "0.0"]),
    (dict(power="2"), TypeError, ["'power'", "'2'"]),
])
def test_bad_arguments(kwargs, exc, words):
    args = dict(learning_rate=0.1, end_learning_rate=0.0, warmup_steps=2, decay_steps=10, power=1.0)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        WarmupPolynomialDecayLR(**args)
    for word in words:
        assert word in str(info.value)
