"""torchjd's aggregators (DualProj, ConFIG, Krum, TrimmedMean, Constant,
CR-MOGM, PCD), each against an independent NumPy computation of its formula on the rows
themselves (float64, no Gram-matrix bookkeeping; the projections exactly, by their KKT
conditions), and their argument checks."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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

def nearest_feasible_point(x, a, b):
  """argmin_d ||d - x||^2 s.t. a d >= b, exactly and without a solver: for every set S of
  constraints taken as equalities, d = x + a_S^T lam_S with a_S d = b_S (least squares); the
  answer is the candidate that satisfies the KKT conditions (a d >= b, lam >= 0, a_S d = b_S)
  best. The projection onto a nonempty polyhedron is one of these candidates (S the active rows,
  linearly independent by Caratheodory), so this cannot fail on a feasible problem; the KKT
  residual of the returned point is checked."""
  norms = np.linalg.norm(a, axis=1)
  keep = norms > 0
  assert np.all(b[~keep] <= 0), "a zero row with b > 0: infeasible"
  a, b = a[keep] / norms[keep, None], b[keep] / norms[keep]  # unit rows: lam in x's units
  size = np.linalg.norm(x) + np.abs(b).max(initial=0.0)
  best, best_violation = x, np.inf
  for active in itertools.product((False, True), repeat=len(a)):
    s = np.array(active, bool)
    lam = np.zeros(len(a))
    if s.any():
      lam[s] = np.linalg.lstsq(a[s] @ a[s].T, b[s] - a[s] @ x, rcond=None)[0]
    d = x + a.T @ lam
    slack = a @ d - b
    violation = max(np.max(-slack, initial=0.0), np.max(-lam, initial=0.0),
                    np.max(np.abs(slack[s]), initial=0.0))
    if violation < best_violation:
      best, best_violation = d, violation
  assert best_violation <= 1e-9 * max(size, 1e-300), ("no KKT point: infeasible", best_violation)
  return best


def project_onto_dual_cone(g, x):
  """argmin_{d : G d >= 0} ||d - x||^2, exactly (`nearest_feasible_point`)."""
  return nearest_feasible_point(x, g, np.zeros(len(g)))


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


# -- PCD --

def pcd_rows(k, seed, n=N):
  """(K, n) rows with norms 10^U(-1, 1); each secondary pulls against the primary row 0 by a
  random fraction of its norm, so some constraints bind."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, n))
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  g[1:] -= rng.uniform(0.0, 1.5, size=(k - 1, 1)) * g[0]
  return g * 10.0 ** rng.uniform(-1, 1, size=(k, 1))


def pcd_qp(gt, tau):
  """argmin_d 1/2 ||d - gt_0||^2 s.t. gt_j . d >= tau_j ||gt_j||^2 (j >= 1), exactly
  (`nearest_feasible_point`: the KKT point of the primal QP, no solver)."""
  return nearest_feasible_point(gt[0], gt[1:], tau * np.sum(gt[1:] ** 2, axis=1))


class PCDRef:
  """PCD in NumPy float64: the moving average of the squared norms, the normalized rows, the
  primal QP (`pcd_qp`, or the K = 2 closed form) and the rescaling to ||g_1||."""

  def __init__(self, k, tau=0.02, beta=0.999, eps=1e-8, closed_form=False):
    self.v, self.n = np.zeros(k), 0
    self.tau = np.broadcast_to(np.asarray(tau, np.float64), (k - 1,))
    self.beta, self.eps, self.closed_form = beta, eps, closed_form

  def step(self, g, infeasible=False):
    """-> (d, the normalized rows g~, d~); `infeasible`: the constraints are (d~ = g~_1)."""
    sq = np.sum(g * g, axis=1)
    self.n += 1
    self.v = self.beta * self.v + (1 - self.beta) * sq
    gt = g / np.sqrt(self.v / (1 - self.beta**self.n) + self.eps)[:, None]
    if infeasible:
      dt = gt[0]
    elif self.closed_form:  # K = 2: g~_1 if it satisfies the constraint, else g~_1 plus the
      # shortfall (tau - g~_2 . g~_1 / ||g~_2||^2) times g~_2
      dt = gt[0] + max(0.0, self.tau[0] - gt[1] @ gt[0] / (gt[1] @ gt[1])) * gt[1]
    else:
      dt = pcd_qp(gt, self.tau)
    return dt * np.sqrt(sq[0]) / np.linalg.norm(dt), gt, dt


@pytest.mark.parametrize("k,tau,beta", [(3, 0.02, 0.999), (4, [0.1, 0.3, 0.05], 0.8),
                                        (2, 0.2, 0.9)])
def test_pcd_matches_the_primal_qp_over_steps(k, tau, beta):
  """Four steps against `PCDRef` (the exact QP; the closed form at K = 2): the update, the moving
  average in the state, and the guarantee g~_j . d~ >= tau_j ||g~_j||^2 on the weights."""
  tx = mtl_optax.pcd(k, tau=tau, beta=beta)
  ref = PCDRef(k, tau, beta, closed_form=k == 2)
  state, step = tx.init({"w": jnp.zeros(N)}), jax.jit(tx.update)
  for seed in range(4):
    g = pcd_rows(k, 70 + seed)
    d, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    want, gt, dt = ref.step(g)
    close(d["w"], want, g, rtol=1e-4)
    np.testing.assert_allclose(state.inner.sq_norms, ref.v, rtol=1e-5)
    assert int(state.inner.count) == seed + 1
    # d = c d~ with c = w_1 / s_1 (the primary's weight is 1 on the normalized rows).
    w = np.asarray(state.weights, np.float64)
    s = np.linalg.norm(gt, axis=1) / np.linalg.norm(g, axis=1)
    d_tilde = (w @ g) * s[0] / w[0]
    close(d_tilde, dt, gt, rtol=1e-4)
    slack = gt[1:] @ d_tilde - ref.tau * np.sum(gt[1:] ** 2, axis=1)
    assert np.all(slack >= -1e-4 * np.sum(gt * gt))
    assert np.any(slack < 1e-3)  # some constraint binds


def test_pcd_special_cases():
  """Two opposite secondaries (infeasible): g_1; zero primary or all-zero rows: 0; a zero
  secondary changes nothing; with norms far above sqrt(eps), d(a G) = a d(G)."""
  g = pcd_rows(3, 80)
  g[2] = -2.0 * g[1]
  d, state = update(mtl_optax.pcd(3), g)
  close(d["w"], g[0], g, rtol=1e-5)
  np.testing.assert_allclose(state.weights, [1.0, 0.0, 0.0], atol=1e-6)
  g = pcd_rows(4, 81)
  g[3] = -g[2]  # opposite secondaries again, besides a feasible one
  close(update(mtl_optax.pcd(4, tau=0.3), g)[0]["w"], g[0], g, rtol=1e-5)
  g, tx = pcd_rows(3, 82), mtl_optax.pcd(3)
  g[0] = 0.0
  d, state = update(tx, g)
  assert not np.any(d["w"]) and not np.any(state.weights)
  assert not np.any(update(tx, np.zeros((3, N)))[0]["w"])
  g = pcd_rows(3, 83)
  g[2] = 0.0
  close(update(tx, g)[0]["w"], PCDRef(2, closed_form=True).step(g[:2])[0], g, rtol=1e-4)
  g = pcd_rows(3, 84)
  for a in (1e-2, 1e2):
    close(update(tx, a * g)[0]["w"], a * np.asarray(update(tx, g)[0]["w"], np.float64), a * g)
  for scale in (1e-12, 1e12):  # finite at extreme scales
    assert np.all(np.isfinite(update(tx, scale * pcd_rows(3, 85))[0]["w"]))


def test_pcd_rank_deficient_long_rows():
  """Rows of length 4000, whose float32 Gram matrix is rounded beyond K eps: two equal
  secondaries and one in the span of two other rows, over three steps of changing row norms,
  then two opposite secondaries (infeasible) once the moving average lags the norms. The
  reference solves the QP in the rows' span (an orthonormal basis Q: the same Gram matrix)."""
  k, length = 5, 4000
  tx, ref = mtl_optax.pcd(k, beta=0.9), PCDRef(k, beta=0.9)
  state, step = tx.init({"w": jnp.zeros(length)}), jax.jit(tx.update)
  for seed in range(4):
    g = pcd_rows(k, 100 + seed, length)
    g[3] = g[1]
    g[4] = 0.6 * g[0] - 0.8 * g[2]
    if seed == 3:
      g[4] = -2.0 * g[1]
    q = np.linalg.qr(g.T)[0]
    d, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
    close(d["w"], q @ ref.step(g @ q, infeasible=seed == 3)[0], g, rtol=1e-3)


def test_pcd_secondaries_of_rank_two_in_both_precisions():
  """Six secondaries in a plane, rows of length 2000: their cosine matrix has rank 2 and
  eigenvalues rounded below 0 by more than K eps (with that fixed ridge, the float64 dual
  was indefinite for these two draws, which then returned g_1)."""
  tx = mtl_optax.pcd(7)
  for seed in (34, 62):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(7, 2000))
    g[2:] = rng.normal(size=(5, 2)) @ g[:2]
    g *= 10.0 ** rng.uniform(-2, 2, size=(7, 1))
    q = np.linalg.qr(g.T)[0][:, :2]
    want = q @ PCDRef(7).step(g @ q)[0]
    for dtype, rtol in ((jnp.float32, 1e-3), (jnp.float64, 1e-9)):
      with jax.enable_x64(dtype == jnp.float64):
        jac, params = {"w": jnp.asarray(g, dtype)}, {"w": jnp.zeros(2000, dtype)}
        d, _ = jitted(tx)(jac, tx.init(params))
      close(d["w"], want, g, rtol=rtol)


def test_pcd_non_finite_step_leaves_the_state():
  """A NaN row makes its task sit out the step (issue 24): weight 0, its moving average kept,
  and the update is PCD of the other tasks from their state; nothing non-finite reaches the
  state or the update (`apply_if_finite`, which checks its input, still skips the whole
  step)."""
  tx = mtl_optax.pcd(3, beta=0.5)
  state, step = tx.init({"w": jnp.zeros(N)}), jax.jit(tx.update)
  g = pcd_rows(3, 90)
  _, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
  bad = pcd_rows(3, 91)
  bad[1, 0] = np.nan
  d, bad_state = step({"w": jnp.asarray(bad, jnp.float32)}, state)
  assert np.all(np.isfinite(d["w"])) and bad_state.weights[1] == 0
  np.testing.assert_array_equal(bad_state.inner.sq_norms[1], state.inner.sq_norms[1])
  assert int(bad_state.inner.count) == 2
  two = mtl_optax.pcd(2, beta=0.5)  # the primary (task 0) and task 2, from their state
  inner = mtl_optax.PCDState(state.inner.sq_norms[jnp.array([0, 2])], state.inner.count)
  want, want_state = jax.jit(two.update)({"w": jnp.asarray(bad[[0, 2]], jnp.float32)},
                                         two.init({"w": jnp.zeros(N)})._replace(inner=inner))
  close(d["w"], want["w"], bad[[0, 2]])
  np.testing.assert_allclose(bad_state.inner.sq_norms[jnp.array([0, 2])],
                             want_state.inner.sq_norms, rtol=1e-6)
  g = pcd_rows(3, 92)
  d, next_state = step({"w": jnp.asarray(g, jnp.float32)}, bad_state)
  assert np.all(np.isfinite(d["w"])) and np.all(np.isfinite(next_state.inner.sq_norms))
  guarded = mtl_optax.apply_if_finite(tx, 3)  # skips the step: zero update, state as it was
  d, guarded_state = jax.jit(guarded.update)({"w": jnp.asarray(bad, jnp.float32)},
                                             guarded.init({"w": jnp.zeros(N)}))
  assert not np.any(d["w"]) and not np.any(np.isnan(guarded_state.inner_state.weights))


def test_pcd_tau_and_beta_set_by_inject_hyperparams():
  tx = optax.inject_hyperparams(mtl_optax.pcd, static_args=("num_tasks",))(2, tau=0.2, beta=0.9)
  state, step = tx.init({"w": jnp.zeros(N)}), jax.jit(tx.update)
  ref = PCDRef(2, 0.2, 0.9, closed_form=True)
  g = pcd_rows(2, 93)
  d, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
  close(d["w"], ref.step(g)[0], g)
  state.hyperparams["tau"], ref.tau = jnp.asarray(0.5), np.array([0.5])
  g = pcd_rows(2, 94)
  d, state = step({"w": jnp.asarray(g, jnp.float32)}, state)
  close(d["w"], ref.step(g)[0], g)


def test_pcd_on_the_gram_only_and_representation_paths():
  """Three steps with the state carried: the Gram-only path equals the stacked path, and the
  representation path's z-update is PCD (`PCDRef`) on the flattened z-rows."""
  rng = np.random.default_rng(95)
  k, b, h = 3, 8, 5
  params = {"trunk": jnp.asarray(rng.normal(size=(4, h)), jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(k, h)), jnp.float32)}
  encode = lambda p, x: jnp.tanh(x @ p["trunk"])
  heads = lambda p, z, x: jnp.mean((z @ p["heads"].T - x[:, :k]) ** 2, axis=0)
  losses = lambda p, x: heads(p, encode(p, x), x)
  mask = {"trunk": True, "heads": False}
  tx = mtl_optax.pcd(k, beta=0.7, shared=mask)
  gram_only = jax.jit(mtl_optax.value_and_reweighted_grad(losses, tx))
  stacked = jax.jit(lambda p, s, x: tx.update(mtl_optax.value_and_jacrev(losses)(p, x)[1], s, p))
  rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=mask)
  tx_rep = mtl_optax.pcd(k, beta=0.7)  # the representation path: shared=None (z shared)
  rep_step = jax.jit(lambda rows, s: tx_rep.update(rows, s))
  s_gram = s_stacked = tx.init(params)
  s_rep = tx_rep.init(mtl_optax.row_like(rep(params, jnp.zeros((b, 4)))[1]))
  ref = PCDRef(k, beta=0.7)
  for _ in range(3):
    x = jnp.asarray(rng.normal(size=(b, 4)), jnp.float32)
    (_, got), s_gram = gram_only(params, s_gram, x)
    want, s_stacked = stacked(params, s_stacked, x)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, c, rtol=2e-3, atol=2e-4 * float(jnp.abs(c).max()))
    _, rows, _ = rep(params, x)
    out, s_rep = rep_step(rows, s_rep)
    flat = np.asarray(rows.z, np.float64).reshape(k, -1)
    close(np.ravel(out.z), ref.step(flat)[0], flat, rtol=1e-3)


# -- registry --

NEW = ("dualproj", "config", "krum", "trimmed_mean", "constant", "cr_mogm", "pcd")


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
    (lambda: mtl_optax.pcd(3, tau=1.5), "tau"),
    (lambda: mtl_optax.pcd(3, tau=[0.1, -0.1]), "tau"),
    (lambda: mtl_optax.pcd(3, tau=[0.1, 0.2, 0.3]), "K - 1 = 2"),
    (lambda: mtl_optax.pcd(3, tau=[[0.1, 0.2]]), "tau"),
    (lambda: mtl_optax.pcd(3, beta=1.0), "beta"),
    (lambda: mtl_optax.pcd(3, beta=-0.1), "beta"),
    (lambda: mtl_optax.pcd(3, eps=-1e-8), "eps"),
    (lambda: mtl_optax.pcd(0), "num_tasks"),
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
    (lambda: mtl_optax.pcd(2), "disagree"),
])
def test_bad_input_raises_at_trace_time(make, match):
  tx = make()
  g = jnp.ones((3, N))
  with pytest.raises(ValueError, match=match):
    jax.jit(tx.update)({"w": g}, tx.init({"w": g[0]}))
