"""Lamb(mu_dtype=...): the first moment stored in float16 or bfloat16, computed in float32.

Held to the float64 reference (tests/helpers/reference.py) with its first moment rounded to the same dtype
at each step, on the fused CPU kernel and the composite graph, in both modes; the rounding itself (to
nearest, ties to even, and the step computed from m as stored) is checked exactly on one step built so that
float32 makes no other rounding. Checkpoints carry the stored dtype.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from mindspore_lamb import Lamb, check_state
from nets import loss_fn, make_data, make_net
from reference import LambReference, round_to
from update_cases import run_against_reference
from test_update_rule import CONFIGS

# (backend, mu_dtype) pairs that run on CPU: MindSpore 2.10 cannot write a bfloat16 Parameter on CPU, so
# the composite graph stores a bfloat16 first moment on GPU/Ascend only
RUNS = [("fused_cpu", "float16"), ("fused_cpu", "bfloat16"), ("composite", "float16")]
ULP_BITS = {"float16": 10, "bfloat16": 7}       # significand bits after the leading one


@pytest.mark.parametrize("backend, mu_dtype", RUNS)
@pytest.mark.parametrize("config", ["weight_decay", "groups", "all_together", "max_grad_norm"])
def test_matches_reference_with_the_stored_moment_rounded(mode, backend, mu_dtype, config):
    opt, _ = run_against_reference(CONFIGS[config], "float32", backend=backend, mu_dtype=mu_dtype)
    assert opt.backend.name == backend
    assert all(m.dtype == getattr(ms, mu_dtype) for m in opt.moments1)
    assert all(v.dtype == ms.float32 for v in opt.moments2)


def _grid_gradients(mu_dtype):
    """Gradients g = 2 x, x on and between the points of mu_dtype's grid: k/8 of a unit in the last place
    above a grid point (k = 0..7: 4 is a midpoint, which ties to even), over binades up to near float16's
    largest, and around float16's subnormals (n + k/8) 2^-24, both signs."""
    bits = ULP_BITS[mu_dtype]
    x = [sign * 2.0 ** e * (1.0 + (j + k / 8.0) * 2.0 ** -bits)
         for sign in (1.0, -1.0) for e in (-6, -3, 0, 2, 14) for j in (0, 1, 2, 5) for k in range(8)]
    x += [sign * (n + k / 8.0) * 2.0 ** -24 for sign in (1.0, -1.0) for n in (0, 1, 2, 5, 100) for k in range(8)]
    return 2.0 * np.array(x, np.float32)


@pytest.mark.parametrize("backend, mu_dtype", RUNS)
def test_first_moment_is_rounded_to_nearest_even_and_the_step_uses_it(mode, backend, mu_dtype):
    """beta1 = 0.5: m = g / 2 exactly in float32, so the stored m is exactly m rounded to mu_dtype, and with
    lr = 1 and q = 1 the step w - m^ / (sqrt(v^) + eps) moves by a relative 2^-(bits+3) or more when m^ is
    not the stored m (unrounded, truncated, or ties rounded away from even)."""
    g = _grid_gradients(mu_dtype)
    w = Parameter(Tensor(np.ones_like(g)), name="w")
    opt = Lamb([{"params": [w], "layer_adaptation": False}], learning_rate=1.0, beta1=0.5, backend=backend,
               mu_dtype=mu_dtype)
    opt((Tensor(g),))
    m = opt.moments1[0].float().asnumpy()
    np.testing.assert_array_equal(m, round_to(g.astype(np.float64) / 2.0, mu_dtype))
    ref = LambReference([np.ones_like(g)], beta1=0.5, mu_dtype=mu_dtype)
    ref.step([g], lr=1.0, weight_decay=0.0, layer_adaptation=[False])
    np.testing.assert_allclose(w.asnumpy(), ref.w[0], rtol=0, atol=2e-6)
    unrounded = LambReference([np.ones_like(g)], beta1=0.5)
    unrounded.step([g], lr=1.0, weight_decay=0.0, layer_adaptation=[False])
    assert np.abs(unrounded.w[0] - ref.w[0]).max() > 2.0 ** -(ULP_BITS[mu_dtype] + 3)    # the check can tell


def test_default_is_float32_and_the_argument_is_checked():
    params = make_net(0).trainable_params()
    assert all(m.dtype == ms.float32 for m in Lamb(params, 0.1).moments1)
    assert Lamb(params, 0.1, mu_dtype=ms.bfloat16).mu_dtype == ms.bfloat16
    assert Lamb(params, 0.1, mu_dtype="Float16").mu_dtype == ms.float16
    with pytest.raises(ValueError, match=r"'mu_dtype' must be None or one of \['float32', 'float16', 'bfloat16'\].*"
                                         r"float64"):
        Lamb(params, 0.1, mu_dtype="float64")
    with pytest.raises(ValueError, match="'mu_dtype'.*mindspore.int8"):
        Lamb(params, 0.1, mu_dtype=ms.int8)
    with pytest.raises(TypeError, match="'mu_dtype'.*int 16"):
        Lamb(params, 0.1, mu_dtype=16)


def test_bfloat16_moments_on_cpu_need_the_fused_kernel(monkeypatch):
    """MindSpore 2.10's CPU Assign has no bfloat16 kernel: the composite graph cannot store them on CPU."""
    params = make_net(0).trainable_params()
    with pytest.raises(RuntimeError, match="'backend' is 'composite'.*bfloat16 Parameter on CPU.*first moments"):
        Lamb(params, 0.1, mu_dtype="bfloat16", backend="composite")
    monkeypatch.setenv("MINDSPORE_LAMB_FUSED", "0")
    with pytest.raises(TypeError, match="no backend can run.*on CPU.*composite: .*bfloat16"):
        Lamb(params, 0.1, mu_dtype="bfloat16")
    monkeypatch.delenv("MINDSPORE_LAMB_FUSED")
    half = [Parameter(Tensor(np.ones(3, np.float16)), name="half")]
    with pytest.raises(TypeError, match="fused_cpu: not every parameter is float32; composite: .*bfloat16"):
        Lamb(half, 0.1, mu_dtype="bfloat16")


def _train_cell(mu_dtype, seed=0):
    net = make_net(seed)
    opt = Lamb(net.trainable_params(), 0.01, weight_decay=0.01, mu_dtype=mu_dtype)
    return nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn()), opt), opt


@pytest.mark.parametrize("saved, loaded", [("bfloat16", "float32"), ("float32", "bfloat16"),
                                           ("float16", "bfloat16")])
def test_checkpoint_carries_the_stored_dtype_and_loads_into_any(tmp_path, saved, loaded):
    """lamb_m.* is saved in mu_dtype (lamb_v.* float32), passes check_state, and loads into a Lamb with
    another mu_dtype: MindSpore casts it, exactly upwards, to nearest downwards (what the step stores)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    x, labels = (Tensor(a) for a in make_data(n=64))
    cell, opt = _train_cell(saved)
    for _ in range(2):
        cell(x, labels)
    path = str(tmp_path / "mu.ckpt")
    ms.save_checkpoint(cell, path)
    state = ms.load_checkpoint(path)
    firsts = [name for name in state if name.startswith("lamb_m.")]
    assert firsts and all(state[name].dtype == getattr(ms, saved) for name in firsts)
    assert all(state[name].dtype == ms.float32 for name in state if name.startswith("lamb_v."))
    check_state(state, path)
    other, other_opt = _train_cell(loaded, seed=1)
    assert ms.load_param_into_net(other, state)[0] == []
    for ours, theirs in zip(other_opt.moments1, opt.moments1):
        assert ours.dtype == getattr(ms, loaded)
        want = round_to(theirs.float().asnumpy().astype(np.float64), loaded)
        np.testing.assert_array_equal(ours.float().asnumpy(), want)
    other(x, labels)
    assert int(other_opt.global_step.asnumpy()[0]) == 3
    other_opt.check_state()


def test_check_state_takes_each_slot_in_its_own_dtypes():
    step = np.array([1], np.int32)
    m = Tensor(np.ones(3, np.float32), ms.bfloat16).asnumpy()
    check_state({"global_step": step, "lamb_m.w": m, "lamb_v.w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"'lamb_v\.w' is stored as bfloat16, but LAMB's second moments are float32"):
        check_state({"global_step": step, "lamb_m.w": m, "lamb_v.w": m})
    with pytest.raises(ValueError, match=r"'lamb_m\.w' is stored as float64, but LAMB's first moments are float32 or "
                                         r"float16 or bfloat16"):
        check_state({"lamb_m.w": np.ones(3)})
    bad = Tensor(np.array([1.0, np.nan, 2.0], np.float32), ms.bfloat16).asnumpy()
    with pytest.raises(ValueError, match=r"'lamb_m\.w' holds 1 NaN or Inf value\(s\), the first at index \(1,\)"):
        check_state({"lamb_m.w": bad})
