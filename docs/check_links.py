"""Check the built HTML site: every internal link (each relative href/src names a file of the build, and each
#fragment an id of the page it points to); no page loads a script, stylesheet, image or frame from the network
(the site works offline; plain links to other sites are fine and are not fetched); each page's <html lang> is
"zh" for the Chinese pages (*.zh.html) and "en" for the others. Exit 1 listing what is wrong.

Usage: python docs/check_links.py BUILD_DIR
"""
import os
import sys
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit


def _remote(url):
    """Whether the browser would fetch `url` from the network (http:, https:, or scheme-relative //)."""
    return urlsplit(url).scheme in ("http", "https") or url.startswith("//")


class _Page(HTMLParser):
    """The ids, the internal links (href/src), the resources loaded from the network (a script's or frame's src,
    an image's, a stylesheet's or preload's href) and the <html lang> of one HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.remote, self.lang = set(), [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = [(name, value) for name, value in attrs if value]
        if tag == "html":
            self.lang = dict(attrs).get("lang")
        loads = tag in ("script", "img", "iframe", "source", "audio", "video") or (
            tag == "link" and {"stylesheet", "preload", "modulepreload", "icon"} & set(dict(attrs).get("rel", "").split()))
        for name, value in attrs:
            if name in ("id", "name"):
                self.ids.add(value)
            elif name in ("href", "src") and not urlsplit(value).scheme and not value.startswith("//"):
                self.links.append(value)
            elif name in ("href", "src") and loads and _remote(value):
                self.remote.append(value)


def _parse(path, cache):
    if path not in cache:
        page = _Page()
        with open(path, encoding="utf-8") as handle:
            page.feed(handle.read())
        cache[path] = page
    return cache[path]


def broken_links(root):
    """[(page, link, why)] for every internal link of the HTML files under `root` that does not resolve."""
    cache, broken = {}, []
    pages = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".html")]
    for page in sorted(pages):
        for link in _parse(page, cache).links:
            parts = urlsplit(link)
            target = os.path.normpath(os.path.join(os.path.dirname(page), unquote(parts.path))) if parts.path else page
            if os.path.isdir(target):
                target = os.path.join(target, "index.html")
            if not os.path.isfile(target):
                broken.append((page, link, "no such file"))
            elif parts.fragment and target.endswith(".html") and unquote(parts.fragment) not in _parse(target, cache).ids:
                broken.append((page, link, f"no id {parts.fragment!r} in {os.path.relpath(target, root)}"))
    for page in sorted(pages):
        for url in _parse(page, cache).remote:
            broken.append((page, url, "loaded from the network (the site must work offline)"))
        lang, expected = _parse(page, cache).lang, "zh" if page.endswith(".zh.html") else "en"
        if lang != expected:
            broken.append((page, "<html>", f"lang={lang!r}, expected {expected!r}"))
    return broken, len(pages)


def main(argv):
    if len(argv) != 2 or not os.path.isdir(argv[1]):
        sys.exit(f"usage: python docs/check_links.py BUILD_DIR (a built HTML directory), got {argv[1:]}")
    broken, count = broken_links(argv[1])
    for page, link, why in broken:
        print(f"{os.path.relpath(page, argv[1])}: {link}: {why}")
    print(f"{count} pages, {len(broken)} problems (broken internal links, resources from the network, <html lang>)")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main(sys.argv)
