"""Step time of every balancer, as ratios measured in one run on the quickstart's model.

Each training step (forward, backward, balancer, Adam, apply) runs 50 times inside one
compiled `lax.scan`, so Python dispatch is not timed, from a state already trained for 100
steps (10 epochs of 10 steps), so every balancer is past its warm-up epochs. Methods are timed in interleaved rounds
and each reports its median; ratios are against a baseline timed in the same rounds:
  1. loss balancers on the single-backward path vs plain equal weighting (grad of sum L_i),
  2. the stacked-Jacobian path of each loss balancer vs its single-backward path,
  3. gradient balancers on the stacked Jacobian vs the plain stacked sum (`sum_tasks`),
     for K = 3, 11 and 40 tasks;
  4. every gradient balancer on the representation path vs single-backward equal weighting,
     on the QM9 benchmark's model (descriptor MLP, 3 x 256, K = 11, batch 128) and the same
     model with K = 40 heads, beside the floor of every Gram-based method there (`unit_rows`:
     the z-rows, their Gram matrix, the combination and the pullback, no solver);
  5. the Gram-only path vs the stacked path on an MLP of six 512-wide layers, K = 3, 11, 40;
  6. the entry point `mtl_optax.value_and_grad` vs the per-path functions it is built on, on
     every path, on the QM9 benchmark's model (K = 11).

  python benchmarks/step_time.py [--rounds 7] [--sections loss grad rep gram entry] [--out FILE]
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
from benchmarks import methods, models  # noqa: E402

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
    if not methods.accepts(name, num_tasks):
      continue
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


def _compiled(step: Callable, carry, steps: int = STEPS,
              warmup_steps: int = WARMUP) -> Callable[[], None]:
  """A zero-argument callable running `steps` steps of `step` in one compiled scan.

  The state is first advanced by `warmup_steps` (at least one run of `steps`); the default
  WARMUP makes the timed window steady-state training (past every balancer's warm-up epochs;
  IGBv2 acts with its agent and trains it once).
  """
  run = jax.jit(lambda c: jax.lax.scan(lambda c, _: (step(c), None), c, None, length=steps)[0])
  run = run.lower(carry).compile()
  for _ in range(max(1, warmup_steps // steps)):
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


class FlaxProblem:
  """A benchmark model (`benchmarks.models`: MLP trunk, K linear heads) on random data."""

  def __init__(self, num_tasks: int, hidden: int, depth: int, d_in: int, batch: int):
    self.model = models.build("mlp", num_tasks, 1, hidden, depth)
    kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
    self.x = jax.random.normal(kx, (batch, d_in))
    self.y = jax.random.normal(ky, (batch, num_tasks))
    self.params = self.model.init(kp, self.x[:1])
    self.encode, self.heads = models.representation_split(self.model)

  def losses(self, params, x, y):
    return self.head_losses(params, self.encode(params, x), x, y)

  def head_losses(self, params, z, x, y):
    del x
    return jnp.mean((self.heads(params, z)[..., 0] - y.T) ** 2, axis=1)

  def _adam_step(self, grad_and_state: Callable) -> Callable:
    opt = optax.adam(1e-3)

    def step(carry):
      params, b_state, opt_state = carry
      grad, b_state = grad_and_state(params, b_state)
      updates, opt_state = opt.update(grad, opt_state, params)
      return optax.apply_updates(params, updates), b_state, opt_state
    return step, opt

  def step(self, path: str, balancer: optax.GradientTransformation | None = None,
           chunk_size: int = 4) -> tuple[Callable, tuple]:
    """`(step, carry)`: one training step with Adam on `path`:
    'ew' (grad of sum_i L_i), 'stacked', 'gram' (Gram-only) or 'representation'."""
    x, y = self.x, self.y
    if path == "ew":
      grad_fn = jax.grad(lambda p: self.losses(p, x, y).sum())
      fn = lambda p, s: (grad_fn(p), s)  # noqa: E731
      like = None
    elif path == "stacked":
      jac_fn = mtl_optax.value_and_jacrev(self.losses)

      def fn(p, s):
        losses, jac = jac_fn(p, x, y)
        return balancer.update(jac, s, p, losses=losses)
      like = self.params
    elif path == "gram":
      grad_fn = mtl_optax.value_and_reweighted_grad(self.losses, balancer, chunk_size=chunk_size)

      def fn(p, s):
        (_, grad), s = grad_fn(p, s, x, y)
        return grad, s
      like = self.params
    else:
      rep = mtl_optax.value_and_representation_jacrev(
          lambda p, x, y: self.encode(p, x), self.head_losses, shared=models.shared_mask)

      def fn(p, s):
        losses, rows, pullback = rep(p, x, y)
        out, s = balancer.update(rows, s, losses=losses)
        return pullback(out), s
      like = mtl_optax.row_like(rep(self.params, x, y)[1])
    step, opt = self._adam_step(fn)
    state = balancer.init(like) if balancer is not None else None
    return step, (self.params, state, opt.init(self.params))

  def entry_step(self, path: str, balancer: optax.GradientTransformation) -> tuple[Callable, tuple]:
    """`(step, carry)` as `step`, through `mtl_optax.value_and_grad`."""
    x, y = self.x, self.y
    if path == "representation":
      fun = (lambda p, x, y: self.encode(p, x), self.head_losses)
      vg = mtl_optax.value_and_grad(fun, balancer, path=path, shared=models.shared_mask)
    else:
      vg = mtl_optax.value_and_grad(self.losses, balancer, path=path)

    def fn(p, s):
      out, s = vg.update(p, s, x, y)
      return out.grad, s
    step, opt = self._adam_step(fn)
    return step, (self.params, vg.init(self.params, x, y), opt.init(self.params))


def median_times(runs: dict[str, Callable[[], None]], rounds: int,
                 steps: int = STEPS) -> dict[str, float]:
  """Median seconds per step of each run, timed in interleaved rounds."""
  samples: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      samples[name].append((time.perf_counter() - start) / steps)
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


GRAM_FLOOR = "floor: z-rows' Gram, no solver"


def unit_rows(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """The sum of the unit rows, w_i = 1 / ||g_i|| from the Gram matrix: a Gram-based balancer
  with a closed-form weighting, so its step is what every Gram-based method pays before its
  own solver (the rows, their K x K Gram matrix, the combination and the pullback)."""
  return mtl_optax.gram_aggregator(
      GRAM_FLOOR, num_tasks, lambda params: optax.EmptyState(),
      lambda gram, state, losses: (1.0 / jnp.sqrt(jnp.diag(gram)), None, state))


def representation_table(rounds: int, task_counts: tuple[int, ...] = (11, 40)) -> str:
  """Representation path vs single-backward EW on the QM9 benchmark's model."""
  results = {}
  for k in task_counts:
    problem = FlaxProblem(k, hidden=256, depth=3, d_in=274, batch=128)
    runs = {"EW (single-backward)": _compiled(*problem.step("ew")),
            GRAM_FLOOR: _compiled(*problem.step("representation", unit_rows(k)))}
    for name, factory in methods.gradient_methods("representation").items():
      balancer = methods.chain(factory(k, STEPS_PER_EPOCH, jax.random.PRNGKey(0)))
      runs[name] = _compiled(*problem.step("representation", balancer))
    results[k] = median_times(runs, rounds)
  rows = []
  for name in results[task_counts[0]]:
    row = [name]
    for k in task_counts:
      t = results[k]
      row += [f"{1e3 * t[name]:.3f}", f"{t[name] / t['EW (single-backward)']:.2f}"]
    rows.append(row)
  columns = [c for k in task_counts for c in (f"K={k} ms/step", f"K={k} vs EW")]
  return ("### Gradient balancers on the representation path (QM9 model: MLP 274-256-256-256, "
          "batch 128)\n\n" + _table(["method"] + columns, rows))


GRAM_METHODS = ("sum_tasks", "mgda", "nash_mtl", "upgrad", "igb_v1+nash_mtl")


def _gram_balancer(name: str, num_tasks: int) -> optax.GradientTransformation:
  if name == "sum_tasks":
    return mtl_optax.sum_tasks()
  return methods.chain(methods.registry()[name](num_tasks, STEPS_PER_EPOCH, jax.random.PRNGKey(0)))


def gram_table(rounds: int, task_counts: tuple[int, ...] = (3, 11, 40)) -> str:
  """Gram-only path vs stacked path, on an MLP of six 512-wide layers (batch 64)."""
  rows = []
  for k in task_counts:
    problem = FlaxProblem(k, hidden=512, depth=6, d_in=512, batch=64)
    runs = {}
    for name in GRAM_METHODS:
      for label, path in ((name, "stacked"), (name + " (gram)", "gram")):
        runs[label] = _compiled(*problem.step(path, _gram_balancer(name, k)), steps=5,
                                warmup_steps=5)
    t = median_times(runs, rounds, steps=5)
    rows += [[str(k), name, f"{1e3 * t[name]:.1f}", f"{1e3 * t[name + ' (gram)']:.1f}",
              f"{t[name + ' (gram)'] / t[name]:.2f}"] for name in GRAM_METHODS]
  return ("### Gram-only path vs stacked path (MLP of six 512-wide layers, batch 64, "
          "chunk_size 4; 5 steps per timing)\n\n"
          + _table(["K", "method", "stacked ms/step", "Gram-only ms/step", "Gram-only vs stacked"],
                   rows))


ENTRY_METHODS = ("igb_v1", "nash_mtl", "igb_v1+nash_mtl", "mgda")


def entry_table(rounds: int, num_tasks: int = 11) -> str:
  """`value_and_grad` vs the per-path functions, same balancer, same model, same rounds."""
  problem = FlaxProblem(num_tasks, hidden=256, depth=3, d_in=274, batch=128)
  gradient = {"stacked": methods.gradient_methods(),
              "representation": methods.gradient_methods("representation")}
  rows = []
  for path in ("stacked", "gram", "representation"):
    runs = {}
    for name in ENTRY_METHODS:
      factory = gradient.get(path, gradient["stacked"]).get(name) or methods.registry()[name]
      links = factory(num_tasks, STEPS_PER_EPOCH, jax.random.PRNGKey(0))
      balancer = methods.chain(links) if links.aggregator else links.reweighter
      # The per-path functions need the reducer after a loss balancer, except on the Gram path.
      lower = methods.chain(links) if path != "gram" else balancer
      runs[name] = _compiled(*problem.step(path, lower), steps=50, warmup_steps=10)
      runs[name + " (entry)"] = _compiled(*problem.entry_step(path, balancer), steps=50,
                                          warmup_steps=10)
    t = median_times(runs, rounds, steps=50)
    rows += [[path, name, f"{1e3 * t[name]:.2f}", f"{1e3 * t[name + ' (entry)']:.2f}",
              f"{t[name + ' (entry)'] / t[name]:.3f}"] for name in ENTRY_METHODS]
  return (f"### value_and_grad vs the per-path functions (QM9 model, K = {num_tasks}, "
          "batch 128; 50 steps per timing)\n\n"
          + _table(["path", "method", "per-path ms/step", "value_and_grad ms/step",
                    "value_and_grad vs per-path"], rows))


def cpu_model() -> str:
  """The processor's model name (Linux), else what `platform` knows."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 11, 40])
  parser.add_argument("--sections", nargs="+", default=["loss", "grad", "rep", "gram", "entry"],
                      choices=["loss", "grad", "rep", "gram", "entry"])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  report = "\n\n".join([
      f"Device: {jax.devices()[0].device_kind} ({cpu_model()}), "
      f"jax {jax.__version__}; {STEPS} steps per timing, batch {BATCH}, median of "
      f"{args.rounds} interleaved rounds.",
      *[{"loss": lambda: loss_balancer_tables(args.rounds),
         "grad": lambda: gradient_balancer_table(args.rounds, tuple(args.tasks)),
         "rep": lambda: representation_table(args.rounds),
         "gram": lambda: gram_table(args.rounds),
         "entry": lambda: entry_table(args.rounds)}[s]() for s in args.sections],
      "Command: `python benchmarks/step_time.py " + " ".join(sys.argv[1:]) + "`",
  ])
  print(report)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")


if __name__ == "__main__":
  main()
