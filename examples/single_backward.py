"""A loss balancer on the single-backward path: one forward and one backward pass per step.

  PYTHONPATH=. python examples/single_backward.py

IGBv1 scales task i's loss by s_i = lambda_i / L_i; `value_and_reweighted_grad` reads s from the
balancer and backpropagates sum_i stop_gradient(s_i) L_i, the same gradient as summing the
reweighted rows of the stacked Jacobian, at the cost of equal weighting.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import mtl_optax

NUM_TASKS, STEPS_PER_EPOCH = 3, 20


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32)(x))
    return nn.Dense(NUM_TASKS)(h)  # one output per task


def main(epochs: int = 10) -> jax.Array:
  kx, kw, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (STEPS_PER_EPOCH, 32, 8))       # batches of inputs
  y = jnp.tanh(x @ jax.random.normal(kw, (8, NUM_TASKS))) * jnp.array([1.0, 10.0, 100.0])
  model = Net()
  params = model.init(kinit, x[0])

  def losses_fn(params, xb, yb):
    return jnp.mean((model.apply(params, xb) - yb) ** 2, axis=0)  # (K,), of very different scales

  balancer = mtl_optax.igb_v1(NUM_TASKS, STEPS_PER_EPOCH)
  adam = optax.adam(1e-2)
  grad_fn = mtl_optax.value_and_reweighted_grad(losses_fn, balancer)

  def epoch(carry, _):
    def step(carry, batch):
      params, bal_state, adam_state = carry
      (losses, grad), bal_state = grad_fn(params, bal_state, *batch)
      updates, adam_state = adam.update(grad, adam_state, params)
      return (optax.apply_updates(params, updates), bal_state, adam_state), losses
    carry, losses = jax.lax.scan(step, carry, (x, y))
    return carry, losses.mean(0)

  carry = (params, balancer.init(params), adam.init(params))
  carry, history = jax.lax.scan(epoch, carry, None, length=epochs)
  for e, losses in enumerate(history):
    print(f"epoch {e}: losses {losses}")

  # The same gradient from the stacked Jacobian: reweight the rows, then sum them.
  params, bal_state, _ = carry
  (_, grad), _ = grad_fn(params, bal_state, x[0], y[0])
  losses, jac = mtl_optax.value_and_jacrev(losses_fn)(params, x[0], y[0])
  stacked = optax.chain(balancer, mtl_optax.sum_tasks())
  grad_jac, _ = stacked.update(jac, (bal_state, mtl_optax.sum_tasks().init(params)), params,
                               losses=losses)
  gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.abs(a - b).max(), grad, grad_jac)))
  print(f"largest difference from the Jacobian path: {gap:.2e}")
  return history


if __name__ == "__main__":
  main()
