"""Each loss balancer against an independent NumPy computation of its card's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax

K = 3
RTOL = 2e-5


def stacked_rows(k=K, seed=0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(k, 4)), jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(k, 2, 3)), jnp.float32)}}


def random_losses(steps, k=K, seed=1):
  return np.random.default_rng(seed).uniform(0.2, 3.0, size=(steps, k)).astype(np.float32)


def softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


def run(tx, losses_seq, extra_seq=None, k=K):
  """Steps `tx`; checks that task_weights and the stacked update agree; returns the s_t."""
  rows = stacked_rows(k)
  state_w = state_u = tx.init(None)
  out = []
  for t, losses in enumerate(losses_seq):
    extra = {} if extra_seq is None else extra_seq[t]
    s, state_w = mtl_optax.task_weights(tx, state_w, jnp.asarray(losses), **extra)
    scaled, state_u = tx.update(rows, state_u, None, losses=jnp.asarray(losses), **extra)
    s = np.asarray(s)
    jax.tree.map(lambda got, row: np.testing.assert_allclose(
        got, s.reshape((-1,) + (1,) * (row.ndim - 1)) * np.asarray(row), rtol=1e-6),
                 scaled.rows, rows)
    np.testing.assert_array_equal(state_u.weights, s)  # the state keeps the weights used
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state_w, state_u)
    out.append(s)
  return np.stack(out)


def numpy_adam(lr, b1=0.9, b2=0.999, eps=1e-8):
  """Adam as in Kingma & Ba 2015, Alg. 1 (bias-corrected moments)."""
  m = v = 0.0
  t = 0

  def step(x, g):
    nonlocal m, v, t
    t += 1
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return step


def test_equal_weights():
  losses = random_losses(4)
  np.testing.assert_array_equal(run(mtl_optax.equal_weights(K), losses), np.ones((4, K)))


def test_log_losses():
  losses = random_losses(4)
  np.testing.assert_allclose(run(mtl_optax.log_losses(K), losses), 1.0 / (losses + 1e-8),
                             rtol=RTOL)
  # eps is added to the loss, and is configurable.
  np.testing.assert_allclose(run(mtl_optax.log_losses(K, eps=0.5), losses), 1.0 / (losses + 0.5),
                             rtol=RTOL)


def test_gls():
  losses = random_losses(4)
  expected = np.stack([np.prod(l) ** (1 / K) / (K * l) for l in losses.astype(np.float64)])
  np.testing.assert_allclose(run(mtl_optax.gls(K), losses), expected, rtol=RTOL)


def test_gls_is_the_gradient_of_the_geometric_mean():
  losses = jnp.asarray(random_losses(1)[0])
  grad = jax.grad(lambda l: jnp.prod(l) ** (1 / K))(losses)
  s, _ = mtl_optax.task_weights(mtl_optax.gls(K), mtl_optax.gls(K).init(None), losses)
  np.testing.assert_allclose(s, grad, rtol=RTOL)


def dwa_reference(losses, spe, temperature):
  out = []
  for t, l in enumerate(losses):
    e = t // spe
    if e < 2:
      out.append(np.ones(len(l)))
      continue
    last = losses[(e - 1) * spe:e * spe].mean(0)
    before = losses[(e - 2) * spe:(e - 1) * spe].mean(0)
    out.append(len(l) * softmax(last / before / temperature))
  return np.stack(out)


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_dwa_over_epochs(temperature):
  spe, steps = 3, 14  # five epochs, the last one partial
  losses = random_losses(steps)
  got = run(mtl_optax.dwa(K, spe, temperature), losses)
  np.testing.assert_allclose(got, dwa_reference(losses.astype(np.float64), spe, temperature),
                             rtol=RTOL)
  # Weights are constant within an epoch, change across epochs, and sum to K.
  np.testing.assert_array_equal(got[6], got[8])
  assert not np.allclose(got[8], got[9])
  np.testing.assert_allclose(got.sum(1), K, rtol=RTOL)


def igb_v1_reference(losses, spe):
  out = []
  for t, l in enumerate(losses):
    lam = np.ones(len(l))
    if t // spe >= 2:
      lam = len(l) * softmax(l / losses[spe:2 * spe].mean(0))
    out.append(lam / l)
  return np.stack(out)


def test_igb_v1_over_epochs():
  spe, steps = 3, 12
  losses = random_losses(steps)
  got = run(mtl_optax.igb_v1(K, spe), losses)
  np.testing.assert_allclose(got, igb_v1_reference(losses.astype(np.float64), spe), rtol=RTOL)
  # Epochs 1-2 are plain log losses; from epoch 3 on they are not.
  np.testing.assert_allclose(got[:6], 1 / losses[:6], rtol=RTOL)
  assert not np.allclose(got[6:], 1 / losses[6:], rtol=1e-3)


def test_igb_v1_base_loss_ignores_epoch_one():
  """Changing epoch 1's losses leaves epoch-3 weights unchanged; changing epoch 2's does not."""
  spe = 2
  losses = random_losses(6)
  base = run(mtl_optax.igb_v1(K, spe), losses)[4:]
  changed1, changed2 = losses.copy(), losses.copy()
  changed1[:2] *= 5.0
  changed2[2:4] *= 5.0
  np.testing.assert_allclose(run(mtl_optax.igb_v1(K, spe), changed1)[4:], base, rtol=RTOL)
  assert not np.allclose(run(mtl_optax.igb_v1(K, spe), changed2)[4:], base, rtol=1e-3)


@pytest.mark.parametrize("name, init, weight, grad", [
    ("uw", -0.5, lambda s: np.exp(-s), lambda s, l: 1 - np.exp(-s) * l),
    ("imtl_l", 0.0, np.exp, lambda s, l: np.exp(s) * l - 1),
])
def test_learned_scales_with_numpy_adam(name, init, weight, grad):
  """UW (Kendall et al. Eq. 7 card form) and IMTL-L (Eq. 3): s takes Adam steps on dJ/ds."""
  lr, steps = 0.1, 8
  losses = random_losses(steps).astype(np.float64)
  adam = numpy_adam(lr)
  s = np.full(K, init)
  expected = []
  for l in losses:
    expected.append(weight(s))
    s = adam(s, grad(s, l))
  got = run(getattr(mtl_optax, name)(K, learning_rate=lr), losses.astype(np.float32))
  np.testing.assert_allclose(got, np.stack(expected), rtol=1e-4)
  assert not np.allclose(got[0], got[-1])


def test_imtl_l_fixed_point_is_log_loss():
  """DB-MTL Prop. 3.1: at the minimizer over s, exp(s_i) = 1/L_i, i.e. log-loss weights."""
  losses = jnp.asarray([0.5, 2.0, 4.0])
  tx = mtl_optax.imtl_l(K, learning_rate=0.05)
  state = tx.init(None)
  step = jax.jit(lambda st: mtl_optax.task_weights(tx, st, losses))
  for _ in range(400):
    s, state = step(state)
  np.testing.assert_allclose(s, 1 / losses, rtol=2e-2)


@pytest.mark.parametrize("scale", [1.0, float(K)])
def test_rlw(scale):
  steps, seed = 5, 7
  losses = random_losses(steps)
  got = run(mtl_optax.rlw(K, scale, key=seed), losses)
  assert np.all(got > 0)
  np.testing.assert_allclose(got.sum(1), scale, rtol=RTOL)
  assert all(not np.allclose(got[t], got[t + 1]) for t in range(steps - 1))
  # Reproducible from the key (an int seed and its PRNGKey agree); another seed differs.
  np.testing.assert_array_equal(
      run(mtl_optax.rlw(K, scale, key=jax.random.PRNGKey(seed)), losses), got)
  assert not np.allclose(run(mtl_optax.rlw(K, scale, key=seed + 1), losses), got)
  # For the z the state's key draws at each step, the weights are scale * softmax(z).
  key = jax.random.PRNGKey(seed)
  for t in range(steps):
    key, sub = jax.random.split(key)
    z = np.asarray(jax.random.normal(sub, (K,)), np.float64)
    np.testing.assert_allclose(got[t], scale * softmax(z), rtol=RTOL)


def test_rlw_weights_are_not_biased():
  """Over many draws each task's weight averages scale / K (softmax of i.i.d. normals)."""
  tx = mtl_optax.rlw(K, key=0)
  losses = jnp.ones(K)
  def body(state, _):
    s, state = mtl_optax.task_weights(tx, state, losses)
    return state, s
  _, s = jax.lax.scan(body, tx.init(None), None, length=3000)
  np.testing.assert_allclose(np.mean(s, 0), 1 / K, atol=0.02)


def famo_reference(losses, after, lr, gamma, min_losses):
  """Alg. 1 of Liu et al. 2023 with the reference's torch Adam (L2 weight decay)."""
  adam = numpy_adam(lr)
  w = np.zeros(losses.shape[1])
  out = []
  for t, l in enumerate(losses):
    z = softmax(w)
    d = l - min_losses + 1e-8
    out.append((z / d) / np.sum(z / d))
    delta = np.log(d) - np.log(after[t] - min_losses + 1e-8)
    jac = np.diag(z) - np.outer(z, z)  # d softmax(w) / dw
    w = adam(w, jac.T @ delta + gamma * w)
  return np.stack(out)


@pytest.mark.parametrize("min_losses", [None, [0.1, 0.0, 0.15]])
def test_famo_with_post_step_losses(min_losses):
  steps, lr, gamma = 10, 0.1, 0.01
  losses = random_losses(steps).astype(np.float64)
  after = losses * np.random.default_rng(3).uniform(0.5, 1.1, size=losses.shape)
  floor = np.zeros(K) if min_losses is None else np.asarray(min_losses)
  expected = famo_reference(losses, after, lr, gamma, floor)
  # The post-step losses of step t are passed at step t + 1.
  extra = [{}] + [{"post_step_losses": jnp.asarray(a, jnp.float32)} for a in after[:-1]]
  tx = mtl_optax.famo(K, learning_rate=lr, weight_decay=gamma, min_losses=min_losses)
  got = run(tx, losses.astype(np.float32), extra)
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=RTOL)
  assert not np.allclose(got[-1], got[0] * losses[0] / losses[-1], rtol=1e-3)  # logits moved


def test_famo_without_post_step_losses_uses_current_losses():
  steps, lr, gamma = 8, 0.1, 1e-3
  losses = random_losses(steps).astype(np.float64)
  expected = famo_reference(losses, np.concatenate([losses[1:], losses[-1:]]), lr, gamma,
                            np.zeros(K))
  got = run(mtl_optax.famo(K, learning_rate=lr, weight_decay=gamma), losses.astype(np.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_famo_first_step_is_log_loss_weights_normalized():
  losses = jnp.asarray([0.5, 1.0, 4.0])
  s, state = mtl_optax.task_weights(mtl_optax.famo(K), mtl_optax.famo(K).init(None), losses)
  np.testing.assert_allclose(s, (1 / losses) / np.sum(1 / losses), rtol=RTOL)
  np.testing.assert_array_equal(state.inner.logits, np.zeros(K))
  assert int(state.inner.opt_state[1][0].count) == 0  # no Adam step on the first call


def test_famo_defaults():
  state = mtl_optax.famo(K).init(None)
  np.testing.assert_array_equal(state.inner.logits, np.zeros(K))
  # Default hyperparameters (lr 0.025, gamma 1e-3) against the reference formulas.
  losses = random_losses(4).astype(np.float64)
  after = losses * np.random.default_rng(4).uniform(0.5, 1.1, size=losses.shape)
  extra = [{}] + [{"post_step_losses": jnp.asarray(a, jnp.float32)} for a in after[:-1]]
  np.testing.assert_allclose(run(mtl_optax.famo(K), losses.astype(np.float32), extra),
                             famo_reference(losses, after, 0.025, 1e-3, np.zeros(K)), rtol=1e-4)


ALL = {
    "equal_weights": lambda k: mtl_optax.equal_weights(k),
    "log_losses": lambda k: mtl_optax.log_losses(k),
    "gls": lambda k: mtl_optax.gls(k),
    "rlw": lambda k: mtl_optax.rlw(k, key=0),
    "dwa": lambda k: mtl_optax.dwa(k, 1),
    "uw": lambda k: mtl_optax.uw(k),
    "imtl_l": lambda k: mtl_optax.imtl_l(k),
    "igb_v1": lambda k: mtl_optax.igb_v1(k, 1),
    "famo": lambda k: mtl_optax.famo(k),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_degenerate_inputs_stay_finite(name):
  """K = 1, identical tasks, zero gradients, and tiny or zero losses under jit: finite."""
  for k, losses in [(1, [0.7]), (K, [1.0, 1.0, 1.0]), (K, [1e-30, 0.0, 2.0])]:
    tx = ALL[name](k)
    rows = jax.tree.map(jnp.zeros_like, stacked_rows(k))

    @jax.jit
    def step(state, losses):
      s, _ = mtl_optax.task_weights(tx, state, losses)
      out, state = tx.update(rows, state, None, losses=losses)
      return out, state, s

    state = tx.init(None)
    for _ in range(4):  # crosses DWA's and IGBv1's epoch boundaries (steps_per_epoch = 1)
      out, state, s = step(state, jnp.asarray(losses, jnp.float32))
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((out, state, s))), (k, losses)
      jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), out.rows)
    if k == 1 and name not in ("uw", "imtl_l", "log_losses", "igb_v1"):
      np.testing.assert_allclose(s, 1.0, rtol=RTOL)
