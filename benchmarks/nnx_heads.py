"""Separate vs fused heads on the representation path, in Flax NNX.

The representation path backpropagates the heads once per task (the K passes vmapped). With K
separate `nnx.Linear(d, 1)` heads every head is its own small product, forward and backward,
and its own contribution to the rows dL_i/dz; with one fused `nnx.Linear(d, K)` each of those
is one product (at K = 11 the representation path's compiled `update` with `sum_tasks` holds
108 XLA fusions with separate heads, 28 with the fused head).

This times a training step (forward, balanced gradient, Adam, apply) of both models, the QM9
benchmark's descriptor MLP (274-256-256-256, K = 11, batch 128, as `benchmarks/run.py` trains
it), all through `mtl_optax.value_and_grad`:
  - EW: `sum_tasks()` on the Gram-only path (one backward pass, the baseline of each model),
  - the representation path with `sum_tasks()` and with `mgda(K)` (Gram-based),
beside `jax.grad` of the summed losses. Each step runs STEPS times in one compiled `lax.scan`
(warm-up run excluded); the runs are timed in interleaved rounds: each reports its median time,
and each ratio is the median over the rounds of the ratio within a round.

  python benchmarks/nnx_heads.py [--rounds 15] [--out benchmarks/results/nnx_heads.md]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from benchmarks import step_time  # noqa: E402

HEADS = ("separate", "fused")
METHODS = ("EW: jax.grad of the sum", "EW: sum_tasks, Gram-only path",
           "representation: sum_tasks", "representation: mgda")
BASELINE = METHODS[1]


class Net(nnx.Module):
  """An MLP trunk (`depth` Linear + ReLU layers) and K linear heads, separate or fused."""

  def __init__(self, num_tasks: int, fused: bool, d_in: int, hidden: int, depth: int,
               rngs: nnx.Rngs):
    layers = []
    for i in range(depth):
      layers += [nnx.Linear(d_in if i == 0 else hidden, hidden, rngs=rngs), nnx.relu]
    self.trunk = nnx.Sequential(*layers)
    if fused:
      self.heads = nnx.Linear(hidden, num_tasks, rngs=rngs)
    else:
      self.heads = nnx.List([nnx.Linear(hidden, 1, rngs=rngs) for _ in range(num_tasks)])

  def predict(self, z: jax.Array) -> jax.Array:
    """The K heads on the representation z: `(batch, K)`."""
    if isinstance(self.heads, nnx.Linear):
      return self.heads(z)
    return jnp.concatenate([head(z) for head in self.heads], axis=-1)


def shared_mask(params):
  return jax.tree.map_with_path(lambda path, _: path[0].key == "trunk", params)


def runs(fused: bool, num_tasks: int, d_in: int, hidden: int, depth: int, batch: int,
         steps: int) -> dict[str, Callable[[], None]]:
  """Every method's compiled run of `steps` training steps on one model."""
  graphdef, params = nnx.split(Net(num_tasks, fused, d_in, hidden, depth, nnx.Rngs(0)),
                               nnx.Param)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  x, y = jax.random.normal(kx, (batch, d_in)), jax.random.normal(ky, (batch, num_tasks))

  def encode(params, x, y):
    return nnx.merge(graphdef, params).trunk(x)

  def task_losses(params, z, x, y):
    return jnp.mean((nnx.merge(graphdef, params).predict(z) - y) ** 2, axis=0)

  def losses(params, x, y):
    return task_losses(params, encode(params, x, y), x, y)

  opt = optax.adam(1e-3)
  grad_of_sum = jax.grad(lambda p: losses(p, x, y).sum())

  def plain_step(carry):
    params, opt_state = carry
    updates, opt_state = opt.update(grad_of_sum(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def balanced(vg: mtl_optax.ValueAndGrad) -> Callable[[], None]:
    def step(carry):
      params, b_state, opt_state = carry
      out, b_state = vg.update(params, b_state, x, y)
      updates, opt_state = opt.update(out.grad, opt_state, params)
      return optax.apply_updates(params, updates), b_state, opt_state
    carry = (params, vg.init(params, x, y), opt.init(params))
    return step_time._compiled(step, carry, steps=steps, warmup_steps=steps)

  rep = lambda balancer: mtl_optax.value_and_grad(  # noqa: E731
      (encode, task_losses), balancer, path="representation", shared=shared_mask)
  return dict(zip(METHODS, (
      step_time._compiled(plain_step, (params, opt.init(params)), steps=steps,
                          warmup_steps=steps),
      balanced(mtl_optax.value_and_grad(losses, mtl_optax.sum_tasks(), path="gram")),
      balanced(rep(mtl_optax.sum_tasks())),
      balanced(rep(mtl_optax.mgda(num_tasks))),
  )))


def interleaved(runs: dict, rounds: int, steps: int) -> dict:
  """Seconds per step of each run in each of `rounds` interleaved rounds."""
  samples = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      samples[name].append((time.perf_counter() - start) / steps)
  return samples


def table(samples: dict[tuple[str, str], list[float]]) -> str:
  """One row per method: each model's median ms/step and ratio to its own EW, and separate /
  fused; a ratio is the median over rounds of the ratio of the two timings of that round."""
  def ratio(a, b):
    return statistics.median(x / y for x, y in zip(samples[a], samples[b]))
  rows = []
  for method in METHODS:
    row = [method]
    for heads in HEADS:
      row += [f"{1e3 * statistics.median(samples[heads, method]):.3f}",
              f"{ratio((heads, method), (heads, BASELINE)):.2f}"]
    rows.append(row + [f"{ratio(('separate', method), ('fused', method)):.2f}"])
  return step_time._table(
      ["method", "separate heads ms/step", "vs EW", "fused head ms/step", "vs EW",
       "separate / fused"], rows)


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--steps", type=int, default=step_time.STEPS)
  parser.add_argument("--tasks", type=int, default=11)
  parser.add_argument("--input", type=int, default=274)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  all_runs = {}
  for heads in HEADS:
    for method, run in runs(heads == "fused", args.tasks, args.input, args.hidden, args.depth,
                            args.batch, args.steps).items():
      all_runs[heads, method] = run
  samples = interleaved(all_runs, args.rounds, args.steps)
  widths = "-".join(str(w) for w in [args.input] + [args.hidden] * args.depth)
  report = "\n\n".join([
      "Command: `python benchmarks/nnx_heads.py"
      + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv)) + "`",
      f"Device: {jax.devices()[0].device_kind} ({step_time.cpu_model()}), jax {jax.__version__}, "
      f"flax {flax.__version__}; {args.steps} steps per timing "
      f"(one compiled scan, warm-up run excluded), {args.rounds} interleaved rounds: median "
      "times, ratios the median of the per-round ratios.",
      f"### Separate vs fused heads (Flax NNX; MLP {widths}, K = {args.tasks}, "
      f"batch {args.batch})\n\n"
      "Separate heads: K `nnx.Linear(d, 1)`; fused head: one `nnx.Linear(d, K)`. \"vs EW\": "
      "against EW with the same heads (`value_and_grad(losses, sum_tasks(), path=\"gram\")`).",
      table(samples),
  ])
  print(report)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
  return report


if __name__ == "__main__":
  main()
