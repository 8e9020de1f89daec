"""Check every internal link of the built HTML site: each relative href/src names a file of the build, and each
#fragment an id of the page it points to. External links (with a scheme) are not fetched. Exit 1 listing the
broken ones.

Usage: python docs/check_links.py BUILD_DIR
"""
import os
import sys
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    """The ids and the internal links (href/src) of one HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("id", "name") and value:
                self.ids.add(value)
            elif name in ("href", "src") and value and not urlsplit(value).scheme and not value.startswith("//"):
                self.links.append(value)


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
    return broken, len(pages)


def main(argv):
    if len(argv) != 2 or not os.path.isdir(argv[1]):
        sys.exit(f"usage: python docs/check_links.py BUILD_DIR (a built HTML directory), got {argv[1:]}")
    broken, count = broken_links(argv[1])
    for page, link, why in broken:
        print(f"{os.path.relpath(page, argv[1])}: {link}: {why}")
    print(f"{count} pages, {len(broken)} broken internal links")
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main(sys.argv)
