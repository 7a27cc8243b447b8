"""COSMOS and PBI (torchjd 0.18's scalarizers) as loss balancers: s_i = dS/dL_i.

The NumPy side evaluates each scalarization S(L) as torchjd's `forward` does (float64) and
differentiates it by central finite differences, so the closed-form gradients in
`mtl_optax.loss.scalarize` are checked against the formulas, not against themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax


def np_cosmos(losses, r, lam):
  """torchjd COSMOS.forward: sum(r L) - lambda cosine_similarity(r, L) (torch's eps 1e-8)."""
  cos = r @ losses / (max(np.linalg.norm(r), 1e-8) * max(np.linalg.norm(losses), 1e-8))
  return r @ losses - lam * cos


def np_pbi(losses, w, theta, reference=None):
  """torchjd PBI.forward: d1 + theta d2, d2 = sqrt(|perpendicular|^2 + 1e-12)."""
  f = losses if reference is None else losses - reference
  direction = w / np.linalg.norm(w)
  d1 = f @ direction
  perpendicular = f - d1 * direction
  return d1 + theta * np.sqrt(perpendicular @ perpendicular + 1e-12)


def finite_differences(fn, losses, h=1e-6):
  out = np.zeros_like(losses)
  for i in range(len(losses)):
    e = np.zeros_like(losses)
    e[i] = h
    out[i] = (fn(losses + e) - fn(losses - e)) / (2 * h)
  return out


def scalings(tx, losses):
  """The s_i the balancer applies: the scaled rows of an identity-like stacked Jacobian."""
  k = len(losses)
  rows, state = tx.update({"w": jnp.eye(k)}, tx.init({"w": jnp.zeros(k)}),
                          losses=jnp.asarray(losses, jnp.float32))
  return np.asarray(jnp.diag(rows.rows["w"]), np.float64), state


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("lam", [0.0, 0.5, 8.0])
def test_cosmos_matches_numpy(k, lam):
  rng = np.random.default_rng(k)
  for _ in range(3):
    losses = 10.0 ** rng.uniform(-2, 1, size=k)
    r = rng.dirichlet(np.ones(k))
    want = finite_differences(lambda x: np_cosmos(x, r, lam), losses)
    got, _ = scalings(mtl_optax.cosmos(k, lam, weights=r), losses)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + lam))


def test_cosmos_with_dirichlet_preferences():
  """With `key`, r ~ Dirichlet(1) each step (on the simplex, different every step) and
  s = dS/dL at that r."""
  k, lam = 4, 2.0
  losses = np.array([0.5, 1.0, 2.0, 4.0])
  tx = mtl_optax.cosmos(k, lam, key=3)
  state = tx.init({"w": jnp.zeros(k)})
  seen = []
  for _ in range(3):
    rows, state = tx.update({"w": jnp.eye(k)}, state, losses=jnp.asarray(losses, jnp.float32))
    r = np.asarray(state.inner.preference, np.float64)
    assert np.all(r >= 0) and abs(r.sum() - 1) < 1e-5
    want = finite_differences(lambda x: np_cosmos(x, r, lam), losses)
    np.testing.assert_allclose(np.diag(rows.rows["w"]), want, rtol=1e-4, atol=1e-4)
    seen.append(r)
  assert not np.allclose(seen[0], seen[1])


def test_cosmos_without_penalty_is_the_linear_scalarization():
  got, _ = scalings(mtl_optax.cosmos(3, 0.0), np.array([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(got, np.ones(3))


@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("theta", [0.0, 5.0])
@pytest.mark.parametrize("with_reference", [False, True])
def test_pbi_matches_numpy(k, theta, with_reference):
  rng = np.random.default_rng(10 + k)
  for _ in range(3):
    losses = 10.0 ** rng.uniform(-2, 1, size=k)
    w = rng.uniform(0.1, 1.0, size=k)
    ref = 0.5 * losses.min() * rng.uniform(size=k) if with_reference else None
    want = finite_differences(lambda x: np_pbi(x, w, theta, ref), losses)
    got, _ = scalings(mtl_optax.pbi(k, theta, weights=w, reference=ref), losses)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + theta))


def test_pbi_on_the_preference_line_stays_finite():
  """L on the line (d_2 = 0): torchjd's 1e-12 under the root keeps the gradient finite. In
  float32 the perpendicular part is rounding (~1e-7, above the 1e-6 root of 1e-12), so p / d_2
  is a unit vector of rounding, as in torch: s stays within theta of w_hat; in float64 it is
  w_hat."""
  losses, w_hat = np.array([2.0, 2.0, 2.0]), np.ones(3) / np.sqrt(3)
  got, _ = scalings(mtl_optax.pbi(3, 5.0), losses)
  assert np.all(np.isfinite(got)) and np.linalg.norm(got - w_hat) <= 5.0 + 1e-5
  with jax.enable_x64(True):
    tx = mtl_optax.pbi(3, 5.0)
    rows, _ = tx.update({"w": jnp.eye(3, dtype=jnp.float64)}, tx.init(None),
                        losses=jnp.asarray(losses))
  np.testing.assert_allclose(np.diag(rows.rows["w"]), w_hat, rtol=1e-5)


@pytest.mark.parametrize("name", ["cosmos", "pbi"])
def test_single_backward_path_equals_stacked(name):
  """One backward pass of sum_i s_i L_i gives the stacked path's update."""
  k = 3
  params = {"w": jnp.array([[0.3, -0.2, 0.5], [0.1, 0.4, -0.3]])}
  x = jnp.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.3]])

  def task_losses(p, x):
    return jnp.mean((x @ p["w"] - jnp.arange(k)) ** 2, axis=0) + 0.1

  tx = mtl_optax.registry.build(name, k)
  losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x)
  rows, _ = tx.update(jac, tx.init(params), params, losses=losses)
  (_, grad), _ = jax.jit(mtl_optax.value_and_reweighted_grad(task_losses, tx))(
      params, tx.init(params), x)
  np.testing.assert_allclose(grad["w"], rows.rows["w"].sum(0), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="lambda_"):
    mtl_optax.cosmos(2, -1.0)
  with pytest.raises(ValueError, match="theta"):
    mtl_optax.pbi(2, -1.0)
  with pytest.raises(ValueError, match="weights"):
    mtl_optax.pbi(3, weights=[1.0, 1.0])
  with pytest.raises(ValueError, match="weights"):
    mtl_optax.cosmos(2, weights=[-1.0, 1.0])
  with pytest.raises(ValueError, match="reference"):
    mtl_optax.pbi(2, reference=[0.0])
