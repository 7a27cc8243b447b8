"""Compiled temporary memory of one training step on each path, as XLA reports it.

For an MLP of six 512-wide layers (input 512, batch 64, K linear heads) and K = 3, 11, 40, one
jitted step (gradients, balancer, Adam, apply) is compiled on the stacked path, the Gram-only
path (`value_and_reweighted_grad`, several `chunk_size`s) and the representation path, and
`compiled.memory_analysis().temp_size_in_bytes` is read. Equal weighting (the gradient of
sum_i L_i) is the reference. Nothing is run, so the numbers do not depend on the machine's load.

  python benchmarks/memory.py [--out benchmarks/results/memory.md]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from benchmarks.step_time import FlaxProblem, _table  # noqa: E402

TASKS = (3, 11, 40)
CHUNKS = (1, 4, 8)


def temp_bytes(step, carry) -> int:
  """Temporary bytes of the compiled step (arguments and outputs excluded)."""
  return jax.jit(step).lower(carry).compile().memory_analysis().temp_size_in_bytes


def measure(method: str = "mgda") -> list[list[str]]:
  rows = []
  for k in TASKS:
    problem = FlaxProblem(k, hidden=512, depth=6, d_in=512, batch=64)
    make = lambda: getattr(mtl_optax, method)(k)  # noqa: E731
    sizes = {"EW (grad of sum)": temp_bytes(*problem.step("ew")),
             "stacked": temp_bytes(*problem.step("stacked", make()))}
    for c in CHUNKS:
      sizes[f"Gram-only, chunk {c}"] = temp_bytes(*problem.step("gram", make(), chunk_size=c))
    sizes["representation"] = temp_bytes(*problem.step("representation", make()))
    for name, size in sizes.items():
      rows.append([str(k), name, f"{size / 2**20:.1f}", f"{size / sizes['stacked']:.3f}"])
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  params = sum(x.size for x in jax.tree.leaves(FlaxProblem(3, 512, 6, 512, 64).params))
  report = "\n\n".join([
      f"# Compiled temporary memory per training step (MGDA; jax {jax.__version__}, "
      f"{jax.devices()[0].platform})",
      f"Model: MLP 512-512x6 trunk with K linear heads ({params:,} parameters at K = 3), "
      "batch 64, Adam. `temp_size_in_bytes` of `jax.jit(step).lower(...).compile()"
      ".memory_analysis()`; ratio against the stacked path at the same K.",
      _table(["K", "path", "temporary MiB", "vs stacked"], measure()),
      "Command: `python benchmarks/memory.py " + " ".join(sys.argv[1:]) + "`",
  ])
  print(report)
  if args.out:
    args.out.write_text(report + "\n")


if __name__ == "__main__":
  main()
