"""Every documented error (docs/api/lamb.md, "Raises"): raised in the constructor (gradient mismatches at
the first call), with a message naming the argument and the value received."""
import re

import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from mindspore_lamb import Lamb


class _TwoInputSchedule(nn.learning_rate_schedule.LearningRateSchedule):
    """A schedule whose construct does not take the step alone."""
    def construct(self, global_step, scale):
        return global_step * scale


class _DecaySchedule(nn.Cell):
    """A weight-decay schedule written as a plain Cell (MindSpore's documented form): no trainable parameter."""
    def construct(self, global_step):
        return ms.ops.cast(global_step, ms.float32) * 0.0 + 0.01


def _params():
    return [Parameter(Tensor(np.ones((2, 3), np.float32)), name="dense.weight"),
            Parameter(Tensor(np.zeros((3,), np.float32)), name="dense.bias")]


# (keyword arguments, exception, fragments that must all appear in the message)
BAD_ARGUMENTS = [
    (dict(learning_rate="0.1"), TypeError, ["learning_rate", "'0.1'"]),
    (dict(learning_rate=None), TypeError, ["learning_rate", "None"]),
    (dict(learning_rate=True), TypeError, ["learning_rate", "True"]),
    (dict(learning_rate=nn.Dense(2, 2)), TypeError, ["learning_rate", "Dense"]),
    (dict(learning_rate=-0.1), ValueError, ["learning_rate", "-0.1"]),
    (dict(learning_rate=Tensor(np.ones((2, 2), np.float32))), ValueError, ["learning_rate", "(2, 2)"]),
    (dict(learning_rate=["a", "b"]), TypeError, ["learning_rate", "'a'"]),
    (dict(beta1=1), TypeError, ["beta1", "int 1"]),
    (dict(beta2="0.9"), TypeError, ["beta2", "'0.9'"]),
    (dict(eps=1), TypeError, ["eps", "int 1"]),
    (dict(eps=0.0), ValueError, ["eps", "0.0"]),
    (dict(eps=-1e-6), ValueError, ["eps", "-1e-06"]),
    (dict(beta1=0.0), ValueError, ["beta1", "0.0"]),
    (dict(beta1=1.0), ValueError, ["beta1", "1.0"]),
    (dict(beta2=1.5), ValueError, ["beta2", "1.5"]),
    (dict(beta2=-0.1), ValueError, ["beta2", "-0.1"]),
    (dict(weight_decay="0.1"), TypeError, ["weight_decay", "'0.1'"]),
    (dict(weight_decay=None), TypeError, ["weight_decay", "None"]),
    (dict(weight_decay=-0.01), ValueError, ["weight_decay", "-0.01"]),
    (dict(weight_decay=-1), ValueError, ["weight_decay", "-1"]),
    (dict(loss_scale="1"), TypeError, ["loss_scale", "'1'"]),
    (dict(loss_scale=None), TypeError, ["loss_scale", "None"]),
    (dict(loss_scale=0.0), ValueError, ["loss_scale", "0.0"]),
    (dict(loss_scale=-2), ValueError, ["loss_scale", "-2"]),
    (dict(max_grad_norm="1"), TypeError, ["max_grad_norm", "'1'"]),
    (dict(max_grad_norm=0.0), ValueError, ["max_grad_norm", "0.0"]),
    (dict(trust_ratio_clip=10.0), TypeError, ["trust_ratio_clip", "10.0"]),
    (dict(trust_ratio_clip=(2.0, 1.0)), ValueError, ["trust_ratio_clip", "(2.0, 1.0)"]),
    (dict(trust_ratio_clip=(-1.0, 1.0)), ValueError, ["trust_ratio_clip", "(-1.0, 1.0)"]),
    (dict(trust_ratio_clip=(0, 0)), ValueError, ["trust_ratio_clip", "(0, 0)", "upper bound"]),
    (dict(trust_ratio_clip=(0.0, 1e-45)), ValueError, ["trust_ratio_clip", "1e-45", "upper bound"]),
    (dict(eps=1e30), ValueError, ["eps", "1e+30", "at most 1.0"]),
    (dict(eps=1.5), ValueError, ["eps", "1.5", "at most 1.0"]),
    (dict(learning_rate=Tensor(True)), TypeError, ["learning_rate", "Bool"]),
    (dict(learning_rate=Tensor(np.array([True, False]))), TypeError, ["learning_rate", "Bool"]),
    (dict(learning_rate=Tensor(np.array([0.1 + 2j], np.complex64))), TypeError, ["learning_rate", "Complex64"]),
    (dict(learning_rate=np.array([0.1 + 2j])), TypeError, ["learning_rate", "NumPy array", "complex128"]),
    (dict(learning_rate=np.array([True])), TypeError, ["learning_rate", "NumPy array", "bool"]),
    (dict(learning_rate=np.ones((2, 2), np.float32)), ValueError, ["learning_rate", "NumPy array", "(2, 2)"]),
    (dict(learning_rate=_TwoInputSchedule()), TypeError, ["learning_rate", "_TwoInputSchedule", "global_step"]),
    (dict(weight_decay=_TwoInputSchedule()), TypeError, ["weight_decay", "_TwoInputSchedule", "global_step"]),
    (dict(weight_decay=nn.Dense(1, 1)), TypeError, ["weight_decay", "Dense", "trainable parameters"]),
    (dict(exact_skip=1), TypeError, ["exact_skip", "1"]),
    (dict(exact_skip="yes"), TypeError, ["exact_skip", "'yes'"]),
    (dict(shard_bucket_size=0), ValueError, ["shard_bucket_size", ">= 1", "0"]),
    (dict(shard_bucket_size=2.0 ** 20), TypeError, ["shard_bucket_size", "float 1048576.0"]),
    (dict(shard_bucket_size=True), TypeError, ["shard_bucket_size", "True"]),
    (dict(bias_correction=0), ValueError, ["bias_correction", "int 0", "step_size"]),
    (dict(weight_decay_mode="adamw"), ValueError, ["weight_decay_mode", "'adamw'", "decoupled_outside"]),
    (dict(grad_averaging=1), TypeError, ["grad_averaging", "1"]),
    (dict(eps_inside_sqrt="no"), TypeError, ["eps_inside_sqrt", "'no'"]),
    (dict(weight_norm_clip=0.0), ValueError, ["weight_norm_clip", "0.0"]),
    (dict(weight_norm_clip="10"), TypeError, ["weight_norm_clip", "'10'"]),
    (dict(layer_adaptation="all"), ValueError, ["layer_adaptation", "'all'", "decayed"]),
    (dict(layer_adaptation=1), ValueError, ["layer_adaptation", "int 1"]),
    (dict(exclude_from_weight_decay=5), TypeError, ["exclude_from_weight_decay", "int 5"]),
    (dict(exclude_from_layer_adaptation=["("]), ValueError, ["exclude_from_layer_adaptation", "regular expression"]),
]


@pytest.mark.parametrize("kwargs,error,fragments", BAD_ARGUMENTS,
                         ids=[f"{next(iter(k))}={next(iter(k.values()))!r}"[:40] for k, _, _ in BAD_ARGUMENTS])
def test_bad_argument(kwargs, error, fragments):
    kwargs = dict({"learning_rate": 0.1}, **kwargs)
    with pytest.raises(error) as info:
        Lamb(_params(), **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def _group_cases():
    a, b = _params()
    return [
        ("not a list", a, TypeError, ["params", "Parameter"]),
        ("empty", [], ValueError, ["params", "empty"]),
        ("element", [a, "w"], TypeError, ["params", "'w'", "index 1"]),
        ("mixed", [a, {"params": [b]}], TypeError, ["params", "mix"]),
        ("duplicate", [a, a], ValueError, ["dense.weight", "more than once"]),
        ("unknown key", [{"params": [a], "momentum": 0.9}], KeyError, ["momentum", "group 0"]),
        ("no params key", [{"lr": 0.1}], KeyError, ["params", "group 0"]),
        ("group member", [{"params": [a, 3]}], TypeError, ["group 0", "int 3", "index 1"]),
        ("group duplicate", [{"params": [a]}, {"params": [a, b]}], ValueError, ["dense.weight", "more than once"]),
        ("group lr", [{"params": [a], "lr": "x"}], TypeError, ["lr (group 0)", "'x'"]),
        ("group lr bool", [{"params": [a], "lr": Tensor(True)}], TypeError, ["lr (group 0)", "Bool"]),
        ("group weight_decay layer", [{"params": [a], "weight_decay": nn.Dense(2, 2)}], TypeError,
         ["weight_decay (group 0)", "Dense"]),
        ("group weight_decay", [{"params": [a], "weight_decay": -1.0}], ValueError,
         ["weight_decay (group 0)", "-1.0"]),
        ("group layer_adaptation", [{"params": [a], "layer_adaptation": 1}], TypeError,
         ["layer_adaptation (group 0)", "int 1"]),
        ("group grad_centralization", [{"params": [a], "grad_centralization": "yes"}], TypeError,
         ["grad_centralization (group 0)", "'yes'"]),
        ("order not alone", [{"params": [a, b]}, {"order_params": [b, a], "lr": 0.1}], ValueError,
         ["order_params", "lr"]),
        ("order unknown", [{"params": [a]}, {"order_params": [a, b]}], ValueError,
         ["order_params", "dense.bias"]),
        ("order incomplete", [{"params": [a, b]}, {"order_params": [a]}], ValueError,
         ["order_params", "exactly once"]),
    ]


@pytest.mark.parametrize("case", range(len(_group_cases())), ids=[c[0] for c in _group_cases()])
def test_bad_params(case):
    _, params, error, fragments = _group_cases()[case]
    with pytest.raises(error) as info:
        Lamb(params, 0.1)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bfloat16_on_cpu_is_refused_in_constructor():
    w = Parameter(Tensor(np.ones((2, 2), np.float32), ms.bfloat16), name="w16")
    with pytest.raises(TypeError, match="'w16' is bfloat16"):
        Lamb([w], 0.1)


def test_wrong_number_of_gradients(mode):
    params = _params()
    opt = Lamb(params, 0.1)
    with pytest.raises(ValueError, match=r"one gradient per parameter \(2\), but got 1"):
        opt((Tensor(np.ones((2, 3), np.float32)),))


def test_wrong_gradient_shape_names_the_parameter(mode):
    params = _params()
    opt = Lamb(params, 0.1)
    before = params[0].asnumpy().copy()
    grads = (Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones((4,), np.float32)))
    with pytest.raises(ValueError, match=r"'dense.bias'.*\(3,\), but got \(4,\)"):
        opt(grads)
    np.testing.assert_array_equal(params[0].asnumpy(), before)   # nothing was trained or lost
    assert int(opt.global_step.asnumpy()[0]) == 0


def test_finite_flag_must_be_a_scalar(mode):
    params = _params()
    opt = Lamb(params, 0.1)
    before = params[0].asnumpy().copy()
    grads = tuple(Tensor(np.ones(p.shape, np.float32)) for p in params)
    with pytest.raises(ValueError, match=r"'finite' must be a bool scalar.*shape \(2,\)"):
        opt(grads, Tensor(np.array([True, False])))
    np.testing.assert_array_equal(params[0].asnumpy(), before)
    opt(grads, Tensor(np.array([False])))          # a 1-element Tensor and a Python bool are accepted
    opt(grads, False)
    np.testing.assert_array_equal(params[0].asnumpy(), before)
    assert opt.skipped_steps == 2


def test_numpy_learning_rates_train_as_numbers_and_lists_do():
    """A float32 NumPy array of per-step rates is the list of them; a NumPy scalar is the number."""
    grads = tuple(Tensor(np.full(p.shape, 0.5, np.float32)) for p in _params())
    for numpy_rate, python_rate in ((np.array([0.1, 0.01], np.float32), [0.1, 0.01]),
                                    (np.float32(0.25), 0.25), (np.array(0.25), 0.25)):
        trained = []
        for rate in (numpy_rate, python_rate):
            params = _params()
            opt = Lamb(params, rate)
            opt(grads)
            opt(grads)
            trained.append([p.asnumpy() for p in params])
        for got, want in zip(*trained):
            np.testing.assert_array_equal(got, want)
        assert not np.array_equal(trained[0][0], np.ones((2, 3), np.float32))


def test_weight_decay_schedule_cell_is_accepted_and_applied():
    """A plain Cell taking the step (no trainable parameter) is a weight-decay schedule: the same step as the
    number it returns; a layer is refused (test_bad_argument)."""
    rng = np.random.default_rng(0)
    start = [rng.standard_normal(p.shape).astype(np.float32) for p in _params()]
    grads = tuple(Tensor(rng.standard_normal(w.shape).astype(np.float32)) for w in start)
    trained = []
    for weight_decay in (_DecaySchedule(), 0.01, 0.0):
        params = _params()
        for param, value in zip(params, start):
            param.set_data(Tensor(value))
        Lamb(params, 0.1, weight_decay=weight_decay)(grads)
        trained.append(params[0].asnumpy())
    np.testing.assert_allclose(trained[0], trained[1], rtol=1e-6)
    assert np.abs(trained[0] - trained[2]).max() > 1e-4      # the decay is applied


@pytest.mark.parametrize("name", ["dense\nweight", "dense\rweight", "a\u2028b"])
def test_parameter_name_with_a_line_break_is_refused(name):
    """The sharded state records the names one per line: such a name could not be merged back."""
    a, b = _params()
    a.name = name
    for params in ([a, b], [{"params": [a]}, {"params": [b]}]):
        with pytest.raises(ValueError, match=rf"'Lamb'.*{re.escape(repr(name))}.*line break.*rename"):
            Lamb(params, 0.1)
