"""The method catalog and the per-method cards, generated from the registry and the docstrings.

`mtl_optax.registry.METHODS` gives every method's name, family (loss or gradient balancer) and
the properties it claims (checked by the property suite); the paths follow from them (a loss
balancer or a Gram-based gradient balancer runs on all three, any other gradient balancer on the
stacked and representation paths). The paper, its arXiv id and the equation come from the
`References:` section of the factory's docstring. What is not in the code, the method's usual
name and its name in LibMTL and torchjd, is in `EXTERNAL` below; the build fails when a
registry method has no row there (or a row names no method), so the catalog cannot drift.

Directives (MyST: ```` ```{mtl-method-catalog} ````):

- `mtl-method-catalog`: the table of every base method of the registry (`kind: loss` or
  `kind: gradient` as an option to show one family), or `threshold: true` for the registry's
  threshold variants;
- `mtl-method-card <factory>`: on a factory's API page, its registry facts, the update as a
  formula (where `FORMULAS` has one) and the plots made with it (`examples/toy_<name>.png`,
  `benchmarks/results/plots/<dataset>_<name>.png`); nothing for other names.
"""

from __future__ import annotations

import inspect
import pathlib
import re
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx import errors
from sphinx.util.docutils import SphinxDirective

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Registry names whose factory has another name.
FACTORY = {"ew": "equal_weights", "si": "log_losses"}

# registry name: (usual name, LibMTL `weighting` class, torchjd class); "" = none there.
EXTERNAL: dict[str, tuple[str, str, str]] = {
    "ew": ("EW", "EW", "Sum / Mean"),
    "si": ("SI (log losses)", "", ""),
    "rlw": ("RLW", "RLW", "Random"),
    "dwa": ("DWA", "DWA", ""),
    "uw": ("UW", "UW", ""),
    "gls": ("GLS", "GLS", ""),
    "imtl_l": ("IMTL-L", "IMTL (loss part)", ""),
    "igb_v1": ("IGBv1", "", ""),
    "igb_v2": ("IGBv2", "", ""),
    "famo": ("FAMO", "FAMO", ""),
    "stch": ("STCH", "STCH", ""),
    "cosmos": ("COSMOS", "", "COSMOS (scalarization)"),
    "pbi": ("PBI", "", "PBI (scalarization)"),
    "mgda": ("MGDA", "MGDA", "MGDA"),
    "pcgrad": ("PCGrad", "PCGrad", "PCGrad"),
    "cagrad": ("CAGrad", "CAGrad", "CAGrad"),
    "imtl_g": ("IMTL-G", "IMTL (gradient part)", "IMTLG"),
    "nash_mtl": ("Nash-MTL", "Nash_MTL", "NashMTL"),
    "aligned_mtl": ("Aligned-MTL", "Aligned_MTL", "AlignedMTL"),
    "upgrad": ("UPGrad", "UPGrad", "UPGrad"),
    "graddrop": ("GradDrop", "GradDrop", "GradDrop"),
    "gradvac": ("GradVac", "GradVac", "GradVac"),
    "gradnorm": ("GradNorm", "GradNorm", ""),
    "moco": ("MoCo", "MoCo", ""),
    "imtl": ("IMTL", "IMTL", ""),
    "db_mtl": ("DB-MTL", "DB_MTL", ""),
    "imgrad": ("IMGrad", "", ""),
    "imgrad_nash": ("IMGrad (Nash-MTL variant)", "", ""),
    "excess_mtl": ("ExcessMTL", "ExcessMTL", ""),
    "fairgrad": ("FairGrad", "FairGrad", ""),
    "modo": ("MoDo", "MoDo", ""),
    "sdmgrad": ("SDMGrad", "SDMGrad", ""),
    "dualproj": ("DualProj", "", "DualProj"),
    "config": ("ConFIG", "", "ConFIG"),
    "krum": ("Krum", "", "Krum"),
    "trimmed_mean": ("Trimmed mean", "", "TrimmedMean"),
    "constant": ("Constant", "", "Constant"),
    "cr_mogm": ("CR-MOGM", "", "CRMOGMWeighting"),
    "pcd": ("PCD", "", "PCD"),
}

# The update as a formula, for the cards (LaTeX; g_i the rows, M the Gram matrix, L_i losses).
FORMULAS: dict[str, str] = {
    "ew": r"d = \sum_i g_i",
    "si": r"s_i = \frac{1}{L_i + \epsilon}, \qquad d = \sum_i s_i g_i",
    "igb_v1": r"s_i = \frac{\lambda_i}{L_i}, \quad \lambda = K\,\mathrm{softmax}(L / L_{\mathrm{base}})",
    "igb_v2": r"s_i = \frac{w_i}{L_i}, \quad w \sim \pi_{\mathrm{SAC}}(\cdot \mid L)",
    "dwa": r"s = K\,\mathrm{softmax}(r / T), \quad r_i = \bar L_i(t-1) / \bar L_i(t-2)",
    "uw": r"s_i = e^{-\sigma_i}, \quad \min_\sigma \sum_i e^{-\sigma_i} L_i + \sigma_i",
    "gls": r"s_i = \frac{(\prod_j L_j)^{1/K}}{K L_i}",
    "mgda": r"w = \arg\min_{w \in \Delta} \Big\| \sum_i w_i g_i \Big\|^2, \qquad d = \sum_i w_i g_i",
    "cagrad": r"d = g_0 + \frac{c \|g_0\|}{\|g_w\|} g_w, \quad w = \arg\min_{w \in \Delta} g_w^\top g_0 + c \|g_0\| \|g_w\|",
    "nash_mtl": r"\alpha_i (M \alpha)_i = 1 \;\; (i = 1..K), \qquad d = \sum_i \alpha_i g_i",
    "fairgrad": r"M w = w^{-1/\alpha}, \qquad d = \sum_i w_i g_i",
    "upgrad": r"d = \frac{1}{K} \sum_i \pi_{\mathcal{C}}(g_i), \quad \mathcal{C} = \{v : g_j^\top v \ge 0\ \forall j\}",
    "imtl_g": r"d = \sum_i \alpha_i g_i \text{ with } u_i^\top d \text{ equal for all } i, \; u_i = g_i / \|g_i\|",
    "pcgrad": r"g_i \leftarrow g_i - \frac{\min(g_i^\top g_j, 0)}{\|g_j\|^2} g_j \text{ (random order)}, \quad d = \sum_i g_i",
    "db_mtl": r"d = \max_j \|\hat g_j\| \sum_i \frac{\hat g_i}{\|\hat g_i\|}, \quad \hat g_i \leftarrow \beta \hat g_i + (1 - \beta) \nabla \log L_i",
}

_ARXIV = re.compile(r"arXiv:\s*([0-9]{4}\.[0-9]{4,5})")
_LOCATION = re.compile(r"\b((?:Alg|Algs|Eq|Eqs|Sec|Def|Prop|Table)\.\s*[0-9][0-9A-Za-z.\-]*"
                       r"(?:\s*(?:and|,)\s*(?:Eqs?\.\s*)?[0-9][0-9.\-]*)*)")


def factory_name(name: str) -> str:
  return FACTORY.get(name, name)


def base_methods() -> dict[str, Any]:
  """The registry's methods without its `@` threshold variants."""
  from mtl_optax import registry
  return {n: m for n, m in registry.METHODS.items() if "@" not in n}


def check_external() -> None:
  """Raises when the registry and `EXTERNAL` disagree, or a factory is not public."""
  import mtl_optax
  names = set(base_methods())
  missing, extra = sorted(names - set(EXTERNAL)), sorted(set(EXTERNAL) - names)
  if missing or extra:
    raise errors.SphinxError(
        "method_catalog: docs/ext/method_catalog.py's EXTERNAL must have one row per registry "
        f"method; missing: {missing}, not in the registry: {extra}")
  private = sorted(n for n in names if factory_name(n) not in mtl_optax.__all__)
  if private:
    raise errors.SphinxError(f"method_catalog: factories not in mtl_optax.__all__: {private}")


def paths(method: Any) -> list[str]:
  if method.kind == "loss" or "gram" in method.properties:
    return ["stacked", "gram", "representation"]
  return ["stacked", "representation"]


def reference(name: str) -> dict[str, Any]:
  """The factory docstring's first reference: its text, arXiv ids and equation/algorithm."""
  import mtl_optax
  doc = inspect.getdoc(getattr(mtl_optax, factory_name(name))) or ""
  _, _, refs = doc.partition("References:")
  text = " ".join(refs.strip().split("\n\n")[0].split())
  first = text
  # The first citation ends at the first ';' outside quotes and parentheses.
  in_quote, depth = False, 0
  for i, ch in enumerate(text):
    if ch == '"':
      in_quote = not in_quote
    elif ch == "(":
      depth += 1
    elif ch == ")":
      depth = max(depth - 1, 0)
    elif ch == ";" and not in_quote and depth == 0:
      first = text[:i]
      break
  head = first.split('"')[0] if '"' in first else first.split(",")[0]
  authors = head.strip().rstrip(",. ")
  title = re.search(r'"([^"]+)"', first)
  return {"text": first, "authors": authors, "title": title.group(1) if title else "",
          "arxiv": _ARXIV.findall(first) or _ARXIV.findall(text),
          "where": ", ".join(dict.fromkeys(w.rstrip(".") for w in _LOCATION.findall(first)))}


SHOWN_PROPERTIES = ("scale_invariant", "scale_invariant_direction", "non_conflicting",
                    "homogeneous", "permutation_equivariant", "stateful", "random",
                    "needs_losses")


def _props(method: Any) -> str:
  props = [p for p in SHOWN_PROPERTIES if p in method.properties]
  if "scale_invariant" in props:
    props.remove("scale_invariant_direction")
  return ", ".join(p.replace("_", " ") for p in props) or NONE


NONE = "\u2014"  # an em dash: an empty cell (a bare "-" would be a bullet list in RST)


def _cell(text: str) -> str:
  return text.replace("|", "\\|") or NONE


def _arxiv_links(ids: list[str]) -> str:
  return ", ".join(f"`arXiv {i} <https://arxiv.org/abs/{i}>`__" for i in ids) or NONE


def _code(name: str) -> str:
  return f"``{name}``" if name else NONE


def paper_cell(name: str) -> str:
  """Authors and year, the arXiv link(s), and the equation or algorithm."""
  ref = reference(name)
  parts = [ref["authors"]] if ref["authors"] else []
  if ref["arxiv"]:
    parts.append(_arxiv_links(ref["arxiv"]))
  if ref["where"]:
    parts.append(ref["where"])
  return ", ".join(parts) or NONE


CATALOG_HEADER = ["method", "factory (registry name)", "paths", "properties", "paper",
                  "LibMTL", "torchjd"]


def catalog_rows(kind: str | None = None) -> list[list[str]]:
  """The catalog's rows (RST cells), in `CATALOG_HEADER`'s order."""
  rows = []
  for name, method in base_methods().items():
    if kind and method.kind != kind:
      continue
    usual, libmtl, torchjd = EXTERNAL[name]
    rows.append([usual, f":func:`~mtl_optax.{factory_name(name)}` (``{name}``)",
                 ", ".join(paths(method)), _props(method), paper_cell(name),
                 _code(libmtl), _code(torchjd)])
  return rows


def _list_table(header: list[str], rows: list[list[str]], widths: str = "auto") -> list[str]:
  lines = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}",
           "   :class: mtl-catalog", ""]
  for row in [header, *rows]:
    lines.append(f"   * - {row[0]}")
    lines += [f"     - {cell}" for cell in row[1:]]
  return lines


class _RstDirective(SphinxDirective):
  def _parse(self, lines: list[str]) -> list[nodes.Node]:
    # The lines are reStructuredText; on a MyST page nested content is read as Markdown, so
    # hand it to MyST's eval-rst directive there.
    if type(self.state).__module__.startswith("myst_parser"):
      lines = ["````{eval-rst}", *lines, "````"]
    container = nodes.container()
    self.state.nested_parse(StringList(lines, source=self.get_source_info()[0]),
                            self.content_offset, container)
    return container.children


class Catalog(_RstDirective):
  option_spec = {"kind": directives.unchanged, "threshold": directives.flag}

  def run(self) -> list[nodes.Node]:
    check_external()
    self.env.note_dependency(str(ROOT / "mtl_optax" / "registry.py"))
    if "threshold" in self.options:
      from mtl_optax import registry
      rows = [[f"``{n}``", f":func:`~mtl_optax.threshold` of ``{n.partition('@')[0]}``",
               n.partition("@")[2], _props(m)]
              for n, m in registry.METHODS.items() if "@" in n]
      return self._parse(_list_table(["registry name", "built as", "criterion", "properties"],
                                     rows))
    return self._parse(_list_table(CATALOG_HEADER, catalog_rows(self.options.get("kind"))))


class Card(_RstDirective):
  required_arguments = 1

  def run(self) -> list[nodes.Node]:
    check_external()
    factory = self.arguments[0].rpartition(".")[2]
    names = [n for n in base_methods() if factory_name(n) == factory]
    if not names:
      return []
    name = names[0]
    method = base_methods()[name]
    usual, libmtl, torchjd = EXTERNAL[name]
    ref = reference(name)
    rows = [["registry name", f"``{name}`` (``mtl_optax.registry.build({name!r}, K)``)"],
            ["family", f"{method.kind} balancer"],
            ["paths", ", ".join(paths(method))],
            ["properties", _props(method)],
            ["paper", _cell(ref["text"])],
            ["arXiv", _arxiv_links(ref["arxiv"])],
            ["LibMTL", _code(libmtl)],
            ["torchjd", _code(torchjd)]]
    lines = [f".. rubric:: {usual} at a glance", ""]
    lines += [".. list-table::", "   :header-rows: 0", "   :widths: 20 80",
              "   :class: mtl-card", ""]
    for row in rows:
      lines += [f"   * - {row[0]}", f"     - {row[1]}"]
    lines.append("")
    if name in FORMULAS:
      lines += [".. math::", "", f"   {FORMULAS[name]}", ""]
    for image, caption in self._plots(name):
      lines += [f".. figure:: /{image}", "   :width: 90%", "", f"   {caption}", ""]
    return self._parse(lines)

  def _plots(self, name: str) -> list[tuple[str, str]]:
    """Plots made with this method, as paths relative to the docs source folder."""
    found = []
    toy = ROOT / "examples" / f"toy_{name}.png"
    if toy.exists():
      found.append((f"../examples/{toy.name}",
                    f"The two-task toy problem in this method's paper's settings "
                    f"(``python examples/toy.py --figure {name}``)."))
    for dataset in ("qm9", "multifashion"):
      plot = ROOT / "benchmarks" / "results" / "plots" / f"{dataset}_{name}.png"
      if plot.exists():
        found.append((f"../benchmarks/results/plots/{plot.name}",
                      f"Weights and diagnostics over training on {dataset} "
                      f"(``benchmarks/results/diagnostics_{dataset}.md`` has the command)."))
    for path, _ in found:
      self.env.note_dependency(str((ROOT / "docs" / path).resolve()))
    return found


def setup(app: Any) -> dict[str, Any]:
  app.add_directive("mtl-method-catalog", Catalog)
  app.add_directive("mtl-method-card", Card)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
