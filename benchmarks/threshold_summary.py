"""IMGrad's Fig. 5 test: a threshold baseline's level picked on validation, read on test.

Reads the validation and test tables of one `benchmarks/run.py --split val --also-test` run over
`<inner>`, `<inner>@imbalance=<level>` and `<inner>@similarity=<level>` and writes, per inner
balancer, the vanilla method's Delta_m, each level's validation Delta_m, the level picked on
validation and its test Delta_m, and whether it beats the vanilla method on test.

  python benchmarks/threshold_summary.py VAL.md TEST.md [--out FILE]
"""

from __future__ import annotations

import argparse
import pathlib
import re

from benchmarks.claims import read_table


def summary(val: dict[str, tuple[float, float, float]],
            test: dict[str, tuple[float, float, float]]) -> str:
  """The Markdown table (Delta_m in %, mean ± std over seeds)."""
  inners = [n for n in val if "@" not in n and any(m.startswith(n + "@") for m in val)]
  head = ("| inner | vanilla val Δm% | vanilla test Δm% | imbalance: val Δm% per level | picked "
          "(val) | its test Δm% | beats vanilla on test? | similarity: val Δm% per level | "
          "picked (val) | its test Δm% | beats vanilla on test? |\n" + "|---" * 11 + "|\n")
  rows = ""
  for inner in inners:
    cells = [inner, f"{val[inner][0]:.2f} ± {val[inner][1]:.2g}",
             f"{test[inner][0]:.2f} ± {test[inner][1]:.2g}"]
    for criterion in ("imbalance", "similarity"):
      levels = {m.split("=", 1)[1]: val[m][0] for m in val
                if re.fullmatch(re.escape(f"{inner}@{criterion}=") + r".+", m)}
      picked = min(levels, key=levels.get)
      got = test[f"{inner}@{criterion}={picked}"]
      cells += [", ".join(f"{lv}: {dm:.2f}" for lv, dm in levels.items()), picked,
                f"{got[0]:.2f} ± {got[1]:.2g}", "yes" if got[0] < test[inner][0] else "no"]
    rows += "| " + " | ".join(cells) + " |\n"
  return head + rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("val", type=pathlib.Path)
  parser.add_argument("test", type=pathlib.Path)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  (val, command), (test, _) = read_table(args.val), read_table(args.test)
  text = (f"Command: `python benchmarks/threshold_summary.py {args.val.name} {args.test.name}` "
          f"(runs: `{command}`).\n\n" + summary(val, test))
  print(text)
  if args.out:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
