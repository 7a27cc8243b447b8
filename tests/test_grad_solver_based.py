"""MGDA, CAGrad, IMGrad, Nash-MTL and UPGrad against independent NumPy/SciPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import optimize

import mtl_optax
from covering import all_but, covering
from mtl_optax.toy import TOY_STARTS, toy_losses

N = 12  # parameters per task row, split over two leaves


def jacobian(k, kind="plain", seed=0):
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, N))
  if kind == "rank":
    g = rng.normal(size=(k, 2)) @ rng.normal(size=(2, N))
  elif kind == "zero":
    g[min(1, k - 1)] = 0.0
  elif kind == "norms":
    g *= 10.0 ** rng.uniform(-1.5, 1.5, size=(k, 1))
  return g


def as_tree(g):
  g = jnp.asarray(g, jnp.float32)
  return {"a": g[:, :6].reshape(-1, 2, 3), "b": g[:, 6:]}


def flat(tree):
  a, b = np.asarray(tree["a"]).reshape(-1), np.asarray(tree["b"])
  return np.concatenate([a, b]).astype(np.float64)


def apply(tx, g, losses=None, state=None):
  tree = as_tree(g)
  state = tx.init(jax.tree.map(lambda x: x[0], tree)) if state is None else state
  out, state = jax.jit(tx.update)(tree, state, losses=losses)
  return flat(out), state


def simplex_argmin(fun, k):
  cons = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}
  return optimize.minimize(fun, np.full(k, 1.0 / k), bounds=[(0, 1)] * k, constraints=cons,
                           method="SLSQP", options={"ftol": 1e-15, "maxiter": 2000}).x


def np_min_norm(g):
  m = g @ g.T
  return simplex_argmin(lambda w: w @ m @ w / m.max(), g.shape[0])


def scale(g):
  return np.linalg.norm(g, axis=1).max()


CASES = [(2, "plain"), (3, "plain"), (7, "plain"), (7, "rank"), (3, "zero"), (5, "norms")]


# -- MGDA --

def np_mgda(g, losses, normalization, apply_to, by_k):
  norms = np.linalg.norm(g, axis=1)
  norms = np.where(norms > 0, norms, 1.0)
  n = {"none": lambda: np.ones(len(g)), "l2": lambda: norms, "loss": lambda: losses,
       "loss+": lambda: losses * norms}[normalization]()
  w = np_min_norm(g / n[:, None])
  if apply_to == "normalized":
    w = w / n
  return (len(g) if by_k else 1) * w @ g


@pytest.mark.parametrize("k,kind", CASES)
def test_mgda_matches_scipy_and_does_not_conflict(k, kind):
  g = jacobian(k, kind, seed=k)
  d, _ = apply(mtl_optax.mgda(len(g)), g)
  np.testing.assert_allclose(d, np_mgda(g, None, "none", "raw", False), atol=1e-3 * scale(g))
  assert np.min(g @ d - d @ d) > -1e-5 * scale(g) ** 2


@pytest.mark.parametrize("normalization,apply_to_by_k", covering(
    ["l2", "loss", "loss+"], [("raw", False), ("normalized", False), ("raw", True)]))
def test_mgda_normalizations(normalization, apply_to_by_k):
  apply_to, by_k = apply_to_by_k
  g = jacobian(3, "norms", seed=11)
  losses = np.array([0.5, 2.0, 7.0])
  tx = mtl_optax.mgda(len(g), normalization, apply_to=apply_to, scale_by_num_tasks=by_k)
  d, _ = apply(tx, g, jnp.asarray(losses, jnp.float32))
  np.testing.assert_allclose(d, np_mgda(g, losses, normalization, apply_to, by_k),
                             atol=1e-3 * scale(g) * (3 if by_k else 1))


def test_mgda_bad_arguments():
  with pytest.raises(ValueError, match="normalization"):
    mtl_optax.mgda(3, "max")
  with pytest.raises(ValueError, match="apply_to"):
    mtl_optax.mgda(3, apply_to="sum")
  with pytest.raises(ValueError, match="losses"):
    apply(mtl_optax.mgda(3, "loss"), jacobian(3))


# -- CAGrad and IMGrad (the reference code, with SLSQP in float64) --

def np_cagrad(g, c, rescale="1+c^2", by_k=True, imbalance=None):
  k = len(g)
  m = g @ g.T
  g0_norm = np.sqrt(m.mean() + 1e-8)
  radius = c * g0_norm + 1e-8
  mean_row = m.mean(1)
  if imbalance is None:
    fun = lambda w: w @ mean_row + radius * np.sqrt(w @ m @ w + 1e-8)
  else:
    wm = np_min_norm(g)
    gm = wm @ g
    cos = gm @ g.mean(0) / (np.linalg.norm(gm) * np.linalg.norm(g.mean(0)))
    fun = {
        "reference": lambda w: ((1.5 - cos) * w @ mean_row
                                + cos * radius * np.sqrt(w @ m @ w + 1e-8)),
        "paper_eq11": lambda w: (1 - cos) * w @ mean_row + cos * radius * (w @ m @ w),
        "paper_eq9": lambda w: ((1 - cos) * (w @ mean_row + radius * np.sqrt(w @ m @ w + 1e-8))
                                + cos * (w @ m @ w)),
    }[imbalance]
  w = simplex_argmin(fun, k)
  gw = w @ g
  d = g.mean(0) + radius / (np.linalg.norm(gw) + 1e-8) * gw
  d = d / {"none": 1.0, "1+c^2": 1 + c**2, "1+c": 1 + c}[rescale]
  return d * k if by_k else d


CAGRAD_CASES = [(2, "plain"), (3, "plain"), (7, "plain"), (7, "rank"), (3, "zero"), (5, "norms")]


@pytest.mark.parametrize("k,kind", CAGRAD_CASES)
def test_cagrad_matches_reference(k, kind):
  # Unit-variance rows: the reference's absolute epsilons and ours (relative) coincide.
  g = jacobian(k, kind, seed=20 + k)
  d, _ = apply(mtl_optax.cagrad(len(g)), g)
  np.testing.assert_allclose(d, np_cagrad(g, 0.4), atol=2e-3 * k * scale(g))


@pytest.mark.parametrize("rescale,by_k", [("none", False), ("1+c", True)])
def test_cagrad_options(rescale, by_k):
  g = jacobian(3, seed=5)
  d, _ = apply(mtl_optax.cagrad(len(g), 0.5, rescale=rescale, scale_by_num_tasks=by_k), g)
  np.testing.assert_allclose(d, np_cagrad(g, 0.5, rescale, by_k), atol=5e-3 * scale(g))


@pytest.mark.parametrize("k_kind,form", covering(
    [(2, "plain"), (3, "plain"), (7, "rank"), (5, "norms")],
    ["reference", "paper_eq11", "paper_eq9"]))
def test_imgrad_forms_match_numpy(form, k_kind):
  k, kind = k_kind
  g = jacobian(k, kind, seed=40 + k)
  if form != "reference":  # the paper forms are not scale-free; we evaluate them on M / (tr/K)
    g = g / np.sqrt(np.trace(g @ g.T) / k)
  d, _ = apply(mtl_optax.imgrad(len(g), form=form), g)
  np.testing.assert_allclose(d, np_cagrad(g, 0.8, imbalance=form), atol=2e-3 * k * scale(g))


def test_cagrad_imgrad_bad_arguments():
  with pytest.raises(ValueError, match="rescale"):
    mtl_optax.cagrad(3, rescale=1)
  with pytest.raises(ValueError, match="form"):
    mtl_optax.imgrad(3, form="eq13")


# -- UPGrad --

def np_upgrad(g, reg=1e-4):
  k = len(g)
  m = g @ g.T
  m = m / np.trace(m) + reg * np.eye(k)
  w = np.zeros(k)
  for i in range(k):
    u = np.eye(k)[i] / k
    w += optimize.minimize(lambda v: v @ m @ v, u, jac=lambda v: 2 * m @ v,
                           bounds=[(lo, None) for lo in u], method="L-BFGS-B",
                           options={"ftol": 1e-16, "gtol": 1e-14, "maxiter": 10000}).x
  return w @ g


@pytest.mark.parametrize("k,kind", CASES)
def test_upgrad_matches_scipy_and_does_not_conflict(k, kind):
  g = jacobian(k, kind, seed=60 + k)
  d, _ = apply(mtl_optax.upgrad(len(g)), g)
  np.testing.assert_allclose(d, np_upgrad(g), atol=1e-3 * scale(g))
  # Non-conflicting up to the regularization: g_i . d >= -reg_eps * trace(M) * max weight.
  assert np.min(g @ d) > -2e-4 * np.trace(g @ g.T)


def test_upgrad_without_conflict_is_the_mean():
  g = np.abs(jacobian(3, seed=1))  # all pairwise products positive: every row is in the cone
  d, _ = apply(mtl_optax.upgrad(len(g), reg_eps=1e-8), g)
  np.testing.assert_allclose(d, g.mean(0), atol=1e-4 * scale(g))


# -- Nash-MTL --

def np_nash(g):
  m = g @ g.T
  # The positive root (the system has others): bounded least squares from 1 / ||g_i||.
  x0 = 1.0 / np.linalg.norm(g, axis=1)
  return optimize.least_squares(lambda a: a * (m @ a) - 1.0, x0, bounds=(1e-12, np.inf),
                                xtol=1e-15, ftol=1e-15, gtol=1e-15).x


@pytest.mark.parametrize("k,kind", [(2, "plain"), (3, "plain"), (7, "plain"), (5, "norms")])
def test_nash_matches_scipy_root(k, kind):
  g = jacobian(k, kind, seed=80 + k)
  alpha = np_nash(g)
  d, state = apply(mtl_optax.nash_mtl(k, max_norm=0.0), g)
  np.testing.assert_allclose(state.inner.alpha * (g @ g.T @ state.inner.alpha), 1.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(state.inner.alpha), alpha, rtol=1e-3)
  np.testing.assert_allclose(d, alpha @ g, atol=1e-3 * np.linalg.norm(alpha @ g))
  clipped, _ = apply(mtl_optax.nash_mtl(k), g)  # ||d|| = sqrt(K) > 1 = max_norm
  np.testing.assert_allclose(clipped, alpha @ g / np.linalg.norm(alpha @ g), atol=1e-4)


def test_nash_update_weights_every_keeps_alpha_between_updates():
  tx = mtl_optax.nash_mtl(3, update_weights_every=2, max_norm=0.0)
  g1, g2, g3 = (jacobian(3, seed=s) for s in (1, 2, 3))
  _, state = apply(tx, g1)
  a1 = np_nash(g1)
  np.testing.assert_allclose(state.inner.alpha, a1, rtol=1e-3)
  d2, state = apply(tx, g2, state=state)  # step 1: alpha reused
  np.testing.assert_allclose(state.inner.alpha, a1, rtol=1e-3)
  np.testing.assert_allclose(d2, a1 @ g2, atol=1e-3 * np.linalg.norm(a1 @ g2))
  _, state = apply(tx, g3, state=state)  # step 2: recomputed
  np.testing.assert_allclose(state.inner.alpha, np_nash(g3), rtol=1e-3)
  assert int(state.inner.step) == 3


def test_nash_zero_row_keeps_previous_alpha_for_that_task():
  g = jacobian(3, "zero", seed=4)
  _, state = apply(mtl_optax.nash_mtl(3), g)
  assert state.inner.alpha[1] == 1.0
  keep = np.array([0, 2])
  np.testing.assert_allclose(np.asarray(state.inner.alpha)[keep], np_nash(g[keep]), rtol=1e-3)


def test_nash_checks_num_tasks():
  with pytest.raises(ValueError, match="disagree"):
    apply(mtl_optax.nash_mtl(4), jacobian(3))
  with pytest.raises(ValueError, match="update_weights_every"):
    mtl_optax.nash_mtl(3, update_weights_every=0)


# -- properties shared by all of them --

ALL = {
    "mgda": lambda k: mtl_optax.mgda(k),
    "cagrad": lambda k: mtl_optax.cagrad(k),
    "imgrad": lambda k: mtl_optax.imgrad(k),
    "upgrad": lambda k: mtl_optax.upgrad(k),
    "nash_mtl": lambda k: mtl_optax.nash_mtl(k),
}


@pytest.mark.parametrize("name,k", covering(list(ALL), [1, 3]))
def test_zero_gradients_and_single_task_are_finite(name, k):
  d, state = apply(ALL[name](k), np.zeros((k, N)))
  assert np.all(d == 0)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  g = jacobian(1, seed=3)
  d, _ = apply(ALL[name](1), g)
  cos = d @ g[0] / (np.linalg.norm(d) * np.linalg.norm(g[0]))
  assert np.isfinite(d).all() and cos > 0.999


# Permutation equivariance of all five: tests/test_properties.py (every method that claims it).


# The mask is resolved before the method (tests/test_fusion.py); Nash-MTL weights the heads.
@pytest.mark.parametrize("name", all_but(list(ALL), {"cagrad", "imgrad", "upgrad"}))
def test_mask_task_specific_leaves(name):
  g = jacobian(3, seed=9)
  tree = as_tree(g)
  tx = ALL[name](3)
  masked = {"mgda": mtl_optax.mgda, "cagrad": mtl_optax.cagrad, "imgrad": mtl_optax.imgrad,
            "upgrad": mtl_optax.upgrad}.get(name)
  tx = (masked(3, shared={"a": True, "b": False}) if masked else
        mtl_optax.nash_mtl(3, shared={"a": True, "b": False}))
  out, state = jax.jit(tx.update)(tree, tx.init(None))
  shared_only, _ = apply(ALL[name](3), np.concatenate([g[:, :6], np.zeros((3, 6))], axis=1))
  np.testing.assert_allclose(np.asarray(out["a"]).reshape(-1), shared_only[:6], atol=1e-5)
  weights = np.asarray(state.inner.alpha) if name == "nash_mtl" else np.ones(3)
  np.testing.assert_allclose(out["b"], weights @ g[:, 6:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_vmap_over_a_batch_of_jacobians(name):
  gs = np.stack([jacobian(3, seed=s) for s in range(3)])
  tx = ALL[name](3)
  trees = as_tree(gs.reshape(-1, N))
  trees = jax.tree.map(lambda x: x.reshape((3, 3) + x.shape[1:]), trees)
  state = tx.init(None)
  states = jax.tree.map(lambda x: jnp.stack([x] * 3), state)
  out, _ = jax.jit(jax.vmap(tx.update))(trees, states)
  for b in range(3):
    d, _ = apply(tx, gs[b])
    np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[b], out)), d,
                               atol=1e-5 * 3 * scale(gs[b]))


# -- the toy problem --

def train_toy(tx, starts, steps=5000, lr=1e-2):
  """The end points of Adam runs from each start (one compiled, vmapped program)."""
  opt = optax.chain(tx, optax.adam(lr))

  def step(carry, _):
    x, state = carry
    losses, jac = mtl_optax.value_and_jacrev(toy_losses)(x)
    updates, state = opt.update(jac, state, x, losses=losses)
    return (optax.apply_updates(x, updates), state), None

  run = lambda x: jax.lax.scan(step, (x, opt.init(x)), None, length=steps)[0][0]
  return np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(starts, jnp.float32)))


def test_toy_mgda_reaches_the_pareto_set():
  for x in train_toy(mtl_optax.mgda(2), [(-8.5, -5.0), TOY_STARTS[4]]):
    # Pareto set of the quadratic branch: x1 between the task minima, x2 at the common minimum.
    assert -7.5 < x[0] < 7.5 and abs(x[1] + 8.3552) < 0.3, x
    jac = np.asarray(jax.jacrev(toy_losses)(jnp.asarray(x)), np.float64)
    d = np_min_norm(jac) @ jac  # Pareto-stationary: the min-norm point is (nearly) zero
    assert np.linalg.norm(d) < 0.05 * scale(jac)


def test_toy_imgrad_reduces_both_objectives():
  starts = [TOY_STARTS[0], TOY_STARTS[2]]
  for x0, x in zip(starts, train_toy(mtl_optax.imgrad(2), starts)):
    before, after = (np.asarray(toy_losses(jnp.asarray(p))) for p in (x0, x))
    assert np.all(after < before - 5.0), (before, after)
