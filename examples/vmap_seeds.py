"""Several seeds in one program: `jax.vmap` over the PRNG key of the model and the balancer.

  PYTHONPATH=. python examples/vmap_seeds.py

All balancer state is an explicit pytree (here RLW's key), so a whole training run vmaps: one
compiled program trains every seed at once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import mtl_optax

NUM_TASKS = 2


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_TASKS)(nn.relu(nn.Dense(16)(x))).T  # (K, batch)


def main(seeds: int = 4, steps: int = 200) -> jax.Array:
  kx, kw = jax.random.split(jax.random.PRNGKey(42))
  x = jax.random.normal(kx, (128, 4))
  y = jnp.stack([jnp.sin(x @ jax.random.normal(kw, (4,))), x[:, 0] ** 2])
  model = Net()
  losses_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2, axis=1)  # noqa: E731
  adam = optax.adam(1e-2)

  def train(key):
    k_init, k_rlw = jax.random.split(key)
    balancer = mtl_optax.rlw(NUM_TASKS, key=k_rlw)
    grad_fn = mtl_optax.value_and_reweighted_grad(losses_fn, balancer)
    params = model.init(k_init, x)

    def step(carry, _):
      params, bal_state, adam_state = carry
      (losses, grad), bal_state = grad_fn(params, bal_state)
      updates, adam_state = adam.update(grad, adam_state, params)
      return (optax.apply_updates(params, updates), bal_state, adam_state), losses

    carry = (params, balancer.init(params), adam.init(params))
    _, losses = jax.lax.scan(step, carry, None, length=steps)
    return losses[-1]

  final = jax.jit(jax.vmap(train))(jax.random.split(jax.random.PRNGKey(0), seeds))
  print("final losses per seed:\n", final)
  print("mean ± std over seeds:", final.mean(0), "±", final.std(0))
  return final


if __name__ == "__main__":
  main()
