"""The update-rule harness shared by the reference tests: a set of parameters of every kind, and
`run_against_reference`, which runs Lamb and tests/helpers/reference.py side by side, step by step."""
import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor

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


# (MindSpore dtype, the host's name for the storage dtype (tests/helpers/reference.py), tolerance): 16-bit
# weights are rounded once per step, so a float32 result next to a rounding midpoint may land one unit in the
# last place (ulp) away from the float64 reference's: about two ulps of the stored significand (float16:
# 10 bits, 2e-3 ~ 2 * 2^-10; bfloat16: 7 bits, 2 * 2^-7)
DTYPES = {"float32": (ms.float32, np.float32, dict(rtol=2e-5, atol=2e-6)),
          "float16": (ms.float16, np.float16, dict(rtol=2e-3, atol=2e-3)),
          "bfloat16": (ms.bfloat16, "bfloat16", dict(rtol=2 ** -6, atol=2 ** -6))}
# the first moment stored in 16 bits (mu_dtype): float32 arithmetic and the float64 reference may round an m
# that falls next to a rounding midpoint to neighbouring points of the grid: one unit in the last place
MU_TOLERANCES = {"float16": dict(rtol=2 ** -10, atol=2 ** -24), "bfloat16": dict(rtol=2 ** -7, atol=0.0)}


def run_against_reference(config, dtype, seed=0, steps=STEPS, backend=None, mu_dtype=None):
    """Build parameters, run `steps` Lamb calls (on `backend`, None: Lamb's choice; first moments stored in
    `mu_dtype`, None: float32, compared with the exact m) and the reference side by side; assert after each.

    `config` is a configuration function (params, names) -> (Lamb arguments, reference step arguments,
    reference constructor arguments), as in tests/test_update_rule.py."""
    ms_dtype, np_dtype, tol = DTYPES[dtype]
    host = np.float32 if np_dtype == "bfloat16" else np_dtype    # NumPy has no bfloat16: its values as float32
    rng = np.random.default_rng(seed)
    init = {name: round_to(_initial(kind, shape, rng), np_dtype) for name, shape, kind, _ in PARAMS}
    params = [Parameter(Tensor(init[name].astype(host), ms_dtype), name=name) for name, *_ in PARAMS]
    names = [p.name for p in params]
    make_config = config
    lamb_kwargs, step_kwargs, ref_kwargs = make_config(params, names)
    order = ref_kwargs.pop("order", names)
    tol = dict(tol, atol=max(tol["atol"], ref_kwargs.pop("atol", 0.0)))
    m_tol = tol if mu_dtype is None else MU_TOLERANCES[mu_dtype]
    lamb_params = lamb_kwargs.pop("params", params)
    opt = Lamb(lamb_params, backend=backend, mu_dtype=mu_dtype, **lamb_kwargs)
    assert list(opt.param_names) == order
    by_name = {p.name: p for p in params}
    ref = LambReference([init[n] for n in order], param_dtype=dtype, mu_dtype=mu_dtype, **ref_kwargs)
    scale = {name: gs for name, _, _, gs in PARAMS}
    feed_scale = ref_kwargs.get("loss_scale", 1.0)

    for step in range(steps):
        grads = [round_to(rng.standard_normal(by_name[n].shape) * scale[n] * feed_scale, np_dtype) for n in order]
        result = opt(tuple(Tensor(g.astype(host), ms_dtype) for g in grads))
        assert all(bool(x) for x in result) and len(result) == len(order)
        assert ref.step(grads, **step_kwargs)
        assert int(opt.global_step.asnumpy()[0]) == step + 1
        got_q = opt.trust_ratios()
        for i, name in enumerate(order):
            w = by_name[name].float().asnumpy().astype(np.float64)   # a copy (asnumpy shares memory on CPU)
            where = f"{make_config.__name__}/{dtype}: {name} at step {step + 1}"
            # atol also scales with the layer's magnitude: float32 rounds w (up to ~60 here) at ~1e-7 of it
            layer_tol = dict(tol, atol=max(tol["atol"], tol["rtol"] * np.abs(ref.w[i]).max()))
            np.testing.assert_allclose(w, ref.w[i], err_msg=where, **layer_tol)
            np.testing.assert_allclose(opt.moments1[i].float().asnumpy(), ref.m[i], err_msg="m " + where, **m_tol)
            np.testing.assert_allclose(opt.moments2[i].asnumpy(), ref.v[i], err_msg="v " + where,
                                       rtol=tol["rtol"], atol=tol["atol"] ** 2)
            np.testing.assert_allclose(got_q[name], ref.trust_ratios[i], err_msg="q " + where, rtol=tol["rtol"])
    return opt, ref
