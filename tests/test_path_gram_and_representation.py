"""The Gram-only and representation paths against the stacked path and NumPy.

Model: z = tanh(x W) (the encoder, W = params["trunk"]), L_i = mean_b (z_b . h_i - y_bi)^2 + c_i
(head i = params["heads"][i]), so dL_i/dz and the encoder's VJP have closed forms in NumPy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from covering import covering
from mtl_optax.state import weights_product
import tiny_model
from tiny_model import MASK, encode, heads, task_losses

D, H, B = 4, 6, 16


def model(k, seed=0):
  return tiny_model.model(k, seed, d=D, h=H, b=B)



def gram_based(k, shared):
  """Every Gram-based balancer (and a fusion), built for K tasks and a mask."""
  return {
      "sum_tasks": mtl_optax.sum_tasks(),
      "mgda": mtl_optax.mgda(k, shared=shared),
      "mgda_l2": mtl_optax.mgda(k, "loss+", apply_to="normalized", shared=shared),
      "pcgrad": mtl_optax.pcgrad(k, key=0, shared=shared),
      "cagrad": mtl_optax.cagrad(k, shared=shared),
      "imtl_g": mtl_optax.imtl_g(k, shared=shared),
      "imtl": mtl_optax.imtl(k, shared=shared),
      "nash_mtl": mtl_optax.nash_mtl(k, shared=shared),
      "aligned_mtl": mtl_optax.aligned_mtl(k, shared=shared),
      "upgrad": mtl_optax.upgrad(k, shared=shared),
      "gradvac": mtl_optax.gradvac(k, key=0, shared=shared),
      "gradnorm": mtl_optax.gradnorm(k, learning_rate=0.05, shared=shared),
      "imgrad": mtl_optax.imgrad(k, shared=shared),
      "imgrad_nash": mtl_optax.imgrad_nash(k, shared=shared),
      "igb_v1+nash_mtl": optax.chain(mtl_optax.igb_v1(k, 1), mtl_optax.nash_mtl(k, shared=shared)),
  }


def not_gram_based(k):
  return {
      "graddrop": mtl_optax.graddrop(k, key=0),
      "moco": mtl_optax.moco(k),
      "db_mtl": mtl_optax.db_mtl(k),
  }


def used_weights(state):
  """The weights of the last update on the raw rows, kept in the states of a chain (a scalar
  for sum_tasks)."""
  return weights_product(state)


STEPS = 3


@functools.cache
def both_paths(name, k):
  """A jitted run of STEPS steps on the stacked and Gram-only paths, with and without a mask."""
  def run(params, x, y):
    results = []
    for shared in (None, MASK):
      tx = gram_based(k, shared)[name]
      gram_grad = mtl_optax.value_and_reweighted_grad(task_losses, tx, chunk_size=2)

      def step(carry, _):
        p, s_state, g_state = carry
        losses, jac = mtl_optax.value_and_jacrev(task_losses)(p, x, y)
        stacked, s_state = tx.update(jac, s_state, p, losses=losses)
        (_, gram), g_state = gram_grad(p, g_state, x, y)
        p = jax.tree.map(lambda a, b: a - 0.05 * b, p, stacked)
        return (p, s_state, g_state), (stacked, gram, used_weights(s_state),
                                       used_weights(g_state))

      init = (params, tx.init(params), tx.init(params))
      results.append(jax.lax.scan(step, init, None, length=STEPS)[1])
    return results
  return jax.jit(run)


@pytest.mark.parametrize("name,k", covering(list(gram_based(2, None)), [2, 5, 11]))
def test_gram_only_path_equals_stacked_path(name, k):
  for stacked, gram, w_stacked, w_gram in both_paths(name, k)(*model(k, seed=k)):
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(gram)):
      scale = float(jnp.max(jnp.abs(a))) + 1e-6
      np.testing.assert_allclose(b, a, atol=2e-4 * scale, rtol=2e-3)
    if w_stacked is not None:
      scale = float(jnp.max(jnp.abs(w_stacked)))
      np.testing.assert_allclose(w_gram, w_stacked, atol=2e-4 * scale, rtol=2e-3)


def test_gram_only_path_without_jacobian_for_loss_balancers():
  """A loss balancer alone never asks for the Gram matrix: no JVP in the compiled step."""
  params, x, y = model(3)
  tx = mtl_optax.igb_v1(3, 1)
  f = mtl_optax.value_and_reweighted_grad(task_losses, tx)
  cheap = jax.make_jaxpr(f)(params, tx.init(params), x, y)
  tx = mtl_optax.mgda(3)
  g = mtl_optax.value_and_reweighted_grad(task_losses, tx)
  full = jax.make_jaxpr(g)(params, tx.init(params), x, y)
  assert "while" not in str(cheap) and "while" in str(full)


# -- representation path --

def np_representation(params, x, y):
  """z, dL_i/dz (K, B, H) and dL_i/dheads (K, K, H) in closed form."""
  w, h = np.asarray(params["trunk"], np.float64), np.asarray(params["heads"], np.float64)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  z = np.tanh(x @ w)
  resid = z @ h.T - y                                 # (B, K)
  z_rows = 2.0 / B * resid.T[:, :, None] * h[:, None, :]   # (K, B, H)
  head_rows = np.zeros((len(h),) + h.shape)
  for i in range(len(h)):
    head_rows[i, i] = 2.0 / B * resid[:, i] @ z
  return z, z_rows, head_rows


def np_encoder_vjp(params, x, z, dz):
  """d/dW of sum(z * dz) for z = tanh(x W)."""
  return np.asarray(x, np.float64).T @ (dz * (1.0 - z**2))


REP = mtl_optax.value_and_representation_jacrev(encode, heads, shared=MASK)


@pytest.mark.parametrize("name,k", covering(
    [n for n in gram_based(2, None) if n != "sum_tasks"] + list(not_gram_based(2)), [2, 5]))
def test_representation_path_matches_numpy(name, k):
  params, x, y = model(k, seed=10 + k)
  losses, rows, pullback = REP(params, x, y)
  z, z_rows, head_rows = np_representation(params, x, y)
  np.testing.assert_allclose(rows.z, z_rows, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(rows.specific["heads"], head_rows, rtol=1e-4, atol=1e-6)
  assert rows.specific["trunk"] is None

  tx = {**gram_based(k, None), **not_gram_based(k)}[name]
  state = tx.init(mtl_optax.row_like(rows))
  out, new_state = jax.jit(tx.update)(rows, state, losses=losses)
  grad = jax.jit(pullback)(out)
  # The update is the encoder's VJP of the aggregated z-gradient, plus the heads' part.
  np.testing.assert_allclose(grad["trunk"], np_encoder_vjp(params, x, z, np.asarray(out.z)),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad["heads"], out.specific["heads"], rtol=1e-6)
  if name in gram_based(k, None):
    # The weights are the method's weights on the Gram matrix of the z-rows, from NumPy (on
    # the raw rows: a loss balancer chained before it included).
    flat = z_rows.reshape(k, -1)
    expected, _ = mtl_optax.task_weights(tx, state, losses, gram=jnp.asarray(flat @ flat.T))
    np.testing.assert_allclose(out.z, np.einsum("k,k...->...", np.asarray(expected), z_rows),
                               rtol=2e-3, atol=1e-4 * np.abs(out.z).max())
    # The states keep them (a chain's product: the loss balancer's scaling included).
    np.testing.assert_allclose(mtl_optax.effective_weights(new_state), expected, rtol=2e-3,
                               atol=2e-4 * float(jnp.max(jnp.abs(expected))))


# -- jit and vmap over seeds on both paths --

def fusions(k):
  return {
      "igb_v1+nash_mtl": optax.chain(mtl_optax.igb_v1(k, 1), mtl_optax.nash_mtl(k)),
      "igb_v2+nash_mtl": optax.chain(
          mtl_optax.igb_v2(k, 1, key=0, train_from_epoch=1, act_from_epoch=2, update_every=2, buffer_size=16,
                           batch_size=4), mtl_optax.nash_mtl(k)),
  }


VMAP_K, SEEDS, VMAP_STEPS = 3, 3, 2


def vmap_methods():
  gram = {n: tx for n, tx in gram_based(VMAP_K, None).items() if n != "igb_v1+nash_mtl"}
  return {**gram, **not_gram_based(VMAP_K), **fusions(VMAP_K)}


def train(name, path, seed):
  """VMAP_STEPS SGD steps of one method on one path; returns the final parameters."""
  tx = vmap_methods()[name]
  params, x, y = model(VMAP_K)
  noise = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), seed), x.shape)
  x = x + 0.1 * noise
  if path == "gram":
    step_fn = mtl_optax.value_and_reweighted_grad(task_losses, tx, chunk_size=2)
    state = tx.init(params)
  else:
    rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=MASK)
    state = tx.init(mtl_optax.row_like(rep(params, x, y)[1]))

    def step_fn(p, state, x, y):
      losses, rows, pullback = rep(p, x, y)
      out, state = tx.update(rows, state, losses=losses)
      return (losses, pullback(out)), state

  def body(carry, _):
    p, state = carry
    (_, g), state = step_fn(p, state, x, y)
    return (jax.tree.map(lambda a, b: a - 0.05 * b, p, g), state), None

  return jax.lax.scan(body, (params, state), None, length=VMAP_STEPS)[0][0]


@pytest.mark.parametrize("name,path", covering(  # IGBv2's fusion (a SAC agent): -m slow
    [n for n in vmap_methods() if not n.startswith("igb_v2")], ["representation", "gram"])
    + [pytest.param(n, p, marks=pytest.mark.slow) for n in vmap_methods()
       if n.startswith("igb_v2") for p in ("gram", "representation")])
def test_jit_and_vmap_over_seeds(name, path):
  if path == "gram" and name in not_gram_based(VMAP_K):
    with pytest.raises(ValueError, match=f"{name} is not Gram-based"):
      train(name, path, 0)
    return
  run = jax.jit(lambda seed: train(name, path, seed))
  batched = jax.jit(jax.vmap(lambda seed: train(name, path, seed)))(jnp.arange(SEEDS))
  for seed in range(SEEDS):
    single = run(seed)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      assert np.all(np.isfinite(a))
      np.testing.assert_allclose(a[seed], b, rtol=2e-3, atol=1e-4)  # float32 solver tolerance


# -- bad input --

def test_representation_path_bad_outputs():
  params, x, y = model(3)
  with pytest.raises(ValueError, match="task_losses must return a vector of K losses"):
    mtl_optax.value_and_representation_jacrev(
        encode, lambda p, z, x, y: heads(p, z, x, y).sum(), shared=MASK)(params, x, y)
  with pytest.raises(ValueError, match="task_losses must return a vector of K losses"):
    mtl_optax.value_and_representation_jacrev(
        encode, lambda p, z, x, y: (z @ p["heads"].T - y) ** 2, shared=MASK)(params, x, y)
  with pytest.raises(ValueError, match="encode must return a non-empty pytree of float arrays"):
    mtl_optax.value_and_representation_jacrev(
        lambda p, x, y: jnp.argmax(x @ p["trunk"], -1), heads, shared=MASK)(params, x, y)
  _, rows, pullback = REP(params, x, y)
  with pytest.raises(ValueError, match="pullback takes one row"):
    pullback(params)


def test_representation_path_needs_z_shared():
  params, x, y = model(3)
  losses, rows, _ = REP(params, x, y)
  for shared in (MASK, lambda rows: jax.tree.map(lambda _: True, rows),
                 mtl_optax.RepresentationRows(z=False, specific=True)):
    tx = mtl_optax.mgda(3, shared=shared)
    with pytest.raises(ValueError, match="build the balancer with shared=None there"):
      tx.update(rows, tx.init(mtl_optax.row_like(rows)), losses=losses)
  tx = mtl_optax.mgda(3, shared=mtl_optax.RepresentationRows(z=True, specific=False))
  out, _ = tx.update(rows, tx.init(mtl_optax.row_like(rows)), losses=losses)
  np.testing.assert_allclose(out.specific["heads"], rows.specific["heads"].sum(0))


def test_gram_only_path_bad_input():
  params, x, y = model(3)
  for tx in not_gram_based(3).values():
    with pytest.raises(ValueError, match="is not Gram-based"):
      mtl_optax.value_and_reweighted_grad(task_losses, tx)(params, tx.init(params), x, y)
  tx = optax.chain(mtl_optax.mgda(3), optax.adam(1e-3))
  with pytest.raises(ValueError, match="without an optimizer: apply the optimizer to the"):
    mtl_optax.value_and_reweighted_grad(task_losses, tx)(params, tx.init(params), x, y)
  tx = mtl_optax.mgda(4)
  with pytest.raises(ValueError, match="K=3 tasks, expected 4"):
    mtl_optax.value_and_reweighted_grad(task_losses, tx)(params, tx.init(params), x, y)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    mtl_optax.value_and_reweighted_grad(task_losses, tx, chunk_size=0)


def test_weights_are_readable_from_the_state():
  params, x, y = model(3)
  tx = optax.chain(mtl_optax.igb_v1(3, 1), mtl_optax.nash_mtl(3, max_norm=0.0), optax.sgd(0.1))
  losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
  _, state = tx.update(jac, tx.init(params), params, losses=losses)
  s, weights = state[0].weights, state[1].weights  # each balancer's, in chain order
  np.testing.assert_allclose(s, 1.0 / losses, rtol=1e-6)  # lambda = 1 in epoch 1: s = 1 / L
  scaled = jax.tree.map(lambda g: g / losses.reshape((-1,) + (1,) * (g.ndim - 1)), jac)
  g = np.concatenate([np.asarray(l).reshape(3, -1) for l in jax.tree.leaves(scaled)], axis=1)
  # Nash-MTL's fixed point on the rows IGBv1 scaled.
  np.testing.assert_allclose(np.asarray(weights) * (g @ g.T @ np.asarray(weights)), 1.0,
                             rtol=1e-3)
  # On the raw rows the update's weights are their product.
  np.testing.assert_allclose(mtl_optax.effective_weights(state), s * weights, rtol=1e-6)
