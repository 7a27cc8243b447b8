"""Loss balancing then gradient balancing (IGB Alg. 3) with every gradient balancer.

`chain(igb_v1, aggregator)` must equal the aggregator applied to the rows scaled by IGBv1's
s_i = lambda_i / L_i, computed here in NumPy from the card; task-specific leaves get the sum of
their reweighted rows (a weighted sum for Nash-MTL, GradNorm and IMTL).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from covering import all_but

K, SPE, STEPS = 3, 2, 6
SHARED = {"trunk": True, "heads": False}
AGGREGATORS = {
    "mgda": lambda shared: mtl_optax.mgda(K, shared=shared),
    "pcgrad": lambda shared: mtl_optax.pcgrad(K, key=0, shared=shared),
    "cagrad": lambda shared: mtl_optax.cagrad(K, shared=shared),
    "imtl_g": lambda shared: mtl_optax.imtl_g(K, shared=shared),
    "nash_mtl": lambda shared: mtl_optax.nash_mtl(K, shared=shared),
    "aligned_mtl": lambda shared: mtl_optax.aligned_mtl(K, shared=shared),
    "upgrad": lambda shared: mtl_optax.upgrad(K, shared=shared),
    "graddrop": lambda shared: mtl_optax.graddrop(K, key=0, shared=shared),
    "gradvac": lambda shared: mtl_optax.gradvac(K, key=0, shared=shared),
    "gradnorm": lambda shared: mtl_optax.gradnorm(K, shared=shared),
    "moco": lambda shared: mtl_optax.moco(K, shared=shared),
    "imtl": lambda shared: mtl_optax.imtl(K, shared=shared),
    "db_mtl": lambda shared: mtl_optax.db_mtl(K, log_transform=False, shared=shared),
    "imgrad": lambda shared: mtl_optax.imgrad(K, shared=shared),
    "imgrad_nash": lambda shared: mtl_optax.imgrad_nash(K, shared=shared),
}
# Task-specific leaves get a weighted sum: Nash-MTL's (and IMGrad-Nash's) alpha, GradNorm's w, and IMTL's own
# IMTL-L scalings exp(s_i) (it is a loss balancer chained before IMTL-G).
WEIGHTED_HEADS = {"nash_mtl", "imgrad_nash", "gradnorm", "imtl"}


def igb_v1_scalings(losses: np.ndarray) -> np.ndarray:
  """s_t = lambda_t / L_t of IGBv1 (Dai et al. 2023, Eq. 3) for a sequence of losses (T, K)."""
  base = losses[SPE:2 * SPE].mean(0)
  s = []
  for t, loss in enumerate(losses):
    if t < 2 * SPE:
      lam = np.ones(K)
    else:
      e = np.exp(loss / base - (loss / base).max())
      lam = K * e / e.sum()
    s.append(lam / loss)
  return np.stack(s)


def _sequence():
  rng = np.random.default_rng(0)
  losses = rng.uniform(0.2, 3.0, (STEPS, K)).astype(np.float32)
  jacs = [{"trunk": jnp.asarray(rng.normal(size=(K, 4, 5)) * [[[1.0]], [[10.0]], [[0.1]]],
                                jnp.float32),
           "heads": jnp.asarray(rng.normal(size=(K, 5, 2)), jnp.float32)} for _ in range(STEPS)]
  return losses, jacs


# IMGrad's two forms chain as CAGrad and Nash-MTL do (their solvers compile slowly): -m slow.
@pytest.mark.parametrize("name", all_but(sorted(AGGREGATORS), {"imgrad", "imgrad_nash"}))
def test_igb_v1_then_aggregator_equals_aggregator_on_scaled_rows(name):
  losses, jacs = _sequence()
  scalings = igb_v1_scalings(losses.astype(np.float64))
  params = jax.tree.map(lambda x: x[0], jacs[0])
  fused = optax.chain(mtl_optax.igb_v1(K, SPE), AGGREGATORS[name](SHARED))
  alone = AGGREGATORS[name](SHARED)
  fused_update, alone_update = jax.jit(fused.update), jax.jit(alone.update)
  fused_state, alone_state = fused.init(params), alone.init(params)
  for t in range(STEPS):
    out, fused_state = fused_update(jacs[t], fused_state, params, losses=losses[t])
    scaled = jax.tree.map(lambda g: g * scalings[t].astype(np.float32).reshape(K, 1, 1), jacs[t])
    expected, alone_state = alone_update(scaled, alone_state, params, losses=losses[t])
    np.testing.assert_allclose(out["trunk"], expected["trunk"], rtol=2e-3, atol=1e-5)
    np.testing.assert_allclose(out["heads"], expected["heads"], rtol=2e-3, atol=1e-5)
    if name not in WEIGHTED_HEADS:
      np.testing.assert_allclose(out["heads"], scaled["heads"].sum(0), rtol=1e-4, atol=1e-5)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_igb_v2_nash_mtl_adam_trains_under_jit():
  """optax.chain(igb_v2, nash_mtl, adam): the seed paper's fusion, one jitted step at a time."""
  def task_losses(params, x):
    h = jnp.tanh(x @ params["trunk"])
    return jnp.mean((h @ params["heads"] - jnp.arange(1.0, K + 1.0)) ** 2, axis=0)

  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
  params = {"trunk": 0.3 * jax.random.normal(jax.random.PRNGKey(1), (4, 5)),
            "heads": 0.3 * jax.random.normal(jax.random.PRNGKey(2), (5, K))}
  tx = optax.chain(mtl_optax.igb_v2(K, 2, key=0, train_from_epoch=1, act_from_epoch=2, update_every=2,
                                    buffer_size=16, batch_size=8),
                   mtl_optax.nash_mtl(K, shared=SHARED), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x)
    updates, state = tx.update(jac, state, params, losses=losses)
    return optax.apply_updates(params, updates), state, losses

  first = None
  for _ in range(12):
    params, state, losses = step(params, state)
    first = losses if first is None else first
  assert bool(jnp.all(jnp.isfinite(losses)))
  assert float(losses.sum()) < float(first.sum())
  assert int(state[0].inner.agent.actor_opt[0].count) > 0  # the agent trained inside the step


# The mask is resolved before any method runs: by default one of each kind (Gram-based, with
# weighted heads, row-based, stateful row-based); every method under -m slow.
@pytest.mark.parametrize("name", all_but(sorted(AGGREGATORS), set(AGGREGATORS) - {
    "mgda", "nash_mtl", "graddrop", "moco"}))
def test_prefix_mask_equals_full_mask(name):
  """`shared` may be a prefix of the parameters ({"trunk": True}), as with optax.masked."""
  _, jacs = _sequence()
  nested = {"trunk": {"w": jacs[0]["trunk"], "b": jacs[1]["trunk"][:, 0]},
            "heads": {"w": jacs[0]["heads"], "b": jacs[1]["heads"][:, 0]}}
  params = jax.tree.map(lambda x: x[0], nested)
  full = {"trunk": {"w": True, "b": True}, "heads": {"w": False, "b": False}}
  outs = []
  for mask in (SHARED, full):
    tx = AGGREGATORS[name](mask)
    out, _ = tx.update(nested, tx.init(params), params, losses=jnp.array([1.0, 2.0, 0.5]))
    outs.append(out)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *outs)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_nearly_opposite_rows_stay_finite(name):
  """g0 ~ 0 (the toy problem's valley floor): rounding must not reach a sqrt or log as NaN."""
  rng = np.random.default_rng(1)
  tx = AGGREGATORS[name](SHARED)
  update = jax.jit(tx.update)
  params = {"trunk": jnp.zeros((5, 4)), "heads": jnp.zeros(2)}
  for scale in (1e-6, 1.0, 1e4):
    g, e = rng.normal(size=(2, 5, 4)) * scale
    for rows in ([g, -g, g], [g, -g * (1 + 1e-7), 1e-3 * g],
                 [g + 1e-4 * e, -0.5 * g + 1e-4 * e, -0.5 * g - 1e-4 * e]):
      jac = {"trunk": jnp.asarray(np.stack(rows), jnp.float32),
             "heads": jnp.ones((K, 2), jnp.float32)}
      state = tx.init(params)
      for _ in range(3):
        out, state = update(jac, state, params, losses=jnp.array([1.0, 2.0, 0.5]))
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out)), (scale, out)


@pytest.mark.parametrize("factory", [mtl_optax.cagrad, mtl_optax.imgrad])
def test_toy_valley_floor_jacobian_stays_finite(factory):
  """The Jacobian at which CAGrad once returned NaN on the toy problem (x ~ (0, -8.35))."""
  jac = jnp.array([[-1.399382472038269, 0.00024215318262577057],
                   [1.3992888927459717, 0.00024246424436569214]], jnp.float32)
  tx = factory(2)
  out, _ = tx.update(jac, tx.init(jnp.zeros(2)))
  assert bool(jnp.all(jnp.isfinite(out)))
