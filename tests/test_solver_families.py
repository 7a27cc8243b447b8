"""The solvers on five families of hard but ordinary Gram matrices, against float64 SciPy.

Families: i.i.d. rows; correlated rows; rank-deficient (rank K/4); row norms spread
over 1e-2..1e2; nearly opposite rows (g_1 = -g_0 + 1% noise). Every method gets the float32
Gram matrix of the float32 rows and must give a direction d = sum_i w_i g_i with cosine
>= 0.9999 to its float64 reference. K = 40 is marked slow (compiles and references take long).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from mtl_optax import solvers
from mtl_optax import (aligned_mtl_weights, cagrad_weights, imgrad_weights, imtl_g_weights,
                       upgrad_weights)

FAMILIES = ("iid", "correlated", "rank", "norms", "opposite")
KS = [3, 11, pytest.param(40, marks=pytest.mark.slow)]
MIN_COS = 0.9999
F32_EPS = float(np.finfo(np.float32).eps)


def family(name, k, seed=0):
  """K rows of dimension 2K + 32 of the named family."""
  rng = np.random.default_rng([seed, k, FAMILIES.index(name)])
  n = 2 * k + 32
  g = rng.normal(size=(k, n))
  if name == "correlated":
    g = rng.normal(size=(1, n)) + 0.5 * g  # pairwise cosines ~0.8
  elif name == "rank":  # rank K/4, a common component keeps the origin out of the hull
    a = rng.normal(size=(k, max(1, k // 4)))
    a[:, 0] += 2.0
    g = a @ rng.normal(size=(a.shape[1], n))
  elif name == "norms":
    g *= 10.0 ** rng.uniform(-2, 2, size=(k, 1))
  elif name == "opposite":
    g[1] = -g[0] + 0.01 * rng.normal(size=n)
  return g


def grams(k):
  """Rows (float64, float32-representable) and float32 Gram matrices of every family."""
  gs = [np.asarray(np.float32(family(f, k)), np.float64) for f in FAMILIES]
  g32 = jnp.asarray(np.stack(gs), jnp.float32)
  return gs, jnp.einsum("bkn,bjn->bkj", g32, g32, precision=jax.lax.Precision.HIGHEST)


def cosine(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


# -- float64 references -------------------------------------------------------------------------


def np_simplex(fun, k, w0=None):
  cons = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}
  return optimize.minimize(fun, np.full(k, 1.0 / k) if w0 is None else w0, bounds=[(0, 1)] * k,
                           constraints=cons, method="SLSQP",
                           options={"ftol": 1e-16, "maxiter": 5000}).x


def np_min_norm(m):
  """Min-norm point of the hull: SLSQP in the rows' cosines, then the exact equality QP on its
  support (kept if it is feasible and no worse)."""
  k = len(m)
  n = np.sqrt(np.diag(m))
  c = m / np.outer(n, n)
  cons = {"type": "eq", "fun": lambda b: b @ (1 / n) - 1.0, "jac": lambda b: 1 / n}
  b = optimize.minimize(lambda b: b @ c @ b, n / k, jac=lambda b: 2 * c @ b,
                        bounds=[(0, None)] * k, constraints=cons, method="SLSQP",
                        options={"ftol": 1e-16, "maxiter": 5000}).x
  w = np.maximum(b / n, 0.0)
  w /= w.sum()
  s = w > 1e-9 * w.max()
  kkt = np.block([[m[np.ix_(s, s)], np.ones((s.sum(), 1))], [np.ones((1, s.sum())), 0.0]])
  sol = np.linalg.lstsq(kkt, np.r_[np.zeros(s.sum()), 1.0], rcond=1e-14)[0]
  exact = np.zeros(k)
  exact[s] = sol[:-1]
  return exact if np.all(exact >= 0) and exact @ m @ exact <= w @ m @ w * (1 + 1e-9) else w


def np_ball(m, w, radius, c):
  """CAGrad's d = g0 + radius g_w / ||g_w||, rescale '1+c^2', times K (as `cagrad`'s defaults)."""
  k = len(m)
  return (1.0 / k + radius / (np.sqrt(max(w @ m @ w, 0.0)) + 1e-8) * w) / (1 + c**2) * k


def np_cagrad(m, c=0.4):
  k = len(m)
  m = m / (np.trace(m) / k)
  radius = c * np.sqrt(max(m.mean(), 0.0) + 1e-8) + 1e-8
  w = np_simplex(lambda w: w @ m.mean(1) + radius * np.sqrt(max(w @ m @ w, 0.0) + 1e-8), k)
  return np_ball(m, w, radius, c)


def np_imgrad(m, c=0.8):
  """IMGrad 'reference' form: cos(g0, g_m) from the min-norm point, then the weighted dual."""
  k = len(m)
  m = m / (np.trace(m) / k)
  w_m = np_min_norm(m)
  cos = (w_m @ m.mean(1)) / max(np.sqrt(m.mean()) * np.sqrt(w_m @ m @ w_m), 1e-8)
  radius = c * np.sqrt(max(m.mean(), 0.0) + 1e-8) + 1e-8
  w = np_simplex(lambda w: ((1.5 - cos) * (w @ m.mean(1))
                            + cos * radius * np.sqrt(max(w @ m @ w, 0.0) + 1e-8)), k)
  return np_ball(m, w, radius, c)


def np_upgrad(m, reg=1e-4):
  """sum_i argmin_{v >= e_i / K} v^T A v, A = M / trace + reg I, by L-BFGS-B."""
  k = len(m)
  a = m / np.trace(m) + reg * np.eye(k)
  total = np.zeros(k)
  for i in range(k):
    b = a[:, i] / k
    z = optimize.minimize(lambda z: 0.5 * z @ a @ z + b @ z, np.zeros(k), jac=lambda z: a @ z + b,
                          bounds=[(0, None)] * k, method="L-BFGS-B",
                          options={"ftol": 1e-17, "gtol": 1e-14, "maxiter": 20000}).x
    total += np.eye(k)[i] / k + z
  return total


def np_imtl_g(m):
  """IMTL-G's closed form; the pseudo-inverse cut-off is the float32 one of `jnp.linalg.pinv`
  (10 K eps times the largest eigenvalue), so rows that float32 cannot tell from dependent
  (the nearly opposite pair at K = 40) are treated alike."""
  n = np.sqrt(np.diag(m))
  c = m / np.outer(n, n)
  fit = np.linalg.pinv(c, rcond=10 * len(m) * F32_EPS, hermitian=True) @ np.ones(len(m))
  return fit / n / (fit / n).sum()


def np_aligned(m):
  """Aligned-MTL ('min'): eigenvalues kept above K eps(float32) times the largest, as the
  method's rule in float32 (row norms over 1e-2..1e2 put the rest below float32's resolution)."""
  lam, v = np.linalg.eigh(m)
  keep = lam > lam.max() * len(m) * F32_EPS
  return (np.sqrt(lam[keep].min()) * (v[:, keep] / np.sqrt(lam[keep])) @ v[:, keep].T).sum(1)


def np_nash(m):
  """Nash's fixed point by damped Newton in float64 on the unit-diagonal problem."""
  n = np.sqrt(np.diag(m))
  c = m / np.outer(n, n)
  b = np.full(len(m), np.sqrt(len(m) / max(c.sum(), 1e-3)))
  for _ in range(200):
    r = c @ b - 1 / b
    step = -np.linalg.solve(c + np.diag(1 / b**2), r)
    dec = np.sqrt(max(-r @ step, 0.0))
    b = b + (1.0 if dec < 0.5 else 1.0 / (1.0 + dec)) * step
  assert np.abs(b * (c @ b) - 1).max() < 1e-9
  return b / n


# -- the library's weights (jitted per K, vmapped over the families) ---------------------------


METHODS = {
    "mgda": (solvers.min_norm_weights, np_min_norm),
    "cagrad": (cagrad_weights, np_cagrad),
    "upgrad": (upgrad_weights, np_upgrad),
    "imtl_g": (imtl_g_weights, np_imtl_g),
    "aligned_mtl": (aligned_mtl_weights, np_aligned),
    "imgrad": (imgrad_weights, np_imgrad),
    "nash_mtl": (lambda m: solvers.nash_weights(m)[0], np_nash),
}


@partial(jax.jit, static_argnums=0)
def batched(name, ms):
  return jax.vmap(METHODS[name][0])(ms)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("name", list(METHODS))
def test_direction_matches_float64(name, k):
  gs, ms = grams(k)
  ws = np.asarray(batched(name, ms), np.float64)
  assert np.all(np.isfinite(ws))
  cos = {f: cosine(w @ g, METHODS[name][1](g @ g.T) @ g) for f, w, g in zip(FAMILIES, ws, gs)}
  assert min(cos.values()) >= MIN_COS, cos


@pytest.mark.parametrize("k", KS)
def test_nash_accepts_its_iterate(k):
  """Nearly opposite rows: float32 cannot reach residual 1e-4, yet the iterate is accepted."""
  _, ms = grams(k)
  _, ok = jax.jit(jax.vmap(solvers.nash_weights))(ms)
  assert np.all(np.asarray(ok))


def test_degenerate_inputs_are_finite():
  """Zero, exactly opposite and identical rows (a batch of 5, as the families, to reuse the
  compiled K = 3 functions): finite weights, never NaN."""
  opp = np.array([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
  ms = jnp.asarray(np.stack([np.zeros((3, 3)), opp @ opp.T, np.ones((3, 3)), opp @ opp.T,
                             np.zeros((3, 3))]), jnp.float32)
  for name in ("mgda", "cagrad", "upgrad", "imgrad", "nash_mtl"):
    assert np.all(np.isfinite(np.asarray(batched(name, ms)))), name
  alpha, ok = jax.jit(partial(solvers.nash_weights, prev=jnp.ones(3)))(ms[1])
  assert np.all(np.isfinite(np.asarray(alpha))) and not np.any(np.asarray(ok))
