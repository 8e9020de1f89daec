"""Named presets: the LAMB of another library, as flags of :class:`mindspore_lamb.Lamb`.

Each preset holds the library's default hyper-parameters (used unless you pass your own) and the flags
that make our update rule its update rule. docs/variants.md has the table, the source each preset was
read from, and the measured deviation from that library's own trajectory.
"""
from collections import namedtuple

Preset = namedtuple("Preset", ["library", "defaults", "flags", "note"])

_ADAM = dict(beta1=0.9, beta2=0.999, eps=1e-6)

PRESETS = {
    "paper": Preset("You et al. 2019, Algorithm 2 (MindSpore nn.Lamb on Ascend)",
                    dict(_ADAM, weight_decay=0.0), {}, "the defaults of Lamb"),
    "mindspore_gpu": Preset("MindSpore nn.Lamb, GPU kernel", dict(_ADAM, weight_decay=0.0),
                            dict(trust_ratio_clip=(0.0, 10.0)), "trust ratio clipped to [0, 10]"),
    "apex": Preset("NVIDIA apex FusedLAMB (NVLAMB, adam_w_mode=True, use_nvlamb=False)",
                   dict(_ADAM, weight_decay=0.01), dict(max_grad_norm=1.0, layer_adaptation="decayed"),
                   "global-norm pre-normalisation at 1.0; no trust ratio where weight decay is 0 "
                   "(use_nvlamb=True: pass layer_adaptation=True)"),
    "timm": Preset("timm.optim.Lamb", dict(_ADAM, weight_decay=0.01),
                   dict(max_grad_norm=1.0, layer_adaptation="decayed"),
                   "global-norm clipping at 1.0; no trust ratio where weight decay is 0 (always_adapt=False)"),
    "optax": Preset("optax.lamb", dict(_ADAM, weight_decay=0.0), {}, "the paper's rule"),
    "keras": Preset("keras.optimizers.Lamb (Keras 3)", dict(beta1=0.9, beta2=0.999, eps=1e-7, weight_decay=0.0),
                    dict(weight_decay_mode="decoupled_outside"),
                    "weight decay applied by the base optimizer, outside the trust ratio"),
    "tfa": Preset("tensorflow_addons.optimizers.LAMB", dict(_ADAM, weight_decay=0.0), {},
                  "exclude_from_layer_adaptation defaults to exclude_from_weight_decay"),
    "paddle": Preset("paddle.optimizer.Lamb", dict(_ADAM, weight_decay=0.01), dict(layer_adaptation="decayed"),
                     "no trust ratio where weight decay is 0 (always_adapt=False); lamb_weight_decay "
                     "defaults to 0.01"),
    "torch_optimizer": Preset("torch_optimizer.Lamb", dict(_ADAM, weight_decay=0.0),
                              dict(bias_correction=False, weight_norm_clip=10.0),
                              "no bias correction (debias=False); ||w|| clamped to 10 (clamp_value)"),
    "deepspeed": Preset("DeepSpeed FusedLamb", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
                        dict(trust_ratio_clip=(0.01, 10.0), bias_correction="step_size"),
                        "trust ratio clipped to [0.01, 10]; bias correction in the step size, not in the "
                        "moments (so q sees the uncorrected update)"),
}


def resolve(name, overrides):
    """The keyword arguments of Lamb for preset `name`, with `overrides` (the caller's) taking precedence."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"For 'Lamb.preset', the argument 'name' must be one of {sorted(PRESETS)}, "
                         f"but got {name!r}.")
    preset = PRESETS[name]
    if overrides.get("optim_bits", 32) != 32:
        raise ValueError(f"For 'Lamb.preset', the argument 'optim_bits' must be 32: the preset {name!r} reproduces "
                         f"{preset.library}, whose moments are float32 (Lamb(..., optim_bits=8) with the preset's "
                         f"flags, docs/variants.md, is LAMB with 8-bit state, not that library), but got "
                         f"{overrides['optim_bits']!r}.")
    kwargs = dict(preset.defaults, **preset.flags)
    kwargs.update(overrides)
    if name == "tfa" and "exclude_from_layer_adaptation" not in overrides:
        # TF-Addons: exclude_from_layer_adaptation=None means "the same as exclude_from_weight_decay"
        kwargs["exclude_from_layer_adaptation"] = kwargs.get("exclude_from_weight_decay")
    return kwargs


def table():
    """str: a Markdown table of the presets (name, library, flags, defaults)."""
    rows = ["| preset | library | flags | default hyper-parameters | what differs from the paper |",
            "|---|---|---|---|---|"]
    for name, preset in PRESETS.items():
        flags = ", ".join(f"`{k}={v!r}`" for k, v in preset.flags.items()) or "none"
        defaults = ", ".join(f"{k}={v}" for k, v in preset.defaults.items())
        rows.append(f"| `{name}` | {preset.library} | {flags} | {defaults} | {preset.note} |")
    return "\n".join(rows)
