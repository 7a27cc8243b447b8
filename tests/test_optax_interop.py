"""Balancers inside optax's own wrappers: inject_hyperparams, MultiSteps, apply_if_finite,
masked; parameter dtypes (bfloat16 kept, float64 under x64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

K, N = 3, 6


def problem(dtype=jnp.float32):
  """Params {'w': (N,), 'head': (K,)} and losses L_i = (x_i . w + head_i - y_i)^2 + 0.1."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(K, N)), dtype)
  y = jnp.asarray(rng.normal(size=(K,)), dtype)
  params = {"w": jnp.asarray(rng.normal(size=(N,)), dtype), "head": jnp.zeros((K,), dtype)}

  def losses(p, scale=1.0):
    return scale * ((x @ p["w"] + p["head"] - y) ** 2 + 0.1)
  return params, losses


SHARED = {"w": True, "head": False}


def test_inject_hyperparams_changes_cagrad_c_and_nash_max_norm():
  params, loss_fn = problem()
  losses, jac = mtl_optax.value_and_jacrev(loss_fn)(params)
  # Integer and boolean arguments are static (optax would turn every number into an array).
  cases = ((mtl_optax.cagrad, "c", (0.1, 0.9), ("num_tasks", "max_iter", "scale_by_num_tasks")),
           (mtl_optax.nash_mtl, "max_norm", (0.05, 10.0),
            ("num_tasks", "update_weights_every", "optim_niter")))
  for factory, name, values, static in cases:
    tx = optax.inject_hyperparams(factory, static_args=static)(K, **{name: values[0]})
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, _ = update(jac, state, losses=losses)
    state.hyperparams[name] = jnp.asarray(values[1])
    second, _ = update(jac, state, losses=losses)
    direct = [jax.jit(factory(K, **{name: v}).update)(jac, factory(K).init(params),
                                                      losses=losses)[0] for v in values]
    for got, want in zip((first, second), direct):
      np.testing.assert_allclose(got["w"], want["w"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(first["w"], second["w"])


def test_multi_steps_after_a_balancer_accumulates_balanced_gradients():
  """optax.MultiSteps accumulates updates shaped like the parameters, so it goes after the
  balancer: the balancer sees every mini-step's own Jacobian and losses (and updates its
  state each time), the optimizer the mean of the balanced gradients every k steps."""
  params, loss_fn = problem()
  grad_fn = mtl_optax.value_and_jacrev(loss_fn)
  accumulate = optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2).gradient_transformation()
  tx = optax.chain(mtl_optax.nash_mtl(K, shared=SHARED), accumulate)
  alone = mtl_optax.nash_mtl(K, shared=SHARED)
  state, alone_state = tx.init(params), alone.init(params)
  balanced = []
  for scale in (1.0, 3.0):
    losses, jac = grad_fn(params, scale)
    updates, state = tx.update(jac, state, params, losses=losses)
    d, alone_state = alone.update(jac, alone_state, losses=losses)
    balanced.append(d)
  np.testing.assert_allclose(updates["w"], -0.1 * (balanced[0]["w"] + balanced[1]["w"]) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(state[0].weights, alone_state.weights, rtol=1e-6)


@pytest.mark.parametrize("name", ["nash_mtl", "db_mtl"])
def test_apply_if_finite_skips_a_nan_step_and_keeps_the_balancer_state(name):
  params, loss_fn = problem()
  grad_fn = mtl_optax.value_and_jacrev(loss_fn)
  balancer = mtl_optax.registry.build(name, K, shared=SHARED)
  tx = mtl_optax.apply_if_finite(optax.chain(balancer, optax.adam(1e-2)), 3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  losses, jac = grad_fn(params)
  _, state = update(jac, state, params, losses=losses)
  nan_jac = jax.tree.map(lambda j: j.at[0].set(jnp.nan), jac)
  skipped, after = update(nan_jac, state, params, losses=losses.at[0].set(jnp.nan))
  assert not after.last_finite and int(after.total_notfinite) == 1
  assert all(not np.any(s) for s in jax.tree.leaves(skipped))
  assert jax.tree.structure(skipped) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, after.inner_state, state.inner_state)
  # Only a NaN loss (finite rows, e.g. a NaN in a logged term): skipped as well.
  _, after = update(jac, state, params, losses=losses.at[1].set(jnp.nan))
  assert not after.last_finite


def test_optax_apply_if_finite_wraps_the_optimizer_after_a_balancer():
  """optax's own wrapper returns zeros shaped like its input, so it wraps the optimizer after
  the balancer; a loss balancer alone (its output is StackedRows) takes ours."""
  params, loss_fn = problem()
  losses, jac = mtl_optax.value_and_jacrev(loss_fn)(params)
  tx = optax.chain(mtl_optax.mgda(K, shared=SHARED), optax.apply_if_finite(optax.adam(1e-2), 2))
  updates, _ = tx.update(jac, tx.init(params), params, losses=losses)
  assert updates["w"].shape == (N,)
  reweighted = mtl_optax.apply_if_finite(mtl_optax.uw(K), 2)
  out, state = reweighted.update(jac, reweighted.init(params), losses=losses)
  assert out.rows["w"].shape == (K, N) and bool(state.last_finite)


def test_masked_transformations_after_a_balancer():
  """optax.masked after a gradient balancer (weight decay on the shared leaves only); around a
  loss balancer it meets the StackedRows it returns and says what to do (loss balancers scale
  whole rows; the gradient balancer's shared= mask decides which leaves are balanced)."""
  params, loss_fn = problem()
  losses, jac = mtl_optax.value_and_jacrev(loss_fn)(params)
  tx = optax.chain(mtl_optax.gls(K), mtl_optax.sum_tasks(),
                   optax.masked(optax.add_decayed_weights(0.5), SHARED))
  out, _ = tx.update(jac, tx.init(params), params, losses=losses)
  gls = jnp.prod(losses) ** (1 / K) / (K * losses)
  np.testing.assert_allclose(out["w"], gls @ jac["w"] + 0.5 * params["w"], rtol=1e-5)
  np.testing.assert_allclose(out["head"], gls @ jac["head"], rtol=1e-6)
  tx = optax.chain(optax.masked(mtl_optax.gls(K), SHARED), mtl_optax.sum_tasks())
  with pytest.raises(ValueError, match="StackedRows"):
    tx.update(jac, tx.init(params), losses=losses)
  decay = optax.chain(mtl_optax.mgda(K, shared=SHARED),
                      optax.masked(optax.add_decayed_weights(0.5), SHARED))
  base = mtl_optax.mgda(K, shared=SHARED)
  want, _ = base.update(jac, base.init(params), losses=losses)
  got, _ = decay.update(jac, decay.init(params), params, losses=losses)
  np.testing.assert_allclose(got["w"], want["w"] + 0.5 * params["w"], rtol=1e-5)
  np.testing.assert_allclose(got["head"], want["head"], rtol=1e-6)


@pytest.mark.parametrize("name", mtl_optax.registry.names())
def test_bfloat16_parameters_keep_their_dtype(name):
  params, loss_fn = problem(jnp.bfloat16)
  balancer = mtl_optax.registry.build(name, K, steps_per_epoch=1, shared=SHARED)
  tx = optax.chain(balancer, mtl_optax.sum_tasks()) if mtl_optax.registry.METHODS[
      name].kind == "loss" else balancer
  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(mtl_optax.value_and_jacrev(loss_fn)(params)[1], s,
                                     params, losses=loss_fn(params)))
  for _ in range(2):  # the state keeps its dtypes, so the second step reuses the first
    out, new_state = step(state)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), new_state, state)
    state = new_state
  assert all(o.dtype == jnp.bfloat16 for o in jax.tree.leaves(out))
  assert all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in jax.tree.leaves(out))


def test_float64_under_x64_is_not_truncated():
  """With jax_enable_x64, float64 rows give float64 Gram matrices, weights and updates,
  accurate far below float32's resolution (MGDA's two-task closed form)."""
  with jax.enable_x64(True):
    g = np.array([[1.0, 1e-9, 0.0], [0.3, 1.0, 1e-9]])
    params = {"w": jnp.zeros(3, jnp.float64)}
    tx = mtl_optax.mgda(2)
    out, state = tx.update({"w": jnp.asarray(g)}, tx.init(params),
                           losses=jnp.ones(2, jnp.float64))
    a = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[1] - g[0]) ** 2), 0, 1)
    want = a * g[0] + (1 - a) * g[1]
    assert out["w"].dtype == jnp.float64 and state.weights.dtype == jnp.float64
    np.testing.assert_allclose(out["w"], want, rtol=1e-12, atol=1e-15)
    nash = mtl_optax.nash_mtl(2, max_norm=0.0)
    out, state = nash.update({"w": jnp.asarray(g)}, nash.init(params))
    m = g @ g.T
    alpha = np.asarray(state.weights)
    assert state.weights.dtype == jnp.float64
    np.testing.assert_allclose(alpha * (m @ alpha), 1.0, rtol=1e-9)
