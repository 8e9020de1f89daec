"""Step-by-step comparison of mindspore_lamb.Lamb with the float64 NumPy reference (spec section 3).

A table of configurations (parameter kinds x learning-rate forms x weight decay x groups x
loss scale x dtypes x section-5 options) is crossed with GRAPH and PYNATIVE mode; every
configuration runs STEPS calls and compares w, m, v, the trust ratios and global_step after each.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from mindspore_lamb import Lamb
from reference import LambReference, round_to

STEPS = 10
LRS = [0.05, 0.04, 0.03, 0.03, 0.02, 0.02, 0.01, 0.01, 0.005, 0.005, 0.001]

# name, shape, initial value kind, gradient scale (0: an all-zero gradient every step)
PARAMS = [
    ("dense.weight", (8, 16), "normal", 1.0),
    ("dense.bias", (16,), "small", 0.3),
    ("norm.gamma", (16,), "ones", 0.2),
    ("norm.beta", (16,), "zeros", 0.2),
    ("zero.weight", (4, 4), "zeros", 1.0),          # all-zero parameter: ||w|| = 0 -> q = 1
    ("still.weight", (3, 5), "normal", 0.0),        # all-zero gradient
    ("conv.weight", (4, 3, 2, 2), "normal", 2.0),   # rank 4, for gradient centralization
    ("big.weight", (6, 6), "large", 0.01),          # ||w|| >> ||u||: trust ratio ~ 30 (hits clip bounds)
]
WEIGHTS = ("dense.weight", "zero.weight", "still.weight", "conv.weight", "big.weight")


def _initial(kind, shape, rng):
    return {"normal": lambda: rng.standard_normal(shape) * 0.5,
            "small": lambda: rng.standard_normal(shape) * 0.05,
            "large": lambda: rng.standard_normal(shape) * 30.0,
            "ones": lambda: np.ones(shape),
            "zeros": lambda: np.zeros(shape)}[kind]()


class StepWeightDecay(nn.Cell):
    """A dynamic weight decay: lambda_s = 0.01 * (1 + s) / 4."""

    def construct(self, global_step):
        return 0.0025 * (ms.ops.cast(global_step, ms.float32) + 1.0)


def _wd_cell_value(s):
    return 0.0025 * (s + 1.0)


def _poly_lr(s, lr=0.05, end=0.005, decay_steps=6, power=2.0):
    """nn.PolynomialDecayLR, from its documented formula."""
    s = min(s, decay_steps)
    return (lr - end) * (1 - s / decay_steps) ** power + end


def _by_name(params, names):
    return [p for p in params if p.name in names]


def _default_decay(names):
    return [("beta" not in n and "gamma" not in n) for n in names]


# Each configuration: a function (params, names) -> (Lamb positional/keyword args, reference step kwargs,
# reference constructor kwargs). Reference lr / weight decay are numbers or functions of the step s.
def cfg_default(params, names):
    return dict(learning_rate=0.02), dict(lr=0.02, weight_decay=0.0), {}


def cfg_weight_decay(params, names):
    return (dict(learning_rate=0.02, weight_decay=0.01),
            dict(lr=0.02, weight_decay=0.01, decay=_default_decay(names)), {})


def cfg_int_lr_and_wd(params, names):
    # lr = 1 moves every layer by its own norm each step: w - q u cancels to small values, so the
    # float32 rounding of q u (~1e-7 of ||w||) shows as larger relative errors; hence the atol.
    return (dict(learning_rate=1, weight_decay=1),
            dict(lr=1.0, weight_decay=1.0, decay=_default_decay(names)), dict(atol=5e-5))


def cfg_lr_tensor_0d(params, names):
    return dict(learning_rate=Tensor(0.03, ms.float32)), dict(lr=0.03, weight_decay=0.0), {}


def cfg_lr_tensor_1d(params, names):
    return (dict(learning_rate=Tensor(np.array(LRS, np.float32)), weight_decay=0.02),
            dict(lr=lambda s: LRS[s], weight_decay=0.02, decay=_default_decay(names)), {})


def cfg_lr_iterable(params, names):
    return (dict(learning_rate=(x for x in LRS)),       # a generator: read once
            dict(lr=lambda s: LRS[s], weight_decay=0.0), {})


def cfg_lr_schedule(params, names):
    return (dict(learning_rate=nn.PolynomialDecayLR(0.05, 0.005, 6, 2.0), weight_decay=0.01),
            dict(lr=_poly_lr, weight_decay=0.01, decay=_default_decay(names)), {})


def cfg_wd_cell(params, names):
    return (dict(learning_rate=0.02, weight_decay=StepWeightDecay()),
            dict(lr=0.02, weight_decay=_wd_cell_value, decay=_default_decay(names)), {})


def cfg_loss_scale(params, names):
    # gradients are fed multiplied by 1024; the decay must not be scaled (decoupled)
    return (dict(learning_rate=0.02, weight_decay=0.01, loss_scale=1024.0),
            dict(lr=0.02, weight_decay=0.01, decay=_default_decay(names)), dict(loss_scale=1024.0))


def cfg_groups(params, names):
    weights = _by_name(params, WEIGHTS)
    others = [p for p in params if p.name not in WEIGHTS]
    groups = [{"params": others, "lr": 0.01},
              {"params": weights, "weight_decay": 0.05},
              {"order_params": params}]
    in_w = [n in WEIGHTS for n in names]
    return (dict(params=groups, learning_rate=0.03, weight_decay=0.0),
            dict(lr=[0.03 if w else 0.01 for w in in_w], weight_decay=0.05, decay=in_w), {})


def cfg_groups_dynamic(params, names):
    weights = _by_name(params, WEIGHTS)
    others = [p for p in params if p.name not in WEIGHTS]
    groups = [{"params": weights, "lr": nn.PolynomialDecayLR(0.05, 0.005, 6, 2.0),
               "weight_decay": StepWeightDecay()},
              {"params": others, "weight_decay": 0.0}]
    order = [p.name for p in weights + others]
    in_w = [n in WEIGHTS for n in order]
    return (dict(params=groups, learning_rate=Tensor(np.array(LRS, np.float32))),
            dict(lr=[_poly_lr if w else (lambda s: LRS[s]) for w in in_w],
                 weight_decay=_wd_cell_value, decay=in_w), dict(order=order))


def cfg_grad_centralization(params, names):
    weights = _by_name(params, WEIGHTS)
    others = [p for p in params if p.name not in WEIGHTS]
    groups = [{"params": weights, "grad_centralization": True, "weight_decay": 0.01},
              {"params": others}]
    order = [p.name for p in weights + others]
    in_w = [n in WEIGHTS for n in order]
    return (dict(params=groups, learning_rate=0.02),
            dict(lr=0.02, weight_decay=0.01, decay=in_w, centralize=in_w), dict(order=order))


def cfg_max_grad_norm(params, names):
    return (dict(learning_rate=0.02, weight_decay=0.01, max_grad_norm=1.0, loss_scale=8.0),
            dict(lr=0.02, weight_decay=0.01, decay=_default_decay(names)),
            dict(max_grad_norm=1.0, loss_scale=8.0))


def cfg_trust_ratio_clip(params, names):
    return (dict(learning_rate=0.02, weight_decay=0.01, trust_ratio_clip=(0.5, 2.0)),
            dict(lr=0.02, weight_decay=0.01, decay=_default_decay(names)),
            dict(trust_ratio_clip=(0.5, 2.0)))


def cfg_layer_adaptation(params, names):
    weights = _by_name(params, WEIGHTS)
    others = [p for p in params if p.name not in WEIGHTS]
    groups = [{"params": weights, "weight_decay": 0.01},
              {"params": others, "layer_adaptation": False}]
    order = [p.name for p in weights + others]
    in_w = [n in WEIGHTS for n in order]
    return (dict(params=groups, learning_rate=0.02),
            dict(lr=0.02, weight_decay=0.01, decay=in_w, layer_adaptation=in_w), dict(order=order))


CONFIGS = {f.__name__[4:]: f for f in [
    cfg_default, cfg_weight_decay, cfg_int_lr_and_wd, cfg_lr_tensor_0d, cfg_lr_tensor_1d, cfg_lr_iterable,
    cfg_lr_schedule, cfg_wd_cell, cfg_loss_scale, cfg_groups, cfg_groups_dynamic, cfg_grad_centralization,
    cfg_max_grad_norm, cfg_trust_ratio_clip, cfg_layer_adaptation]}

DTYPES = {"float32": (ms.float32, np.float32, dict(rtol=2e-5, atol=2e-6)),
          "float16": (ms.float16, np.float16, dict(rtol=2e-3, atol=2e-3))}


def run_against_reference(config, dtype, seed=0, steps=STEPS):
    """Build parameters, run `steps` Lamb calls and the reference side by side; assert after each.

    `config` is a name in CONFIGS or a configuration function of the same form."""
    ms_dtype, np_dtype, tol = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    init = {name: round_to(_initial(kind, shape, rng), np_dtype) for name, shape, kind, _ in PARAMS}
    params = [Parameter(Tensor(init[name].astype(np_dtype), ms_dtype), name=name) for name, *_ in PARAMS]
    names = [p.name for p in params]
    make_config = CONFIGS[config] if isinstance(config, str) else config
    lamb_kwargs, step_kwargs, ref_kwargs = make_config(params, names)
    order = ref_kwargs.pop("order", names)
    tol = dict(tol, atol=max(tol["atol"], ref_kwargs.pop("atol", 0.0)))
    lamb_params = lamb_kwargs.pop("params", params)
    opt = Lamb(lamb_params, **lamb_kwargs)
    assert list(opt.param_names) == order
    by_name = {p.name: p for p in params}
    ref = LambReference([init[n] for n in order], param_dtype=dtype, **ref_kwargs)
    scale = {name: gs for name, _, _, gs in PARAMS}
    feed_scale = ref_kwargs.get("loss_scale", 1.0)

    for step in range(steps):
        grads = [round_to(rng.standard_normal(by_name[n].shape) * scale[n] * feed_scale, np_dtype) for n in order]
        result = opt(tuple(Tensor(g.astype(np_dtype), ms_dtype) for g in grads))
        assert all(bool(x) for x in result) and len(result) == len(order)
        assert ref.step(grads, **step_kwargs)
        assert int(opt.global_step.asnumpy()[0]) == step + 1
        got_q = opt.trust_ratios()
        for i, name in enumerate(order):
            w = by_name[name].asnumpy().astype(np.float64)     # asnumpy shares memory on CPU: copied by astype
            where = f"{make_config.__name__}/{dtype}: {name} at step {step + 1}"
            # atol also scales with the layer's magnitude: float32 rounds w (up to ~60 here) at ~1e-7 of it
            layer_tol = dict(tol, atol=max(tol["atol"], tol["rtol"] * np.abs(ref.w[i]).max()))
            np.testing.assert_allclose(w, ref.w[i], err_msg=where, **layer_tol)
            np.testing.assert_allclose(opt.moments1[i].asnumpy(), ref.m[i], err_msg="m " + where, **tol)
            np.testing.assert_allclose(opt.moments2[i].asnumpy(), ref.v[i], err_msg="v " + where,
                                       rtol=tol["rtol"], atol=tol["atol"] ** 2)
            np.testing.assert_allclose(got_q[name], ref.trust_ratios[i], err_msg="q " + where, rtol=tol["rtol"])
    return opt, ref


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference_float32(mode, path, config):
    opt, _ = run_against_reference(config, "float32")
    assert opt.fused == (path == "fused")


@pytest.mark.parametrize("config", ["default", "weight_decay", "groups", "loss_scale"])
def test_matches_reference_float16(mode, config):
    opt, _ = run_against_reference(config, "float16")
    assert not opt.fused                                                      # composite path
    assert all(m.dtype == ms.float32 for m in opt.moments1 + opt.moments2)    # float32 moments
    assert all(p.dtype == ms.float16 for p in opt.params)                     # written back as float16


def test_reference_sanity():
    """The reference itself, on a case worked by hand: w = 1 (3 elements), g = 0.5, lambda = 0.01.

    Step 1: m^ = g, v^ = g^2, r = 0.5 / (0.5 + 1e-6), u = r + 0.01, q = ||w|| / ||u|| = 1 / u,
    so w = 1 - lr * q * u = 1 - lr, whatever u is.
    """
    ref = LambReference([np.ones(3)], param_dtype="float64")
    ref.step([np.full(3, 0.5)], lr=0.1, weight_decay=0.01)
    np.testing.assert_allclose(ref.w[0], 0.9, rtol=1e-12)
    np.testing.assert_allclose(ref.m[0], 0.05, rtol=1e-12)
    np.testing.assert_allclose(ref.v[0], 0.00025, rtol=1e-12)
    u = 0.5 / (0.5 + 1e-6) + 0.01
    np.testing.assert_allclose(ref.trust_ratios[0], 1.0 / u, rtol=1e-12)
