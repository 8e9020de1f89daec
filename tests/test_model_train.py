"""Lamb as a drop-in optimizer for Model.train with a mindspore.dataset pipeline."""
import numpy as np

import mindspore as ms
from mindspore import nn
from mindspore.train import Callback, FixedLossScaleManager, Model

from mindspore_lamb import Lamb
from nets import loss_fn, make_data, make_dataset, make_net, params_of


class LossRecorder(Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def step_end(self, run_context):
        self.losses.append(float(run_context.original_args().net_outputs.asnumpy()))


def _accuracy(net):
    x, labels = make_data()
    return float((net(ms.Tensor(x)).asnumpy().argmax(1) == labels).mean())


def _train(epochs, loss_scale=None, seed=0):
    net = make_net(seed)
    kwargs = {} if loss_scale is None else {"loss_scale": loss_scale}
    opt = Lamb(net.trainable_params(), learning_rate=0.02, weight_decay=0.01, **kwargs)
    manager = None if loss_scale is None else FixedLossScaleManager(loss_scale, drop_overflow_update=False)
    model = Model(net, loss_fn=loss_fn(), optimizer=opt, loss_scale_manager=manager)
    recorder = LossRecorder()
    model.train(epochs, make_dataset(), callbacks=[recorder], dataset_sink_mode=False)
    return net, opt, recorder.losses


def test_model_train_learns(mode):
    net0 = make_net(0)
    accuracy_before = _accuracy(net0)
    net, opt, losses = _train(epochs=6)
    assert len(losses) == 6 * 8
    assert int(opt.global_step.asnumpy()[0]) == 6 * 8
    assert np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
    assert _accuracy(net) > max(0.85, accuracy_before + 0.2)


def test_fixed_loss_scale_manager_with_loss_scale_gives_identical_parameters():
    """FixedLossScaleManager(s, drop_overflow_update=False) scales the loss by s; Lamb(loss_scale=s) undoes it
    on the gradients only (never on the weight decay), so training is identical to the unscaled run."""
    ms.set_context(mode=ms.GRAPH_MODE)
    plain, _, plain_losses = _train(epochs=2)
    scaled, opt, scaled_losses = _train(epochs=2, loss_scale=1024.0)
    assert opt.loss_scale == 1024.0
    np.testing.assert_allclose(scaled_losses, plain_losses, rtol=1e-6)
    for name, value in params_of(plain).items():
        np.testing.assert_array_equal(params_of(scaled)[name], value, err_msg=name)


def test_loss_scale_without_lamb_loss_scale_differs():
    """The check above can fail: forgetting loss_scale=s in Lamb changes training (gradients 1024x).

    LAMB's direction m^/sqrt(v^) is invariant to the gradient scale except through eps, so the
    difference is small, but the parameters are no longer identical."""
    ms.set_context(mode=ms.GRAPH_MODE)
    net = make_net(0)
    opt = Lamb(net.trainable_params(), learning_rate=0.02, weight_decay=0.01)
    model = Model(net, loss_fn=loss_fn(), optimizer=opt,
                  loss_scale_manager=FixedLossScaleManager(1024.0, drop_overflow_update=False))
    model.train(1, make_dataset(), dataset_sink_mode=False)
    plain, _, _ = _train(epochs=1)
    diffs = [np.abs(params_of(net)[n] - v).max() for n, v in params_of(plain).items()]
    assert max(diffs) > 1e-6


def test_model_train_dataset_sink_mode_matches_non_sink():
    """Graph mode with dataset sink (how Model.train is often used for pretraining) trains exactly as
    the non-sink loop, with a learning-rate schedule driven by global_step."""
    ms.set_context(mode=ms.GRAPH_MODE)
    results = []
    for sink in (True, False):
        net = make_net(0)
        opt = Lamb(net.trainable_params(), learning_rate=nn.PolynomialDecayLR(0.02, 0.002, 16, 1.0))
        Model(net, loss_fn=loss_fn(), optimizer=opt).train(2, make_dataset(), dataset_sink_mode=sink)
        assert int(opt.global_step.asnumpy()[0]) == 16
        results.append(params_of(net))
    for name, value in results[1].items():
        np.testing.assert_allclose(results[0][name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert any(np.abs(value - params_of(make_net(0))[name]).max() > 1e-3 for name, value in results[0].items())


def test_functional_train_step_under_jit(mode):
    """The MindSpore 2.x functional style: value_and_grad + a jit-compiled step calling the optimizer."""
    net = make_net(0)
    opt = Lamb(net.trainable_params(), learning_rate=0.02, weight_decay=0.01)
    criterion = loss_fn()

    def forward(x, labels):
        return criterion(net(x), labels)

    grad_fn = ms.value_and_grad(forward, None, opt.parameters)

    @ms.jit
    def train_step(x, labels):
        loss, grads = grad_fn(x, labels)
        opt(grads)
        return loss

    reference = make_net(0)
    model = Model(reference, loss_fn=loss_fn(),
                  optimizer=Lamb(reference.trainable_params(), learning_rate=0.02, weight_decay=0.01))
    model.train(1, make_dataset(), dataset_sink_mode=False)
    for batch in make_dataset().create_tuple_iterator():
        train_step(*batch)
    assert int(opt.global_step.asnumpy()[0]) == 8
    for name, value in params_of(reference).items():
        np.testing.assert_allclose(params_of(net)[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
