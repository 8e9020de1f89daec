"""Fault injection: hostile or unlucky inputs and environments end in a clear error or a documented, tested
behaviour (docs/api/lamb.md, "What can go wrong"), with nothing already trained lost."""
import logging
import os
import re
import warnings

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from mindspore_lamb import Lamb, LossScaleTrainStep, backends
from mindspore_lamb.backends import _build, composite, fused_cpu
from nets import loss_fn, make_net
from reference import LambReference


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal((4, 6)).astype(np.float32)), name="fc.weight"),
            Parameter(Tensor(rng.standard_normal((6,)).astype(np.float32)), name="fc.bias")]


def _grads(params, rng, dtype=np.float32):
    return tuple(Tensor(rng.standard_normal(p.shape).astype(dtype)) for p in params)


# ---- arguments, as float32 will see them ----

DEGENERATE = [
    (dict(learning_rate=Tensor(np.float32(np.nan))), ["learning_rate", "nan"]),
    (dict(learning_rate=Tensor(np.float32(np.inf))), ["learning_rate", "inf"]),
    (dict(learning_rate=Tensor(np.float32(-1.0))), ["learning_rate", "-1.0"]),
    (dict(learning_rate=[np.nan] * 5), ["learning_rate", "element 0", "nan"]),
    (dict(learning_rate=[0.1, 0.05, -0.01]), ["learning_rate", "element 2", "-0.01"]),
    (dict(learning_rate=Tensor(np.array([0.1, np.inf], np.float32))), ["learning_rate", "element 1", "inf"]),
    (dict(learning_rate=1e300), ["learning_rate", "1e+300", "float32"]),
    (dict(eps=1e-50), ["eps", "1e-50", "normal float32"]),
    (dict(eps=1e50), ["eps", "1e+50", "float32"]),
    (dict(beta2=1 - 1e-9), ["beta2", "0.999999999", "float32"]),
    (dict(beta1=1e-50), ["beta1", "1e-50", "float32"]),
    (dict(loss_scale=1e300), ["loss_scale", "1e+300"]),
    (dict(loss_scale=1e-300), ["loss_scale", "1e-300"]),
    (dict(loss_scale=1e38), ["loss_scale", "reciprocal", "1e+38"]),
    (dict(trust_ratio_clip=(np.inf, np.inf)), ["trust_ratio_clip", "inf"]),
    (dict(max_grad_norm=1e-50), ["max_grad_norm", "1e-50"]),
    (dict(weight_decay=1e40), ["weight_decay", "1e+40"]),
]


@pytest.mark.parametrize("kwargs,fragments", DEGENERATE, ids=[str(k)[:40] for k, _ in DEGENERATE])
def test_degenerate_numbers_are_refused(kwargs, fragments):
    kwargs = dict({"learning_rate": 0.1}, **kwargs)
    with pytest.raises(ValueError) as info:
        Lamb(_params(), **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_group_learning_rate_sequence_is_checked():
    params = _params()
    with pytest.raises(ValueError, match=r"lr \(group 1\).*element 1"):
        Lamb([{"params": params[:1]}, {"params": params[1:], "lr": [0.1, np.nan]}], learning_rate=0.1)


def test_empty_parameter_is_refused():
    empty = Parameter(Tensor(np.zeros((0,), np.float32)), name="empty.bias")
    with pytest.raises(ValueError, match="'Lamb'.*'empty.bias'.*no element"):
        Lamb(_params() + [empty], learning_rate=0.1)


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(min_scale=1e-50), ["min_scale", "1e-50"]),
    (dict(init_scale=1e300), ["init_scale", "1e+300"]),
    (dict(init_scale=1e38, min_scale=1.0), ["init_scale", "reciprocal"]),
])
def test_loss_scale_cell_refuses_degenerate_scales(kwargs, fragments):
    net = make_net(0)
    with pytest.raises(ValueError) as info:
        LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), Lamb(net.trainable_params(), 0.01), **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_loss_scale_growth_stops_where_its_reciprocal_stays_normal(mode):
    """Growth is capped where 1 / scale is still a normal float32; a long run of good steps never reaches
    a scale whose reciprocal underflows."""
    net = make_net(0)
    cell = LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), Lamb(net.trainable_params(), 1e-3),
                              init_scale=2.0 ** 120, scale_factor=16.0, scale_window=1)
    x = Tensor(np.ones((4, 8), np.float32) * 1e-30)
    y = Tensor(np.zeros(4, np.int32))
    for _ in range(4):
        cell(x, y)
    assert 2.0 ** 120 < cell.get_loss_scale() <= 1.0 / np.finfo(np.float32).tiny


def test_both_max_grad_norms_is_an_error():
    net = make_net(0)
    opt = Lamb(net.trainable_params(), 0.01, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), opt, max_grad_norm=1.0)


# ---- learning-rate sequences shorter than the run hold their last value ----

@pytest.mark.parametrize("form", ["list", "tensor"])
def test_short_learning_rate_sequence_holds_its_last_value(mode, path, form, rng):
    values = [0.05, 0.02, 0.01]
    lr = values if form == "list" else Tensor(np.array(values, np.float32))
    params = _params()
    ref = LambReference([p.asnumpy().astype(np.float64) for p in params])
    opt = Lamb(params, learning_rate=lr, weight_decay=0.01, backend=path)
    for step in range(6):                     # steps 3, 4, 5 run past the end: lr 0.01
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
        opt(tuple(Tensor(g) for g in grads))
        ref.step(grads, lr=lambda s: values[min(s, len(values) - 1)], weight_decay=0.01)
        for p, want in zip(params, ref.w):
            np.testing.assert_allclose(p.asnumpy(), want, rtol=2e-5, atol=2e-6)
    assert int(opt.global_step.asnumpy()[0]) == 6


# ---- non-finite weights are never silent ----

def test_nonfinite_weight_is_left_alone_and_reported(mode, path, rng):
    params = _params()
    opt = Lamb(params, learning_rate=0.1, weight_decay=0.01, backend=path)
    poisoned = params[0].asnumpy().copy()
    poisoned[1, 2] = np.nan
    params[0].set_data(Tensor(poisoned))
    bias_before = params[1].asnumpy().copy()
    opt(_grads(params, rng))
    after = params[0].asnumpy()
    assert np.isnan(after[1, 2])
    finite = np.isfinite(poisoned)
    np.testing.assert_array_equal(after[finite], poisoned[finite])      # the rest of the layer untouched
    assert np.isnan(opt.trust_ratios()["fc.weight"])                     # never 1.0
    assert opt.nonfinite_parameters() == ["fc.weight"]
    assert not np.array_equal(params[1].asnumpy(), bias_before)          # the healthy layer trained
    assert np.isfinite(opt.trust_ratios()["fc.bias"])
    assert all(np.isfinite(m.asnumpy()).all() for m in list(opt.moments1) + list(opt.moments2))


class _Bag(nn.Cell):
    """Embedding -> mean -> Dense: a NaN in an embedding row that no input uses leaves the loss finite."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.dense = nn.Dense(4, 3)

    def construct(self, ids):
        return self.dense(self.embedding(ids).mean(axis=1))


def test_monitor_stops_training_on_a_nonfinite_weight():
    import mindspore.dataset as ds
    from mindspore_lamb import TrustRatioMonitor
    ms.set_context(mode=ms.GRAPH_MODE)
    net = _Bag()
    table = net.embedding.embedding_table.asnumpy().copy()
    table[7, 1] = np.nan                                # row 7: never looked up below
    net.embedding.embedding_table.set_data(Tensor(table))
    opt = Lamb(net.trainable_params(), 0.01)
    monitor = TrustRatioMonitor(opt, every=1)
    ids = np.random.default_rng(0).integers(0, 5, (32, 6)).astype(np.int32)
    data = ds.NumpySlicesDataset({"ids": ids, "y": np.zeros(32, np.int32)}, shuffle=False).batch(8)
    model = ms.train.Model(net, loss_fn(), opt)
    with pytest.warns(RuntimeWarning, match=r"embedding_table.*NaN or Inf.*stopped"):
        model.train(1, data, callbacks=[monitor], dataset_sink_mode=False)
    assert len({r["step"] for r in monitor.records}) == 1                 # stopped after the first step
    assert opt.nonfinite_parameters() == [net.embedding.embedding_table.name]
    assert np.isnan(opt.trust_ratios()[net.embedding.embedding_table.name])
    assert np.isnan(net.embedding.embedding_table.asnumpy()[7, 1])         # left as it was, not spread
    assert np.isfinite(np.delete(net.embedding.embedding_table.asnumpy().reshape(-1), 7 * 4 + 1)).all()


# ---- wrong-dtype gradients: one behaviour on both backends ----

@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_floating_gradients_are_cast_to_float32(mode, path, dtype, rng):
    results = []
    for grad_dtype in (np.float32, dtype):
        params = _params()
        opt = Lamb(params, learning_rate=0.1, weight_decay=0.01, backend=path)
        grads = [np.random.default_rng(5).standard_normal(p.shape).astype(dtype) for p in params]
        opt(tuple(Tensor(g.astype(grad_dtype)) for g in grads))
        results.append([p.asnumpy().copy() for p in params])
    for ours, theirs in zip(*results):
        np.testing.assert_array_equal(ours, theirs)


def test_integer_gradient_is_an_error_naming_the_parameter(mode, path):
    params = _params()
    opt = Lamb(params, learning_rate=0.1, backend=path)
    before = [p.asnumpy().copy() for p in params]
    grads = (Tensor(np.ones((4, 6), np.int32)), Tensor(np.ones(6, np.float32)))
    with pytest.raises(TypeError, match="fc.weight.*Float32.*Int32"):
        opt(grads)
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.asnumpy(), b)


# ---- migrating from nn.Lamb: quiet in both directions ----

def test_nn_lamb_checkpoint_loads_quietly(tmp_path, caplog):
    ms.set_context(mode=ms.GRAPH_MODE)
    other = make_net(1)
    theirs = nn.TrainOneStepCell(nn.WithLossCell(other, loss_fn()), nn.Lamb(other.trainable_params(), 0.01))
    path = str(tmp_path / "nn_lamb.ckpt")
    ms.save_checkpoint(theirs, path)
    net = make_net(0)
    ours = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn()), Lamb(net.trainable_params(), 0.01))
    with caplog.at_level(logging.WARNING):
        not_loaded, _ = ms.load_param_into_net(ours, ms.load_checkpoint(path))
    assert not_loaded == []
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    np.testing.assert_array_equal(net.fc1.weight.asnumpy(), other.fc1.weight.asnumpy())


# ---- hyper-parameters from Cells: an invalid value is a skipped, counted step, never NaN weights ----

class _BadAtStep(nn.learning_rate_schedule.LearningRateSchedule):
    """A learning-rate or weight-decay Cell: `good` at every step but `at`, where it returns `bad`."""

    def __init__(self, good, bad, at):
        super().__init__()
        self.good, self.bad, self.at = good, bad, at

    def construct(self, global_step):
        step = ops.reshape(global_step, ())
        return ops.select(step == self.at, ops.fill(ms.float32, (), self.bad), ops.fill(ms.float32, (), self.good))


INVALID_CELLS = [("learning_rate", np.nan), ("learning_rate", np.inf), ("learning_rate", -1.0),
                 ("weight_decay", np.nan), ("weight_decay", -np.inf), ("weight_decay", -5.0)]


@pytest.mark.parametrize("which,bad", INVALID_CELLS, ids=[f"{w}={b}" for w, b in INVALID_CELLS])
def test_invalid_value_from_a_cell_skips_and_counts_the_step(mode, path, which, bad, rng):
    params = _params()
    kwargs = {"learning_rate": 0.1, "weight_decay": 0.01, which: _BadAtStep(0.1 if which == "learning_rate" else 0.01,
                                                                            bad, at=2)}
    opt = Lamb(params, **kwargs, backend=path)
    for _ in range(2):
        opt(_grads(params, rng))
    state = [x.asnumpy().copy() for x in list(params) + list(opt.moments1) + list(opt.moments2)]
    for _ in range(3):                          # step 2 again and again: the counter does not advance
        opt(_grads(params, rng))
    after = [x.asnumpy() for x in list(params) + list(opt.moments1) + list(opt.moments2)]
    for before, now in zip(state, after):
        np.testing.assert_array_equal(now, before)
    assert int(opt.global_step.asnumpy()[0]) == 2
    assert opt.skipped_steps == 3 and opt.invalid_steps == 3


def test_decay_outside_the_trust_ratio_beyond_one_is_refused_or_skipped(mode, path, rng):
    with pytest.raises(ValueError, match=r"decoupled_outside.*learning_rate \* weight_decay <= 1.*0\.5.*4\.0"):
        Lamb(_params(), learning_rate=[0.1, 0.5], weight_decay=4.0, weight_decay_mode="decoupled_outside",
             backend=path)
    with pytest.raises(ValueError, match=r"\(group 1\).*learning_rate 2\.0 and weight_decay 0\.75"):
        params = _params()
        Lamb([{"params": params[:1]}, {"params": params[1:], "lr": 2.0}], learning_rate=0.1, weight_decay=0.75,
             weight_decay_mode="decoupled_outside", backend=path)
    params = _params()
    before = [p.asnumpy().copy() for p in params]
    opt = Lamb(params, learning_rate=0.5, weight_decay=_BadAtStep(0.1, 3.0, at=0),
               weight_decay_mode="decoupled_outside", backend=path)
    opt(_grads(params, rng))                   # 0.5 * 3.0 > 1: the weights would flip sign
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p.asnumpy(), b)
    assert opt.invalid_steps == 1
    assert np.isnan(list(opt.layer_norms().values())).all()     # nothing recorded: no step applied yet


def test_monitor_stops_training_on_invalid_steps():
    import mindspore.dataset as ds
    from mindspore_lamb import TrustRatioMonitor
    ms.set_context(mode=ms.GRAPH_MODE)
    net = make_net(0)
    opt = Lamb(net.trainable_params(), _BadAtStep(0.01, np.nan, at=3))
    monitor = TrustRatioMonitor(opt, every=1)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    data = ds.NumpySlicesDataset({"x": x, "y": np.zeros(64, np.int32)}, shuffle=False).batch(8)
    model = ms.train.Model(net, loss_fn(), opt)
    with pytest.warns(RuntimeWarning, match=r"step 4: 1 step\(s\) were skipped as invalid.*global_step 3.*stopped"):
        model.train(1, data, callbacks=[monitor], dataset_sink_mode=False)
    assert {r["step"] for r in monitor.records} == {1, 2, 3, 4}
    assert all(np.isfinite(p.asnumpy()).all() for p in net.trainable_params())


# ---- a damaged optimizer state (a bad checkpoint) is named, and never spreads into the weights ----

def _damage(opt, kind):
    if kind == "nan in m":
        m = opt.moments1[0].asnumpy().copy()
        m[1, 2] = np.nan
        opt.moments1[0].set_data(Tensor(m))
        return "'lamb_m.fc.weight' holds 1 NaN or Inf value(s), the first at index (1, 2)"
    if kind == "negative v":
        v = opt.moments2[0].asnumpy().copy()
        v[3, 1] = -0.5
        opt.moments2[0].set_data(Tensor(v))
        return "'lamb_v.fc.weight' holds 1 negative value(s) (a second moment is a mean of squares), the first at " \
               "index (3, 1): -0.5"
    opt.global_step.set_data(Tensor(np.array([-1], np.int32)))
    return "'global_step' must be one integer >= 0 (the number of steps taken), but it is [-1]"


@pytest.mark.parametrize("kind", ["nan in m", "negative v", "negative global_step"])
def test_damaged_state_is_named_and_never_reaches_the_weights(mode, path, kind, rng):
    params = _params()
    opt = Lamb(params, learning_rate=0.1, weight_decay=0.01, backend=path)
    opt.check_state()                                   # healthy: no error
    message = _damage(opt, kind)                        # as a damaged checkpoint loaded before training
    with pytest.raises(ValueError) as info:
        opt.check_state()
    assert message in str(info.value)
    weight, bias = (p.asnumpy().copy() for p in params)
    opt(_grads(params, rng))
    np.testing.assert_array_equal(params[0].asnumpy(), weight)          # left as it was: no NaN written
    if kind == "negative global_step":                                   # the whole step is invalid
        assert opt.invalid_steps == 1 and int(opt.global_step.asnumpy()[0]) == -1
        np.testing.assert_array_equal(params[1].asnumpy(), bias)
    else:                                                                # only the damaged layer is held
        assert opt.nonfinite_parameters() == ["fc.weight"]
        assert np.isnan(opt.trust_ratios()["fc.weight"])
        assert not np.array_equal(params[1].asnumpy(), bias)
        # the step counts as applied (the documented behaviour): the layer stays frozen, the state stays named
        assert int(opt.global_step.asnumpy()[0]) == 1 and opt.skipped_steps == 0
        with pytest.raises(ValueError, match=re.escape(message.split(": -")[0])):   # v moved, still < 0
            opt.check_state()


def test_damaged_checkpoint_is_named_before_it_is_loaded(tmp_path):
    from mindspore_lamb import check_state
    ms.set_context(mode=ms.GRAPH_MODE)
    net = make_net(0)
    cell = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn()), Lamb(net.trainable_params(), 0.01))
    path = str(tmp_path / "good.ckpt")
    ms.save_checkpoint(cell, path)
    state = ms.load_checkpoint(path)
    check_state(state, path)                            # a healthy checkpoint passes
    half = {name: (Parameter(Tensor(value.asnumpy().astype(np.float16)), name=name)
                   if name.startswith("lamb_v.") else value) for name, value in state.items()}
    half_path = str(tmp_path / "half.ckpt")
    ms.save_checkpoint(list(half.values()), half_path)
    with pytest.raises(ValueError, match=r"half\.ckpt is damaged.*'lamb_v\.fc1\.weight' is stored as float16.*"
                                         r"moments are float32"):
        check_state(ms.load_checkpoint(half_path), half_path)


def test_monitor_refuses_to_start_from_a_damaged_state():
    import mindspore.dataset as ds
    from mindspore_lamb import TrustRatioMonitor
    ms.set_context(mode=ms.GRAPH_MODE)
    net = make_net(0)
    opt = Lamb(net.trainable_params(), 0.01)
    opt.global_step.set_data(Tensor(np.array([-1], np.int32)))
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    data = ds.NumpySlicesDataset({"x": np.ones((16, 8), np.float32), "y": np.zeros(16, np.int32)}).batch(8)
    with pytest.raises(ValueError, match="global_step"):
        ms.train.Model(net, loss_fn(), opt).train(1, data, callbacks=[TrustRatioMonitor(opt)],
                                                  dataset_sink_mode=False)
    for p in net.trainable_params():
        np.testing.assert_array_equal(p.asnumpy(), before[p.name])


@pytest.mark.parametrize("where", ["under a file", "in /proc", "a directory of that name"])
def test_monitor_path_that_cannot_be_written_is_refused_up_front(tmp_path, where):
    from mindspore_lamb import TrustRatioMonitor
    if where == "under a file":
        (tmp_path / "plain").write_text("x")
        path = tmp_path / "plain" / "trust.csv"
    elif where == "in /proc":
        path = "/proc/trust.csv"
    else:
        path = tmp_path / "trust.csv"
        path.mkdir()
    opt = Lamb(_params(), 0.01)
    with pytest.raises(ValueError, match=r"'TrustRatioMonitor'.*'path'.*cannot"):
        TrustRatioMonitor(opt, path=path)
    assert not os.path.isfile(path)


def test_monitor_path_check_leaves_no_file_behind(tmp_path):
    from mindspore_lamb import TrustRatioMonitor
    TrustRatioMonitor(Lamb(_params(), 0.01), path=tmp_path / "sub" / "trust.csv")
    assert os.listdir(tmp_path / "sub") == []


# ---- unclear errors made clear ----

class _VectorLR(nn.learning_rate_schedule.LearningRateSchedule):
    def construct(self, global_step):
        return ops.ones((2,), ms.float32) * 0.1


class _TwoOutputs(nn.Cell):
    def __init__(self):
        super().__init__()
        self.fc = nn.Dense(3, 2)

    def construct(self, x):
        y = self.fc(x)
        return y.sum(), y


def test_schedule_of_the_wrong_shape_is_named(mode):
    params = _params()
    with pytest.raises(ValueError, match=r"'Lamb', the learning rate must be a scalar.*shape \(2,\)"):
        Lamb(params, _VectorLR())(_grads(params, np.random.default_rng(0)))


def test_finite_flag_of_the_wrong_type_is_named(mode):
    params = _params()
    with pytest.raises(TypeError, match=r"'Lamb', the argument 'finite' must be None, a bool or a bool Tensor, "
                                        r"but got int 0"):
        Lamb(params, 0.1)(_grads(params, np.random.default_rng(0)), 0)


def test_missing_gradient_names_the_parameter(mode):
    params = _params()
    grads = _grads(params, np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"gradient of parameter 'fc.bias' is None"):
        Lamb(params, 0.1)((grads[0], None))


def test_loss_scale_cell_names_a_network_returning_a_tuple(mode):
    net = _TwoOutputs()
    cell = LossScaleTrainStep(net, Lamb(net.trainable_params(), 0.1))
    with pytest.raises(TypeError, match=r"'LossScaleTrainStep', the network must return the loss as one Tensor, "
                                        r"but it returned a tuple of 2 elements"):
        cell(Tensor(np.ones((2, 3), np.float32)))


@pytest.mark.parametrize("name", ["global_step", "learning_rate", "lamb_m.fc.bias", "lamb_skipped_steps"])
def test_parameter_named_like_the_optimizer_state_is_refused(name):
    params = _params() + [Parameter(Tensor(np.ones(3, np.float32)), name=name)]
    with pytest.raises(ValueError, match=f"parameter name '{name}' is also the name of the optimizer's own state"):
        Lamb(params, 0.1)


@pytest.mark.parametrize("predicate,error,words", [
    (lambda name: 1 / 0, ValueError, r"predicate 'exclude_from_weight_decay' raised ZeroDivisionError on "
                                     r"parameter 'fc.weight'"),
    (lambda name: "no", TypeError, r"must return a bool.*'fc.weight'.*str 'no'"),
    (lambda name: np.array([True, False]), TypeError, r"must return a bool.*'fc.weight'.*ndarray"),
])
def test_exclusion_predicate_must_answer_with_a_bool(predicate, error, words):
    with pytest.raises(error, match=words):
        Lamb(_params(), 0.1, weight_decay=0.01, exclude_from_weight_decay=predicate)
    assert Lamb(_params(), 0.1, weight_decay=0.01,
                exclude_from_weight_decay=lambda name: np.bool_(name.endswith("bias"))).decay_flags == (True, False)


# ---- the kernel cache ----

@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("MINDSPORE_LAMB_CACHE", str(directory))
    monkeypatch.setattr(_build, "_private_dir", None)
    return directory


def _build_kernel():
    return _build.build(fused_cpu.SRC, fused_cpu.FLAGS, b"test")


def test_cache_is_private_and_verified(cache):
    lib = _build_kernel()
    assert os.path.dirname(lib) == str(cache)
    assert oct(os.stat(cache).st_mode & 0o777) == "0o700"
    assert _build._verified(lib)
    built = os.stat(lib).st_mtime_ns
    assert _build_kernel() == lib and os.stat(lib).st_mtime_ns == built      # reused, not rebuilt


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "foreign owner", "group writable", "no manifest"])
def test_damaged_or_foreign_library_is_rebuilt_not_loaded(cache, damage):
    lib = _build_kernel()
    good = open(lib, "rb").read()
    if damage == "truncated":
        with open(lib, "r+b") as handle:
            handle.truncate(len(good) // 3)
    elif damage == "corrupt":
        with open(lib, "wb") as handle:
            handle.write(bytes(len(good)))
    elif damage == "foreign owner":
        os.chown(lib, 65534, 65534)
    elif damage == "group writable":
        os.chmod(lib, 0o770)
    else:
        os.unlink(lib + ".json")
    assert not _build._verified(lib)
    assert _build_kernel() == lib                   # rebuilt in place, verified again
    assert _build._verified(lib) and os.stat(lib).st_uid == os.getuid()


@pytest.mark.parametrize("problem", ["world writable", "foreign owner", "not a directory"])
def test_untrusted_cache_directory_falls_back_to_a_private_one(cache, tmp_path, problem):
    if problem == "not a directory":
        cache.write_text("a file where the cache should be")
    else:
        cache.mkdir(mode=0o700)
        if problem == "world writable":
            os.chmod(cache, 0o777)
        else:
            os.chown(cache, 65534, 65534)
    with pytest.warns(RuntimeWarning, match="kernel cache"):
        lib = _build_kernel()
    assert not lib.startswith(str(cache))
    assert oct(os.stat(os.path.dirname(lib)).st_mode & 0o777) == "0o700"
    assert _build._verified(lib)


@pytest.fixture
def no_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    monkeypatch.setattr(fused_cpu, "_libraries", {})
    monkeypatch.setattr(backends, "_warned", set())
    ms.set_context(device_target="CPU")


def test_no_compiler_warns_once_and_takes_the_composite_backend(no_compiler, rng):
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*composite.*slower"):
        opt = Lamb(_params(), learning_rate=0.1)
    assert not opt.fused and isinstance(opt.backend, composite.CompositeBackend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Lamb(_params(), learning_rate=0.1)           # said once, not at every optimizer
    params = list(opt.params)
    before = params[0].asnumpy().copy()
    opt(_grads(params, rng))
    assert not np.array_equal(params[0].asnumpy(), before)


def test_failed_compile_names_the_compiler_error(cache, monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(_build.BuildError, match="compiling broken.cc with g\\+\\+ failed: .*error"):
        _build.build(str(broken), fused_cpu.FLAGS)


def test_fused_path_can_be_required(no_compiler, monkeypatch):
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "require")
    with pytest.raises(RuntimeError, match="require.*no C\\+\\+ compiler"):
        Lamb(_params(), learning_rate=0.1)


def test_float16_first_moment_overflow_freezes_the_layer_and_is_named(path):
    """mu_dtype="float16" with a gradient of 7e5: m = 7e4 is stored as Inf, and the next step makes it NaN
    (Inf - Inf); that layer is left as it is from then on while the step counts as applied for the others.
    nonfinite_parameters() and check_state() name it (docs/api/lamb.md, mu_dtype)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    big, small = _params()
    opt = Lamb([big, small], 0.01, mu_dtype="float16", backend=path)
    grads = (Tensor(np.full(big.shape, 7e5, np.float32)), Tensor(np.ones(small.shape, np.float32)))
    before, moved = big.asnumpy().copy(), small.asnumpy().copy()
    for step, kind in ((1, np.isposinf), (2, np.isnan), (3, np.isnan)):
        opt(grads)
        assert kind(opt.moments1[0].asnumpy()).all(), step
        np.testing.assert_array_equal(big.asnumpy(), before)          # frozen, no NaN in the weights
        assert not np.array_equal(small.asnumpy(), moved)              # the other layer trains
        moved = small.asnumpy().copy()
        assert int(opt.global_step.asnumpy()[0]) == step and opt.skipped_steps == 0
        assert opt.nonfinite_parameters() == ["fc.weight"]
    with pytest.raises(ValueError, match=r"'lamb_m.fc.weight' holds 24 NaN or Inf"):
        opt.check_state()
