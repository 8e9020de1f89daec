"""LossScaleTrainStep: loss scaling, overflow skipping, scale dynamics, clipping and accumulation.

Overflow is injected into real steps: inputs of 1e18 make the *scaled* gradients overflow
float32 while the unscaled ones are finite, and NaN inputs make everything non-finite.
Gradients of the Dense + MSE network are computed independently with NumPy (float64), and the
LAMB steps are checked against the float64 reference in tests/reference.py.
"""
import mindspore as ms
import mindspore.dataset as ds
import numpy as np
import pytest
from mindspore import nn

from mindspore_lamb import Lamb, LossScaleTrainStep
from mindspore_lamb.backends import fused_cpu
from reference import LambReference

N_IN, N_OUT = 3, 2


def make_dense(rng):
    net = nn.Dense(N_IN, N_OUT)
    net.weight.set_data(ms.Tensor(rng.uniform(0.2, 0.6, (N_OUT, N_IN)).astype(np.float32)))
    net.bias.set_data(ms.Tensor(rng.uniform(0.1, 0.3, (N_OUT,)).astype(np.float32)))
    return net


def numpy_grads(weights, x, t):
    """float64 gradients of mean((x W^T + b - t)^2) with respect to W and b."""
    w, b = (np.asarray(a, np.float64) for a in weights)
    x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
    dy = 2.0 * (x @ w.T + b - t) / t.size
    return [dy.T @ x, dy.sum(axis=0)]


def batch(rng, n=4, scale=1.0):
    return (rng.standard_normal((n, N_IN)).astype(np.float32) * scale,
            rng.standard_normal((n, N_OUT)).astype(np.float32))


def state(net, opt):
    """Copies (asnumpy shares memory on CPU) of weights, moments and the step counter."""
    return ([p.asnumpy().copy() for p in net.trainable_params()],
            [m.asnumpy().copy() for m in opt.moments1], [v.asnumpy().copy() for v in opt.moments2],
            opt.global_step.asnumpy().item())


def assert_same_state(a, b):
    for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
        np.testing.assert_array_equal(x, y)
    assert a[3] == b[3]


def call(cell, x, t):
    loss, overflow, scale = cell(ms.Tensor(x), ms.Tensor(t))
    return float(loss.asnumpy()), bool(overflow.asnumpy()), float(scale.asnumpy())


@pytest.mark.parametrize("max_grad_norm", [None, 0.05, 100.0])
def test_unscale_and_clip_match_numpy(mode, rng, max_grad_norm):
    """With SGD(lr) the update is -lr * g exactly, so the unscaled (and clipped) gradient is visible."""
    net = make_dense(rng)
    w0 = [p.asnumpy().copy() for p in net.trainable_params()]
    lr = 0.5
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), nn.SGD(net.trainable_params(), lr),
                              init_scale=3.0 * 2 ** 12, max_grad_norm=max_grad_norm)
    x, t = batch(rng)
    loss, overflow, scale = call(cell, x, t)
    g = numpy_grads(w0, x, t)
    global_norm = np.sqrt(sum(np.sum(a * a) for a in g))
    if max_grad_norm is not None:
        if max_grad_norm < 1.0:
            assert global_norm > 2 * max_grad_norm  # the clip is really active
        g = [a * max_grad_norm / max(global_norm, max_grad_norm) for a in g]
    for p, w, grad in zip(net.trainable_params(), w0, g):
        np.testing.assert_allclose(p.asnumpy(), w - lr * grad, rtol=1e-5, atol=1e-6, err_msg=p.name)
    assert not overflow and scale == 3.0 * 2 ** 12
    np.testing.assert_allclose(loss, np.mean((x.astype(np.float64) @ w0[0].T + w0[1] - t) ** 2), rtol=1e-5)


def test_overflow_skips_the_step(mode, rng):
    net = make_dense(rng)
    opt = Lamb(net.trainable_params(), learning_rate=0.05, weight_decay=0.01)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt)  # init_scale 2**16, window 1000
    ref = LambReference([p.asnumpy() for p in net.trainable_params()])
    decay = [True, True]  # ungrouped Lamb decays every parameter without beta/gamma in its name

    x1, t1 = batch(rng)
    ref.step(numpy_grads(ref.w, x1, t1), 0.05, 0.01, decay)
    assert call(cell, x1, t1)[1:] == (False, 2.0 ** 16)
    good = state(net, opt)
    assert good[3] == 1 and cell.good_steps.asnumpy().item() == 1

    # 1e18 inputs: the unscaled gradients are finite in float32, the gradients of loss * 2**16 are not
    x_big, t_big = batch(rng, scale=1e18)
    unscaled = numpy_grads(good[0], x_big, t_big)
    assert max(np.abs(a).max() for a in unscaled) < np.finfo(np.float32).max
    assert max(np.abs(a).max() for a in unscaled) * 2 ** 16 > np.finfo(np.float32).max
    _, overflow, used = call(cell, x_big, t_big)
    assert overflow and used == 2.0 ** 16
    assert cell.get_loss_scale() == 2.0 ** 15
    assert cell.good_steps.asnumpy().item() == 0
    assert_same_state(state(net, opt), good)       # weights, moments, global_step untouched
    assert opt.skipped_steps == 1                  # Lamb was called and skipped the call itself (no branch)

    x_nan = x1.copy()
    x_nan[1, 2] = np.nan
    _, overflow, used = call(cell, x_nan, t1)
    assert overflow and used == 2.0 ** 15 and cell.get_loss_scale() == 2.0 ** 14
    x_inf = x1.copy()
    x_inf[0, 0] = np.inf
    assert call(cell, x_inf, t1)[1:] == (True, 2.0 ** 14)
    assert cell.get_loss_scale() == 2.0 ** 13
    assert_same_state(state(net, opt), good)

    # the next good step is the second LAMB step: t = 2 in the bias correction, lr/wd of step 1
    x2, t2 = batch(rng)
    ref.step(numpy_grads(ref.w, x2, t2), 0.05, 0.01, decay)
    assert call(cell, x2, t2)[1:] == (False, 2.0 ** 13)
    assert opt.global_step.asnumpy().item() == 2
    for p, w in zip(net.trainable_params(), ref.w):
        np.testing.assert_allclose(p.asnumpy(), w, rtol=2e-5, atol=1e-6, err_msg=p.name)


def simulate_scale(flags, init, factor, window, min_scale):
    """The dynamic loss-scale rule, step by step, written from its description."""
    scale, good, out = init, 0, []
    for overflow in flags:
        if overflow:
            scale, good = max(scale / factor, min_scale), 0
        else:
            good += 1
            if good == window:
                scale, good = scale * factor, 0
        out.append((scale, good))
    return out


def test_scale_backoff_growth_and_minimum(mode, rng):
    net = make_dense(rng)
    opt = Lamb(net.trainable_params(), learning_rate=0.01)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=4, scale_factor=2,
                              scale_window=3, min_scale=1)
    flags = [False, False, False, True, False, False, True, True, True, False, False, False, False]
    expected = simulate_scale(flags, 4.0, 2.0, 3, 1.0)
    assert [s for s, _ in expected] == [4, 4, 8, 4, 4, 4, 2, 1, 1, 1, 1, 2, 2]   # sanity of the simulation
    x, t = batch(rng)
    x_nan = np.full_like(x, np.nan)
    applied = 0
    for overflow, (want_scale, want_good) in zip(flags, expected):
        got = call(cell, x_nan if overflow else x, t)
        applied += not overflow
        assert got[1] == overflow
        assert cell.get_loss_scale() == want_scale
        assert cell.good_steps.asnumpy().item() == want_good
    assert opt.global_step.asnumpy().item() == applied


def test_static_scale_still_skips(mode, rng):
    net = make_dense(rng)
    opt = Lamb(net.trainable_params(), learning_rate=0.01)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=1024, dynamic=False,
                              scale_window=1)
    x, t = batch(rng)
    call(cell, x, t)
    before = state(net, opt)
    assert call(cell, np.full_like(x, np.nan), t)[1:] == (True, 1024.0)
    assert_same_state(state(net, opt), before)
    call(cell, x, t)
    assert cell.get_loss_scale() == 1024.0 and opt.global_step.asnumpy().item() == 2


@pytest.mark.parametrize("optimizer", ["lamb", "sgd"])
def test_accumulation_equals_big_batch(mode, rng, optimizer):
    """k micro-batches of 2 step like one batch of 2k (the mean gradient); with SGD also against NumPy."""
    k, clip = 3, (0.5 if optimizer == "lamb" else 100.0)
    micro = [batch(rng, n=2) for _ in range(2 * k)]
    w0 = make_dense(rng)
    init = [p.asnumpy().copy() for p in w0.trainable_params()]

    def build(steps):
        net = nn.Dense(N_IN, N_OUT)
        for p, w in zip(net.trainable_params(), init):
            p.set_data(ms.Tensor(w))
        if optimizer == "lamb":
            opt = Lamb(net.trainable_params(), learning_rate=0.05, weight_decay=0.01)
        else:
            opt = nn.SGD(net.trainable_params(), learning_rate=0.1)
        # clipping to 0.5 is active for the Lamb run; 100 (inactive) for SGD, so that a sum instead of the
        # mean, which the clip (and LAMB's scale invariance) would hide, shows up against NumPy
        return net, opt, LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=2.0 ** 10,
                                            accumulation_steps=steps, max_grad_norm=clip)

    net_a, opt_a, acc = build(k)
    for i, (x, t) in enumerate(micro):
        assert call(acc, x, t)[1] is False
        if (i + 1) % k:
            assert np.any(acc.accum_grads[0].asnumpy() != 0)
            if i < k:
                for p, w in zip(net_a.trainable_params(), init):
                    np.testing.assert_array_equal(p.asnumpy(), w)   # no step before the k-th call
        else:
            assert all(np.all(a.asnumpy() == 0) for a in acc.accum_grads)
        if optimizer == "lamb":
            assert opt_a.global_step.asnumpy().item() == (i + 1) // k
    net_b, opt_b, big = build(1)
    for j in range(2):
        xs, ts = zip(*micro[j * k:(j + 1) * k])
        call(big, np.concatenate(xs), np.concatenate(ts))
    for a, b in zip(net_a.trainable_params(), net_b.trainable_params()):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-6)
    if optimizer == "lamb":
        for a, b in zip(list(opt_a.moments1) + list(opt_a.moments2), list(opt_b.moments1) + list(opt_b.moments2)):
            np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-5, atol=1e-7)
    else:
        w = [a.astype(np.float64) for a in init]
        for j in range(2):
            g = [sum(parts) / k for parts in zip(*(numpy_grads(w, x, t) for x, t in micro[j * k:(j + 1) * k]))]
            norm = np.sqrt(sum(np.sum(a * a) for a in g))
            w = [a - 0.1 * b * clip / max(norm, clip) for a, b in zip(w, g)]
        for p, want in zip(net_a.trainable_params(), w):
            np.testing.assert_allclose(p.asnumpy(), want, rtol=1e-5, atol=1e-6, err_msg=p.name)


def test_overflow_drops_the_accumulated_step(mode, rng):
    net = make_dense(rng)
    ref = LambReference([p.asnumpy() for p in net.trainable_params()])
    opt = Lamb(net.trainable_params(), learning_rate=0.05)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=64.0, scale_window=1000,
                              accumulation_steps=2)
    before = state(net, opt)
    (x1, t1), (x3, t3), (x4, t4) = batch(rng), batch(rng), batch(rng)
    x_nan = np.full_like(x1, np.nan)
    assert call(cell, x1, t1)[1:] == (False, 64.0)
    assert call(cell, x_nan, t1)[1:] == (True, 64.0)    # second micro-step overflows: the window is dropped
    assert_same_state(state(net, opt), before)
    assert cell.get_loss_scale() == 32.0
    assert all(np.all(a.asnumpy() == 0) for a in cell.accum_grads)   # no NaN left behind
    assert call(cell, x3, t3)[1:] == (False, 32.0)
    assert call(cell, x4, t4)[1:] == (False, 32.0)
    assert opt.global_step.asnumpy().item() == 1
    g3, g4 = numpy_grads(ref.w, x3, t3), numpy_grads(ref.w, x4, t4)
    ref.step([(a + b) / 2 for a, b in zip(g3, g4)], 0.05, 0.0)
    for p, w in zip(net.trainable_params(), ref.w):
        np.testing.assert_allclose(p.asnumpy(), w, rtol=2e-5, atol=1e-6, err_msg=p.name)


def test_model_train(mode, rng):
    net = make_dense(rng)
    opt = Lamb(net.trainable_params(), learning_rate=0.02, weight_decay=0.01)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=2.0 ** 8, scale_window=1000,
                              max_grad_norm=1.0)
    x, t = batch(rng, n=32)
    x[17, 1] = np.inf         # row 17 is in the 3rd batch of 8: that step overflows in every epoch
    data = ds.NumpySlicesDataset({"x": x, "t": t}, shuffle=False).batch(8)
    losses = []

    class Record(ms.train.Callback):
        def on_train_step_end(self, run_context):
            out = run_context.original_args().net_outputs
            losses.append((float(out[0].asnumpy()), bool(out[1].asnumpy()), float(out[2].asnumpy())))

    ms.train.Model(cell).train(2, data, callbacks=[Record()], dataset_sink_mode=False)
    assert [o for _, o, _ in losses] == [False, False, True, False] * 2
    assert opt.global_step.asnumpy().item() == 6
    assert cell.get_loss_scale() == 2.0 ** 6
    clean = [loss for loss, o, _ in losses if not o]
    assert clean[-1] < clean[0]


def test_scale_and_counters_are_checkpointed(tmp_path, rng):
    net = make_dense(rng)
    opt = Lamb(net.trainable_params(), learning_rate=0.01)
    cell = LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), opt, init_scale=512, accumulation_steps=2)
    names = set(cell.parameters_dict())
    assert {"loss_scale", "loss_scale_good_steps", "accum_micro_step", "accum_overflow",
            "accum_grad.weight", "accum_grad.bias"} <= names
    cell.loss_scale.set_data(ms.Tensor(8.0, ms.float32))
    ms.save_checkpoint(cell, str(tmp_path / "step.ckpt"))
    net2 = make_dense(rng)
    cell2 = LossScaleTrainStep(nn.WithLossCell(net2, nn.MSELoss()), Lamb(net2.trainable_params(), 0.01),
                               accumulation_steps=2)
    ms.load_param_into_net(cell2, ms.load_checkpoint(str(tmp_path / "step.ckpt")))
    assert cell2.get_loss_scale() == 8.0


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(init_scale="big"), TypeError, ["'init_scale'", "'big'"]),
    (dict(init_scale=0), ValueError, ["'init_scale'", "0.0"]),
    (dict(init_scale=float("inf")), ValueError, ["'init_scale'", "inf"]),
    (dict(init_scale=0.5), ValueError, ["'init_scale'", "0.5", "'min_scale'"]),
    (dict(scale_factor=1.0), ValueError, ["'scale_factor'", "1.0"]),
    (dict(scale_factor=None), TypeError, ["'scale_factor'", "None"]),
    (dict(scale_window=0), ValueError, ["'scale_window'", "0"]),
    (dict(scale_window=10.0), TypeError, ["'scale_window'", "10.0"]),
    (dict(min_scale=-1), ValueError, ["'min_scale'", "-1.0"]),
    (dict(dynamic=1), TypeError, ["'dynamic'", "1"]),
    (dict(max_grad_norm=0.0), ValueError, ["'max_grad_norm'", "0.0"]),
    (dict(max_grad_norm="1"), TypeError, ["'max_grad_norm'", "'1'"]),
    (dict(accumulation_steps=0), ValueError, ["'accumulation_steps'", "0"]),
    (dict(accumulation_steps=True), TypeError, ["'accumulation_steps'", "True"]),
])
def test_bad_arguments(kwargs, exc, words):
    net = nn.Dense(2, 2)
    with pytest.raises(exc) as info:
        LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), Lamb(net.trainable_params(), 0.1), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_bad_network_and_optimizer():
    net = nn.Dense(2, 2)
    with pytest.raises(TypeError, match="'network'"):
        LossScaleTrainStep(lambda x: x, Lamb(net.trainable_params(), 0.1))
    with pytest.raises(TypeError, match="'optimizer'"):
        LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), "adam")
    with pytest.raises(ValueError, match="loss_scale=128.0"):
        LossScaleTrainStep(nn.WithLossCell(net, nn.MSELoss()), Lamb(net.trainable_params(), 0.1, loss_scale=128))


class _Dot(nn.Cell):
    """loss = sum(w * x): the gradient with respect to w is x itself."""

    def __init__(self):
        super().__init__()
        self.w = ms.Parameter(ms.Tensor(np.ones(4, np.float32)), name="w")

    def construct(self, x):
        return (self.w * x).sum()


@pytest.mark.parametrize("scale", [1e18, 1e20])
def test_overflow_is_a_non_finite_sum_of_squares(mode, path, scale):
    """Every gradient element finite, but at 1e20 the sum of squares (4e40) exceeds float32: an overflow,
    the step is skipped and the scale backs off; at 1e18 (4e36) it is a normal step. Both paths: the fused
    sum-of-squares kernel on CPU and the composite HyperMap + AddN."""
    net = _Dot()
    opt = Lamb(net.trainable_params(), learning_rate=0.1, backend=path)
    cell = LossScaleTrainStep(net, opt, init_scale=1.0, min_scale=0.25)
    assert isinstance(cell.grad_sq_cell, fused_cpu.SumOfSquares) == (path == "fused_cpu")
    _, overflow, _ = cell(ms.Tensor(np.full(4, scale, np.float32)))
    assert bool(overflow.asnumpy()) == (scale > 1e19)
    assert cell.get_loss_scale() == (0.5 if scale > 1e19 else 1.0)
    assert (opt.skipped_steps, int(opt.global_step.asnumpy()[0])) == ((1, 0) if scale > 1e19 else (0, 1))
    moved = not np.array_equal(net.w.asnumpy(), np.ones(4, np.float32))
    assert moved == (scale < 1e19)


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_loss_of_more_than_one_element_is_refused(mode, rng, accumulation_steps):
    """A loss of shape (batch,) (nn.MSELoss(reduction='none') averaged over one axis only) would train on
    the gradients of its sum: an error naming the shape and saying to reduce it; nothing changes."""
    net = make_dense(rng)
    opt = Lamb(net.trainable_params(), 0.1)
    per_sample = nn.WithLossCell(net, nn.MSELoss(reduction="none"))
    cell = LossScaleTrainStep(per_sample, opt, accumulation_steps=accumulation_steps)
    before = state(net, opt)
    x, t = batch(rng)
    with pytest.raises(ValueError, match=r"'LossScaleTrainStep'.*scalar loss.*shape \(4, 2\).*mean"):
        cell(ms.Tensor(x), ms.Tensor(t))
    assert_same_state(state(net, opt), before)
