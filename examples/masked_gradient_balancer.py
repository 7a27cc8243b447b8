"""A gradient balancer on the stacked Jacobian, with a shared trunk and task-specific heads.

  PYTHONPATH=. python examples/masked_gradient_balancer.py

The `shared` mask (a pytree of bools like the parameters, or a function of them) marks the trunk
as shared: MGDA balances the trunk's gradients; each head gets the plain sum of its rows (only
its own task's row is nonzero there). Without `mtl_optax.mgda`, a simple rule built with
`gram_aggregator` stands in: unit-norm weighting, w_i = 1 / ||g_i||.
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
    h = nn.relu(nn.Dense(32, name="trunk")(x))
    return jnp.stack([nn.Dense(1, name=f"head_{k}")(h)[:, 0] for k in range(NUM_TASKS)])


def shared(params):
  """True on the trunk, False on the heads."""
  return {"params": {name: jax.tree.map(lambda _: name == "trunk", sub)
                     for name, sub in params["params"].items()}}


def gradient_balancer() -> optax.GradientTransformationExtraArgs:
  """MGDA on the shared trunk; each head gets its own task's gradient."""
  return mtl_optax.mgda(NUM_TASKS, shared=shared)


def main(steps: int = 300) -> jax.Array:
  kx, kw, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (256, 4))
  w = jax.random.normal(kw, (4,))
  y = jnp.stack([x @ w, -(x @ w) + jnp.sin(3 * x[:, 0])])  # two conflicting targets
  model = Net()
  params = model.init(kinit, x)
  print("shared mask:", shared(params))

  def losses_fn(params):
    return jnp.mean((model.apply(params, x) - y) ** 2, axis=1)

  transform = optax.chain(gradient_balancer(), optax.adam(1e-2))
  grad_fn = mtl_optax.value_and_jacrev(losses_fn)

  def step(carry, _):
    params, state = carry
    losses, jac = grad_fn(params)  # every leaf gets a leading task axis of size 2
    updates, state = transform.update(jac, state, params, losses=losses)
    return (optax.apply_updates(params, updates), state), losses

  _, history = jax.jit(lambda c: jax.lax.scan(step, c, None, length=steps))(
      (params, transform.init(params)))
  for t in range(0, steps, max(1, steps // 5)):
    print(f"step {t}: losses {history[t]}")
  print(f"final losses {history[-1]}")
  return history


if __name__ == "__main__":
  main()
