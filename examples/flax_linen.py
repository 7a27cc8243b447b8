"""A Flax Linen `TrainState` step with a balancer: `apply_gradients` that takes `losses`.

  PYTHONPATH=. python examples/flax_linen.py

`flax.training.train_state.TrainState.apply_gradients` calls `tx.update` without extra
arguments, so a balancer would get no `losses`. `MTLTrainState` below passes them on; the rest
is the usual Linen step (here IGBv1 + Nash-MTL on the stacked Jacobian).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

import mtl_optax

NUM_TASKS, STEPS_PER_EPOCH = 3, 10


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="trunk")(x))
    return nn.Dense(NUM_TASKS, name="heads")(h)


class MTLTrainState(train_state.TrainState):
  """A TrainState whose `apply_gradients` forwards extra arguments (`losses=`) to `tx`."""

  def apply_gradients(self, *, grads, **extra_args):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def main(steps: int = 200) -> jax.Array:
  kx, kw, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (64, 8))
  y = jnp.tanh(x @ jax.random.normal(kw, (8, NUM_TASKS))) * jnp.array([1.0, 3.0, 10.0])
  model = Net()
  params = model.init(kinit, x)
  shared = {"params": {"trunk": True, "heads": False}}
  tx = optax.chain(mtl_optax.igb_v1(NUM_TASKS, STEPS_PER_EPOCH),
                   mtl_optax.nash_mtl(NUM_TASKS, shared=shared), optax.adam(1e-2))
  state = MTLTrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, x, y):
    def task_losses(params):
      return jnp.mean((state.apply_fn(params, x) - y) ** 2, axis=0)
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(state.params)
    return state.apply_gradients(grads=jac, losses=losses), losses

  state, first = train_step(state, x, y)
  for _ in range(steps - 1):
    state, losses = train_step(state, x, y)
  print("losses, first step:", first, "last step:", losses)
  return jnp.stack([first, losses])


if __name__ == "__main__":
  main()
