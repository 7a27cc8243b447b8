"""The how-to pages' code runs (the other docs pages: tests/test_docs.py)."""

from __future__ import annotations

import pathlib

import pytest

from docblocks import DOCS, doc_pages, python_blocks, run_page

PAGES = [p for p in doc_pages() if python_blocks(p) and p.parent.name == "howto"]


def test_every_how_to_page_with_code_is_here():
  assert len(PAGES) >= 5, PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_how_to_page_code_runs(page: pathlib.Path):
  run_page(page)
