"""Lamb(optim_bits=8): both moments of each large tensor stored in 8 bits, block-wise (docs/memory.md).

Held step by step to the float64 reference (tests/helpers/reference.py) storing its moments in the 8-bit format
as written down in tests/helpers/blockwise.py, across the configurations of test_update_rule.py, in GRAPH and
PYNATIVE mode; the layer-wise step norm lr ||w|| holds whatever the quantization error; the state's size, the
arguments, skipped steps, and checkpoints.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor

import blockwise
from mindspore_lamb import Lamb, check_state
from reference import LambReference
from test_update_rule import CONFIGS
from update_cases import PARAMS, _initial

# the reference's parameters and one of several blocks, the last one partial (900 = 3 x 256 + 132)
PARAMS_8BIT = PARAMS + [("wide.weight", (3, 300), "normal", 1.0)]
MIN_SIZE = 32               # 8-bit: dense.weight, conv.weight, big.weight, wide.weight; float32: the others
CONFIG_NAMES = ["default", "weight_decay", "groups", "loss_scale", "max_grad_norm", "trust_ratio_clip",
                "layer_adaptation", "no_bias_correction", "l2", "decoupled_outside", "all_together",
                "eps_inside_sqrt", "lr_schedule"]
TOL = dict(rtol=2e-5, atol=2e-6)


def stored(opt, name):
    """(m, v) of parameter `name` as float64, read back from the 8-bit codes and scales (or float32 moments)."""
    state = {p.name: p.asnumpy() for p in opt.backend.state}
    if f"lamb_m8.{name}" in state:
        shape = dict((n, s) for n, s, *_ in PARAMS_8BIT)[name]
        count = int(np.prod(shape))
        m = blockwise.dequantize_signed(state[f"lamb_m8.{name}"], state[f"lamb_m8_scale.{name}"], count)
        v = blockwise.dequantize_unsigned(state[f"lamb_v8.{name}"], state[f"lamb_v8_scale.{name}"], count)
        return m.reshape(shape).astype(np.float64), v.reshape(shape).astype(np.float64)
    return state[f"lamb_m.{name}"].astype(np.float64), state[f"lamb_v.{name}"].astype(np.float64)


def codes(x, signed):
    return (blockwise.quantize_signed if signed else blockwise.quantize_unsigned)(np.asarray(x, np.float32))[0]


def run_8bit(config, backend, steps=6, seed=0):
    """Lamb(optim_bits=8) and the reference side by side. The reference quantizes its float64 moments and
    Lamb its float32 ones: where they fall on either side of a rounding point, a code differs by one; the
    reference then takes Lamb's state and goes on (counted: a few such codes in thousands are float32
    rounding, a wrong map or scale would differ everywhere)."""
    rng = np.random.default_rng(seed)
    init = {name: _initial(kind, shape, rng).astype(np.float32) for name, shape, kind, _ in PARAMS_8BIT}
    params = [Parameter(Tensor(init[name].copy()), name=name) for name, *_ in PARAMS_8BIT]
    names = [p.name for p in params]
    lamb_kwargs, step_kwargs, ref_kwargs = config(params, names)
    order = ref_kwargs.pop("order", names)
    ref_kwargs.pop("atol", None)
    opt = Lamb(lamb_kwargs.pop("params", params), backend=backend, optim_bits=8, min_8bit_size=MIN_SIZE,
               **lamb_kwargs)
    ref = LambReference([init[n] for n in order], optim_bits=8, min_8bit_size=MIN_SIZE, **ref_kwargs)
    assert [ref.quantized[order.index(n)] for n in ("dense.weight", "dense.bias", "wide.weight")] == [True, False, True]
    by_name = {p.name: p for p in params}
    scale = {name: gs for name, _, _, gs in PARAMS_8BIT}
    feed = ref_kwargs.get("loss_scale", 1.0)
    differing = 0
    for step in range(steps):
        grads = [(rng.standard_normal(by_name[n].shape) * scale[n] * feed).astype(np.float32) for n in order]
        opt(tuple(Tensor(g) for g in grads))
        assert ref.step(grads, **step_kwargs)
        for i, name in enumerate(order):
            where = f"{config.__name__}: {name} at step {step + 1}"
            w = by_name[name].asnumpy().astype(np.float64)
            m, v = stored(opt, name)
            if ref.quantized[i]:
                off = [codes(a, signed) .astype(np.int32) - codes(b, signed).astype(np.int32)
                       for a, b, signed in ((m, ref.m[i], True), (v, ref.v[i], False))]
                assert max(np.abs(d).max() for d in off) <= 1, where
                if any(d.any() for d in off):
                    differing += sum(int(np.count_nonzero(d)) for d in off)
                    ref.w[i], ref.m[i], ref.v[i] = w, m, v
                    continue
            layer_tol = dict(TOL, atol=max(TOL["atol"], TOL["rtol"] * np.abs(ref.w[i]).max()))
            np.testing.assert_allclose(w, ref.w[i], err_msg=where, **layer_tol)
            np.testing.assert_allclose(m, ref.m[i], err_msg="m " + where, **TOL)
            np.testing.assert_allclose(v, ref.v[i], err_msg="v " + where, rtol=TOL["rtol"],
                                       atol=TOL["atol"] ** 2)
            np.testing.assert_allclose(opt.trust_ratios()[name], ref.trust_ratios[i], err_msg="q " + where,
                                       rtol=TOL["rtol"])
    assert differing <= 4, f"{differing} codes one apart from the reference's"
    return opt, by_name


@pytest.mark.parametrize("backend", ["composite", "fused_cpu"])
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_matches_reference(mode, config, backend):
    opt, _ = run_8bit(CONFIGS[config], backend)
    assert opt.optim_bits == 8 and opt.backend.name == backend


def _layer_params(rng, shapes=((64, 96), (300, 40), (5000,))):
    return [Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=f"layer{i}")
            for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("backend", ["composite", "fused_cpu"])
def test_each_layer_steps_by_lr_times_its_norm(mode, backend):
    """||w_new - w|| = lr ||w|| for every layer, every step: the trust ratio is taken on the update as applied
    (from the moments as stored), so quantization error cannot change a layer's step size."""
    rng = np.random.default_rng(3)
    params = _layer_params(rng)
    lr = 0.01
    opt = Lamb(params, lr, weight_decay=0.01, optim_bits=8, backend=backend)
    ratios = []
    for _ in range(8):
        before = [p.asnumpy().astype(np.float64) for p in params]
        # gradients of very different scales inside each block: the 8-bit codes round them coarsely
        grads = [(rng.standard_normal(p.shape) * np.exp(2 * rng.standard_normal(p.shape))).astype(np.float32)
                 for p in params]
        opt(tuple(Tensor(g) for g in grads))
        ratios.append([np.linalg.norm(p.asnumpy() - b) / (lr * np.linalg.norm(b)) for p, b in zip(params, before)])
    np.testing.assert_allclose(ratios, 1.0, rtol=1e-5)


def test_fused_and_composite_store_the_same_codes(mode):
    """The fused CPU kernel and the composite graph, fed the same gradients for 5 steps: the same codes and scales,
    bit for bit (the moments depend on the gradients only, through the same float32 operations), and the same
    weights to float32 rounding (the graph folds the bias corrections into u = c m / (sqrt(v) + e) and sums the
    norms in float32, the kernel takes m^ / (sqrt(v^) + eps) and sums in double: q's last bits)."""
    rng = np.random.default_rng(11)
    shapes = ((64, 96), (300, 40), (5000,), (37,))
    grads = [[(rng.standard_normal(s) * np.exp(2 * rng.standard_normal(s))).astype(np.float32) for s in shapes]
             for _ in range(5)]
    grads[2][1][7, 3] = np.inf          # a skipped step: nothing moves (exact_skip; the composite path always)
    runs = {}
    for backend in ("fused_cpu", "composite"):
        params = _layer_params(np.random.default_rng(4), shapes)
        opt = Lamb(params, 0.01, weight_decay=0.01, optim_bits=8, min_8bit_size=1000, exact_skip=True,
                   backend=backend)
        assert opt.backend.name == backend
        runs[backend] = []
        for g in grads:
            opt(tuple(Tensor(x) for x in g))
            runs[backend].append({p.name: p.asnumpy().copy() for p in (*params, *opt.backend.state)})
    for step, (fused, composite) in enumerate(zip(runs["fused_cpu"], runs["composite"])):
        assert sorted(fused) == sorted(composite)
        for name, value in fused.items():
            if name.startswith(("lamb_m8", "lamb_v8")):
                np.testing.assert_array_equal(value, composite[name], err_msg=f"{name} at step {step + 1}")
            else:
                np.testing.assert_allclose(value, composite[name], rtol=1e-5, atol=1e-7,
                                           err_msg=f"{name} at step {step + 1}")


def test_state_takes_two_bytes_an_element_and_small_tensors_keep_float32():
    params = [Parameter(Tensor(np.zeros(shape, np.float32)), name=name)
              for name, shape in (("word", (30522, 768)), ("dense", (768, 3072)), ("bias", (768,)))]
    opt = Lamb(params, 1e-3, optim_bits=8, min_8bit_size=4096)
    state = {p.name: p for p in opt.backend.state}
    assert sorted(state) == ["lamb_m.bias", "lamb_m8.dense", "lamb_m8.word", "lamb_m8_scale.bias",
                             "lamb_m8_scale.dense", "lamb_m8_scale.word", "lamb_v.bias", "lamb_v8.dense",
                             "lamb_v8.word", "lamb_v8_scale.bias", "lamb_v8_scale.dense", "lamb_v8_scale.word"]
    assert state["lamb_m8.word"].dtype == ms.int8 and state["lamb_v8.word"].dtype == ms.uint8
    assert state["lamb_m8_scale.dense"].shape == (768 * 3072 // 256,)
    large = sum(int(np.prod(p.shape)) for p in params[:2])
    nbytes = sum(p.asnumpy().nbytes for name, p in state.items() if "8" in name.split(".")[0])
    assert nbytes / large <= 2.05
    assert state["lamb_m.bias"].dtype == ms.float32 and state["lamb_m8_scale.bias"].shape == (1,)   # unused


def test_a_skipped_step_leaves_codes_and_scales_as_they_were(mode, path):
    """exact_skip: a NaN gradient (in the float32 tensor) or finite=False changes nothing, the codes and scales
    of the 8-bit tensor included, bit for bit."""
    rng = np.random.default_rng(5)
    params = _layer_params(rng, ((40, 30), (7,)))
    opt = Lamb(params, 0.01, optim_bits=8, min_8bit_size=256, exact_skip=True, backend=path)
    opt(tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in params))
    before = {p.name: p.asnumpy().copy() for p in (*opt.backend.state, *params)}
    bad = [rng.standard_normal(p.shape).astype(np.float32) for p in params]
    bad[1][3] = np.nan
    opt(tuple(Tensor(g) for g in bad))
    opt(tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in params), Tensor(False))
    for p in (*opt.backend.state, *params):
        np.testing.assert_array_equal(p.asnumpy(), before[p.name], err_msg=p.name)
    assert opt.skipped_steps == 2


def test_zero_gradients_give_zero_codes_and_scales():
    params = [Parameter(Tensor(np.ones((20, 30), np.float32)), name="w")]
    opt = Lamb(params, 0.01, optim_bits=8, min_8bit_size=1)
    opt((Tensor(np.zeros((20, 30), np.float32)),))
    for p in opt.backend.state:
        assert not p.asnumpy().any(), p.name
    np.testing.assert_array_equal(params[0].asnumpy(), 1.0)


def test_arguments_are_checked():
    params = [Parameter(Tensor(np.ones(4, np.float32)), name="w")]
    with pytest.raises(ValueError, match=r"'optim_bits' must be one of \[32, 8\], but got int 16"):
        Lamb(params, 0.1, optim_bits=16)
    with pytest.raises(ValueError, match=r"'optim_bits' must be one of \[32, 8\], but got bool True"):
        Lamb(params, 0.1, optim_bits=True)
    with pytest.raises(ValueError, match=r"'min_8bit_size' must be >= 1, but got 0"):
        Lamb(params, 0.1, optim_bits=8, min_8bit_size=0)
    with pytest.raises(TypeError, match=r"'min_8bit_size' must be int, but got str"):
        Lamb(params, 0.1, optim_bits=8, min_8bit_size="4096")
    with pytest.raises(ValueError, match=r"'mu_dtype' must be None or float32 with optim_bits=8.*float16"):
        Lamb(params, 0.1, optim_bits=8, mu_dtype="float16")
    with pytest.raises(ValueError, match=r"'optim_bits'.*preset 'timm'"):
        Lamb.preset("timm", params, 0.1, optim_bits=8)
    assert Lamb(params, 0.1, optim_bits=8, mu_dtype="float32").optim_bits == 8


def test_check_state_names_damaged_8bit_state():
    rng = np.random.default_rng(2)
    params = _layer_params(rng, ((40, 30),))
    opt = Lamb(params, 0.01, optim_bits=8, min_8bit_size=1)
    opt((Tensor(rng.standard_normal((40, 30)).astype(np.float32)),))
    opt.check_state()
    state = {p.name: p.asnumpy().copy() for p in opt.backend.state}
    check_state(state)
    scales = state["lamb_v8_scale.layer0"].copy()
    scales[2] = -1.0
    with pytest.raises(ValueError, match=r"'lamb_v8_scale.layer0' holds 1 negative value.*largest magnitude"):
        check_state(dict(state, **{"lamb_v8_scale.layer0": scales}))
    with pytest.raises(ValueError, match=r"'lamb_m8_scale.layer0' holds 1 NaN"):
        check_state(dict(state, **{"lamb_m8_scale.layer0": np.where(np.arange(scales.size) == 1, np.nan,
                                                                    state["lamb_m8_scale.layer0"])}))
    with pytest.raises(ValueError, match=r"'lamb_m8.layer0' is stored as float32, but LAMB's 8-bit first "
                                         r"moments are int8\."):
        check_state(dict(state, **{"lamb_m8.layer0": state["lamb_m8.layer0"].astype(np.float32)}))


def test_checkpoint_resumes_bit_identically(mode, tmp_path):
    rng = np.random.default_rng(9)
    grads = [[rng.standard_normal(shape).astype(np.float32) for shape in ((40, 30), (9,))] for _ in range(6)]

    def fresh():
        params = _layer_params(np.random.default_rng(4), ((40, 30), (9,)))
        return params, Lamb(params, 0.01, weight_decay=0.01, optim_bits=8, min_8bit_size=256)

    params, opt = fresh()
    for g in grads:
        opt(tuple(Tensor(x) for x in g))
    whole = [p.asnumpy().copy() for p in (*params, *opt.backend.state)]

    params, opt = fresh()
    for g in grads[:3]:
        opt(tuple(Tensor(x) for x in g))
    ms.save_checkpoint(opt, str(tmp_path / "half.ckpt"))
    params, opt = fresh()
    loaded = ms.load_checkpoint(str(tmp_path / "half.ckpt"))
    check_state(loaded)
    assert not ms.load_param_into_net(opt, loaded)[0]
    for g in grads[3:]:
        opt(tuple(Tensor(x) for x in g))
    for got, want in zip((p.asnumpy() for p in (*params, *opt.backend.state)), whole):
        np.testing.assert_array_equal(got, want)


def test_model_train_with_loss_scale_and_the_monitor():
    """Model.train with LossScaleTrainStep and TrustRatioMonitor, unchanged with 8-bit state: the net learns,
    the monitor reads every step's ratios, an overflowing step (NaN input) is skipped and leaves the state."""
    from mindspore import nn
    from mindspore.train import Model
    from mindspore_lamb import LossScaleTrainStep, TrustRatioMonitor
    from nets import loss_fn, make_data, make_dataset, make_net
    net = make_net(0)
    opt = Lamb(net.trainable_params(), 0.02, weight_decay=0.01, optim_bits=8, min_8bit_size=48)
    assert {p.name.split(".")[0] for p in opt.backend.state} == {"lamb_m", "lamb_v", "lamb_m8", "lamb_m8_scale",
                                                                 "lamb_v8", "lamb_v8_scale"}
    cell = LossScaleTrainStep(nn.WithLossCell(net, loss_fn()), opt)
    monitor = TrustRatioMonitor(opt, every=1)
    x, labels = make_data()
    before = (net(ms.Tensor(x)).asnumpy().argmax(1) == labels).mean()
    Model(cell).train(6, make_dataset(), callbacks=[monitor], dataset_sink_mode=False)
    after = (net(ms.Tensor(x)).asnumpy().argmax(1) == labels).mean()
    assert after > max(0.85, before + 0.2)
    steps, ratios = monitor.series()["fc1.weight"]
    assert len(steps) == 6 * 8 and np.isfinite(ratios).all() and min(ratios) > 0
    state = {p.name: p.asnumpy().copy() for p in (*opt.backend.state, *net.trainable_params())}
    cell(ms.Tensor(np.full(x[:4].shape, np.nan, np.float32)), ms.Tensor(labels[:4]))
    assert opt.skipped_steps == 1
    for p in (*opt.backend.state, *net.trainable_params()):
        np.testing.assert_array_equal(p.asnumpy(), state[p.name], err_msg=p.name)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_the_composite_graph_compiles_for_many_parameters(optim_bits):
    """130 parameters on the composite path (BERT-base has 199): more than MindSpore's default max_call_depth of
    1000 holds (110 with float32 state, 80 with 8-bit state); Lamb raises it."""
    ms.set_context(max_call_depth=1000)
    params = [Parameter(Tensor(np.full((4, 4), 0.5, np.float32)), name=f"p{i}") for i in range(130)]
    opt = Lamb(params, 0.01, backend="composite", optim_bits=optim_bits, min_8bit_size=1)
    assert ms.get_context("max_call_depth") >= 16 * 130
    opt(tuple(Tensor(np.full((4, 4), 0.1 * (i % 7 + 1), np.float32)) for i in range(130)))
    assert all(not np.array_equal(p.asnumpy(), np.full((4, 4), 0.5, np.float32)) for p in params)
