"""The documentation site's sources kept in step with the code: each Chinese API page (docs/api/*.zh.rst, MindSpore's
format) has the signature, the arguments and the defaults of the object it documents (inspect.signature), every
public object has an English and a Chinese page, the hand-written signature of docs/api/lamb.md is the code's, the
pages have distinct titles and plain Markdown links, the CHANGELOG tags the version, and the check of the built
site (docs/check_links.py) finds broken links, resources loaded from the network and a wrong <html lang>.
Building the site itself is docs/build.sh (CI runs it)."""
import ast
import glob
import importlib
import importlib.util
import inspect
import os
import re

import pytest

import mindspore_lamb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "docs", "api")
ZH_PAGES = sorted(glob.glob(os.path.join(API, "*.zh.rst")))
DIRECTIVE = re.compile(r"^(?P<indent> *)\.\. py:(?P<kind>class|function|method|attribute):: (?P<name>[\w.]+)"
                       r"(?:\((?P<signature>.*)\))?\s*$")
SECTIONS = ("参数:", "输入:", "输出:", "返回:", "异常:", "支持平台:", "样例:")
# the public API beyond mindspore_lamb.__all__: the modules users call directly (docs/api/index.rst)
PUBLIC_MODULES = {"mindspore_lamb.sharding": ["merge", "cut"],
                  "mindspore_lamb.resume": ["resume", "StepCheckpoint", "GlobalStep", "newest", "save", "checkpoints",
                                            "load", "lock", "release", "run_id"]}


def _resolve(dotted):
    """The object named `dotted` (a module attribute, a class attribute of it)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
            if isinstance(obj, (classmethod, staticmethod)):
                obj = obj.__func__
        return obj
    raise ImportError(dotted)


def _value(node):
    """A default as the page writes it (a literal or an arithmetic of literals, e.g. 2.0 ** 16)."""
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})  # noqa: S307


def _page_parameters(text):
    """[(name, kind, default)] of a signature as the page writes it."""
    args = ast.parse(f"def f({text}): pass").body[0].args
    P = inspect.Parameter
    out = []
    plain = args.posonlyargs + args.args
    defaults = [None] * (len(plain) - len(args.defaults)) + list(args.defaults)
    for arg, default in zip(plain, defaults):
        out.append((arg.arg, P.POSITIONAL_OR_KEYWORD, P.empty if default is None else _value(default)))
    if args.vararg:
        out.append((args.vararg.arg, P.VAR_POSITIONAL, P.empty))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, P.KEYWORD_ONLY, P.empty if default is None else _value(default)))
    if args.kwarg:
        out.append((args.kwarg.arg, P.VAR_KEYWORD, P.empty))
    return out


def _code_parameters(obj, drop_first=False):
    params = list(inspect.signature(obj).parameters.values())
    params = params[1:] if drop_first else params
    return [(p.name, p.kind, p.default) for p in params]


def _directives(path):
    """[(qualified name, kind, signature text or None, the block's lines)] of one zh page; a method or attribute
    is qualified by the class it is nested in."""
    lines = open(path, encoding="utf-8").read().splitlines()
    found, owner = [], None
    starts = [(i, DIRECTIVE.match(line)) for i, line in enumerate(lines) if DIRECTIVE.match(line)]
    for (start, match), (end, _) in zip(starts, starts[1:] + [(len(lines), None)]):
        name = match["name"]
        if match["kind"] == "class":
            owner = name
        elif match["kind"] in ("method", "attribute"):
            name = f"{owner}.{name}"
        found.append((name, match["kind"], match["signature"], lines[start + 1:end]))
    return found


def _documented_arguments(block):
    """{name: default text or None} of the 参数 list of a directive's block (its top-level entries)."""
    args, inside, indent = {}, False, None
    for line in block:
        stripped = line.strip()
        if stripped in SECTIONS:
            inside, indent = stripped == "参数:", None
            continue
        entry = re.match(r"^( *)- \*\*(\w+)\*\* \(", line)
        if inside and entry and (indent is None or len(entry.group(1)) == indent):
            indent = len(entry.group(1))
            default = re.search(r"默认值: ``(.+?)``", line)
            args[entry.group(2)] = default.group(1) if default else None
    return args


ENTRIES = [(os.path.basename(path), entry) for path in ZH_PAGES for entry in _directives(path)]


def test_there_are_chinese_pages():
    assert len(ZH_PAGES) >= 8 and len(ENTRIES) >= 30


@pytest.mark.parametrize("page, entry", ENTRIES, ids=[f"{page}:{entry[0]}" for page, entry in ENTRIES])
def test_zh_page_matches_the_code(page, entry):
    name, kind, signature, block = entry
    obj = _resolve(name)
    if kind == "attribute":
        assert signature is None and isinstance(obj, property), f"{page}: {name} is not a property"
        return
    assert signature is not None, f"{page}: {name} has no signature"
    code = _code_parameters(obj, drop_first=kind == "method")      # a method's self or cls
    assert _page_parameters(signature) == code, f"{page}: the signature of {name} differs from the code's"
    if kind in ("class", "function"):
        documented = _documented_arguments(block)
        named = [n for n, k, _ in code if k not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        assert list(documented) == named, f"{page}: the arguments listed for {name} are not the code's, in order"
        defaults = {n: d for n, _, d in code}
        for arg, text in documented.items():
            if text is not None:
                assert _value(ast.parse(text, mode="eval").body) == defaults[arg], f"{page}: default of {name}.{arg}"
            else:
                assert defaults[arg] is inspect.Parameter.empty, f"{page}: {name}.{arg} has a default the page omits"


def _public_names():
    names = [f"mindspore_lamb.{name}" for name in mindspore_lamb.__all__]
    names += [f"{module}.{name}" for module, members in PUBLIC_MODULES.items() for name in members]
    return names + ["mindspore_lamb.Lamb.preset"]


def test_every_public_object_has_a_chinese_and_an_english_page():
    documented = {name for _, (name, _, _, _) in ENTRIES}
    assert [name for name in _public_names() if name not in documented] == []
    english = open(os.path.join(API, "index.rst"), encoding="utf-8").read()
    for name in mindspore_lamb.__all__:
        assert f"mindspore_lamb.{name}\n" in english and os.path.isfile(os.path.join(API, f"mindspore_lamb.{name}.rst"))
    for module, members in PUBLIC_MODULES.items():
        with open(os.path.join(API, f"{module}.rst"), encoding="utf-8") as handle:
            text = handle.read()
        assert all(member in text for member in members), module


def test_lamb_md_signature_is_the_code():
    with open(os.path.join(API, "lamb.md"), encoding="utf-8") as handle:
        block = handle.read().split("```python\n", 1)[1].split("```", 1)[0]
    call = re.search(r"mindspore_lamb\.Lamb\((.*?)\)\n", block, re.S).group(1)
    assert _page_parameters(" ".join(call.split())) == _code_parameters(mindspore_lamb.Lamb)


def _check_links():
    spec = importlib.util.spec_from_file_location("check_links", os.path.join(ROOT, "docs", "check_links.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_link_check_finds_broken_internal_links(tmp_path):
    (tmp_path / "api").mkdir()
    (tmp_path / "index.html").write_text('<html lang="en"><a href="api/page.html#args">ok</a> <a href="missing.html">x</a> '
                                         '<a href="api/page.html#nowhere">y</a> <a href="https://example.org/z">z</a>'
                                         '<img src="_static/logo.png">')
    (tmp_path / "api" / "page.html").write_text('<html lang="en"><h2 id="args">Args</h2><a href="../index.html">up</a>')
    broken, pages = _check_links().broken_links(str(tmp_path))
    assert pages == 2
    assert sorted((link, why.split(" ")[0]) for _, link, why in broken) == [
        ("_static/logo.png", "no"), ("api/page.html#nowhere", "no"), ("missing.html", "no")]
    assert any("no id 'nowhere'" in why for _, _, why in broken)


def test_site_check_finds_resources_from_the_network(tmp_path):
    """The site must work offline: a script, stylesheet or image from http(s) or // is reported (MathJax from a CDN
    left the update rule as raw TeX without the network); plain links to other sites are not."""
    (tmp_path / "index.html").write_text(
        '<html lang="en"><script defer src="https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js"></script>'
        '<link rel="stylesheet" href="//fonts.example.org/a.css"><img src="http://example.org/i.png">'
        '<link rel="shortcut icon" href="https://example.org/favicon.ico">'
        '<script src="_static/local.js"></script><a href="https://arxiv.org/abs/1904.00962">paper</a></html>')
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "local.js").write_text("")
    broken, _ = _check_links().broken_links(str(tmp_path))
    assert sorted(link for _, link, _ in broken) == [
        "//fonts.example.org/a.css", "http://example.org/i.png", "https://cdn.jsdelivr.net/npm/mathjax@4/tex-mml-chtml.js",
        "https://example.org/favicon.ico"]
    assert all("network" in why for _, _, why in broken)


def test_site_check_wants_lang_zh_on_the_chinese_pages(tmp_path):
    (tmp_path / "Lamb.zh.html").write_text('<html lang="en"></html>')
    (tmp_path / "Lamb.html").write_text('<html lang="en"></html>')
    (tmp_path / "index.zh.html").write_text('<html class="no-js" lang="zh"></html>')
    broken, pages = _check_links().broken_links(str(tmp_path))
    assert pages == 3 and [(os.path.basename(page), why) for page, _, why in broken] == [
        ("Lamb.zh.html", "lang='en', expected 'zh'")]


def _conf():
    """docs/conf.py as a module (it imports mindspore_lamb, as the build does)."""
    spec = importlib.util.spec_from_file_location("docs_conf", os.path.join(ROOT, "docs", "conf.py"))
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_conf_marks_the_chinese_pages_lang_zh():
    conf = _conf()
    contexts = {page: {"language": "en"} for page in ("api/mindspore_lamb.Lamb.zh", "api/index.zh", "api/lamb")}
    for page, context in contexts.items():
        conf._page_language(None, page, "page.html", context, None)
    assert {page: c["language"] for page, c in contexts.items()} == {
        "api/mindspore_lamb.Lamb.zh": "zh", "api/index.zh": "zh", "api/lamb": "en"}


def _markdown_pages():
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def test_markdown_pages_read_on_their_own():
    """Links are plain Markdown ([text](page.md), which MyST resolves too), not MyST roles such as {doc}`page`
    that show raw where the file is read alone (on GitHub); each relative .md link names a file."""
    for path in _markdown_pages():
        text = open(path, encoding="utf-8").read()
        assert not re.findall(r"\{(?:doc|ref|any)\}`", text), f"{path}: a MyST role; use [text](page.md)"
        for target in re.findall(r"\]\(([^)#:\s]+\.md)(?:#[^)]*)?\)", text):
            assert os.path.isfile(os.path.join(os.path.dirname(path), target)), f"{path}: no {target}"


def test_examples_use_set_device():
    """MindSpore 2.5+ (so 2.7.1, the oldest supported) chooses the device with ms.set_device; the device_target
    argument of set_context is deprecated."""
    for path in _markdown_pages():
        text = open(path, encoding="utf-8").read()
        assert not re.search(r"set_context\([^)]*device_target", text), f"{path}: use ms.set_device(...)"


def _page_title(path):
    """The title of a page of the site: a Markdown page's first '# ' heading, an rST page's first underlined line."""
    lines = open(path, encoding="utf-8").read().splitlines()
    if lines[0].startswith("```{include} "):                   # a page that shows another file (the changelog)
        return _page_title(os.path.join(os.path.dirname(path), lines[0].split(" ", 1)[1]))
    if path.endswith(".md"):
        return next(line[2:] for line in lines if line.startswith("# "))
    return next(line for line, under in zip(lines, lines[1:]) if under and set(under) <= set("=-~^") and line)


def test_pages_have_distinct_titles():
    """The sidebar and the search results tell the pages apart (the in-depth guide, the English and the Chinese
    API page of Lamb were all "mindspore_lamb.Lamb")."""
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")) + glob.glob(os.path.join(API, "*.md")) +
                   glob.glob(os.path.join(API, "*.rst")))
    titles = {}
    for path in pages:
        titles.setdefault(_page_title(path).replace("`", ""), []).append(os.path.relpath(path, ROOT))
    assert len(pages) > 30 and {title: paths for title, paths in titles.items() if len(paths) > 1} == {}


def test_changelog_tags_the_version():
    """CHANGELOG.md: an [Unreleased] section on top, then the current version's release, dated; every release
    below it older and dated."""
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as handle:
        headings = re.findall(r"^## (.*)$", handle.read(), re.M)
    assert headings[0] == "[Unreleased]"
    releases = [re.fullmatch(r"\[(\d+)\.(\d+)\.(\d+)\] - (\d{4}-\d{2}-\d{2})", heading) for heading in headings[1:]]
    assert releases and all(releases), headings
    assert ".".join(releases[0].groups()[:3]) == mindspore_lamb.__version__
    versions = [tuple(int(part) for part in match.groups()[:3]) for match in releases]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    dates = [match.group(4) for match in releases]
    assert dates == sorted(dates, reverse=True)


def test_presets_table_is_laid_out_to_fit():
    """The generated presets table has five columns; furo scrolls a table wider than the page, which hid two of
    them at 1280 px. The page gives it a class that docs/_static/custom.css lays out within the page's width
    (checked in a browser at 1280 px; a test cannot measure the layout)."""
    with open(os.path.join(API, "mindspore_lamb.presets.rst"), encoding="utf-8") as handle:
        assert ".. rst-class:: presets-table\n\n.. include:: _generated/presets_table.md" in handle.read()
    with open(os.path.join(ROOT, "docs", "_static", "custom.css"), encoding="utf-8") as handle:
        css = handle.read()
    assert re.search(r"table\.presets-table \{[^}]*table-layout: fixed; width: 100%", css)
    conf = _conf()
    assert "_static" in conf.html_static_path and "custom.css" in conf.html_css_files
