"""Fails the docs build when a public name of `mtl_optax` has no entry in the API reference.

The public names are `mtl_optax.__all__`; a name is documented when autodoc registered it in
Sphinx's Python domain (`mtl_optax.<name>` as an object or a module), which is what an entry in
an `autosummary` list of `docs/api.rst` produces. The check runs once every page has been read
(`env-check-consistency`) and raises, so the build fails with or without `-W`.

`undocumented` is the check itself, and `autosummary_names` reads the entries a docs tree lists,
so a test can run the check on a tree with one entry removed without a Sphinx build.
"""

from __future__ import annotations

import pathlib

from collections.abc import Iterable
from typing import Any

try:  # the build raises Sphinx's own error; the tests need no Sphinx
  from sphinx.errors import SphinxError as _Error
except ImportError:  # pragma: no cover
  _Error = Exception

MODULE = "mtl_optax"


class CoverageError(_Error):
  """A public name of `mtl_optax` has no entry in the API reference."""


def public_names() -> set[str]:
  """`mtl_optax.<name>` for every name of `mtl_optax.__all__`."""
  import mtl_optax
  return {f"{MODULE}.{name}" for name in mtl_optax.__all__}


def undocumented(public: Iterable[str], documented: Iterable[str]) -> list[str]:
  """The public names without an entry, sorted."""
  return sorted(set(public) - set(documented))


def check(public: Iterable[str], documented: Iterable[str]) -> None:
  """Raises `CoverageError` (a `SphinxError`) naming every public name without an entry."""
  missing = undocumented(public, documented)
  if missing:
    raise CoverageError(
        "coverage_check: every name of mtl_optax.__all__ needs an entry in the API reference "
        f"(an autosummary list of docs/api.rst); undocumented: {', '.join(missing)}")


def autosummary_names(docs_dir: str | pathlib.Path) -> set[str]:
  """The fully qualified names listed in the `.. autosummary::` directives of the tree's
  reStructuredText pages (autosummary generates stubs only from those)."""
  names = set()
  for page in pathlib.Path(docs_dir).rglob("*.rst"):
    if "_build" in page.parts or "_templates" in page.parts:
      continue
    current, inside = MODULE, False
    for line in page.read_text().splitlines():
      stripped = line.strip()
      if stripped.startswith(".. currentmodule::"):
        current = stripped.split("::", 1)[1].strip()
      if stripped.startswith(".. autosummary::"):
        inside = True
        continue
      if inside:
        if stripped and not line[:1].isspace():
          inside = False
        elif stripped and not stripped.startswith(":"):
          name = stripped.split()[0]
          names.add(name if name.startswith(f"{MODULE}.") else f"{current}.{name}")
  return names


def documented_names(env: Any) -> set[str]:
  """The names autodoc registered in the Python domain (objects and modules)."""
  py = env.domaindata["py"]
  return set(py["objects"]) | set(py.get("modules", {}))


def _check_env(app: Any, env: Any) -> None:
  check(public_names(), documented_names(env))


def setup(app: Any) -> dict[str, Any]:
  app.connect("env-check-consistency", _check_env)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
