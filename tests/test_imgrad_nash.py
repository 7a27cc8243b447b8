"""IMGrad's Nash-MTL variant (Eq. 13): the barrier LP and the CCP against SciPy in float64."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

import mtl_optax
from covering import covering
from mtl_optax import solvers
from mtl_optax.grad.imgrad import imbalance_cos
from mtl_optax.toy import toy_losses

N = 12  # parameters per task row, split over two leaves
# Imbalanced rows (norms over 3 decades) where the cos = 0 answer is not Nash's fixed point
# (nearly orthogonal rows of equal norm give that point for every cos): K -> seed.
SEEDS = {2: 26, 3: 0, 4: 4, 5: 1}


def jacobian(k, seed, kind="norms"):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, N))
  if kind == "norms":
    g *= 10.0 ** rng.uniform(-1.5, 1.5, size=(k, 1))
  return g


def np_nash(m):
  """The Nash fixed point a_i (M a)_i = 1: bounded least squares from 1 / sqrt(M_ii)."""
  return optimize.least_squares(lambda a: a * (m @ a) - 1.0, 1.0 / np.sqrt(np.diag(m)),
                                bounds=(1e-12, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15).x


def np_lp(m, c, x0):
  """argmin c^T x s.t. log x_i + log (M x)_i >= 0 by SLSQP (concave constraints, floored).

  Solved for y = x * sqrt(diag M) (unit-diagonal Gram matrix, as imbalanced rows otherwise
  stall SLSQP). No solver's own verdict is trusted: every run's point is certified by its
  feasibility alone, and the answer is the best feasible point of SLSQP from x0 and from two
  points nearer the boundary (some runs drift out of the domain), of trust-constr where no
  SLSQP run stopped cleanly, and of x0 itself (feasible: x0 = 2 x Nash gives log 4 >= 0).
  """
  d = 1.0 / np.sqrt(np.diag(m))
  m, c = d[:, None] * m * d[None, :], c * d

  def fun(y):
    return np.log(np.maximum(y, 1e-12)) + np.log(np.maximum(m @ y, 1e-12))

  def feasible(y):
    return np.all(np.isfinite(y)) and fun(y).min() > -1e-9

  cons = {"type": "ineq", "fun": fun,
          "jac": lambda y: np.diag(1.0 / y) + m / (m @ y)[:, None]}
  bounds = [(1e-12, None)] * len(c)
  runs = [optimize.minimize(lambda y: c @ y, start, jac=lambda y: c, constraints=cons,
                            bounds=bounds, method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
          for start in (x0 / d, 0.55 * x0 / d, 0.75 * x0 / d)]
  if not any(r.status in (0, 8) and feasible(r.x) for r in runs):
    runs.append(optimize.minimize(lambda y: c @ y, x0 / d, jac=lambda y: c, constraints=cons,
                                  bounds=bounds, method="trust-constr",
                                  options={"gtol": 1e-13, "xtol": 1e-15, "maxiter": 5000}))
  points = [y for y in [x0 / d] + [r.x for r in runs] if feasible(y)]
  assert points, "x0 is not feasible: the caller's start is wrong"
  return d * min(points, key=lambda y: c @ y)


def np_linear_cost(mn, cos, p):
  """(1 - cos) * grad of sum_i (M a)_i + cos * grad of phi at p (Nash-MTL's linearization)."""
  return (1.0 - cos) * mn.sum(0) + cos * (1.0 / p + mn @ (1.0 / (mn @ p)))


def np_ccp(m, cos, alpha0, steps):
  """The Eq. 13 CCP on M / ||M||_F, `steps` SciPy LPs, mapped back by 1 / sqrt(||M||_F)."""
  norm = np.linalg.norm(m)
  mn = m / norm
  nash = np_nash(mn)
  p = alpha0 * np.sqrt(norm)
  if not (np.all(p > 0) and np.all(mn @ p > 0)):
    p = nash
  for _ in range(steps):
    p = np_lp(mn, np_linear_cost(mn, cos, p), 2.0 * nash)
  return p / np.sqrt(norm)


def f32(x):
  return jnp.asarray(x, jnp.float32)


# -- (a) one convex subproblem --

@pytest.mark.parametrize("k,cos", covering([2, 3, 5], [0.0, 0.4, 1.0]))
def test_nash_lp_matches_scipy_slsqp(k, cos):
  g = jacobian(k, SEEDS[k])
  m = g @ g.T
  m /= np.linalg.norm(m)
  nash = np_nash(m)
  p = nash * np.random.default_rng(k).uniform(0.8, 1.25, size=k)
  assert np.all(m @ p > 0)
  c = np_linear_cost(m, cos, p)
  ref = np_lp(m, c, 2.0 * nash)
  # float64 to the barrier's gap tolerance; float32 looser: at cos = 0 these imbalanced, conflicting
  # rows make c^T x a cancellation of terms ~100x larger (a nearly flat boundary direction).
  for x64, rtol in ((True, 1e-6), (False, 2e-3 if cos == 0.0 else 1e-5)):
    with jax.enable_x64(x64):
      dtype = jnp.float64 if x64 else jnp.float32
      args = (jnp.asarray(m, dtype), jnp.asarray(c, dtype), jnp.asarray(2.0 * nash, dtype))
      x = np.asarray(jax.jit(solvers.nash_lp)(*args), np.float64)
    assert np.all(x * (m @ x) >= 1.0 - 1e-5)
    np.testing.assert_allclose(c @ x, c @ ref, rtol=rtol)
    np.testing.assert_allclose(x, ref, atol=max(rtol, 1e-4) * np.abs(ref).max())


# -- (b, c) the CCP sequence --

CCP3 = jax.jit(partial(solvers.imbalance_nash_weights, max_iter=3, tol=0.0))
CCP_LONG = jax.jit(partial(solvers.imbalance_nash_weights, max_iter=100, tol=1e-6))


@pytest.mark.parametrize("k,cos", covering([2, 3, 4, 5], [0.0, 0.5, 1.0]))
def test_ccp_matches_scipy_ccp_and_is_feasible(k, cos):
  g = jacobian(k, SEEDS[k])
  m = g @ g.T
  alpha0 = 1.0 / np.linalg.norm(g, axis=1)  # a valid start: M alpha0 > 0 is checked by both
  ref = np_ccp(m, cos, alpha0, steps=3)
  alpha, ok = CCP3(f32(m), f32(cos), f32(alpha0))
  alpha = np.asarray(alpha, np.float64)
  assert np.all(ok)
  assert np.all(alpha * (m @ alpha) >= 1.0 - 1e-4)
  np.testing.assert_allclose(alpha, ref, rtol=2e-3)
  if cos == 0.0:  # the weighting matters: the answer is off Nash's fixed point
    assert np.max(np.abs(alpha * (m @ alpha) - 1.0)) > 0.01


@pytest.mark.parametrize("k", [2, 3, 5])
def test_ccp_end_points(k):
  g = jacobian(k, SEEDS[k])
  m = g @ g.T
  ones = f32(np.ones(k))
  # cos = 1: minimizing phi >= 0 on Nash's set reaches phi = 0, the Nash fixed point.
  alpha, ok = CCP_LONG(f32(m), f32(1.0), ones)
  np.testing.assert_allclose(alpha, np_nash(m), rtol=2e-3)
  # cos = 0: the cost sum_i (M a)_i does not depend on the start; one LP is the answer.
  norm = np.linalg.norm(m)
  ref = np_lp(m / norm, m.sum(0) / norm, 2.0 * np_nash(m / norm)) / np.sqrt(norm)
  alpha, ok = CCP_LONG(f32(m), f32(0.0), ones)
  assert np.all(ok)
  np.testing.assert_allclose(alpha, ref, rtol=3e-3)  # float32 on a nearly flat LP, as above


def test_ccp_failures_are_flagged_and_finite():
  opp = np.array([[1.0, 2.0], [-1.0, -2.0]])  # Nash's set is empty
  for m in (opp @ opp.T, np.zeros((3, 3)), np.full((2, 2), np.nan)):
    alpha, ok = CCP3(f32(m), f32(0.5), f32(np.ones(len(m))))
    assert not np.any(ok) and np.all(np.asarray(alpha) == 1.0)


# -- (d) the transformation --

def as_tree(g):
  g = f32(g)
  return {"a": g[:, :6].reshape(-1, 2, 3), "b": g[:, 6:]}


def flat(tree):
  return np.concatenate([np.asarray(tree["a"]).reshape(-1), np.asarray(tree["b"])])


def apply(tx, g, state=None):
  state = tx.init(None) if state is None else state
  out, state = jax.jit(tx.update)(as_tree(g), state)
  return flat(out).astype(np.float64), state


def np_cos(g):
  """cos(g0, g_m) with the MGDA min-norm point g_m by SLSQP on the simplex."""
  k = len(g)
  m = g @ g.T / np.trace(g @ g.T)
  cons = {"type": "eq", "fun": lambda w: w.sum() - 1.0}
  w = optimize.minimize(lambda w: w @ m @ w, np.full(k, 1.0 / k), bounds=[(0, 1)] * k,
                        constraints=cons, method="SLSQP", options={"ftol": 1e-15}).x
  g0, gm = g.mean(0), w @ g
  return g0 @ gm / (np.linalg.norm(g0) * np.linalg.norm(gm))


FOUR_STEPS = mtl_optax.imgrad_nash(3, optim_niter=4, tol=0.0, max_norm=0.0)
DEFAULT = mtl_optax.imgrad_nash(3)


def test_imgrad_nash_matches_scipy():
  g = jacobian(3, 5)  # conflicting rows (cos 0.03): Eq. 13 moves alpha off Nash's point
  cos = np_cos(g)
  assert 0.01 < cos < 0.1
  ref = np_ccp(g @ g.T, cos, np.ones(3), steps=4)
  d, state = apply(FOUR_STEPS, g)
  np.testing.assert_allclose(state.inner.alpha, ref, rtol=3e-3)
  np.testing.assert_allclose(d, ref @ g, atol=3e-3 * np.linalg.norm(ref @ g))
  assert np.max(np.abs(ref / np_nash(g @ g.T) - 1.0)) > 1.0
  clipped, _ = apply(mtl_optax.imgrad_nash(3, optim_niter=4, tol=0.0), g)
  np.testing.assert_allclose(clipped, d / max(1.0, np.linalg.norm(d)), atol=1e-5)
  # Scale-free: gradients times 1e3 give alpha / 1e3 and the same direction.
  _, scaled = apply(FOUR_STEPS, 1e3 * g)
  np.testing.assert_allclose(scaled.inner.alpha * 1e3, state.inner.alpha, rtol=1e-3)


def test_zero_gradients_single_task_and_infeasible_are_finite():
  d, state = apply(DEFAULT, np.zeros((3, N)))
  assert np.all(d == 0) and np.all(np.asarray(state.inner.alpha) == 1.0)
  g = jacobian(1, seed=3)
  d, state = apply(mtl_optax.imgrad_nash(1, max_norm=0.0), g)
  np.testing.assert_allclose(state.inner.alpha, 1.0 / np.linalg.norm(g), rtol=1e-4)
  np.testing.assert_allclose(d, g[0] / np.linalg.norm(g), atol=1e-5)
  opp = np.stack([g[0], -g[0]])  # no alpha > 0 exists: the previous alpha is kept
  d, state = apply(mtl_optax.imgrad_nash(2, max_norm=0.0), opp)
  assert np.all(np.asarray(state.inner.alpha) == 1.0) and np.all(np.isfinite(d))


def test_zero_row_keeps_previous_alpha_for_that_task():
  g = jacobian(3, seed=5)
  g[1] = 0.0
  _, state = apply(FOUR_STEPS, g)
  keep = np.array([0, 2])
  assert state.inner.alpha[1] == 1.0
  # g_m = 0, so cos = 0 up to float32 noise in the min-norm point (the library's cos is used).
  cos = float(imbalance_cos(f32(g @ g.T)))
  assert cos < 0.05
  ref = np_ccp(g[keep] @ g[keep].T, cos, np.ones(2), 4)
  np.testing.assert_allclose(np.asarray(state.inner.alpha)[keep], ref, rtol=2e-3)


def test_update_every_mask_and_vmap():
  g1, g2 = jacobian(3, seed=1), jacobian(3, seed=2)
  tx = mtl_optax.imgrad_nash(3, update_weights_every=2, max_norm=0.0)
  _, s1 = apply(tx, g1)
  d2, s2 = apply(tx, g2, s1)  # step 1: alpha reused
  np.testing.assert_array_equal(s2.inner.alpha, s1.inner.alpha)
  np.testing.assert_allclose(d2, np.asarray(s1.inner.alpha) @ g2, rtol=1e-5, atol=1e-6)
  assert int(s2.inner.step) == 2
  # Task-specific leaves ("b") get sum_i alpha_i row_i, alpha from the shared leaf only.
  tx = mtl_optax.imgrad_nash(3, shared={"a": True, "b": False})
  out, state = jax.jit(tx.update)(as_tree(g1), tx.init(None))
  _, shared_only = apply(DEFAULT, np.concatenate([g1[:, :6], 0 * g1[:, 6:]], 1))
  np.testing.assert_allclose(state.inner.alpha, shared_only.inner.alpha, rtol=1e-5)
  np.testing.assert_allclose(out["b"], np.asarray(state.inner.alpha) @ g1[:, 6:], rtol=1e-5, atol=1e-6)
  # vmap over a batch of Jacobians (and of states) matches one at a time.
  tx = DEFAULT
  gs = np.stack([jacobian(3, seed=s) for s in range(3)])
  trees = jax.tree.map(lambda x: x.reshape((3, 3) + x.shape[1:]), as_tree(gs.reshape(-1, N)))
  states = jax.vmap(tx.init)(jnp.zeros(3))
  outs, new = jax.jit(jax.vmap(tx.update))(trees, states)
  for b in range(3):
    d, state = apply(tx, gs[b])
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[b], outs)), d, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.inner.alpha[b], state.inner.alpha, rtol=1e-4)


def test_bad_input():
  with pytest.raises(ValueError, match="disagree"):
    apply(mtl_optax.imgrad_nash(4), jacobian(3, seed=0))
  with pytest.raises(ValueError, match="update_weights_every"):
    mtl_optax.imgrad_nash(3, update_weights_every=0)
  with pytest.raises(ValueError, match="optim_niter"):
    mtl_optax.imgrad_nash(3, optim_niter=0)


def test_vmap_over_the_toy_starts_ends_and_matches_one_at_a_time():
  # Regression: loop conditions that computed in floats could round differently in the two
  # evaluations vmap makes of a batched condition, freezing a member of the batch while the
  # loop ran forever (the first start of the IMGrad toy figure, with mu = 30).
  w = jnp.array([0.9, 0.1])
  starts = jnp.array([(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0)])
  jac = jax.vmap(jax.jacrev(lambda x: w * toy_losses(x)))(starts)
  grams = jnp.einsum("bki,bli->bkl", jac, jac)
  solve = lambda m: solvers.imbalance_nash_weights(m, imbalance_cos(m), jnp.ones(2))
  batched, ok = jax.jit(jax.vmap(solve))(grams)
  assert np.all(np.asarray(ok))
  for b in range(3):
    np.testing.assert_allclose(batched[b], jax.jit(solve)(grams[b])[0], rtol=1e-5)
