"""A Flax NNX training step: `nnx.Optimizer` passes `losses=` on to the balancer.

  PYTHONPATH=. python examples/flax_nnx.py

The model's parameters are split off with `nnx.split`, the stacked Jacobian of the K losses is
taken with `mtl_optax.value_and_jacrev`, and `optimizer.update(model, jac, losses=losses)`
hands both to `optax.chain(mtl_optax.nash_mtl(K, shared=...), optax.adam(...))`: NNX forwards
the keyword arguments of `update` to the transformation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mtl_optax

NUM_TASKS = 3


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(8, 32, rngs=rngs)
    self.heads = nnx.Linear(32, NUM_TASKS, rngs=rngs)  # one output per task

  def __call__(self, x):
    return self.heads(nnx.relu(self.trunk(x)))


def shared_mask(params):
  """True on the trunk's parameters (balanced), False on the heads' (task-specific). A
  function of the parameters, as NNX hands the transformation plain arrays, not Variables."""
  return jax.tree.map_with_path(lambda path, _: path[0].key == "trunk", params)


def main(steps: int = 200) -> jax.Array:
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (64, 8))
  y = jnp.tanh(x @ jax.random.normal(kw, (8, NUM_TASKS))) * jnp.array([1.0, 3.0, 10.0])

  model = Net(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  balancer = mtl_optax.nash_mtl(NUM_TASKS, shared=shared_mask)
  optimizer = nnx.Optimizer(model, optax.chain(balancer, optax.adam(1e-2)), wrt=nnx.Param)

  def task_losses(params, x, y):  # (K,)
    return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2, axis=0)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(nnx.state(model, nnx.Param), x, y)
    optimizer.update(model, jac, losses=losses)  # losses reach the balancer
    return losses

  first = train_step(model, optimizer, x, y)
  for _ in range(steps - 1):
    losses = train_step(model, optimizer, x, y)
  print("losses, first step:", first, "last step:", losses)
  return jnp.stack([first, losses])


if __name__ == "__main__":
  main()
