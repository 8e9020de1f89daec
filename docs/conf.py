"""Sphinx configuration of the mindspore_lamb documentation site (build: see the README, "Documentation").

The API pages are generated from the docstrings (autodoc, importing the package: MindSpore must be installed);
the guides are the Markdown pages of this directory (MyST). Built with warnings as errors (-W) and nitpicky
cross-references; docs/build.sh (what CI runs) then checks the built pages with docs/check_links.py: every
relative link resolves, no page loads anything from the network, the Chinese pages say lang="zh".
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import mindspore_lamb  # noqa: E402  (the version, and a clear failure when the package does not import)

project = "mindspore_lamb"
author = "mindspore_lamb contributors"
copyright = "2026, mindspore_lamb contributors"  # noqa: A001  (Sphinx's name)
release = version = mindspore_lamb.__version__

# sphinx-mathjax-offline (the `docs` extra) copies MathJax 3 into _static/mathjax: the maths renders offline
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "sphinx-mathjax-offline",
              "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "**/_build", "api/_generated"]
language = "en"

# MindSpore's docstring sections: Args / Raises / Examples are Google style (napoleon); these are not
napoleon_custom_sections = ["Inputs", "Outputs", "Supported Platforms"]
napoleon_use_rtype = False
autodoc_typehints = "none"                 # the types are in each docstring's Args, MindSpore's way
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}
autoclass_content = "class"
autodoc_inherit_docstrings = False        # MindSpore's Callback hooks are not part of this API

# headings get anchors, so the guides' links to sections (page.md#section) resolve
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath"]
mathjax_path = "mathjax/tex-chtml.js"     # in _static, as sphinx-mathjax-offline copies it
# \text{loss\_scale} in the docstrings: MathJax 3 reads macros inside \text only with textmacros
mathjax3_config = {"loader": {"load": ["[tex]/textmacros"]}, "tex": {"packages": {"[+]": ["textmacros"]}}}

nitpicky = True
# names the docstrings mention that are not documented here (MindSpore's own classes, builtins in prose)
nitpick_ignore_regex = [(r"py:.*", r"(mindspore|ms|nn|np|numpy|os)\..*"), (r"py:.*", r"(Cell|Parameter|ParameterTuple|Tensor|LearningRateSchedule|RunContext)")]

html_theme = "furo"
html_title = f"mindspore_lamb {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]       # the presets table fits the page (docs/_static/custom.css)
html_show_sourcelink = False


def _write_generated(app):
    """Pages generated from the code at build time (docs/api/_generated/, not committed): the presets table."""
    from mindspore_lamb import presets
    out = os.path.join(app.srcdir, "api", "_generated")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "presets_table.md"), "w", encoding="utf-8") as handle:
        handle.write(presets.table() + "\n")


def _class_signature(app, what, name, obj, options, signature, return_annotation):
    """A Cell subclass's signature as inspect.signature gives it (its __init__'s): autodoc would take
    mindspore.nn.Cell.__new__'s (*args, **kwargs) instead. Annotations are left out, as autodoc_typehints says."""
    if what == "class" and signature == "(*args, **kwargs)":
        import inspect
        full = inspect.signature(obj)
        plain = full.replace(parameters=[p.replace(annotation=p.empty) for p in full.parameters.values()],
                             return_annotation=full.empty)
        return str(plain), return_annotation
    return None


def _page_language(app, pagename, templatename, context, doctree):
    """The Chinese API pages (*.zh) say so in <html lang>: the site's language is English."""
    if pagename.endswith(".zh"):
        context["language"] = "zh"


def setup(app):
    app.connect("builder-inited", _write_generated)
    app.connect("html-page-context", _page_language)
    app.connect("autodoc-process-signature", _class_signature)
