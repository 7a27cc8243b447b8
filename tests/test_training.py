"""Whole training steps: jit, vmap over seeds, and composition with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax

K = 3


def init_params(key):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (4, 5)) / 2, "b": jnp.zeros((5,)),
          "heads": jax.random.normal(k2, (5, K)) / 2}


def batch(step):
  rng = np.random.default_rng(step)
  return (jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
          jnp.asarray(rng.normal(size=(8, K)) * [1.0, 3.0, 0.3], jnp.float32))


def batch_at(t):
  """A batch from a traced step index (for scan)."""
  x = jax.random.normal(jax.random.PRNGKey(t), (8, 4))
  return x, jnp.stack([jnp.sin(x[:, 0]), 3.0 * x[:, 1], 0.3 * x[:, 2] * x[:, 3]], axis=1)


def task_losses(params, data):
  x, y = data
  h = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.mean((h @ params["heads"] - y) ** 2, axis=0) + 0.05


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def make_step(tx):
  def step(params, opt_state, data):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, data)
    updates, opt_state = tx.update(jac, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses
  return step


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_jit_of_whole_step_equals_eager():
  tx = optax.chain(mtl_optax.igb_v1(K, 1), mtl_optax.sum_tasks(), optax.adam(1e-2))
  step = make_step(tx)
  jitted = jax.jit(step)
  params = init_params(jax.random.PRNGKey(0))
  eager = (params, tx.init(params))
  compiled = (params, tx.init(params))
  for t in range(4):  # IGBv1's weighting starts at step 2
    *eager, eager_losses = step(*eager, batch(t))
    *compiled, losses = jitted(*compiled, batch(t))
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-5)
  assert_trees_close(compiled, eager)


def test_vmap_over_seeds_equals_separate_runs():
  """Seeds give different initial parameters and RLW keys; vmap equals four separate runs."""
  def make_tx(key):
    return optax.chain(mtl_optax.igb_v1(K, 2), mtl_optax.rlw(K, key=key),
                       mtl_optax.sum_tasks(), optax.adam(1e-2))

  def init(seed):
    key_params, key_rlw = jax.random.split(jax.random.PRNGKey(seed))
    params = init_params(key_params)
    return params, make_tx(key_rlw).init(params)

  step = jax.jit(make_step(make_tx(0)))  # update uses the key in the state, not the factory's
  seeds = jnp.arange(4)
  vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None)))
  batched = jax.vmap(init)(seeds)
  for t in range(5):
    *batched, batched_losses = vstep(*batched, batch(t))
  for i, seed in enumerate(seeds.tolist()):
    single = init(seed)
    for t in range(5):
      *single, losses = step(*single, batch(t))
    assert_trees_close(jax.tree.map(lambda x: x[i], batched), single)
    np.testing.assert_allclose(batched_losses[i], losses, rtol=1e-5)
  assert not np.allclose(batched[0]["heads"][0], batched[0]["heads"][1])


def test_famo_training_loop_jit_and_vmap():
  """FAMO on the single-backward path, the previous batch re-evaluated after each step."""
  famo, adam = mtl_optax.famo(K, learning_rate=0.1), optax.adam(1e-2)
  grad_fn = mtl_optax.value_and_reweighted_grad(task_losses, famo)

  def step(carry, t):
    params, famo_state, adam_state, prev = carry
    data = batch_at(t)
    post = task_losses(params, prev)  # the previous batch at the current parameters
    (losses, grad), famo_state = grad_fn(params, famo_state, data, post_step_losses=post)
    updates, adam_state = adam.update(grad, adam_state, params)
    return (optax.apply_updates(params, updates), famo_state, adam_state, data), losses

  def run(seed):
    params = init_params(jax.random.PRNGKey(seed))
    carry = (params, famo.init(params), adam.init(params), batch_at(0))
    (_, famo_state, _, _), losses = jax.lax.scan(step, carry, jnp.arange(1, 21))
    return famo_state.inner.logits, losses

  logits, losses = jax.jit(jax.vmap(run))(jnp.arange(2))
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(losses))
  assert not np.allclose(logits, 0.0)
  single_logits, single_losses = jax.jit(run)(1)
  np.testing.assert_allclose(logits[1], single_logits, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses[1], single_losses, rtol=1e-4)


def rows_and_losses(steps, seed=0):
  rng = np.random.default_rng(seed)
  rows = {"a": jnp.asarray(rng.normal(size=(K, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(K, 2, 3)), jnp.float32)}
  return rows, rng.uniform(0.2, 3.0, size=(steps, K)).astype(np.float32)


def weighted_sum(s, rows):
  """NumPy sum_i s_i row_i, per leaf."""
  return jax.tree.map(lambda r: np.tensordot(s, np.asarray(r, np.float64), axes=1), rows)


def test_chain_with_sgd_and_schedule():
  schedule = optax.linear_schedule(0.1, 0.01, transition_steps=4)
  tx = optax.chain(mtl_optax.log_losses(K), mtl_optax.sum_tasks(), optax.sgd(schedule))
  rows, losses = rows_and_losses(5)
  state = tx.init(None)
  for t, l in enumerate(losses):
    updates, state = tx.update(rows, state, None, losses=jnp.asarray(l))
    lr = 0.1 + (0.01 - 0.1) * min(t, 4) / 4
    expected = jax.tree.map(lambda g: -lr * g, weighted_sum(1.0 / l.astype(np.float64), rows))
    assert_trees_close(updates, expected)


def numpy_adam_steps(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Adam updates (Kingma & Ba 2015, Alg. 1) for a list of gradients; lr a function of t."""
  m = v = 0.0
  out = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    out.append(-lr(t - 1) * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
  return out


def test_chain_with_adam_and_schedule():
  schedule = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.5)
  tx = optax.chain(mtl_optax.gls(K), mtl_optax.sum_tasks(), optax.adam(schedule))
  rows, losses = rows_and_losses(4)
  state = tx.init(jax.tree.map(lambda r: r[0], rows))
  got = []
  for l in losses:
    updates, state = tx.update(rows, state, None, losses=jnp.asarray(l))
    got.append(updates["a"])
  l64 = losses.astype(np.float64)
  grads = [weighted_sum(np.prod(l) ** (1 / K) / (K * l), rows)["a"] for l in l64]
  expected = numpy_adam_steps(grads, lambda t: 0.05 * 0.5**t)
  np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-4, atol=1e-7)


def test_losses_flow_through_chain_to_every_reweighter():
  """DWA then SI then FAMO in one chain: rows scaled by the product of the three weights."""
  lr = 0.1
  tx = optax.chain(mtl_optax.dwa(K, 1), mtl_optax.log_losses(K, eps=0.0),
                   mtl_optax.famo(K, learning_rate=lr, weight_decay=0.0),
                   mtl_optax.sum_tasks(), optax.sgd(1.0))
  rows, losses = rows_and_losses(5, seed=1)
  after = losses * np.random.default_rng(2).uniform(0.5, 1.0, size=losses.shape)
  l64, a64 = losses.astype(np.float64), after.astype(np.float64)
  state = tx.init(None)
  logits, famo_grads = np.zeros(K), []
  for t, l in enumerate(l64):
    extra = {} if t == 0 else {"post_step_losses": jnp.asarray(after[t - 1])}
    updates, state = tx.update(rows, state, None, losses=jnp.asarray(losses[t]), **extra)
    dwa_w = np.ones(K) if t < 2 else K * softmax(l64[t - 1] / l64[t - 2] / 2.0)
    if t > 0:  # FAMO's logit step for the previous call (Adam without weight decay)
      z = softmax(logits)
      delta = np.log(l64[t - 1] + 1e-8) - np.log(a64[t - 1] + 1e-8)
      famo_grads.append(z * (delta - z @ delta))
      logits = logits + numpy_adam_steps(famo_grads, lambda _: lr)[-1]
    z = softmax(logits)
    famo_w = (z / (l + 1e-8)) / np.sum(z / (l + 1e-8))
    expected = jax.tree.map(lambda g: -g, weighted_sum(dwa_w / l * famo_w, rows))
    assert_trees_close(updates, expected, rtol=1e-4, atol=1e-6)


def test_uw_with_learning_rate_schedule():
  schedule = optax.linear_schedule(0.2, 0.0, transition_steps=3)
  tx = mtl_optax.uw(K, learning_rate=schedule)
  _, losses = rows_and_losses(5, seed=3)
  state = tx.init(None)
  s, grads, expected = np.full(K, -0.5), [], []
  for l in losses.astype(np.float64):
    expected.append(np.exp(-s))
    grads.append(1 - np.exp(-s) * l)
    s = s + numpy_adam_steps(grads, lambda t: 0.2 * max(0.0, 1 - t / 3))[-1]
  got = []
  for l in losses:
    w, state = mtl_optax.task_weights(tx, state, jnp.asarray(l))
    got.append(w)
  np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-4)
  np.testing.assert_allclose(got[-1], got[-2], rtol=1e-6)  # the schedule reached 0
