"""The examples of the README and the guides run (README.md's quickstart, docs/index.md, migration.md,
choosing_a_preset.md, functional_loop.md, mixed_precision.md): each ```python block runs on its own, in a
fresh namespace, as a reader pasting only that block would run it (what MindSpore keeps per process, the
context and the device, is shared: the blocks set the same, and setting the device it already has is a no-op
here). The guides' blocks hold their own asserts
about the outcome (the same rule as nn.AdamWeightDecay, a loss that falls, what CPU refuses); the
quickstarts print, and their output is checked here: the loss falls and each layer's trust ratio is shown."""
import ast
import importlib
import math
import os
import re

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTARTS = ["README.md", "docs/index.md"]
GUIDES = ["docs/migration.md", "docs/choosing_a_preset.md", "docs/functional_loop.md", "docs/mixed_precision.md",
          "docs/memory.md"]


def _blocks(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        return re.findall(r"^```python\n(.*?)^```$", handle.read(), re.S | re.M)


def _run_block(name, index, tmp_path, monkeypatch):
    """Block `index` of `name`, alone, as one importable module (ms.jit reads the source of what it compiles)."""
    blocks = _blocks(name)
    assert len(blocks) > index, f"{name} has {len(blocks)} python blocks"
    module = re.sub(r"\W", "_", f"example_{name[:-3]}_{index + 1}")
    (tmp_path / f"{module}.py").write_text(f"# {name}, block {index + 1}\n{blocks[index]}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # A reader's script sets the device first thing; in this process the runtime may be up already (other
    # tests ran), where MindSpore refuses to set it again, even to the device it has: the same one is a no-op.
    set_device = ms.set_device

    def same_device_once(device_target, *args, **kwargs):
        if device_target != ms.get_context("device_target"):
            set_device(device_target, *args, **kwargs)
    monkeypatch.setattr(ms, "set_device", same_device_once)
    try:
        importlib.import_module(module)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


EXAMPLES = [(name, index) for name in GUIDES for index in range(len(_blocks(name)))]


@pytest.mark.parametrize("name", GUIDES)
def test_guide_has_examples(name):
    assert _blocks(name), f"{name} has no python example"


@pytest.mark.parametrize("name, index", EXAMPLES, ids=[f"{name}-{index + 1}" for name, index in EXAMPLES])
def test_guide_example_runs_on_its_own(name, index, tmp_path, monkeypatch):
    _run_block(name, index, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstart_trains_and_prints_loss_and_trust_ratios(name, tmp_path, monkeypatch, capsys):
    assert len(_blocks(name)) == 1, f"{name}: one python block, the quickstart"
    _run_block(name, 0, tmp_path, monkeypatch)
    out = capsys.readouterr().out
    losses = [float(value) for value in re.findall(r"\bloss (?:is )?([-+0-9.e]+)", out)]
    assert len(losses) >= 3, f"{name}: the quickstart should print the loss as it trains:\n{out}"
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] / 4, losses
    ratios = ast.literal_eval(re.search(r"^\{.*\}$", out, re.M).group(0))
    assert ratios and all(isinstance(q, float) and math.isfinite(q) and q > 0 for q in ratios.values()), ratios
