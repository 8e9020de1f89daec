"""Packaging facts a user meets before any code runs: every extra the docs name exists under that name
(PEP 685 spelling, which older pips do not normalise), and the kernel source is package data."""
import configparser
import fnmatch
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _extras():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg, set(cfg["options.extras_require"])


def test_extras_named_in_the_docs_exist():
    _, extras = _extras()
    docs = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")) + \
        glob.glob(os.path.join(ROOT, "model_zoo_examples", "**", "*.*"), recursive=True)
    named = set()
    for path in docs:
        if path.endswith((".md", ".py", ".sh")):
            with open(path, encoding="utf-8") as handle:
                named |= set(re.findall(r"\.\[([A-Za-z0-9_.-]+)\]", handle.read()))
    assert named, "the docs name no extra"
    assert named <= extras, f"extras named in the docs but not defined: {sorted(named - extras)}"


def test_extra_names_need_no_normalisation():
    _, extras = _extras()
    for name in extras:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), f"extra {name!r} is not in PEP 685 form"


def test_kernel_source_is_package_data():
    cfg, _ = _extras()
    patterns = cfg["options.package_data"]["mindspore_lamb.backends"].split()
    assert any(fnmatch.fnmatch("fused_cpu.cc", p) for p in patterns)
    assert os.path.isfile(os.path.join(ROOT, "mindspore_lamb", "backends", "fused_cpu.cc"))


def test_one_version_source_and_a_license():
    """The version is written once (mindspore_lamb.__version__, read by setup.cfg), and the Apache-2.0 text
    that setup.cfg declares ships as LICENSE."""
    cfg, _ = _extras()
    assert cfg["metadata"]["version"] == "attr: mindspore_lamb.__version__"
    with open(os.path.join(ROOT, "mindspore_lamb", "__init__.py"), encoding="utf-8") as handle:
        assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', handle.read(), re.M)
    assert cfg["metadata"]["license"] == "Apache-2.0" and cfg["metadata"]["license_files"] == "LICENSE"
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as handle:
        assert "Apache License" in handle.read(2000)
