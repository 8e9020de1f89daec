"""The variant table of docs/variants.md: each row's flags, checked against the NumPy reference
configured as that implementation defines LAMB."""
import numpy as np
import pytest

from mindspore_lamb.groups import bert_param_groups
from update_cases import WEIGHTS, run_against_reference

NO_DECAY = ("bias", "gamma", "beta")


def _no_decay(name):
    return any(k in name for k in NO_DECAY)


def _groups_order(params):
    """bert_param_groups puts decayed parameters first unless order_params says otherwise: read the order back."""
    return [p.name for p in params]


def variant_paper(params, names):
    """Algorithm 2 of the paper: phi = identity, decay on every weight, no clipping, bias correction."""
    return (dict(learning_rate=0.02, weight_decay=0.01),
            dict(lr=0.02, weight_decay=0.01, decay=[("beta" not in n and "gamma" not in n) for n in names]), {})


def variant_nvlamb_apex(params, names):
    """NVIDIA's NVLAMB / apex FusedLAMB (adam_w_mode=True, max_grad_norm=1.0, use_nvlamb=False):
    global gradient pre-normalisation, and no layer adaptation for the parameters with zero weight decay."""
    groups = [{"params": [p for p in params if not _no_decay(p.name)], "weight_decay": 0.01},
              {"params": [p for p in params if _no_decay(p.name)], "weight_decay": 0.0,
               "layer_adaptation": False},
              {"order_params": params}]
    decayed = [not _no_decay(n) for n in names]
    return (dict(params=groups, learning_rate=0.02, max_grad_norm=1.0),
            dict(lr=0.02, weight_decay=0.01, decay=decayed, layer_adaptation=decayed),
            dict(max_grad_norm=1.0))


def variant_mindspore_gpu(params, names):
    """MindSpore's fused GPU Lamb kernel clips the trust ratio to [0, 10]."""
    decay = [("beta" not in n and "gamma" not in n) for n in names]
    return (dict(learning_rate=0.02, weight_decay=0.01, trust_ratio_clip=(0.0, 10.0)),
            dict(lr=0.02, weight_decay=0.01, decay=decay), dict(trust_ratio_clip=(0.0, 10.0)))


def variant_tf_addons(params, names):
    """TF-Addons LAMB: exclude_from_weight_decay=[bias, LayerNorm]; exclude_from_layer_adaptation
    defaults to the same list."""
    groups = bert_param_groups(params, 0.01, no_decay_keywords=NO_DECAY)
    for group in groups:
        if group.get("weight_decay") == 0.0:
            group["layer_adaptation"] = False
    decayed = [not _no_decay(n) for n in names]
    return (dict(params=groups, learning_rate=0.02),
            dict(lr=0.02, weight_decay=0.01, decay=decayed, layer_adaptation=decayed), {})


def variant_optax(params, names):
    """optax.lamb(lr, weight_decay=0.01, mask=no-bias/LayerNorm): decay masked, trust ratio on every leaf."""
    groups = bert_param_groups(params, 0.01, no_decay_keywords=NO_DECAY)
    return (dict(params=groups, learning_rate=0.02),
            dict(lr=0.02, weight_decay=0.01, decay=[not _no_decay(n) for n in names]), {})


VARIANTS = [variant_paper, variant_nvlamb_apex, variant_mindspore_gpu, variant_tf_addons, variant_optax]


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.__name__[8:] for v in VARIANTS])
def test_variant_matches_reference(variant):
    opt, ref = run_against_reference(variant, "float32", steps=6)
    q = dict(zip(opt.param_names, ref.trust_ratios))
    if variant is variant_mindspore_gpu:
        assert q["big.weight"] == 10.0                       # the clip was active, so the test can fail
    if variant in (variant_nvlamb_apex, variant_tf_addons):
        assert q["dense.bias"] == 1.0 and q["dense.weight"] != 1.0
    assert "big.weight" in WEIGHTS and np.isfinite(list(q.values())).all()
