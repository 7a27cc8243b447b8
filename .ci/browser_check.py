"""Checks the built documentation site in a real browser: headless Chromium, offline.

  python .ci/browser_check.py [--html docs/_build/html] [--screenshots DIR] [--chromium PATH]

For each page below, Chromium loads the built file (file://, no network: background
networking, QUIC and component updates off), runs its scripts (MathJax typesets the math) for a
virtual 10 s, and dumps the rendered DOM. The check reads that DOM, not the source: the page's
title, its tables (with rows), its images (each <img> src a file that exists in the build), and
its math typeset by MathJax (<mjx-container> elements, with no MathJax error), that no
directive or role leaked into the text unrendered, and that no script, stylesheet or image
comes from the network. Besides the three pages named by CI's brief (home, Nash-MTL's API page,
the benchmarks), the datasets' tables and the method catalog are checked too. It also saves a screenshot of each page
(1280 x 1600) into `--screenshots` (default: a temporary folder, printed). Exit status 1 on any
failure.
"""

from __future__ import annotations

import argparse
import html.parser
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parents[1]

# page (relative to the build), its title, the fewest tables, images and typeset formulas.
PAGES = [
    ("index.html", "mtl_optax", 1, 1, 2),
    ("_autosummary/mtl_optax.nash_mtl.html", "mtl_optax.nash_mtl", 1, 1, 1),
    ("benchmarks/datasets.html", "Real data: QM9, MultiFashion, Yeast", 9, 0, 1),
    ("benchmarks/index.html", "Benchmarks and the seed papers", 2, 3, 1),
    ("methods/index.html", "Methods", 3, 0, 1),
]
# Markup that should have been rendered: its text in a page means a directive or role leaked.
LEAKS = (".. list-table::", ".. math::", ":func:`", "```{", "{doc}`", ":start-line:")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000"]


class _Dom(html.parser.HTMLParser):
  """Counts what the check needs in a rendered DOM."""

  def __init__(self):
    super().__init__()
    self.title, self.h1 = "", ""
    self._in = None
    self.tables = self.rows = self.math = self.math_errors = 0
    self.images: list[str] = []
    self.remote: list[str] = []
    self.text: list[str] = []
    self._skip = 0  # inside <script>, <style> or <pre>: not prose

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag in ("script", "style", "pre"):
      self._skip += 1
    if tag in ("title", "h1") and not getattr(self, f"_{tag}_done", False):
      self._in = tag
    elif tag == "table":
      self.tables += 1
    elif tag == "tr":
      self.rows += 1
    elif tag == "img":
      self.images.append(a.get("src", ""))
    elif tag == "mjx-container":
      self.math += 1
    elif tag == "mjx-merror":
      self.math_errors += 1
    for key in ("src", "href"):
      url = a.get(key) or ""
      if tag in ("script", "link", "img") and url.startswith(("http:", "https:", "//")):
        if tag != "link" or a.get("rel") in (["stylesheet"], "stylesheet", None) or \
            "stylesheet" in str(a.get("rel")):
          self.remote.append(url)

  def handle_endtag(self, tag):
    if tag in ("script", "style", "pre"):
      self._skip = max(self._skip - 1, 0)
    if tag == self._in:
      setattr(self, f"_{tag}_done", True)  # the document's title and first h1 only
      self._in = None

  def handle_data(self, data):
    if not self._skip:
      self.text.append(data)
    if self._in == "title":
      self.title += data
    elif self._in == "h1":
      self.h1 += data


def chromium_binary(given: str | None) -> str:
  for name in ([given] if given else []) + ["chromium", "chromium-browser", "google-chrome"]:
    path = shutil.which(name) if name else None
    if path:
      return path
  sys.exit("browser_check: no chromium found (apt-get install -y chromium)")


def run_chromium(chromium: str, args: list[str], profile: str) -> subprocess.CompletedProcess:
  return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args],
                        capture_output=True, text=True, timeout=120)


def check_page(chromium: str, build: pathlib.Path, page: str, title: str, tables: int,
               images: int, math: int, shots: pathlib.Path) -> list[str]:
  path = build / page
  if not path.exists():
    return [f"{page}: not built"]
  url = path.resolve().as_uri()
  with tempfile.TemporaryDirectory() as profile:
    dom = run_chromium(chromium, ["--dump-dom", url], profile)
  if dom.returncode != 0 or "<html" not in dom.stdout:
    return [f"{page}: chromium failed ({dom.returncode}): {dom.stderr[-500:]}"]
  parsed = _Dom()
  parsed.feed(dom.stdout)
  problems = []
  if title not in parsed.title or not parsed.h1.strip():
    problems.append(f"{page}: title {parsed.title!r}, h1 {parsed.h1.strip()!r}; "
                    f"expected {title!r}")
  if parsed.tables < tables or parsed.rows < 2 * tables:
    problems.append(f"{page}: {parsed.tables} tables, {parsed.rows} rows; expected >= {tables}")
  content_images = [s for s in parsed.images if "_images/" in s]
  missing = [s for s in content_images
             if not (path.parent / urllib.parse.unquote(s)).resolve().exists()]
  if len(content_images) < images or missing:
    problems.append(f"{page}: {len(content_images)} images (expected >= {images}); "
                    f"missing files: {missing}")
  if parsed.math < math or parsed.math_errors:
    problems.append(f"{page}: {parsed.math} typeset formulas (expected >= {math}), "
                    f"{parsed.math_errors} MathJax errors")
  text = " ".join(parsed.text)
  leaked = [m for m in LEAKS if m in text]
  if leaked:
    problems.append(f"{page}: unrendered markup in the page's text: {leaked}")
  if parsed.remote:
    problems.append(f"{page}: loads from the network: {parsed.remote}")
  shot = shots / (page.replace("/", "_").removesuffix(".html") + ".png")
  with tempfile.TemporaryDirectory() as profile:
    run_chromium(chromium, [f"--screenshot={shot}", "--window-size=1280,1600", url], profile)
  print(f"{page}: title {parsed.title.strip()!r}; {parsed.tables} tables ({parsed.rows} rows), "
        f"{len(content_images)} images, {parsed.math} typeset formulas"
        + (f"; screenshot {shot}" if shot.exists() else "; NO screenshot"))
  if not shot.exists():
    problems.append(f"{page}: no screenshot")
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--html", type=pathlib.Path, default=ROOT / "docs" / "_build" / "html")
  parser.add_argument("--screenshots", type=pathlib.Path, default=None)
  parser.add_argument("--chromium", default=os.environ.get("CHROMIUM"))
  args = parser.parse_args()
  chromium = chromium_binary(args.chromium)
  shots = args.screenshots or pathlib.Path(tempfile.mkdtemp(prefix="docs-screenshots-"))
  shots.mkdir(parents=True, exist_ok=True)
  problems = []
  for page in PAGES:
    problems += check_page(chromium, args.html, *page, shots)
  for p in problems:
    print("FAIL", p)
  print(f"browser_check: {len(PAGES) - len({p.split(':')[0] for p in problems})} of "
        f"{len(PAGES)} pages pass; screenshots in {shots}")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
