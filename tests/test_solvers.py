"""The solvers against independent float64 SciPy solutions and known properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtl_optax import solvers


def jacobian(k, n, kind, seed):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, n))
  if kind == "rank":
    g = rng.normal(size=(k, 2)) @ rng.normal(size=(2, n))
  elif kind == "zero":
    g[1] = 0.0
  elif kind == "norms":
    g *= 10.0 ** rng.uniform(-2, 2, size=(k, 1))
  return g


CASES = [(2, 6, "plain"), (3, 6, "plain"), (7, 20, "plain"), (7, 20, "rank"), (3, 6, "zero"),
         (5, 20, "zero"), (7, 20, "norms")]


def scipy_simplex(fun, k):
  cons = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}
  res = optimize.minimize(fun, np.full(k, 1.0 / k), bounds=[(0, 1)] * k, constraints=cons,
                          method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000})
  return res.x


@pytest.mark.parametrize("k,n,kind", CASES)
def test_min_norm_matches_slsqp(k, n, kind):
  g = jacobian(k, n, kind, seed=k + n)
  m = g @ g.T
  s = m.max()
  ref = scipy_simplex(lambda w: w @ m @ w / s, k)
  w = np.asarray(jax.jit(solvers.min_norm_weights)(jnp.asarray(m, jnp.float32)), np.float64)
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
  d, d_ref = w @ g, ref @ g
  scale = np.sqrt(s)
  assert np.linalg.norm(d - d_ref) < 1e-3 * scale
  # Optimality (Sener & Koltun, Thm. 1 / KKT): g_i . d >= ||d||^2 for every row.
  assert np.min(g @ d - d @ d) > -1e-5 * s


def test_min_norm_two_rows_closed_form():
  g = np.array([[1.0, 0.0], [-1.0, 2.0]])
  m = g @ g.T
  gamma = (m[1, 1] - m[0, 1]) / (m[0, 0] + m[1, 1] - 2 * m[0, 1])  # Sener & Koltun, Alg. 1
  w = solvers.min_norm_weights(jnp.asarray(m, jnp.float32))
  np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-5)


def test_min_norm_degenerate_inputs_are_finite():
  assert np.allclose(solvers.min_norm_weights(jnp.zeros((3, 3))), 1 / 3)
  np.testing.assert_allclose(solvers.min_norm_weights(jnp.ones((1, 1)) * 4.0), [1.0])
  # Opposite gradients: the origin is in the hull, d = 0.
  g = np.array([[1.0, 2.0], [-1.0, -2.0]])
  w = np.asarray(solvers.min_norm_weights(jnp.asarray(g @ g.T, jnp.float32)))
  assert np.linalg.norm(w @ g) < 1e-3


@pytest.mark.parametrize("k,n,kind", CASES)
def test_nonneg_qp_matches_lbfgsb(k, n, kind):
  g = jacobian(k, n, kind, seed=3 * k + n)
  a = g @ g.T / np.trace(g @ g.T) + 1e-3 * np.eye(k)
  b = np.random.default_rng(k).normal(size=k)
  ref = optimize.minimize(lambda z: 0.5 * z @ a @ z + b @ z, np.zeros(k), jac=lambda z: a @ z + b,
                          bounds=[(0, None)] * k, method="L-BFGS-B",
                          options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000}).x
  z = np.asarray(solvers.nonneg_qp(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
  assert np.all(z >= 0)
  np.testing.assert_allclose(z, ref, atol=2e-3 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("k,n,kind", CASES)
def test_dual_cone_projection(k, n, kind):
  g = jacobian(k, n, kind, seed=5 * k + n)
  m = g @ g.T / np.trace(g @ g.T) + 1e-4 * np.eye(k)
  u = np.eye(k)
  v = solvers.dual_cone_weights(jnp.asarray(m, jnp.float32), jnp.asarray(u, jnp.float32))
  v = np.asarray(v)
  for i in range(k):
    ref = optimize.minimize(lambda x: x @ m @ x, u[i], jac=lambda x: 2 * m @ x,
                            bounds=[(lo, None) for lo in u[i]], method="L-BFGS-B",
                            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000}).x
    assert np.all(v[i] >= u[i] - 1e-6)
    np.testing.assert_allclose(v[i] @ m @ v[i], ref @ m @ ref, rtol=1e-3, atol=1e-6)
    # KKT: the projection does not conflict with any row (up to the regularization).
    assert np.min(m @ v[i]) > -1e-5


def test_simplex_minimize_matches_slsqp():
  rng = np.random.default_rng(0)
  for k in (2, 3, 7):
    g = rng.normal(size=(k, 10))
    g[0] *= 3.0
    m = g @ g.T / (np.trace(g @ g.T) / k)
    r = 0.4 * np.sqrt(m.mean())
    fun = lambda w, xp: w @ m.mean(1) + r * xp.sqrt(w @ m @ w + 1e-8)
    ref = scipy_simplex(lambda w: fun(w, np), k)
    mj = jnp.asarray(m, jnp.float32)
    w = solvers.simplex_minimize(lambda w: w @ mj.mean(1) + r * jnp.sqrt(w @ mj @ w + 1e-8),
                                 jnp.full((k,), 1.0 / k))
    w = np.asarray(w, np.float64)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    assert fun(w, np) <= fun(ref, np) + 1e-6
    assert np.linalg.norm((w - ref) @ g) < 1e-3 * np.linalg.norm(g, axis=1).max()


@pytest.mark.parametrize("k,n,kind", [c for c in CASES if c[2] == "plain" or c[2] == "norms"]
                         + [(3, 6, "sum")])
def test_nash_fixed_point_matches_scipy_root(k, n, kind):
  g = jacobian(k, n, kind, seed=7 * k + n)
  if kind == "sum":  # rank-deficient, g_3 = g_1 + g_2: a positive fixed point still exists
    g[2] = g[0] + g[1]
  m = g @ g.T
  alpha, ok = jax.jit(solvers.nash_weights)(jnp.asarray(m, jnp.float32))
  alpha = np.asarray(alpha, np.float64)
  assert np.all(ok)
  np.testing.assert_allclose(alpha * (m @ alpha), 1.0, atol=1e-4)
  ref = optimize.least_squares(lambda a: a * (m @ a) - 1.0, 1.0 / np.sqrt(np.diag(m)),
                               bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15).x
  np.testing.assert_allclose(alpha, ref, rtol=1e-3)


def test_nash_zero_row_and_failures_are_flagged():
  g = jacobian(4, 10, "zero", seed=1)
  alpha, ok = solvers.nash_weights(jnp.asarray(g @ g.T, jnp.float32))
  assert list(np.asarray(ok)) == [True, False, True, True]
  m = g @ g.T
  a = np.asarray(alpha)
  keep = np.array([0, 2, 3])
  np.testing.assert_allclose(a[keep] * (m[np.ix_(keep, keep)] @ a[keep]), 1.0, atol=1e-4)
  # Opposite rows: no positive fixed point exists; the answer is finite and flagged.
  opp = np.array([[1.0, 2.0], [-1.0, -2.0]])
  alpha, ok = solvers.nash_weights(jnp.asarray(opp @ opp.T, jnp.float32))
  assert not np.any(ok) and np.all(np.isfinite(alpha))
  alpha, ok = solvers.nash_weights(jnp.zeros((3, 3)))
  assert not np.any(ok) and np.all(np.isfinite(alpha))


def test_solvers_vmap_over_a_batch():
  gs = np.stack([jacobian(3, 8, "plain", seed=s) for s in range(4)])
  ms = jnp.asarray(np.einsum("bkn,bjn->bkj", gs, gs), jnp.float32)
  w = jax.jit(jax.vmap(solvers.min_norm_weights))(ms)
  alpha, ok = jax.jit(jax.vmap(solvers.nash_weights))(ms)
  for b in range(4):
    np.testing.assert_allclose(w[b], solvers.min_norm_weights(ms[b]), atol=1e-6)
    np.testing.assert_allclose(alpha[b], solvers.nash_weights(ms[b])[0], rtol=1e-5)
  assert np.all(ok)


@pytest.mark.slow  # benchmark-style; run with -m slow
def test_nonneg_qp_active_set_fallback_matches_pdas():
  """pdas_iter=0 leaves everything to Lawson & Hanson's loop: the same exact answer."""
  for k, n, kind in CASES:
    g = jacobian(k, n, kind, seed=11 * k + n)
    a = jnp.asarray(g @ g.T / np.trace(g @ g.T) + 1e-3 * np.eye(k), jnp.float32)
    b = jnp.asarray(np.random.default_rng(k).normal(size=k), jnp.float32)
    np.testing.assert_allclose(solvers.nonneg_qp(a, b, pdas_iter=0), solvers.nonneg_qp(a, b),
                               atol=1e-4)


def test_nash_prev_is_a_warm_start_and_a_fallback():
  g = jacobian(5, 20, "plain", seed=3)
  m = jnp.asarray(g @ g.T, jnp.float32)
  alpha, ok = solvers.nash_weights(m)
  # From its own answer it stops at once, with the same answer; a cap of one step from a poor
  # start is still accepted when it improves on that start.
  again, ok2 = solvers.nash_weights(m, max_iter=0, prev=alpha)
  assert np.all(ok) and np.all(ok2)
  np.testing.assert_allclose(again, alpha, rtol=1e-5)
  poor = np.asarray(alpha) * np.array([1.5, 0.7, 1.0, 1.2, 0.9])
  one, ok1 = solvers.nash_weights(m, max_iter=1, tol=0.0, prev=jnp.asarray(poor))
  assert np.all(ok1) and np.all(np.isfinite(np.asarray(one)))
