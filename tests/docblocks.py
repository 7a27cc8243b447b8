"""The code blocks of the project's Markdown pages (README.md and docs/), run as tests.

Convention, the same for README and every docs page:

- a fenced block opened with three backticks and `python` runs: the blocks of one page run in
  order in one namespace, as a reader would paste them (so later blocks use earlier names);
- a block shown with MyST's `{code-block} python` directive is shown only (other libraries'
  calls, e.g. PyTorch on the migration page); `bash` blocks are commands, checked elsewhere;
- expensive blocks stay cheap by construction: small models, a few steps, written on the page
  (the getting-started run is 150 steps of a 3-task MLP).

Pages run with the repository root as the working directory, so relative paths mean what they
mean in the docs.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_PYTHON = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def python_blocks(page: pathlib.Path) -> list[str]:
  """The runnable blocks of `page`, in order."""
  return _PYTHON.findall(page.read_text())


def doc_pages() -> list[pathlib.Path]:
  """Every Markdown page of docs/ (not the build output)."""
  return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def run_page(page: pathlib.Path) -> dict:
  """Runs the page's blocks in one namespace; returns the namespace."""
  namespace: dict = {"__name__": f"docs_{page.stem}"}
  with contextlib.chdir(ROOT):
    for i, block in enumerate(python_blocks(page)):
      code = compile(block, f"{page.relative_to(ROOT)} (block {i + 1})", "exec")
      exec(code, namespace)  # noqa: S102
  return namespace


def environ() -> dict[str, str]:
  return {**os.environ, "PYTHONPATH": str(ROOT)}
