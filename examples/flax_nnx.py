"""Flax NNX on the three paths: one `nnx.Module`, `mtl_optax.value_and_grad`, `nnx.Optimizer`.

  PYTHONPATH=. python examples/flax_nnx.py [stacked|gram|representation]

`nnx.split(model, nnx.Param)` gives the graph definition and the parameters (an `nnx.State`,
a pytree); the loss functions rebuild the model with `nnx.merge`. The balanced gradient
`out.grad` is shaped like the parameters, so `nnx.Optimizer(model, optax.adam(...),
wrt=nnx.Param)` takes it as it would `nnx.grad`'s; the balancer's state is a pytree carried
through `nnx.jit` beside the model and the optimizer.

- stacked, gram: one loss function of the whole model; Nash-MTL balances the trunk (`shared=`
  a function of the parameters) and weights the heads. Both paths make the same update, the
  Gram-only one without materializing the K per-task gradients.
- representation: `encode` runs the trunk, `task_losses` the heads on its output z; Nash-MTL
  (built with shared=None) balances the rows dL_i/dz, and one VJP through the trunk maps its
  output back to the trunk's parameters.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mtl_optax

NUM_TASKS = 3


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(nnx.Linear(8, 32, rngs=rngs), nnx.relu)
    self.heads = nnx.Linear(32, NUM_TASKS, rngs=rngs)  # one output per task

  def __call__(self, x):
    return self.heads(self.trunk(x))


def shared_mask(params):
  """True on the trunk's parameters (balanced), False on the heads' (task-specific). A
  function of the parameters, so it fits whatever pytree `nnx.split` returns."""
  return jax.tree.map_with_path(lambda path, _: path[0].key == "trunk", params)


def balanced_value_and_grad(graphdef: nnx.GraphDef, path: str) -> mtl_optax.ValueAndGrad:
  """Nash-MTL's balanced gradient of the model's K losses on `path`."""
  def mse(pred, y):  # (K,)
    return jnp.mean((pred - y) ** 2, axis=0)

  if path == "representation":
    def encode(params, x, y):  # z = trunk(x)
      return nnx.merge(graphdef, params).trunk(x)

    def task_losses(params, z, x, y):
      return mse(nnx.merge(graphdef, params).heads(z), y)

    return mtl_optax.value_and_grad((encode, task_losses), mtl_optax.nash_mtl(NUM_TASKS),
                                    path=path, shared=shared_mask)

  def losses(params, x, y):
    return mse(nnx.merge(graphdef, params)(x), y)

  balancer = mtl_optax.nash_mtl(NUM_TASKS, shared=shared_mask)
  return mtl_optax.value_and_grad(losses, balancer, path=path)


def make_data():
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (64, 8))
  y = jnp.tanh(x @ jax.random.normal(kw, (8, NUM_TASKS))) * jnp.array([1.0, 3.0, 10.0])
  return x, y


def main(steps: int = 200, path: str = "stacked") -> jax.Array:
  """Trains on `path`; returns the `(steps, K)` losses."""
  x, y = make_data()
  model = Net(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  vg = balanced_value_and_grad(graphdef, path)
  balancer_state = vg.init(params, x, y)
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, balancer_state, x, y):
    out, balancer_state = vg.update(nnx.state(model, nnx.Param), balancer_state, x, y)
    optimizer.update(model, out.grad)
    return out.losses, out.weights, balancer_state

  history = []
  for step in range(steps):
    losses, weights, balancer_state = train_step(model, optimizer, balancer_state, x, y)
    history.append(losses)
    if step % 50 == 0 or step == steps - 1:
      print(f"{path} step {step:3d}: losses {np.asarray(losses).round(3)}, "
            f"weights {np.asarray(weights).round(3)}")
  return jnp.stack(history)


if __name__ == "__main__":
  main(path=sys.argv[1] if len(sys.argv) > 1 else "stacked")
