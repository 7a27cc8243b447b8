"""STCH, ExcessMTL, FairGrad, MoDo and SDMGrad (LibMTL's weightings) against NumPy/SciPy.

Each reference below is written from the paper's formula and LibMTL's code
(`LibMTL/weighting/<Method>.py`), independently of the library's implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import mtl_optax
from mtl_optax import solvers

K, N, H = 3, 7, 2  # tasks, shared parameters, head parameters per task
SHARED = {"w": True, "head": False}


def jacobians(seed, count=1, k=K):
  """`count` stacked Jacobians {"w": (K, N), "head": (K, K, H)} (head i only in row i) of
  mini-batches of one problem: a common Jacobian plus independent noise."""
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=(k, N)) * 10.0 ** rng.uniform(-1, 1, size=(k, 1))
  out = []
  for _ in range(count):
    head = np.zeros((k, k, H))
    for i in range(k):
      head[i, i] = rng.normal(size=H)
    noise = 0.3 * rng.normal(size=(k, N)) * np.linalg.norm(mean, axis=1, keepdims=True)
    out.append({"w": mean + noise / np.sqrt(N), "head": head})
  return out


def as_jax(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


PARAMS = {"w": jnp.zeros(N), "head": jnp.zeros((K, H))}


def np_simplex(y):
  """Euclidean projection onto the simplex (sort-based, as LibMTL's _projection2simplex)."""
  u = np.sort(y)[::-1]
  css = np.cumsum(u)
  rho = np.nonzero(u * np.arange(1, len(y) + 1) > css - 1)[0][-1]
  return np.maximum(y - (css[rho] - 1) / (rho + 1.0), 0.0)


def close(a, b, rtol=2e-4, atol=1e-5):
  np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=atol)


# -- STCH --


def test_stch_matches_libmtl_over_its_phases():
  spe, warmup, mu = 2, 1, 0.5
  tx = mtl_optax.stch(K, spe, mu=mu, warmup_epochs=warmup)
  update = jax.jit(tx.update)
  state, rows = tx.init(PARAMS), as_jax(jacobians(0)[0])
  rng = np.random.default_rng(1)
  nadir_sum = np.zeros(K)
  for step in range(7):
    losses = rng.uniform(0.2, 3.0, size=K)
    out, state = update(rows, state, losses=jnp.asarray(losses, jnp.float32))
    epoch = step // spe
    if epoch <= warmup:  # d/dL sum log L
      want = 1.0 / losses
      nadir_sum += losses if epoch == warmup else 0.0
    else:  # d/dL of mu K log sum exp(log(L / z) / mu), z the nadir epoch's mean loss
      z = nadir_sum / spe
      e = np.exp(np.log(losses / z) / mu)
      want = K * e / e.sum() / losses
    close(out.rows["w"], want[:, None] * np.asarray(rows["w"]))


# -- ExcessMTL --


def test_excess_mtl_matches_libmtl_over_steps():
  step_size = 0.3
  tx = mtl_optax.excess_mtl(K, step_size, shared=SHARED)
  update = jax.jit(tx.update)
  state = tx.init(PARAMS)
  grad_sum, loss_weight, initial = np.zeros((K, N)), np.ones(K), None
  for jac in jacobians(2, count=4):
    g = jac["w"].astype(np.float32).astype(np.float64)
    grad_sum += g**2
    w = np.array([g[i] / np.sqrt(grad_sum[i] + 1e-7) @ g[i] for i in range(K)])
    if initial is None:
      initial = w
    else:
      loss_weight = loss_weight * np.exp(step_size * w / initial)
      loss_weight = loss_weight / loss_weight.sum() * K
    out, state = update(as_jax(jac), state, PARAMS)
    close(out["w"], loss_weight @ g)
    close(out["head"], np.einsum("i,ikh->kh", loss_weight, jac["head"]))


def test_excess_mtl_zero_first_row_stays_finite():
  tx = mtl_optax.excess_mtl(K)
  rows = jnp.asarray(np.random.default_rng(3).normal(size=(K, N)), jnp.float32)
  _, state = tx.update({"w": rows.at[0].set(0.0)}, tx.init({"w": jnp.zeros(N)}))
  out, state = tx.update({"w": rows}, state)
  assert np.all(np.isfinite(out["w"])) and np.all(np.isfinite(state.inner.log_weights))


# -- FairGrad --


@pytest.mark.parametrize("k, alpha", [(2, 0.5), (5, 1.0), (5, 5.0)])
def test_fairgrad_weights_solve_libmtl_equation(k, alpha):
  """LibMTL: scipy least_squares of G G^T w - w^(-1/alpha) from 1/K, w >= 0."""
  g = np.random.default_rng(k).normal(size=(k, 12)) * 10.0 ** np.linspace(-1, 1, k)[:, None]
  m = g @ g.T
  ref = optimize.least_squares(lambda x: m @ x - (1 / x) ** (1 / alpha), np.full(k, 1.0 / k),
                               bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15).x
  with jax.enable_x64(True):
    w = np.asarray(mtl_optax.fairgrad_weights(jnp.asarray(m), alpha, tol=1e-11))
  np.testing.assert_allclose(w, ref, rtol=1e-6)
  # float32: row norms 1e2 apart leave the smallest weights' residual at ~1e-3.
  w = np.asarray(jax.jit(mtl_optax.fairgrad_weights)(jnp.asarray(m, jnp.float32), alpha),
                 np.float64)
  np.testing.assert_allclose((m @ w) * w ** (1 / alpha), 1.0, rtol=1e-2)


def test_fairgrad_update_weighs_shared_and_head_rows():
  jac = jacobians(4)[0]
  tx = mtl_optax.fairgrad(K, alpha=2.0, shared=SHARED)
  out, state = jax.jit(tx.update)(as_jax(jac), tx.init(PARAMS), PARAMS)
  g = jac["w"]
  w = np.asarray(state.weights, np.float64)
  np.testing.assert_allclose((g @ g.T @ w) * np.sqrt(w), 1.0, rtol=2e-3)
  close(out["w"], w @ g)
  close(out["head"], np.einsum("i,ikh->kh", w, jac["head"]))
  assert np.all(g @ np.asarray(out["w"]) > 0)  # no task's gain is negative


def test_fairgrad_zero_row_is_finite():
  g = np.random.default_rng(5).normal(size=(K, N))
  g[1] = 0.0
  w = np.asarray(mtl_optax.fairgrad_weights(jnp.asarray(g @ g.T, jnp.float32)))
  assert np.all(np.isfinite(w)) and np.all(w > 0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_without_solution_is_finite_and_non_conflicting(alpha):
  """3 g_0 + g_1 = 0, so M w = w^(-1/alpha) has no solution and Newton's iterate runs off (it
  gave d of norm ~1e7, conflicting). Rows a, -3a: the min-norm point 0, weights (3, 1) / 4.
  With a third row b orthogonal to a: some finite d with g_i . d >= 0 at the rounding level."""
  a = np.zeros(N)
  a[0] = 2.0
  b = np.zeros(N)
  b[1] = 1.0
  solve = jax.jit(lambda m: solvers.fair_weights(m, alpha))
  pair = np.stack([a, -3.0 * a])
  w, ok = solve(jnp.asarray(pair @ pair.T, jnp.float32))
  np.testing.assert_allclose(w, [0.75, 0.25], atol=1e-6)
  assert not np.any(ok)
  g = np.stack([a, -3.0 * a, b])
  w, _ = solve(jnp.asarray(g @ g.T, jnp.float32))
  d = np.asarray(w, np.float64) @ g
  assert np.all(np.isfinite(d)) and np.linalg.norm(d) <= np.linalg.norm(g)
  assert np.all(g @ d >= -1e-5 * np.linalg.norm(g) ** 2)


# -- MoDo and SDMGrad: three mini-batches --


def np_modo(jacs, steps_lambd, gamma, rho):
  """LibMTL's MoDo step on flat shared rows: (lambda, d on the shared leaf)."""
  g0, g1, g2 = (j["w"] for j in jacs)
  lambd = np_simplex(steps_lambd - gamma * (g0 @ (g1.T @ steps_lambd) + rho * steps_lambd))
  return lambd, lambd @ g2


def test_modo_matches_libmtl_with_three_batches():
  gamma, rho = 0.05, 0.1
  tx = mtl_optax.modo(K, gamma, rho, shared=SHARED)
  update = jax.jit(tx.update)
  state, lambd = tx.init(PARAMS), np.full(K, 1.0 / K)
  for seed in range(3):
    a, b, c = (jax.tree.map(lambda x: np.asarray(x, np.float32).astype(np.float64), j)
               for j in jacobians(10 + seed, count=3))
    lambd, want = np_modo((a, b, c), lambd, gamma, rho)
    out, state = update(as_jax(c), state, PARAMS, sample_jacobians=(as_jax(a), as_jax(b)))
    close(state.weights, lambd)
    close(out["w"], want)
    close(out["head"], c["head"].sum(0))  # the update batch's plain sum


def np_sdmgrad(jacs, w, lam, niter):
  """LibMTL's SDMGrad step (torch SGD lr 5, momentum 0.5, fresh each step) on flat rows."""
  zeta, xi1, xi2 = (j["w"] for j in jacs)
  gg = xi1 @ xi2.T
  scale = np.mean(np.sqrt(np.maximum(np.diag(gg), 0.0)))
  gg = gg / scale**2
  gg_mean = gg.mean(axis=1)
  buf = None
  for _ in range(niter):
    grad = gg @ w + lam * gg_mean
    buf = grad if buf is None else 0.5 * buf + grad
    w = np_simplex(w - 5.0 * buf)
  return w, (w @ zeta + lam * zeta.mean(0)) / (1 + lam)


def test_sdmgrad_matches_libmtl_with_three_batches():
  lam, niter = 0.3, 20
  tx = mtl_optax.sdmgrad(K, lam, niter, shared=SHARED)
  update = jax.jit(tx.update)
  state, w = tx.init(PARAMS), np.full(K, 1.0 / K)
  for seed in range(3):
    zeta, a, b = (jax.tree.map(lambda x: np.asarray(x, np.float32).astype(np.float64), j)
                  for j in jacobians(20 + seed, count=3))
    w, want = np_sdmgrad((zeta, a, b), w, lam, niter)
    out, state = update(as_jax(zeta), state, PARAMS, sample_jacobians=(as_jax(a), as_jax(b)))
    close(state.inner.w, w, atol=1e-4)
    close(out["w"], want, atol=1e-4)
    close(out["head"], zeta["head"].sum(0))


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_without_samples_the_own_gram_stands_in(name):
  c = as_jax(jacobians(30)[0])
  tx = mtl_optax.registry.build(name, K, shared=SHARED)
  alone, _ = tx.update(c, tx.init(PARAMS), PARAMS)
  same, _ = tx.update(c, tx.init(PARAMS), PARAMS, sample_jacobians=(c, c))
  close(alone["w"], np.asarray(same["w"], np.float64), rtol=1e-6)


@pytest.mark.parametrize("name", ["modo", "sdmgrad"])
def test_samples_on_the_gram_only_path_under_vmap(name):
  """value_and_reweighted_grad with sample_jacobians equals the stacked path, vmapped."""
  tx = mtl_optax.registry.build(name, K)
  params = {"w": jnp.ones(N) * 0.3}

  def task_losses(p, x):
    return jnp.mean((x @ p["w"][:, None] - jnp.arange(K)) ** 2, axis=0)

  def both(x, xa, xb):
    ja = mtl_optax.value_and_jacrev(task_losses)(params, xa)[1]
    jb = mtl_optax.value_and_jacrev(task_losses)(params, xb)[1]
    jac = mtl_optax.value_and_jacrev(task_losses)(params, x)[1]
    stacked, _ = tx.update(jac, tx.init(params), params, sample_jacobians=(ja, jb))
    fun = mtl_optax.value_and_reweighted_grad(task_losses, tx)
    (_, gram_only), _ = fun(params, tx.init(params), x, sample_jacobians=(ja, jb))
    return stacked["w"], gram_only["w"]

  xs = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 5, N))  # 4 seeds, 3 batches of 5
  stacked, gram_only = jax.jit(jax.vmap(both))(xs[0], xs[1], xs[2])
  np.testing.assert_allclose(gram_only, stacked, rtol=1e-4, atol=1e-5)


# -- bad arguments --


@pytest.mark.parametrize("build, match", [
    (lambda: mtl_optax.stch(K, 10, mu=0.0), "mu must be > 0"),
    (lambda: mtl_optax.stch(K, 10, warmup_epochs=-1), "warmup_epochs"),
    (lambda: mtl_optax.stch(K, 0), "steps_per_epoch"),
    (lambda: mtl_optax.excess_mtl(K, robust_step_size=0.0), "robust_step_size"),
    (lambda: mtl_optax.fairgrad(K, alpha=0.0), "alpha must be > 0"),
    (lambda: mtl_optax.fairgrad(K, max_iter=0), "max_iter"),
    (lambda: mtl_optax.modo(K, gamma=-1.0), "gamma must be >= 0"),
    (lambda: mtl_optax.sdmgrad(K, niter=0), "niter"),
    (lambda: mtl_optax.sdmgrad(K, lam=-0.1), "lam must be >= 0"),
])
def test_bad_hyperparameters_raise(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_bad_sample_jacobians_raise():
  tx = mtl_optax.modo(K)
  c = as_jax(jacobians(40)[0])
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="must be a pair"):
    tx.update(c, state, sample_jacobians=c)
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update(c, state, sample_jacobians=(c, {"w": c["w"]}))
  with pytest.raises(ValueError, match="sample_jacobians"):
    tx.update(c, state, sample_jacobians=(c, as_jax(jacobians(41, k=2)[0])))
  rep = mtl_optax.RepresentationRows(c["w"], None)
  with pytest.raises(ValueError, match="representation rows"):
    tx.update(c, state, sample_jacobians=(rep, rep))
  with pytest.raises(ValueError, match="positive"):
    mtl_optax.stch(K, 1).update(c, mtl_optax.stch(K, 1).init(None), losses=jnp.zeros(K))
