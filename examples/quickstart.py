"""Quickstart: a shared-trunk multi-task regressor trained with several balancers.

Three regression tasks share an MLP trunk; each has a linear head. Their targets live on very
different scales (x1, x10, x0.1), the situation loss and gradient balancers are made for.
Every method runs through `mtl_optax.value_and_grad`: loss balancers on the Gram-only path
(one backward pass), gradient balancers on the stacked Jacobian, with the trunk shared and the
heads task-specific. Prints each method's final test losses
(relative to the test loss of the untrained model) and its step time.

  python examples/quickstart.py [--steps 500]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import mtl_optax

NUM_TASKS = 3
SCALES = jnp.array([1.0, 10.0, 0.1])
SHARED = {"trunk": True, "heads": False}


def init_params(key: jax.Array, num_tasks: int = NUM_TASKS, d_in: int = 16,
                hidden: int = 64) -> dict:
  """Trunk: two tanh layers; heads: one linear map per task."""
  k1, k2, k3 = jax.random.split(key, 3)
  glorot = jax.nn.initializers.glorot_normal()
  return {
      "trunk": {"w1": glorot(k1, (d_in, hidden)), "b1": jnp.zeros(hidden),
                "w2": glorot(k2, (hidden, hidden)), "b2": jnp.zeros(hidden)},
      "heads": {"w": glorot(k3, (hidden, num_tasks)), "b": jnp.zeros(num_tasks)},
  }


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error of each task: shape (K,)."""
  t = params["trunk"]
  h = jnp.tanh(x @ t["w1"] + t["b1"])
  h = jnp.tanh(h @ t["w2"] + t["b2"])
  pred = h @ params["heads"]["w"] + params["heads"]["b"]
  return jnp.mean((pred - y) ** 2, axis=0)


def make_data(seed: int, n: int, num_tasks: int = NUM_TASKS, d_in: int = 16,
              scales: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Related nonlinear targets on different scales: y_k = s_k sin(2 x . a_k) + noise.

  The directions a_k are the same for every seed (one problem); the seed draws the samples.
  """
  scales = SCALES[:num_tasks] if scales is None else scales
  directions = jax.random.normal(jax.random.PRNGKey(0), (d_in, num_tasks)) / jnp.sqrt(d_in)
  directions = directions + 0.5 * directions[:, :1]  # tasks share a component
  kx, kn = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(kx, (n, d_in))
  y = jnp.sin(2.0 * x @ directions) * scales
  return x, y + 0.05 * scales * jax.random.normal(kn, y.shape)


def make_step(path: str, balancer: optax.GradientTransformation,
              optimizer: optax.GradientTransformation) -> tuple[Callable, Callable]:
  """`(init, step)` for one balancer through `mtl_optax.value_and_grad` on `path`."""
  vg = mtl_optax.value_and_grad(task_losses, balancer, path=path)

  def init(params):
    return vg.init(params), optimizer.init(params)

  @jax.jit
  def step(params, state, x, y):
    balancer_state, opt_state = state
    out, balancer_state = vg.update(params, balancer_state, x, y)
    updates, opt_state = optimizer.update(out.grad, opt_state, params)
    return optax.apply_updates(params, updates), (balancer_state, opt_state), out

  return init, step


def methods(steps_per_epoch: int) -> dict[str, tuple[str, optax.GradientTransformation]]:
  """Name -> (path, balancer): loss balancers on the Gram-only path (one backward pass),
  gradient balancers on the stacked Jacobian."""
  k = NUM_TASKS
  return {
      "EW": ("gram", mtl_optax.equal_weights(k)),
      "SI (log losses)": ("gram", mtl_optax.log_losses(k)),
      "RLW": ("gram", mtl_optax.rlw(k, key=0)),
      "DWA": ("gram", mtl_optax.dwa(k, steps_per_epoch)),
      "UW": ("gram", mtl_optax.uw(k)),
      "GLS": ("gram", mtl_optax.gls(k)),
      "IMTL-L": ("gram", mtl_optax.imtl_l(k)),
      "IGBv1": ("gram", mtl_optax.igb_v1(k, steps_per_epoch)),
      "IGBv2": ("gram", mtl_optax.igb_v2(k, steps_per_epoch, key=0)),
      "MGDA": ("stacked", mtl_optax.mgda(k, shared=SHARED)),
      "PCGrad": ("stacked", mtl_optax.pcgrad(k, key=0, shared=SHARED)),
      "CAGrad": ("stacked", mtl_optax.cagrad(k, shared=SHARED)),
      "Nash-MTL": ("stacked", mtl_optax.nash_mtl(k, shared=SHARED)),
      "UPGrad": ("stacked", mtl_optax.upgrad(k, shared=SHARED)),
      "DB-MTL": ("stacked", mtl_optax.db_mtl(k, shared=SHARED)),
      "IMGrad": ("stacked", mtl_optax.imgrad(k, shared=SHARED)),
      "IGBv1 + Nash-MTL": ("stacked", optax.chain(mtl_optax.igb_v1(k, steps_per_epoch),
                                               mtl_optax.nash_mtl(k, shared=SHARED))),
  }


def train(path: str, balancer: optax.GradientTransformation, steps: int, batch: int = 64,
          learning_rate: float = 3e-3) -> tuple[jax.Array, float]:
  """Trains one model; returns test losses relative to the untrained model's, and ms/step."""
  params = init_params(jax.random.PRNGKey(1))
  x, y = make_data(2, steps * batch)
  x_test, y_test = make_data(3, 2048)
  init, step = make_step(path, balancer, optax.adam(learning_rate))
  state = init(params)
  x, y = x.reshape(steps, batch, -1), y.reshape(steps, batch, -1)
  start_losses = task_losses(params, x_test, y_test)
  jax.block_until_ready(step(params, state, x[0], y[0]))  # compile
  start = time.perf_counter()
  for i in range(steps):
    params, state, _ = step(params, state, x[i], y[i])
  jax.block_until_ready(params)
  ms = 1e3 * (time.perf_counter() - start) / steps
  return task_losses(params, x_test, y_test) / start_losses, ms


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=500)
  args = parser.parse_args()
  steps_per_epoch = max(args.steps // 10, 1)
  print(f"{NUM_TASKS} tasks, target scales {SCALES.tolist()}, {args.steps} steps of Adam.\n"
        "Test loss relative to the untrained model (lower is better):\n")
  print(f"| method | {' | '.join(f'task {i}' for i in range(NUM_TASKS))} | mean | ms/step |")
  print("|---" * (NUM_TASKS + 3) + "|")
  for name, (path, balancer) in methods(steps_per_epoch).items():
    rel, ms = train(path, balancer, args.steps)
    cells = " | ".join(f"{float(v):.3f}" for v in rel)
    print(f"| {name} | {cells} | {float(rel.mean()):.3f} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
  main()
