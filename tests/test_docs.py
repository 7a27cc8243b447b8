"""The documentation site: every docs page's code runs, and the API reference covers
`mtl_optax.__all__` (the check that fails the Sphinx build, run here without a build)."""

from __future__ import annotations

import pathlib
import shutil
import sys

import pytest

from docblocks import DOCS, ROOT, doc_pages, python_blocks, run_page

sys.path.insert(0, str(DOCS / "ext"))
import coverage_check  # noqa: E402

# The how-to pages run in tests/test_docs_howto.py: pytest-xdist keeps a file's tests in one
# worker, so the two files share the two workers.
ALL_PAGES = [p for p in doc_pages() if python_blocks(p)]
PAGES = [p for p in ALL_PAGES if p.parent.name != "howto"]


def test_the_docs_have_runnable_pages():
  names = {p.relative_to(DOCS).as_posix() for p in ALL_PAGES}
  assert {"index.md", "getting_started.md", "concepts/paths.md", "howto/checkpoints.md",
          "howto/devices.md", "methods/migration.md"} <= names, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page: pathlib.Path):
  ns = run_page(page)
  if page.name == "getting_started.md":  # the tutorial trained, and logged every step
    log = ns["log"]
    assert len(log) == ns["STEPS"]
    assert {"losses", "weights", "min_cos", "pareto_failure"} <= set(log[0])
    assert all(row["weights"].shape == (ns["K"],) for row in log)


def test_api_reference_covers_every_public_name():
  documented = coverage_check.autosummary_names(DOCS)
  assert coverage_check.undocumented(coverage_check.public_names(), documented) == []
  coverage_check.check(coverage_check.public_names(), documented)


def test_coverage_check_fails_when_an_entry_is_removed(tmp_path):
  """Remove Nash-MTL's entry from a copy of the docs tree: the check the build runs raises."""
  tree = tmp_path / "docs"
  shutil.copytree(DOCS, tree, ignore=shutil.ignore_patterns("_build", "_autosummary"))
  api = tree / "api.rst"
  text = api.read_text()
  assert "   mtl_optax.nash_mtl\n" in text
  api.write_text(text.replace("   mtl_optax.nash_mtl\n", ""))
  documented = coverage_check.autosummary_names(tree)
  assert coverage_check.undocumented(coverage_check.public_names(), documented) == [
      "mtl_optax.nash_mtl"]
  with pytest.raises(coverage_check.CoverageError, match=r"undocumented: mtl_optax\.nash_mtl$"):
    coverage_check.check(coverage_check.public_names(), documented)


def test_method_catalog_has_a_row_per_registry_method():
  pytest.importorskip("sphinx")  # the docs extra; the docs build runs this check too
  import method_catalog
  from mtl_optax import registry
  method_catalog.check_external()
  rows = method_catalog.catalog_rows()
  assert len(rows) == sum("@" not in n for n in registry.METHODS)
  nash = dict(zip(method_catalog.CATALOG_HEADER, next(r for r in rows if r[0] == "Nash-MTL")))
  assert "Navon et al. 2022" in nash["paper"] and "2202.01017" in nash["paper"]
  assert "Eq. 5" in nash["paper"] and "Nash_MTL" in nash["LibMTL"]
  assert "NashMTL" in nash["torchjd"] and "scale invariant" in nash["properties"]


def test_readme_is_a_front_door():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 150
  assert 'pip install -e ".[test,bench]"' in readme
  assert "python examples/quickstart.py" in readme
  assert "sphinx-build -W --keep-going -b html docs docs/_build/html" in readme
