"""bert_param_groups: which parameters are decayed, and Lamb applying the groups."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from mindspore_lamb import Lamb, WarmupPolynomialDecayLR, bert_param_groups


class TinyBertBlock(nn.Cell):
    """Names like model-zoo BERT (`layernorm.gamma`), HF BERT (`LayerNorm.weight`) and a bare nn.LayerNorm."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(4, 4)
        self.layernorm = nn.LayerNorm((4,))
        self.out_norm = nn.LayerNorm((4,))          # gamma/beta without "layernorm" in the name
        self.LayerNorm = nn.Dense(4, 4)             # HF-style name: 'LayerNorm.weight', 'LayerNorm.bias'
        self.embedding = ms.Parameter(ms.Tensor(np.ones((5, 4), np.float32)), name="embedding_table")

    def construct(self, x):
        return self.LayerNorm(self.out_norm(self.layernorm(self.dense(x))))


def _names(group):
    return [p.name for p in group["params"]]


def test_default_split_and_order():
    net = TinyBertBlock()
    params = net.trainable_params()
    groups = bert_param_groups(params, weight_decay=0.01)
    assert len(groups) == 3
    order = [p.name for p in params]
    decayed = {"dense.weight", "embedding_table"}
    assert _names(groups[0]) == [n for n in order if n in decayed]  # kept in the order of `params`
    assert groups[0]["weight_decay"] == 0.01
    assert _names(groups[1]) == [n for n in order if n not in decayed]
    assert set(_names(groups[1])) == {"dense.bias", "layernorm.gamma", "layernorm.beta", "out_norm.gamma",
                                      "out_norm.beta", "LayerNorm.weight", "LayerNorm.bias"}
    assert groups[1]["weight_decay"] == 0.0
    assert [p.name for p in groups[2]["order_params"]] == [p.name for p in params]
    assert set(groups[2]) == {"order_params"}
    assert all("lr" not in g for g in groups)


def test_custom_keywords_case_insensitive():
    params = TinyBertBlock().trainable_params()
    groups = bert_param_groups(params, 0.1, no_decay_keywords=["EMBEDDING", "Bias"])
    assert set(_names(groups[1])) == {"dense.bias", "LayerNorm.bias", "embedding_table"}
    # gamma/beta are only covered through the "layernorm" keyword
    assert "out_norm.gamma" in _names(groups[0]) and "layernorm.gamma" in _names(groups[0])


def test_cell_accepted_and_lr_set():
    net = TinyBertBlock()
    schedule = WarmupPolynomialDecayLR(0.1, 0.0, 1, 10)
    groups = bert_param_groups(net, 0.01, lr=schedule)
    assert [p.name for p in groups[-1]["order_params"]] == [p.name for p in net.trainable_params()]
    assert groups[0]["lr"] is schedule and groups[1]["lr"] is schedule


def test_empty_groups_dropped():
    net = nn.Dense(3, 2, has_bias=False)
    groups = bert_param_groups(net.trainable_params(), 0.01)
    assert len(groups) == 2 and _names(groups[0]) == ["weight"] and "order_params" in groups[1]
    Lamb(groups, learning_rate=0.1)  # accepted
    norms = nn.LayerNorm((3,))
    groups = bert_param_groups(norms.trainable_params(), 0.01)
    assert len(groups) == 2 and groups[0]["weight_decay"] == 0.0 and _names(groups[0]) == ["gamma", "beta"]
    Lamb(groups, learning_rate=0.1)


def test_lamb_decays_only_the_decay_group(mode, rng):
    """With zero gradients r = 0, so a decayed w gets u = wd*w, q = 1/wd: w <- (1 - lr) w; others stay."""
    net = TinyBertBlock()
    for p in net.trainable_params():
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    before = {p.name: p.asnumpy().copy() for p in net.trainable_params()}
    lr, wd = 0.1, 0.01
    opt = Lamb(bert_param_groups(net.trainable_params(), wd), learning_rate=lr)
    opt(tuple(ms.Tensor(np.zeros(p.shape, np.float32)) for p in opt.parameters))
    decayed = {"dense.weight", "embedding_table"}
    for p in net.trainable_params():
        want = before[p.name] * (1 - lr) if p.name in decayed else before[p.name]
        np.testing.assert_allclose(p.asnumpy(), want, rtol=1e-6, atol=1e-7, err_msg=p.name)
    assert list(opt.param_names) == [p.name for p in net.trainable_params()]


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(params="weights"), TypeError, ["'params'", "'weights'"]),
    (dict(params=[]), ValueError, ["'params'", "[]"]),
    (dict(params=[1.0]), TypeError, ["'params'", "1.0"]),
    (dict(weight_decay=-0.1), ValueError, ["'weight_decay'", "-0.1"]),
    (dict(weight_decay="0.1"), TypeError, ["'weight_decay'", "'0.1'"]),
    (dict(no_decay_keywords="bias"), TypeError, ["'no_decay_keywords'", "'bias'"]),
    (dict(no_decay_keywords=("bias", 3)), TypeError, ["'no_decay_keywords'", "3"]),
    (dict(no_decay_keywords=("bias", "")), TypeError, ["'no_decay_keywords'", "''"]),
    (dict(lr=-1.0), ValueError, ["'lr'", "-1.0"]),
    (dict(lr="fast"), TypeError, ["'lr'", "'fast'"]),
])
def test_bad_arguments(kwargs, exc, words):
    args = dict(params=nn.Dense(2, 2).trainable_params(), weight_decay=0.01)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        bert_param_groups(**args)
    for word in words:
        assert word in str(info.value)


def test_duplicate_parameter_rejected():
    weight = nn.Dense(2, 2).weight
    with pytest.raises(ValueError, match="'weight' appears more than once"):
        bert_param_groups([weight, weight], 0.01)
