#!/usr/bin/env bash
# Build the documentation site into build/docs/html (open build/docs/html/index.html), as CI does: Sphinx with
# warnings as errors (-W) and every cross-reference checked (-n), then the built pages (docs/check_links.py):
# every internal link resolves, nothing is loaded from the network (MathJax is bundled; external links are not
# fetched), the Chinese pages say lang="zh". Needs the package importable (autodoc imports it, so MindSpore
# too) and the `docs` extra: pip install -e ".[docs]".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/docs
rm -rf "$OUT" docs/api/_generated
python -m sphinx -E -W --keep-going -n -q -b html docs "$OUT/html"
python docs/check_links.py "$OUT/html"
echo "docs: open $OUT/html/index.html"
