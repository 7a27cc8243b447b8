"""Row-based gradient balancers (GradDrop, MoCo, DB-MTL) against independent NumPy loops, and
properties every closed-form or row-based balancer must have (zero rows, K = 1, masks,
permutations, vmap, errors). Everything runs under jax.jit (see grad_harness.make)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from grad_harness import (KINDS, SHAPES, assert_close, jacobian, make, params_like, run,
                          step_keys, to_tree, to_vec)

LOSS_RNG = np.random.default_rng(11)


def random_losses(steps, k):
  return LOSS_RNG.uniform(0.2, 3.0, size=(steps, k))


# -- GradDrop --

@functools.cache
def graddrop_draws(seed):
  """The uniforms GradDrop's first step draws from `seed`: one subkey per leaf, leaves in the
  stacked tree's flattening order (sorted names), returned in the order of SHAPES."""
  names = sorted(SHAPES)
  keys = jax.random.split(step_keys(seed, 1)[0], len(names))
  uniforms = {name: np.asarray(jax.random.uniform(key, SHAPES[name], jnp.float32), np.float64)
              for name, key in zip(names, keys)}
  return np.concatenate([uniforms[name].ravel() for name in SHAPES])


def graddrop_ref(rows, seed, leak):
  """Chen et al. 2020, Alg. 1 per entry, with the same uniforms as the balancer."""
  u = graddrop_draws(seed)
  purity = 0.5 * (1 + rows.sum(0) / (np.abs(rows).sum(0) + 1e-7))
  keep = ((purity > u) & (rows > 0)) | ((purity < u) & (rows < 0))
  leak = np.broadcast_to(leak, rows.shape[:1])[:, None]
  return ((leak + (1 - leak) * keep) * rows).sum(0)


@pytest.mark.parametrize("k", (2, 3, 7))
def test_graddrop_matches_numpy_with_the_same_draws(k):
  for kind in KINDS:
    rows = jacobian(k, kind)
    for leak in (0.0, tuple(np.linspace(0.0, 0.9, k))):
      out = run(make("graddrop", k, key=0, leak=leak), [rows], key=5)[0]
      assert_close(out, graddrop_ref(rows, 5, np.asarray(leak)), rows, rtol=1e-5)


@pytest.mark.parametrize("key", range(3))
def test_graddrop_keeps_one_sign_per_entry(key):
  """For every draw, each entry is the sum of the positive or of the negative parts."""
  rows = jacobian(3, "random", key)
  out = run(make("graddrop", 3, key=0), [rows], key=key)[0]
  pos, neg = np.where(rows > 0, rows, 0).sum(0), np.where(rows < 0, rows, 0).sum(0)
  ok = np.isclose(out, pos, rtol=1e-6, atol=1e-6) | np.isclose(out, neg, rtol=1e-6, atol=1e-6)
  assert ok.all()


def test_graddrop_full_leak_is_the_sum():
  rows = jacobian(3, "random")
  assert_close(run(make("graddrop", 3, key=0, leak=1.0), [rows])[0], rows.sum(0), rows, rtol=1e-6)


# -- MoCo --

def project_simplex(v):
  """Euclidean projection onto the simplex by sorting (Held et al. 1974; Duchi et al. 2008)."""
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  idx = np.arange(1, len(v) + 1)
  r = idx[u - (css - 1) / idx > 0][-1]
  return np.maximum(v - (css[r - 1] - 1) / r, 0)


def softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


def moco_ref(rows_seq, losses_seq, beta, beta_sigma, gamma, gamma_sigma, rho, normalize,
             simplex):
  """Fernando et al. 2023, Alg. 1 in LibMTL's form, over several steps."""
  k = rows_seq[0].shape[0]
  y, lam, outs = np.zeros_like(rows_seq[0]), np.full(k, 1 / k), []
  for step, (rows, losses) in enumerate(zip(rows_seq, losses_seq), start=1):
    if normalize:
      rows = rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-8) * losses[:, None]
    y = y - beta / step**beta_sigma * (y - rows)
    lam = lam - gamma / step**gamma_sigma * (y @ y.T + rho * np.eye(k)) @ lam
    lam = softmax(lam) if simplex == "softmax" else project_simplex(lam)
    outs.append(lam @ y)
  return outs


MOCO_CONFIGS = [
    dict(),
    dict(beta=0.3, beta_sigma=0.0, gamma=2.0, gamma_sigma=0.2, rho=0.1, normalize=False,
         simplex="projection"),
]


@pytest.mark.parametrize("k", (2, 3, 7))
@pytest.mark.parametrize("config", range(len(MOCO_CONFIGS)))
def test_moco_matches_numpy_over_steps(k, config):
  kwargs = MOCO_CONFIGS[config]
  full = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0, normalize=True,
              simplex="softmax") | kwargs
  for kind in KINDS:
    seqs = [jacobian(k, kind, seed) for seed in range(4)]
    losses = random_losses(4, k)
    outs = run(make("moco", k, **kwargs), seqs, losses)
    for out, ref, rows in zip(outs, moco_ref(seqs, losses, **full), seqs):
      assert_close(out, ref, rows, rtol=1e-4)


def test_moco_rejects_unknown_simplex_map():
  with pytest.raises(ValueError, match="simplex"):
    mtl_optax.moco(3, simplex="sparsemax")


# -- DB-MTL --

def db_mtl_ref(rows_seq, losses_seq, beta, beta_sigma):
  """Lin et al. 2023, Alg. 1 (LibMTL DB_MTL), over several steps."""
  h, outs = np.zeros_like(rows_seq[0]), []
  for step, (rows, losses) in enumerate(zip(rows_seq, losses_seq), start=1):
    rows = rows / (losses[:, None] + 1e-8)
    beta_k = beta / step**beta_sigma
    h = beta_k * h + (1 - beta_k) * rows
    u = np.linalg.norm(h, axis=1)
    outs.append(u.max() * (h / (u[:, None] + 1e-8)).sum(0))
  return outs


@pytest.mark.parametrize("k", (2, 3, 7))
@pytest.mark.parametrize("beta,beta_sigma", [(0.9, 0.0), (0.5, 0.5)])
def test_db_mtl_matches_numpy_over_steps(k, beta, beta_sigma):
  for kind in KINDS:
    seqs = [jacobian(k, kind, seed) for seed in range(4)]
    losses = random_losses(4, k)
    outs = run(make("db_mtl", k, beta, beta_sigma), seqs, losses)
    for out, ref, rows in zip(outs, db_mtl_ref(seqs, losses, beta, beta_sigma), seqs):
      assert_close(out, ref, rows / losses.min(), rtol=1e-4)


def test_db_mtl_without_log_transform_takes_rows_as_given():
  seqs = [jacobian(3, "scales", seed) for seed in range(3)]
  outs = run(make("db_mtl", 3, log_transform=False), seqs)
  ones = np.ones((3, 3)) - 1e-8  # the reference divides by L + 1e-8
  for out, ref, rows in zip(outs, db_mtl_ref(seqs, ones, 0.9, 0.0), seqs):
    assert_close(out, ref, rows, rtol=1e-4)


def test_db_mtl_gives_every_ema_gradient_the_largest_norm():
  rows = jacobian(3, "scales")
  out = run(make("db_mtl", 3, 0.0), [rows], np.ones((1, 3)))[0]
  units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  assert_close(out, np.linalg.norm(rows, axis=1).max() * units.sum(0), rows, rtol=1e-4)


def test_db_mtl_rejects_non_positive_losses():
  transform = mtl_optax.db_mtl(2)
  tree = to_tree(jacobian(2, "random"))
  with pytest.raises(ValueError, match="positive"):
    transform.update(tree, transform.init(params_like()), params_like(),
                     losses=jnp.array([1.0, 0.0]))


# -- properties of every closed-form or row-based balancer --

def shared_mask(params):
  return {"w": True, "b": False, "v": True}


FACTORIES = {
    "pcgrad": lambda k, **kw: make("pcgrad", k, key=0, **kw),
    "gradvac": lambda k, **kw: make("gradvac", k, key=0, **kw),
    "imtl_g": lambda k, **kw: make("imtl_g", k, **kw),
    "imtl": lambda k, **kw: make("imtl", k, **kw),
    "aligned_mtl": lambda k, **kw: make("aligned_mtl", k, **kw),
    "graddrop": lambda k, **kw: make("graddrop", k, key=0, **kw),
    "gradnorm": lambda k, **kw: make("gradnorm", k, **kw),
    "moco": lambda k, **kw: make("moco", k, **kw),
    "db_mtl": lambda k, **kw: make("db_mtl", k, **kw),
}
DETERMINISTIC = ("imtl_g", "imtl", "aligned_mtl", "gradnorm", "moco", "db_mtl")
STATEFUL_K = ("gradvac", "imtl", "gradnorm", "moco", "db_mtl")
NEEDS_LOSSES = ("imtl", "gradnorm", "moco", "db_mtl")


@pytest.mark.parametrize("name", FACTORIES)
def test_all_zero_gradients_give_a_zero_update(name):
  outs = run(FACTORIES[name](3), [np.zeros((3, 25))] * 2, random_losses(2, 3))
  for out in outs:
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("name", FACTORIES)
def test_one_task_follows_its_gradient(name):
  rows = jacobian(1, "random")
  for out in run(FACTORIES[name](1), [rows] * 2, random_losses(2, 1)):
    assert np.all(np.isfinite(out))
    cos = out @ rows[0] / (np.linalg.norm(out) * np.linalg.norm(rows[0]))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", FACTORIES)
def test_task_specific_leaves_get_the_sum(name):
  """With a mask, the task-specific leaf gets the (log-transformed, for DB-MTL) row sum, and
  the shared leaves what the balancer gives on the shared leaves alone."""
  k = 3
  rows = to_tree(jacobian(k, "random"))
  losses = jnp.asarray(random_losses(1, k)[0], jnp.float32)
  transform, update = FACTORIES[name](k, shared=shared_mask)
  out, _ = update(rows, transform.init(params_like()), params_like(), losses=losses)
  scale = 1 / (losses + 1e-8) if name == "db_mtl" else jnp.ones(k)
  np.testing.assert_allclose(out["b"], scale @ rows["b"], rtol=1e-5, atol=1e-6)
  sub = {"w": rows["w"], "v": rows["v"]}
  sub_params = {"w": params_like()["w"], "v": params_like()["v"]}
  alone, alone_update = FACTORIES[name](k)
  ref, _ = alone_update(sub, alone.init(sub_params), sub_params, losses=losses)
  for leaf in ("w", "v"):
    np.testing.assert_allclose(out[leaf], ref[leaf], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_permuting_the_tasks_leaves_the_update_unchanged(name):
  k = 4
  seqs = [jacobian(k, "random", seed) for seed in range(3)]
  losses = random_losses(3, k)
  perm = np.array([2, 0, 3, 1])
  made = FACTORIES[name](k)
  outs = run(made, seqs, losses)
  perm_outs = run(made, [rows[perm] for rows in seqs], losses[:, perm])
  for out, perm_out, rows in zip(outs, perm_outs, seqs):
    assert_close(perm_out, out, rows, rtol=1e-4)


@pytest.mark.parametrize("name", FACTORIES)
def test_vmap_agrees_with_one_by_one(name):
  k, batch = 3, 3
  transform, update = FACTORIES[name](k)
  trees = [to_tree(jacobian(k, "random", seed)) for seed in range(batch)]
  losses = jnp.asarray(random_losses(batch, k), jnp.float32)
  states = [transform.init(params_like()) for _ in range(batch)]
  if hasattr(states[0], "key"):
    states = [s._replace(key=jax.random.PRNGKey(i)) for i, s in enumerate(states)]
  stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)
  batched = jax.jit(jax.vmap(lambda u, s, l: transform.update(u, s, params_like(), losses=l)))
  out, new_states = batched(stack(trees), stack(states), losses)
  for i in range(batch):
    ref, ref_state = update(trees[i], states[i], params_like(), losses=losses[i])
    got = jax.tree.map(lambda x: x[i], out)
    assert_close(to_vec(got), to_vec(ref), np.ones(1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(new_states), jax.tree.leaves(ref_state)):
      np.testing.assert_allclose(np.asarray(a[i], np.float64), np.asarray(b, np.float64),
                                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", STATEFUL_K)
def test_wrong_number_of_tasks_raises(name):
  transform, _ = FACTORIES[name](3)
  with pytest.raises(ValueError, match="K"):
    transform.update(to_tree(jacobian(2, "random")), transform.init(params_like()),
                     params_like(), losses=jnp.ones(2))


@pytest.mark.parametrize("name", NEEDS_LOSSES)
def test_missing_losses_raise(name):
  transform, _ = FACTORIES[name](2)
  with pytest.raises(ValueError, match="losses"):
    transform.update(to_tree(jacobian(2, "random")), transform.init(params_like()),
                     params_like())
