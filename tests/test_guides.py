"""The guides' examples run (docs/migration.md, choosing_a_preset.md, functional_loop.md, mixed_precision.md):
the ```python blocks of a guide run in order in one namespace, as a reader would paste them; each holds its
own asserts about the outcome (the same rule as nn.AdamWeightDecay, a loss that falls, what CPU refuses)."""
import importlib
import os
import re

import mindspore as ms
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES = ["migration.md", "choosing_a_preset.md", "functional_loop.md", "mixed_precision.md"]


def _blocks(name):
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as handle:
        return re.findall(r"^```python\n(.*?)^```$", handle.read(), re.S | re.M)


@pytest.mark.parametrize("guide", GUIDES)
def test_guide_examples_run(guide, tmp_path, monkeypatch):
    blocks = _blocks(guide)
    assert blocks, f"{guide} has no python example"
    # one importable module (ms.jit reads the source of the functions it compiles)
    name = f"guide_{guide[:-3]}"
    (tmp_path / f"{name}.py").write_text("".join(f"# docs/{guide}, block {i + 1}\n{block}\n"
                                                 for i, block in enumerate(blocks)), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module(name)
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
