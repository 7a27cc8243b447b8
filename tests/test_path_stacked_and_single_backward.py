"""The stacked Jacobian, and the single-backward path against the stacked path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

K = 3


def init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"body": {"w": jnp.asarray(rng.normal(size=(4, 5)) / 2, jnp.float32),
                   "b": jnp.zeros((5,), jnp.float32)},
          "heads": jnp.asarray(rng.normal(size=(5, K)) / 2, jnp.float32)}


def batch(seed):
  rng = np.random.default_rng(100 + seed)
  return (jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
          jnp.asarray(rng.normal(size=(8, K)), jnp.float32))


def task_losses(params, data):
  x, y = data
  h = jnp.tanh(x @ params["body"]["w"] + params["body"]["b"])
  return jnp.mean((h @ params["heads"] - y) ** 2, axis=0) + 0.1


def task_losses_aux(params, data):
  return task_losses(params, data), {"norm": jnp.sum(params["heads"] ** 2)}


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_value_and_jacrev_equals_jacrev():
  params, data = init_params(), batch(0)
  losses, jac = jax.jit(mtl_optax.value_and_jacrev(task_losses))(params, data)
  np.testing.assert_allclose(losses, task_losses(params, data), rtol=1e-6)
  assert_trees_close(jac, jax.jacrev(task_losses)(params, data))
  assert jac["body"]["w"].shape == (K, 4, 5)


def test_value_and_jacrev_with_aux():
  params, data = init_params(), batch(1)
  (losses, aux), jac = mtl_optax.value_and_jacrev(task_losses_aux, has_aux=True)(params, data)
  ref_jac, ref_aux = jax.jacrev(task_losses_aux, has_aux=True)(params, data)
  assert_trees_close(jac, ref_jac)
  np.testing.assert_allclose(aux["norm"], ref_aux["norm"], rtol=1e-6)
  np.testing.assert_allclose(losses, task_losses(params, data), rtol=1e-6)


def test_value_and_jacrev_kwargs_and_rejects_non_vectors():
  fun = lambda p, scale=1.0: scale * jnp.stack([jnp.sum(p ** 2), jnp.sum(p)])
  losses, jac = mtl_optax.value_and_jacrev(fun)(jnp.asarray([1.0, 2.0]), scale=3.0)
  np.testing.assert_allclose(losses, [15.0, 9.0])
  np.testing.assert_allclose(jac, [[6.0, 12.0], [3.0, 3.0]])
  with pytest.raises(ValueError, match=r"vector of K losses, got shape \(\)"):
    mtl_optax.value_and_jacrev(jnp.sum)(jnp.ones(2))
  with pytest.raises(ValueError, match=r"vector of K losses, got shape \(2, 2\)"):
    mtl_optax.value_and_reweighted_grad(lambda p: jnp.outer(p, p), mtl_optax.gls(2))(
        jnp.ones(2), mtl_optax.gls(2).init(None))


REWEIGHTERS = {
    "equal_weights": lambda: mtl_optax.equal_weights(K),
    "log_losses": lambda: mtl_optax.log_losses(K),
    "gls": lambda: mtl_optax.gls(K),
    "rlw": lambda: mtl_optax.rlw(K, key=3),
    "dwa": lambda: mtl_optax.dwa(K, 2),
    "uw": lambda: mtl_optax.uw(K, learning_rate=0.05),
    "imtl_l": lambda: mtl_optax.imtl_l(K, learning_rate=0.05),
    "igb_v1": lambda: mtl_optax.igb_v1(K, 2),
    "famo": lambda: mtl_optax.famo(K, learning_rate=0.1),
}


@pytest.mark.parametrize("name", sorted(REWEIGHTERS))
def test_single_backward_equals_stacked_path(name):
  """d/dtheta sum_i sg(s_i) L_i equals sum_tasks of the reweighted Jacobian, state included."""
  tx = REWEIGHTERS[name]()
  stacked_tx = optax.chain(tx, mtl_optax.sum_tasks())
  single = jax.jit(mtl_optax.value_and_reweighted_grad(task_losses_aux, tx, has_aux=True))
  jac_fn = jax.jit(mtl_optax.value_and_jacrev(task_losses))
  stacked_update = jax.jit(lambda j, s, p, extra: stacked_tx.update(j, s, p, **extra))
  params = init_params()
  state_single, state_stacked = tx.init(params), stacked_tx.init(params)
  extra = {}
  for t in range(7):  # crosses the epoch boundaries of DWA and IGBv1 (steps_per_epoch = 2)
    data = batch(t)
    state_before_last, last_extra = state_single, extra
    ((losses, aux), grad), state_single = single(params, state_single, data, **extra)
    last_losses = losses
    ref_losses, jac = jac_fn(params, data)
    ref_grad, state_stacked = stacked_update(jac, state_stacked, params,
                                             dict(extra, losses=ref_losses))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    np.testing.assert_allclose(aux["norm"], np.sum(np.asarray(params["heads"]) ** 2), rtol=1e-5)
    assert_trees_close(grad, ref_grad)
    assert_trees_close(state_single, state_stacked[0], rtol=1e-5, atol=1e-7)
    params = jax.tree.map(lambda p, g: p - 0.2 * g, params, grad)
    if name == "famo":  # the previous batch's losses after the parameter step
      extra = {"post_step_losses": task_losses(params, data)}
  # Every piece of the method's state (step counts, sums, keys, logits, Adam moments) has
  # moved, and the state keeps the weights of the last step.
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state_single.inner),
                                                       jax.tree.leaves(tx.init(params).inner))
             if a.dtype != bool)  # which tasks were present: all, at every step
  s, _ = mtl_optax.task_weights(tx, state_before_last, last_losses, **last_extra)
  np.testing.assert_allclose(state_single.weights, s, rtol=1e-6)


def test_single_backward_gradient_is_weighted_sum_of_jacobian_rows():
  """Independent of the balancer: grad = J^T s with s from task_weights, for s = 1 / L."""
  params, data = init_params(), batch(5)
  (losses, grad), _ = mtl_optax.value_and_reweighted_grad(task_losses, mtl_optax.log_losses(K))(
      params, mtl_optax.log_losses(K).init(params), data)
  jac = jax.jacrev(task_losses)(params, data)
  s = 1.0 / (np.asarray(task_losses(params, data), np.float64) + 1e-8)
  expected = jax.tree.map(lambda j: np.tensordot(s, np.asarray(j, np.float64), axes=1), jac)
  assert_trees_close(grad, expected)


def test_task_weights_are_constants():
  """s is stop-gradient'ed: differentiating through task_weights sees no dependence on L."""
  def through(losses):
    s, _ = mtl_optax.task_weights(mtl_optax.log_losses(K), mtl_optax.log_losses(K).init(None), losses)
    return jnp.sum(s * losses)
  losses = jnp.asarray([0.5, 2.0, 4.0])
  np.testing.assert_allclose(jax.grad(through)(losses), 1.0 / losses, rtol=1e-6)
