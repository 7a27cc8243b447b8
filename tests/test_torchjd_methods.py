"""torchjd's aggregators (DualProj, ConFIG, Krum, TrimmedMean, Constant,
CR-MOGM), each against an independent NumPy / SciPy computation of its formula on the rows
themselves (float64, no Gram-matrix bookkeeping), and their argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

import mtl_optax
from mtl_optax import registry

N = 7
SHARED = {"w": True, "head": False}


def rows(k, seed, kind="random"):
  """(K, N) float64 rows; 'conflict': row 0 pulls against the others; 'duplicate': two equal."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, N)) * 10.0 ** rng.uniform(-1, 1, size=(k, 1))
  if kind == "conflict":
    g[0] = -g[1:].sum(0) + 0.1 * g[0]
  if kind == "duplicate":
    g[-1] = g[0]
  return g


@functools.lru_cache(maxsize=None)
def jitted(tx):
  return jax.jit(tx.update)


def update(tx, g, head=None):
  """One jitted update from a fresh state on {'w': rows, 'head': head rows}."""
  jac = {"w": jnp.asarray(g, jnp.float32)}
  if head is not None:
    jac["head"] = jnp.asarray(head, jnp.float32)
  params = jax.tree.map(lambda r: r[0], jac)
  return jitted(tx)(jac, tx.init(params))


def close(got, want, g, rtol=1e-4):
  """`got` equals `want` up to rtol of the rows' scale (float32 against float64)."""
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             atol=rtol * np.abs(g).max() * len(g), rtol=rtol)


# -- DualProj --

def project_onto_dual_cone(g, x):
  """argmin_{d : G d >= 0} ||d - x||^2 by SciPy's SLSQP on the primal problem."""
  res = minimize(lambda d: np.sum((d - x) ** 2), x, jac=lambda d: 2 * (d - x),
                 constraints={"type": "ineq", "fun": lambda d: g @ d, "jac": lambda d: g},
                 method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
  assert res.success
  return res.x


@pytest.mark.parametrize("k,kind,seed", [(3, "conflict", 0), (5, "conflict", 1),
                                         (4, "random", 2), (3, "duplicate", 3)])
def test_dualproj_is_the_projection_of_the_mean(k, kind, seed):
  g = rows(k, seed, kind)
  d, state = update(mtl_optax.dualproj(k, reg_eps=1e-7), g)
  want = project_onto_dual_cone(g, g.mean(0))
  close(d["w"], want, g, rtol=1e-3)
  close(np.asarray(state.weights) @ g, want, g, rtol=1e-3)


def test_dualproj_pref_vector_and_task_specific_sum():
  g, head, u = rows(3, 4, "conflict"), rows(3, 5), np.array([0.5, 0.2, 0.3])
  d, _ = update(mtl_optax.dualproj(3, pref_vector=u, reg_eps=1e-7, shared=SHARED), g, head)
  close(d["w"], project_onto_dual_cone(g, u @ g), g, rtol=1e-3)
  close(d["head"], head.sum(0), head)


def test_dualproj_default_is_torchjd_regularized_and_conflict_free():
  g = rows(4, 6, "conflict")
  d, _ = update(mtl_optax.dualproj(4), g)
  assert np.all(g @ np.asarray(d["w"], np.float64) >= -1e-3 * np.sum(g * g))
  close(d["w"], project_onto_dual_cone(g, g.mean(0)), g, rtol=1e-2)


# -- ConFIG --

def config_ref(g, p=None):
  """torchjd's ConFIG on the rows: e = pinv(U) p normalized, d = (sum_i g_i . e) e."""
  norms = np.linalg.norm(g, axis=1, keepdims=True)
  units = np.divide(g, norms, out=np.zeros_like(g), where=norms > 0)
  best = np.linalg.pinv(units) @ (np.ones(len(g)) if p is None else p)
  e = best / np.linalg.norm(best)
  return np.sum(g @ e) * e


@pytest.mark.parametrize("k,kind,seed", [(2, "random", 0), (3, "conflict", 1),
                                         (5, "random", 2), (4, "duplicate", 3)])
def test_config_matches_torchjd_formula(k, kind, seed):
  g = rows(k, seed, kind)
  d, _ = update(mtl_optax.config(k), g)
  close(d["w"], config_ref(g), g)


def test_config_zero_row_pref_vector_and_equal_cosines():
  g, p = rows(4, 7), np.array([1.0, 2.0, 0.5, 1.0])
  g[2] = 0.0
  d, _ = update(mtl_optax.config(4, pref_vector=p), g)
  close(d["w"], config_ref(g, p), g)
  g, tx = rows(3, 8), mtl_optax.config(3)  # independent rows: equal cosines with d
  d = np.asarray(update(tx, g)[0]["w"], np.float64)
  cosines = g @ d / np.linalg.norm(g, axis=1) / np.linalg.norm(d)
  np.testing.assert_allclose(cosines, cosines[0], rtol=1e-4)
  assert cosines[0] > 0
  assert not np.any(update(tx, np.zeros((3, N)))[0]["w"])


def test_config_collinear_rows():
  """Parallel rows: d is their sum; opposite rows: U^+ 1 = 0, so d = 0 at every scale (where
  torchjd normalizes rounding noise)."""
  g, tx = rows(1, 12)[0], mtl_optax.config(2)
  for scale in (1e-3, 1.0, 1e3):
    close(update(tx, scale * np.stack([g, 3 * g]))[0]["w"], 4 * scale * g, scale * g)
    assert not np.any(update(tx, scale * np.stack([g, -3 * g]))[0]["w"])


# -- Krum --

def krum_ref(g, f, m, score):
  """Blanchard et al. 2017: s(i) = sum over the K - f - 2 closest j != i of ||g_i - g_j||^2
  (or of the distances, torchjd), the mean of the m rows of least score."""
  k = len(g)
  dist = np.array([[np.sum((a - b) ** 2) for b in g] for a in g])
  dist = np.sqrt(dist) if score == "distance" else dist
  scores = [np.sum(sorted(np.delete(dist[i], i))[:k - f - 2]) for i in range(k)]
  return g[np.argsort(scores)[:m]].mean(0)


@pytest.mark.parametrize("k,f,m,score", [(3, 0, 1, "squared"), (7, 2, 1, "squared"),
                                         (7, 2, 3, "distance"), (6, 1, 6, "squared")])
def test_krum_matches_numpy(k, f, m, score):
  for seed in range(3):
    g = rows(k, seed)
    g[-f - 1:] += 30.0  # f + 1 far rows
    d, _ = update(mtl_optax.krum(k, n_byzantine=f, n_selected=m, score=score), g)
    close(d["w"], krum_ref(g, f, m, score), g)


def test_krum_score_modes_can_choose_differently():
  """Sum of squared distances (paper) against sum of distances (torchjd): on the first rows
  where the two references pick different rows, ours follows each."""
  g = next(g for g in (np.random.default_rng(seed).normal(size=(7, N)) for seed in range(100))
           if not np.allclose(krum_ref(g, 1, 1, "squared"), krum_ref(g, 1, 1, "distance")))
  for score in ("squared", "distance"):
    d, _ = update(mtl_optax.krum(7, n_byzantine=1, score=score), g)
    close(d["w"], krum_ref(g, 1, 1, score), g)


# -- TrimmedMean --

@pytest.mark.parametrize("k,t", [(1, 0), (3, 1), (5, 1), (8, 3)])
def test_trimmed_mean_matches_numpy_per_entry(k, t):
  g, head = rows(k, k), rows(k, k + 1)
  tx = mtl_optax.trimmed_mean(k, t, shared=SHARED)
  d, _ = update(tx, g, head)
  want = np.array([np.mean(sorted(col)[t:k - t]) for col in g.T])
  close(d["w"], want, g)
  close(d["head"], head.sum(0), head)


def test_trimmed_mean_is_not_gram_based():
  tx = mtl_optax.trimmed_mean(3, 1)
  losses = lambda p: jnp.stack([p["w"][0] ** 2, p["w"][1] ** 2, p["w"].sum()])
  f = mtl_optax.value_and_reweighted_grad(losses, tx)
  with pytest.raises(ValueError, match="not Gram-based"):
    f({"w": jnp.ones(2)}, tx.init(None))


# -- Constant --

def test_constant_weights():
  w = np.array([0.5, -1.0, 2.0])
  tx = mtl_optax.constant(w, shared=SHARED)
  g, head = rows(3, 9), rows(3, 10)
  d, state = update(tx, g, head)
  close(d["w"], w @ g, g)
  close(d["head"], head.sum(0), head)
  np.testing.assert_allclose(state.weights, w)


# -- CR-MOGM --

def test_cr_mogm_is_the_ema_of_any_weighting_over_steps():
  """A weighting w_i = 1 / ||g_i|| (normalized), its EMA computed by hand over 4 steps."""
  def unit(gram):
    w = 1.0 / jnp.sqrt(jnp.diag(gram))
    return w / w.sum()
  beta, k = 0.7, 3
  tx = mtl_optax.cr_mogm(k, unit, beta=beta)
  state, step = tx.init({"w": jnp.zeros(N)}), jax.jit(tx.update)
  ema = None
  for seed in range(4):
    g = rows(k, 20 + seed)
    d, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    fresh = 1.0 / np.linalg.norm(g, axis=1)
    fresh /= fresh.sum()
    ema = fresh if ema is None else beta * ema + (1 - beta) * fresh
    close(d["w"], ema @ g, g)
    np.testing.assert_allclose(state.weights, ema, rtol=1e-5)


def mgda2(g):
  """MGDA at K = 2: w = (a, 1 - a), a = clip((g2 - g1) . g2 / ||g2 - g1||^2, 0, 1)."""
  a = np.clip((g[1] - g[0]) @ g[1] / np.sum((g[1] - g[0]) ** 2), 0.0, 1.0)
  return np.array([a, 1 - a])


def test_cr_mogm_of_mgda_two_tasks_closed_form():
  """The moving average of MGDA's weights, in closed form at K = 2 (`mgda2`)."""
  tx = mtl_optax.cr_mogm(2, mtl_optax.mgda_weights, beta=0.5)
  state, step, ema = tx.init({"w": jnp.zeros(N)}), jax.jit(tx.update), None
  for seed in range(3):
    g = rows(2, 30 + seed)
    d, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    fresh = mgda2(g)
    ema = fresh if ema is None else 0.5 * ema + 0.5 * fresh
    close(d["w"], ema @ g, g)


def test_cr_mogm_beta_zero_is_the_wrapped_weighting():
  g = rows(3, 40, "conflict")
  d, _ = update(mtl_optax.cr_mogm(3, mtl_optax.mgda_weights, beta=0.0), g)
  want, _ = update(mtl_optax.mgda(3), g)
  close(d["w"], np.asarray(want["w"], np.float64), g, rtol=1e-5)


def test_cr_mogm_beta_set_by_inject_hyperparams():
  tx = optax.inject_hyperparams(mtl_optax.cr_mogm, static_args=("num_tasks", "weighting"))(
      2, mtl_optax.mgda_weights, beta=0.5)
  state, step = tx.init({"w": jnp.zeros(N)}), jax.jit(tx.update)
  g1, g2 = rows(2, 60), rows(2, 61)
  _, state = step({"w": jnp.asarray(g1, jnp.float32)}, state)
  state.hyperparams["beta"] = jnp.asarray(0.9)
  _, state = step({"w": jnp.asarray(g2, jnp.float32)}, state)
  np.testing.assert_allclose(state.inner_state.weights, 0.9 * mgda2(g1) + 0.1 * mgda2(g2),
                             rtol=1e-4)


# -- registry --

NEW = ("dualproj", "config", "krum", "trimmed_mean", "constant", "cr_mogm")


def test_registry_lists_them_and_krum_needs_three_tasks():
  assert set(NEW) <= set(registry.names("gradient"))
  assert "krum" not in registry.names("gradient", num_tasks=2)
  assert "trimmed_mean" in registry.names("gradient", having=("homogeneous",), num_tasks=1)
  gram = {n for n in NEW if "gram" in registry.METHODS[n].properties}
  assert gram == set(NEW) - {"trimmed_mean"}
  g = rows(3, 50)
  for name in NEW:
    d, _ = update(registry.build(name, 3), g)
    assert np.all(np.isfinite(d["w"]))


@pytest.mark.parametrize("name", [n for n in NEW if n != "trimmed_mean"])
def test_gram_based_ones_give_the_stacked_update_on_the_gram_only_path(name):
  x = jnp.asarray(rows(3, 11))
  losses = lambda p: (x @ p["w"]) ** 2 + p["head"]
  params = {"w": jnp.linspace(-1.0, 1.0, N), "head": jnp.zeros(3)}
  tx = registry.build(name, 3, shared=SHARED)
  gram_only = jax.jit(mtl_optax.value_and_reweighted_grad(losses, tx))
  (_, grad), _ = gram_only(params, tx.init(params))
  _, jac = mtl_optax.value_and_jacrev(losses)(params)
  stacked, _ = jax.jit(tx.update)(jac, tx.init(params))
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(stacked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))


# -- bad arguments --

@pytest.mark.parametrize("make,match", [
    (lambda: mtl_optax.dualproj(3, pref_vector=[1.0, 2.0]), "pref_vector"),
    (lambda: mtl_optax.dualproj(3, reg_eps=0.0), "reg_eps"),
    (lambda: mtl_optax.dualproj(0), "num_tasks"),
    (lambda: mtl_optax.config(2, pref_vector=[[1.0, 2.0]]), "pref_vector"),
    (lambda: mtl_optax.config(2, pref_vector=[1.0, np.nan]), "pref_vector"),
    (lambda: mtl_optax.krum(3, n_byzantine=1), "n_byzantine \\+ 3"),
    (lambda: mtl_optax.krum(5, n_byzantine=-1), "n_byzantine"),
    (lambda: mtl_optax.krum(5, n_selected=0), "n_selected"),
    (lambda: mtl_optax.krum(5, n_selected=6), "n_selected"),
    (lambda: mtl_optax.krum(5, score="l1"), "score"),
    (lambda: mtl_optax.trimmed_mean(4, 2), "2 trim_number \\+ 1"),
    (lambda: mtl_optax.trimmed_mean(4, -1), "trim_number"),
    (lambda: mtl_optax.constant([]), "weights"),
    (lambda: mtl_optax.constant([[1.0, 2.0]]), "weights"),
    (lambda: mtl_optax.constant([1.0, np.inf]), "weights"),
    (lambda: mtl_optax.cr_mogm(2, mtl_optax.mgda_weights, beta=1.5), "beta"),
    (lambda: mtl_optax.cr_mogm(2, "mgda"), "weighting"),
])
def test_bad_arguments_raise_at_construction(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("make,match", [
    (lambda: mtl_optax.dualproj(2), "K=2|disagree"),
    (lambda: mtl_optax.krum(4), "disagree"),
    (lambda: mtl_optax.trimmed_mean(4, 1), "disagree"),
    (lambda: mtl_optax.constant([1.0, 2.0]), "disagree"),
    (lambda: mtl_optax.cr_mogm(3, lambda gram: jnp.ones(2)), "shape"),
])
def test_bad_input_raises_at_trace_time(make, match):
  tx = make()
  g = jnp.ones((3, N))
  with pytest.raises(ValueError, match=match):
    jax.jit(tx.update)({"w": g}, tx.init({"w": g[0]}))
