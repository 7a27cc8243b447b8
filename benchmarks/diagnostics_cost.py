"""What recording diagnostics costs: a training step with and without `with_diagnostics`.

On the QM9 benchmark's model (descriptor MLP 274-256-256-256, K linear heads, batch 128,
Adam), each method on the stacked, Gram-only and representation paths, timed as in
`benchmarks/step_time.py` (50 steps in one compiled scan, interleaved rounds, medians), without
the wrapper, with it recording every step and with it recording every `--every` steps, in the
same rounds. Also checks that the parameters after 20 steps are bitwise the same with and
without it.

  python benchmarks/diagnostics_cost.py [--rounds 7] [--tasks 11] [--every 25] [--out FILE]
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


def balancer(name: str, k: int, path: str, every: int | None) -> optax.GradientTransformation:
  """`name` on `path`, wrapped in `with_diagnostics(every=every)` unless `every` is None."""
  shared = None if path == "representation" else models.shared_mask
  tx = (mtl_optax.sum_tasks() if name == "sum_tasks"
        else mtl_optax.registry.build(name, k, shared=shared))
  if every is None:
    return tx
  return mtl_optax.with_diagnostics(tx, k, shared=shared, every=every)


def final_params(step, carry, steps: int = 20):
  run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (step(c), None), c, None, length=steps)[0])
  return run(carry)[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--tasks", type=int, default=11)
  parser.add_argument("--every", type=int, default=25)
  parser.add_argument("--out", type=pathlib.Path)
  args = parser.parse_args()
  k, every = args.tasks, args.every
  problem = FlaxProblem(k, hidden=256, depth=3, d_in=274, batch=128)
  runs, same = {}, {}
  for path in PATHS:
    for name in METHODS:
      steps = {e: problem.step(path, balancer(name, k, path, e)) for e in (None, 1, every)}
      plain = final_params(*steps[None])
      for e in (1, every):
        watched = final_params(*steps[e])
        same[(path, name, e)] = all(np.array_equal(x, y) for x, y in
                                    zip(jax.tree.leaves(plain), jax.tree.leaves(watched)))
      for e, step in steps.items():
        runs[(path, name, e)] = _compiled(*step)
  t = median_times(runs, args.rounds)
  rows = []
  for path in PATHS:
    for name in METHODS:
      base = t[(path, name, None)]
      rows.append([path, name, f"{1e3 * base:.3f}", f"{1e3 * t[(path, name, 1)]:.3f}",
                   f"{t[(path, name, 1)] / base:.3f}", f"{t[(path, name, every)] / base:.3f}",
                   *("yes" if same[(path, name, e)] else "NO" for e in (1, every))])
  text = (f"# Cost of recording diagnostics\n\nCommand: `python benchmarks/diagnostics_cost.py "
          f"--rounds {args.rounds} --tasks {k} --every {every}`\n\nDevice: "
          f"{jax.devices()[0].device_kind} ({cpu_model()}), jax {jax.__version__}; QM9's model "
          f"(MLP 274-256-256-256, K = {k} heads, batch 128, Adam), 50 steps per timing, median "
          f"of {args.rounds} interleaved rounds. 'every step': `with_diagnostics(tx, K)`; "
          f"'every {every}': `with_diagnostics(tx, K, every={every})`, which records on 2 of "
          "the 50 steps. 'same update': the parameters after 20 steps are bitwise equal with "
          "and without the wrapper.\n\n"
          + _table(["path", "method", "ms/step", "every step: ms/step", "ratio",
                    f"every {every}: ratio", "every step: same update",
                    f"every {every}: same update"], rows) + "\n")
  print(text)
  if args.out:
    args.out.write_text(text)

if __name__ == "__main__":
  main()
