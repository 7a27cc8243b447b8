"""What recording diagnostics costs: a training step with and without `with_diagnostics`.

On the QM9 benchmark's model (descriptor MLP 274-256-256-256, K linear heads, batch 128,
Adam), each method on the stacked, Gram-only and representation paths, timed as in
`benchmarks/step_time.py` (50 steps in one compiled scan, interleaved rounds, medians), with
and without the wrapper in the same rounds. Also checks that the parameters after the timed
steps are bitwise the same with and without it.

  python benchmarks/diagnostics_cost.py [--rounds 7] [--tasks 11] [--out FILE]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.step_time import (FlaxProblem, _compiled, _table, cpu_model,  # noqa: E402
                                  median_times)

METHODS = ("sum_tasks", "mgda", "nash_mtl", "cagrad@imbalance")
PATHS = ("stacked", "gram", "representation")


def balancer(name: str, k: int, path: str, watch: bool) -> optax.GradientTransformation:
  shared = None if path == "representation" else models.shared_mask
  tx = (mtl_optax.sum_tasks() if name == "sum_tasks"
        else mtl_optax.registry.build(name, k, shared=shared))
  return mtl_optax.with_diagnostics(tx, k, shared=shared) if watch else tx


def final_params(step, carry, steps: int = 20):
  run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (step(c), None), c, None, length=steps)[0])
  return run(carry)[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--tasks", type=int, default=11)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  k = args.tasks
  problem = FlaxProblem(k, hidden=256, depth=3, d_in=274, batch=128)
  runs, same = {}, {}
  for path in PATHS:
    for name in METHODS:
      plain = problem.step(path, balancer(name, k, path, False))
      watched = problem.step(path, balancer(name, k, path, True))
      a, b = final_params(*plain), final_params(*watched)
      same[(path, name)] = all(np.array_equal(x, y) for x, y in
                               zip(jax.tree.leaves(a), jax.tree.leaves(b)))
      runs[(path, name, False)] = _compiled(*plain)
      runs[(path, name, True)] = _compiled(*watched)
  t = median_times(runs, args.rounds)
  rows = [[path, name, f"{1e3 * t[(path, name, False)]:.3f}", f"{1e3 * t[(path, name, True)]:.3f}",
           f"{t[(path, name, True)] / t[(path, name, False)]:.3f}",
           "yes" if same[(path, name)] else "NO"]
          for path in PATHS for name in METHODS]
  text = (f"# Cost of recording diagnostics\n\nCommand: `python benchmarks/diagnostics_cost.py "
          f"--rounds {args.rounds} --tasks {k}`\n\nDevice: {jax.devices()[0].device_kind} "
          f"({cpu_model()}), jax {jax.__version__}; QM9's model (MLP 274-256-256-256, K = {k} "
          "heads, batch 128, Adam), 50 steps per timing, median of "
          f"{args.rounds} interleaved rounds. 'same update': the parameters after 20 steps are "
          "bitwise equal with and without the wrapper.\n\n"
          + _table(["path", "method", "ms/step", "with diagnostics ms/step", "ratio",
                    "same update"], rows) + "\n")
  print(text)
  if args.out:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
