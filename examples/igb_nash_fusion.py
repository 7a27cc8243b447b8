"""Loss balancing + gradient balancing (IGB, Alg. 3): IGB reweights the rows, Nash-MTL
aggregates them on the shared trunk.

  PYTHONPATH=. python examples/igb_nash_fusion.py

`optax.chain(igb, nash_mtl(shared=...), optax.adam(...))` consumes the stacked Jacobian: row i
becomes (lambda_i / L_i) g_i, then Nash-MTL's bargaining weights combine the shared rows. The
agent trains at learning rate 1e-4, the IGB paper's setting for its fusions (3e-4 alone).

Nash-MTL is scale-invariant (rows s_i g_i give the same update, heads included), so this chain,
IGB4MTL's reading of Algorithm 3, is Nash-MTL step for step up to rounding. The paper's text
(heads updated by the loss balancing alone) is `mtl_optax.fusion(igb, nash, reading=
"algorithm3", shared=...)`; README, "Scale invariance and IGB's fusion".
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import mtl_optax

NUM_TASKS, STEPS_PER_EPOCH = 3, 25


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(32, name="trunk")(x))
    return nn.Dense(NUM_TASKS, name="heads")(h).T  # (K, batch)


def shared(params):
  """True on the trunk, False on the heads."""
  return {"params": {name: jax.tree.map(lambda _: name == "trunk", sub)
                     for name, sub in params["params"].items()}}


def fused() -> optax.GradientTransformationExtraArgs:
  """IGB Alg. 3: IGBv2's loss weights first, then Nash-MTL on the shared trunk."""
  igb = mtl_optax.igb_v2(NUM_TASKS, STEPS_PER_EPOCH, key=jax.random.PRNGKey(0),
                        agent_learning_rate=1e-4)
  return optax.chain(igb, mtl_optax.nash_mtl(NUM_TASKS, shared=shared))


def main(epochs: int = 8) -> jax.Array:
  kx, kw, kinit = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (STEPS_PER_EPOCH, 64, 8))
  y = jnp.swapaxes(jnp.tanh(x @ jax.random.normal(kw, (8, NUM_TASKS))), 1, 2)
  y = y * jnp.array([1.0, 5.0, 25.0])[:, None]  # (batches, K, batch): unequal task scales
  model = Net()
  params = model.init(kinit, x[0])
  transform = optax.chain(fused(), optax.adam(3e-3))
  grad_fn = mtl_optax.value_and_jacrev(
      lambda p, xb, yb: jnp.mean((model.apply(p, xb) - yb) ** 2, axis=1))

  def step(carry, batch):
    params, state = carry
    losses, jac = grad_fn(params, *batch)
    updates, state = transform.update(jac, state, params, losses=losses)
    return (optax.apply_updates(params, updates), state), losses

  def epoch(carry, _):
    carry, losses = jax.lax.scan(step, carry, (x, y))
    return carry, losses.mean(0)

  _, history = jax.jit(lambda c: jax.lax.scan(epoch, c, None, length=epochs))(
      (params, transform.init(params)))
  for e, losses in enumerate(history):
    print(f"epoch {e}: losses {losses}")
  return history


if __name__ == "__main__":
  main()
