"""What a user sees before the first step: the real signature of Lamb (help(), IDEs), a misspelled keyword named
with the closest valid one, and type hints a type checker can read (PEP 561: py.typed ships in the wheel)."""
import configparser
import inspect
import os
import typing

import pytest
from mindspore import nn

from mindspore_lamb import Lamb, LossScaleTrainStep, TrustRatioMonitor, WarmupPolynomialDecayLR, bert_param_groups
from mindspore_lamb import check_state, resume, sharding
from mindspore_lamb._options import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params():
    return nn.Dense(4, 2).trainable_params()


def test_signature_shows_every_argument_with_its_default():
    """inspect.signature(Lamb) is the constructor's, not the registering decorator's (*args, **kwargs): the
    arguments Options checks, in order, each keyword-only one after `weight_decay`."""
    signature = inspect.signature(Lamb)
    expected = [name for name in inspect.signature(Options).parameters]
    assert list(signature.parameters) == expected
    params = signature.parameters
    assert params["eps"].default == 1e-6 and params["mu_dtype"].default is None
    assert params["loss_scale"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["weight_decay"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert "learning_rate" in inspect.getdoc(Lamb) and Lamb.__init__.__name__ == "__init__"


def test_the_decorator_still_records_the_arguments():
    """MindSpore's opt_init_args_register keeps doing its work: the constructor's arguments, defaults
    applied, in init_params / init_learning_rate / init_args."""
    params = _params()
    opt = Lamb(params, 2e-3, weight_decay=0.1, max_grad_norm=1.0)
    assert opt.init_params["params"] == params and opt.init_learning_rate == 2e-3
    assert opt.init_args["weight_decay"] == 0.1 and opt.init_args["max_grad_norm"] == 1.0
    assert opt.init_args["beta2"] == 0.999 and "params" not in opt.init_args


@pytest.mark.parametrize("build, owner", [
    (lambda p: Lamb(p, 1e-3, max_grad_norms=1.0), "Lamb"),
    (lambda p: Lamb.preset("timm", p, 1e-3, max_grad_norms=1.0), "Lamb.preset"),
], ids=["Lamb", "preset"])
def test_misspelled_keyword_names_the_class_and_the_closest_keyword(build, owner):
    with pytest.raises(TypeError, match=rf"For '{owner}', 'max_grad_norms' is not a keyword argument: did you mean "
                                        r"'max_grad_norm'\? the keywords are beta1, .*, backend\."):
        build(_params())


def test_keyword_far_from_any_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"For 'Lamb', 'zzz' is not a keyword argument: the keywords are beta1, "):
        Lamb(_params(), 1e-3, zzz=1)


@pytest.mark.parametrize("build, message", [
    (lambda p: Lamb(p), "missing a required argument: 'learning_rate'"),
    (lambda p: Lamb(p, 1e-3, 0.9, 0.999, 1e-6, 0.0, 1.0), "too many positional arguments"),
], ids=["missing", "too-many"])
def test_wrong_arity_names_the_class_and_shows_the_signature(build, message):
    with pytest.raises(TypeError, match=rf"For 'Lamb', {message}; the signature is Lamb\(params, learning_rate, "
                                        r"beta1=0.9, .*backend=None\)\."):
        build(_params())


PUBLIC = [Lamb.__init__, Lamb.preset, LossScaleTrainStep.__init__, TrustRatioMonitor.__init__, TrustRatioMonitor.save,
          TrustRatioMonitor.plot, WarmupPolynomialDecayLR.__init__, bert_param_groups, check_state, sharding.merge,
          sharding.cut, resume.resume, resume.save, resume.newest, resume.checkpoints, resume.GlobalStep.__init__,
          resume.StepCheckpoint.__init__]


@pytest.mark.parametrize("function", PUBLIC, ids=lambda f: f.__qualname__)
def test_public_api_is_fully_annotated(function):
    """Every argument and the return of the public API carry a type hint that resolves."""
    hints = typing.get_type_hints(function)
    signature = inspect.signature(function)
    named = [name for name, p in signature.parameters.items()
             if name not in ("self", "cls") and p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert [name for name in named if name not in hints] == []
    assert "return" in hints


def test_py_typed_ships_in_the_package():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert cfg["options.package_data"]["mindspore_lamb"].split() == ["py.typed"]
    assert os.path.isfile(os.path.join(ROOT, "mindspore_lamb", "py.typed"))


def _public(obj):
    return {name for name in dir(obj) if not name.startswith("_")}


def test_every_public_attribute_of_nn_lamb_is_there_with_its_type():
    """Code written for nn.Lamb reads its attributes: our Lamb has every public one, with nn.Lamb's types
    (beta1, beta2 and eps as 1-element float32 Tensors, the state as ParameterTuples) and values."""
    import numpy as np
    from mindspore import ParameterTuple, Tensor
    params = _params()
    theirs = nn.Lamb(params, 0.1, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.01)
    ours = Lamb(params, 0.1, beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=0.01, eps_inside_sqrt=True)
    assert _public(theirs) - _public(ours) == set()
    for name in ("beta1", "beta2", "eps"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert isinstance(mine, Tensor) and mine.dtype == reference.dtype and mine.shape == reference.shape, name
        np.testing.assert_array_equal(mine.asnumpy(), reference.asnumpy())
    for name in ("params", "moments1", "moments2"):
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert isinstance(mine, ParameterTuple), name
        assert [p.name for p in mine] == [p.name for p in reference], name
    assert ours.device_ascend is theirs.device_ascend is False


@pytest.mark.parametrize("keyword, value, hint", [
    ("lr", 1e-3, r"did you mean 'learning_rate'\?"),
    ("betas", (0.9, 0.999), r"did you mean 'beta1' and 'beta2' \(one number each, not a tuple\)\?"),
    ("epsilon", 1e-6, r"did you mean 'eps'\?"),
], ids=["lr", "betas", "epsilon"])
def test_other_libraries_keywords_suggest_ours(keyword, value, hint):
    """PyTorch's lr and betas, Keras' epsilon: the error says which of Lamb's keywords they are."""
    with pytest.raises(TypeError, match=rf"For 'Lamb', '{keyword}' is not a keyword argument: {hint}"):
        Lamb(_params(), **{keyword: value})
    if keyword != "lr":                 # preset takes learning_rate positionally
        with pytest.raises(TypeError, match=rf"For 'Lamb.preset', '{keyword}' is not a keyword argument: {hint}"):
            Lamb.preset("timm", _params(), 1e-3, **{keyword: value})


def test_a_bare_parameter_is_to_be_wrapped_in_a_list():
    param = _params()[0]
    with pytest.raises(TypeError, match=r"'params' must be a list of Parameter or of dict \(wrap it in a list: "
                                        r"\[param\]\), but got Parameter"):
        Lamb(param, 1e-3)
    with pytest.raises(TypeError, match=r"'params' of group 0 must be a list of Parameter \(wrap it in a list"):
        Lamb([{"params": param}], 1e-3)
