"""Reads the package's docstrings as the plain text they are written in, before napoleon.

The docstrings are Google style (napoleon turns their `Args:`, `Returns:`, `Example:`,
`References:` sections into reStructuredText), but their prose is plain text: `|x|` is an
absolute value, not a substitution, and an indented run of lines under a sentence is a list of
cases or a formula laid out by hand, not a block quote. This extension, run before napoleon:

- escapes `|` outside inline code and doctest lines;
- turns each indented run of the prose (before the first section) into a line block, so its
  lines and their indentation show as written.

It also keeps autodoc from printing annotations whose class cannot be printed
(`mtl_optax.GramUpdate`'s metaclass repr reads a `_hint` the class does not set).
"""

from __future__ import annotations

import re
from typing import Any

SECTION = re.compile(r"^(Args|Arguments|Returns|Return|Yields|Raises|Example|Examples|"
                     r"References|Note|Notes|Attributes|Warning|See Also|Todo):\s*$")
_CODE = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_bars(line: str) -> str:
  stripped = line.lstrip()
  if stripped.startswith((">>>", "...")):
    return line
  parts = _CODE.split(line)
  return "".join(p if i % 2 else p.replace("|", r"\|") for i, p in enumerate(parts))


def plain_text_to_rst(lines: list[str]) -> list[str]:
  """The docstring's lines with its prose made safe for reStructuredText."""
  out: list[str] = []
  in_sections = False
  in_doctest = False
  i = 0
  while i < len(lines):
    line = lines[i]
    if SECTION.match(line):
      in_sections = True
    if line.lstrip().startswith(">>>"):
      in_doctest = True
    elif not line.strip():
      in_doctest = False
    if in_doctest:
      out.append(line)
      i += 1
      continue
    line = _escape_bars(line)
    indented = line[:1].isspace() and line.strip()
    if in_sections or not indented:
      out.append(line)
      i += 1
      continue
    # An indented run of prose: a line block, after a blank line and followed by one.
    run = []
    while i < len(lines) and lines[i][:1].isspace() and lines[i].strip():
      run.append(_escape_bars(lines[i]))
      i += 1
    base = min(len(r) - len(r.lstrip()) for r in run)
    if out and out[-1].strip():
      out.append("")
    out += ["| " + "\u00a0" * (len(r) - len(r.lstrip()) - base) + r.strip() for r in run]
    out.append("")
  return out


def _process(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
  lines[:] = plain_text_to_rst(lines)


def _printable_annotations(app: Any, obj: Any, bound_method: bool) -> None:
  annotations = getattr(obj, "__annotations__", None)
  if not isinstance(annotations, dict):
    return
  for key, value in list(annotations.items()):
    if isinstance(value, str) and "GramUpdate" in value:
      annotations[key] = value.replace("GramUpdate", "mtl_optax.GramUpdate")


def setup(app: Any) -> dict[str, Any]:
  # napoleon listens with the default priority (500); this runs first.
  app.connect("autodoc-process-docstring", _process, priority=400)
  app.connect("autodoc-before-process-signature", _printable_annotations)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
