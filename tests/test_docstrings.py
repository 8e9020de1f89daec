"""The `Examples` of every public docstring run as doctests (GRAPH_MODE on CPU), so they cannot rot."""
import doctest

import mindspore as ms
import pytest

import mindspore_lamb
from mindspore_lamb import diagnostics, groups, lamb, schedules, train_step

MODULES = [lamb, train_step, diagnostics, schedules, groups]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # an example may name an output file
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(module, module.__name__) if t.examples]
    assert tests, f"{module.__name__} has no docstring example"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples failed in {module.__name__}"


def test_every_public_name_has_an_example():
    for name in mindspore_lamb.__all__:
        doc = getattr(mindspore_lamb, name).__doc__
        assert "Examples:" in doc and ">>>" in doc, name
