"""Each preset against trajectories recorded from the real library (tests/fixtures/peers/*.npz, written by
tools/record_peers.py): 20 steps of a 2-D weight, a bias, a LayerNorm pair and a zero-initialised tensor,
with a decaying learning rate, weight decay 0 and 0.01 on every parameter; both backends, both modes.

The tolerance is stated per library (TOLERANCE, relative to each parameter's norm, after every step) and
explained where it is above float32 rounding; docs/variants.md has the measured deviations. Each preset's
default betas, eps and weight decay are compared with its library's constructor (tests/fixtures/
peer_defaults.json, written by tools/peer_defaults.py).
"""
import json
import os

import numpy as np
import pytest

from mindspore import Parameter, Tensor

from mindspore_lamb import Lamb
from mindspore_lamb.presets import PRESETS

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "peers")
VARIANTS_DOC = os.path.join(os.path.dirname(FIXTURES), "..", "..", "docs", "variants.md")
NAMES = ("dense.weight", "dense.bias", "norm.gamma", "norm.beta", "zero.weight")

# relative deviation allowed: ||ours - theirs|| / ||theirs|| per parameter and step
# (measured on CPU: docs/variants.md). Float32 rounding gives about 2e-7; the libraries that compute
# 1 - beta^t from the float32 beta (0.999 is 0.99900001287 in float32: 1 - beta2^t 1.3e-5 off, the step
# 6.4e-6) differ by that where the trust ratio does not cancel it (q = 1 on the zero-initialised
# parameters at step 1); paddle multiplies float32 beta^t accumulators every step.
TOLERANCE = {
    "tfa": 1e-6, "timm": 3e-6, "torch_optimizer": 1e-6,
    "optax": 1e-5, "keras": 1e-5, "paddle": 5e-6,
}


def _run(library, trajectory, mode_name, backend=None):
    data = np.load(os.path.join(FIXTURES, f"{library}.npz"))
    wd = float(trajectory[2:])
    params = [Parameter(Tensor(data[f"init/{n}"]), name=n) for n in NAMES]
    lr = [float(x) for x in data["lr"]]
    # every library was run with eps 1e-6 and its weight decay on every parameter (one group)
    opt = Lamb.preset(library, [{"params": params, "weight_decay": wd}], learning_rate=lr, eps=1e-6,
                      beta1=0.9, beta2=0.999, backend=backend)
    worst = 0.0
    for step in range(len(lr)):
        opt(tuple(Tensor(data[f"grad/{n}"][step]) for n in NAMES))
        for param, name in zip(params, NAMES):
            theirs = data[f"{trajectory}/{name}"][step].astype(np.float64)
            ours = param.asnumpy().astype(np.float64)
            worst = max(worst, float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)))
    return opt, worst


@pytest.mark.parametrize("trajectory", ["wd0", "wd0.01"])
@pytest.mark.parametrize("library", sorted(TOLERANCE))
def test_preset_reproduces_the_library(mode, path, library, trajectory):
    opt, worst = _run(library, trajectory, mode, backend=path)
    assert opt.backend.name == path
    assert worst <= TOLERANCE[library], f"{library} {trajectory}: deviation {worst:.3g}"


def test_every_fixture_has_a_preset_and_every_preset_is_documented():
    fixtures = {f[:-4] for f in os.listdir(FIXTURES) if f.endswith(".npz")}
    fixtures -= {"bnb", "torchao"}      # 8-bit optimizers on another problem: tests/test_peers_8bit.py
    assert fixtures <= set(PRESETS), fixtures - set(PRESETS)
    with open(VARIANTS_DOC, encoding="utf-8") as f:
        doc = f.read()
    for name in PRESETS:
        assert f"`{name}`" in doc, name


def test_presets_differ_where_the_libraries_do():
    """The fixtures are not all the same trajectory: the presets' differences are real."""
    finals = {lib: np.load(os.path.join(FIXTURES, f"{lib}.npz"))["wd0.01/dense.weight"][-1] for lib in TOLERANCE}
    assert not np.allclose(finals["timm"], finals["optax"], rtol=1e-4)
    assert not np.allclose(finals["keras"], finals["optax"], rtol=1e-4)
    assert not np.allclose(finals["torch_optimizer"], finals["optax"], rtol=1e-4)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="'name'.*'timm'.*'lamb'"):
        Lamb.preset("lamb", [Parameter(Tensor(np.ones(3, np.float32)), name="w")], 0.1)


# ---- apex and DeepSpeed need CUDA: their kernels' formulas, transcribed (float64), on the same problem ----

def _apex_fused_lamb(ws, grads, lrs, wd, beta1=0.9, beta2=0.999, eps=1e-6, max_grad_norm=1.0):
    """NVIDIA/apex csrc/multi_tensor_lamb.cu (adam_w_mode=True, grad_averaging=True, use_nvlamb=False):
    stage 1 g / max(G / max_grad_norm, 1), m, v, u = m^ / (sqrt(v^) + eps) + decay p; stage 2
    p -= lr * (||p|| / ||u|| if decay != 0 and both norms != 0 else 1) * u."""
    ws = [w.astype(np.float64) for w in ws]
    m = [np.zeros_like(w) for w in ws]
    v = [np.zeros_like(w) for w in ws]
    out = []
    for step, (gs, lr) in enumerate(zip(grads, lrs)):
        t = step + 1
        big_g = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in gs))
        clip = max(big_g / max_grad_norm, 1.0)
        for i, g in enumerate(gs):
            g = g.astype(np.float64) / clip
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            u = (m[i] / (1 - beta1 ** t)) / (np.sqrt(v[i] / (1 - beta2 ** t)) + eps) + wd * ws[i]
            p_norm, u_norm = np.linalg.norm(ws[i]), np.linalg.norm(u)
            ratio = p_norm / u_norm if (wd != 0 and p_norm != 0 and u_norm != 0) else 1.0
            ws[i] = ws[i] - lr * ratio * u
        out.append([w.copy() for w in ws])
    return out


def _deepspeed_fused_lamb(ws, grads, lrs, wd, beta1=0.9, beta2=0.999, eps=1e-8, max_coeff=10.0, min_coeff=0.01):
    """microsoft/DeepSpeed csrc/lamb/fused_lamb_cuda_kernel.cu (bias_correction=True, eps_inside_sqrt=False,
    max_grad_norm=0): u = m / (sqrt(v) + eps) + decay p (moments uncorrected), step_size =
    lr sqrt(1 - beta2^t) / (1 - beta1^t), coeff = clamp(||p|| / ||u||, min_coeff, max_coeff) (1 if a norm is 0)."""
    ws = [w.astype(np.float64) for w in ws]
    m = [np.zeros_like(w) for w in ws]
    v = [np.zeros_like(w) for w in ws]
    out = []
    for step, (gs, lr) in enumerate(zip(grads, lrs)):
        t = step + 1
        step_size = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        for i, g in enumerate(gs):
            g = g.astype(np.float64)
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            u = m[i] / (np.sqrt(v[i]) + eps) + wd * ws[i]
            p_norm, u_norm = np.linalg.norm(ws[i]), np.linalg.norm(u)
            coeff = min(max(p_norm / u_norm, min_coeff), max_coeff) if (p_norm != 0 and u_norm != 0) else 1.0
            ws[i] = ws[i] - step_size * coeff * u
        out.append([w.copy() for w in ws])
    return out


@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("library", ["apex", "deepspeed"])
def test_cuda_only_presets_match_their_kernels_formula(mode, path, library, wd):
    data = np.load(os.path.join(FIXTURES, "optax.npz"))         # the shared problem: weights, gradients, lr
    init = [data[f"init/{n}"] for n in NAMES]
    grads = [[data[f"grad/{n}"][s] for n in NAMES] for s in range(len(data["lr"]))]
    lrs = [float(x) for x in data["lr"]]
    transcription = _apex_fused_lamb if library == "apex" else _deepspeed_fused_lamb
    want = transcription(init, grads, lrs, wd)
    params = [Parameter(Tensor(w), name=n) for w, n in zip(init, NAMES)]
    opt = Lamb.preset(library, [{"params": params, "weight_decay": wd}], learning_rate=lrs,
                      backend=path)
    for step, gs in enumerate(grads):
        opt(tuple(Tensor(g) for g in gs))
        for param, theirs in zip(params, want[step]):
            deviation = np.linalg.norm(param.asnumpy() - theirs) / np.linalg.norm(theirs)
            # 3e-6: as timm's row, float32 rounding of plain Adam steps (no trust ratio at wd = 0) on the
            # zero-initialised tensors, measured relative to their still small norms
            assert deviation <= 3e-6, f"{library} wd={wd} step {step + 1}: {deviation:.3g}"


# ---- the presets' own defaults (betas, eps, weight decay) against each library's constructor ----

# written by tools/peer_defaults.py from each library's source at a pinned version (apex: transcribed)
PEER_DEFAULTS = os.path.join(os.path.dirname(FIXTURES), "peer_defaults.json")


def _peer_defaults():
    with open(PEER_DEFAULTS, encoding="utf-8") as f:
        return json.load(f)


def test_every_library_preset_has_its_source_defaults():
    # `paper` is a paper, not a library: nothing to read defaults from
    assert set(_peer_defaults()) == set(PRESETS) - {"paper"}


def test_docs_name_where_each_default_was_read():
    with open(VARIANTS_DOC, encoding="utf-8") as f:
        doc = f.read()
    for name, entry in _peer_defaults().items():
        assert f"`{entry['file']}:{entry['line']}`" in doc, name


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"paper"}))
def test_preset_defaults_are_the_library_defaults(name):
    entry = _peer_defaults()[name]
    ours = PRESETS[name].defaults
    assert set(ours) == set(entry["defaults"]), name
    for key, theirs in entry["defaults"].items():
        where = f"{entry['package']} {entry['version']} {entry['file']}:{entry['line']}"
        assert np.float32(ours[key]) == np.float32(theirs), \
            f"preset {name!r}: {key}={ours[key]!r}, but {where} has {entry['arguments'][key]}={theirs!r}"
