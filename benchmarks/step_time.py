"""Step time of every balancer, as ratios measured in one run on the quickstart's model.

Each training step (forward, backward, balancer, Adam, apply) runs 50 times inside one
compiled `lax.scan`, so Python dispatch is not timed, from a state already trained for 100
steps (10 epochs of 10 steps), so every balancer is past its warm-up epochs. Methods are timed in interleaved rounds
and each reports its median; ratios are against a baseline timed in the same rounds:
  1. loss balancers on the single-backward path vs plain equal weighting (grad of sum L_i),
  2. the stacked-Jacobian path of each loss balancer vs its single-backward path,
  3. gradient balancers on the stacked Jacobian vs the plain stacked sum (`sum_tasks`),
     for K = 3, 11 and 40 tasks.

  python benchmarks/step_time.py [--rounds 7] [--out benchmarks/results/step_time.md]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
import quickstart  # noqa: E402
from benchmarks import methods  # noqa: E402

STEPS = 50
WARMUP = 100  # 10 epochs of STEPS_PER_EPOCH
STEPS_PER_EPOCH = 10
BATCH = 256


def _split_registry(num_tasks: int, steps_per_epoch: int):
  """The benchmark registry's methods, split into loss balancers and the rest.

  Loss balancers (no aggregator) come back as reweighters for the single-backward path;
  plain EW (no reweighter either) is the baseline and is left out. The others come back as
  their whole chain, for the stacked path, with the trunk shared and the heads task-specific.
  """
  loss, grad = {}, {}
  for name, factory in methods.registry().items():
    links = factory(num_tasks, steps_per_epoch, jax.random.PRNGKey(0))
    if links.aggregator is None and links.reweighter is not None:
      loss[name] = links.reweighter
    elif links.aggregator is not None:
      grad[name] = methods.chain(links)
  return loss, grad


def _problem(num_tasks: int):
  params = quickstart.init_params(jax.random.PRNGKey(0), num_tasks)
  x, y = quickstart.make_data(1, BATCH, num_tasks, scales=jnp.ones(num_tasks))
  return params, x, y


def _compiled(step: Callable, carry) -> Callable[[], None]:
  """A zero-argument callable running STEPS steps of `step` in one compiled scan.

  The state is first advanced by WARMUP steps, so the timed window is steady-state training
  (past every balancer's warm-up epochs; IGBv2 acts with its agent and trains it once).
  """
  run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (step(c), None), c, None, length=STEPS)[0])
  run = run.lower(carry).compile()
  for _ in range(WARMUP // STEPS):
    carry = run(carry)
  jax.block_until_ready(carry)
  return lambda: jax.block_until_ready(run(carry))


def plain_ew(num_tasks: int) -> Callable[[], None]:
  """Equal weighting with no balancer at all: the gradient of sum_i L_i."""
  params, x, y = _problem(num_tasks)
  opt = optax.adam(1e-3)
  grad_fn = jax.grad(lambda p: quickstart.task_losses(p, x, y).sum())

  def step(carry):
    params, opt_state = carry
    updates, opt_state = opt.update(grad_fn(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return _compiled(step, (params, opt.init(params)))


def single_backward(num_tasks: int, balancer: optax.GradientTransformation) -> Callable[[], None]:
  """A loss balancer on the single-backward path."""
  params, x, y = _problem(num_tasks)
  opt = optax.adam(1e-3)
  value_and_grad = mtl_optax.value_and_reweighted_grad(quickstart.task_losses, balancer)

  def step(carry):
    params, b_state, opt_state = carry
    (_, grad), b_state = value_and_grad(params, b_state, x, y)
    updates, opt_state = opt.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), b_state, opt_state

  return _compiled(step, (params, balancer.init(params), opt.init(params)))


def stacked(num_tasks: int, balancer: optax.GradientTransformation) -> Callable[[], None]:
  """Any balancer chain on the stacked Jacobian, followed by Adam."""
  params, x, y = _problem(num_tasks)
  tx = optax.chain(balancer, optax.adam(1e-3))
  value_and_jac = mtl_optax.value_and_jacrev(quickstart.task_losses)

  def step(carry):
    params, state = carry
    losses, jac = value_and_jac(params, x, y)
    updates, state = tx.update(jac, state, params, losses=losses)
    return optax.apply_updates(params, updates), state

  return _compiled(step, (params, tx.init(params)))


def median_times(runs: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
  """Median seconds per step of each run, timed in interleaved rounds."""
  samples: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      samples[name].append((time.perf_counter() - start) / STEPS)
  return {name: statistics.median(s) for name, s in samples.items()}


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def loss_balancer_tables(rounds: int, num_tasks: int = 3) -> str:
  balancers, _ = _split_registry(num_tasks, STEPS_PER_EPOCH)
  runs = {"plain EW": plain_ew(num_tasks)}
  for name, balancer in balancers.items():
    runs[name] = single_backward(num_tasks, balancer)
    runs[name + " (stacked)"] = stacked(num_tasks, optax.chain(balancer, mtl_optax.sum_tasks()))
  t = median_times(runs, rounds)
  rows = [[name, f"{1e3 * t[name]:.3f}", f"{t[name] / t['plain EW']:.3f}",
           f"{1e3 * t[name + ' (stacked)']:.3f}", f"{t[name + ' (stacked)'] / t[name]:.2f}"]
          for name in balancers]
  rows.insert(0, ["plain EW (grad of sum)", f"{1e3 * t['plain EW']:.3f}", "1.000", "", ""])
  return (f"### Loss balancers, K = {num_tasks}\n\n" + _table(
      ["method", "single-backward ms/step", "vs plain EW", "stacked ms/step",
       "stacked vs single-backward"], rows))


def gradient_balancer_table(rounds: int, task_counts: tuple[int, ...]) -> str:
  columns, results = [], {}
  for k in task_counts:
    runs = {"sum_tasks": stacked(k, mtl_optax.sum_tasks())}
    for name, balancer in _split_registry(k, STEPS_PER_EPOCH)[1].items():
      runs[name] = stacked(k, balancer)
    t = median_times(runs, rounds)
    results[k] = t
    columns += [f"K={k} ms/step", f"K={k} vs sum"]
  names = list(results[task_counts[0]])
  rows = []
  for name in names:
    row = [name]
    for k in task_counts:
      t = results[k]
      row += [f"{1e3 * t[name]:.3f}", f"{t[name] / t['sum_tasks']:.2f}"]
    rows.append(row)
  return "### Gradient balancers on the stacked Jacobian\n\n" + _table(["method"] + columns, rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 11, 40])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  report = "\n\n".join([
      f"Device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
      f"jax {jax.__version__}; {STEPS} steps per timing, batch {BATCH}, median of "
      f"{args.rounds} interleaved rounds.",
      loss_balancer_tables(args.rounds),
      gradient_balancer_table(args.rounds, tuple(args.tasks)),
      "Command: `python benchmarks/step_time.py " + " ".join(sys.argv[1:]) + "`",
  ])
  print(report)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")


if __name__ == "__main__":
  main()
