"""Closed-form, Gram-expressible gradient balancers against independent NumPy computations.

PCGrad, GradVac, IMTL-G, IMTL, Aligned-MTL, GradNorm: each reference below works on the
flattened rows in float64 (vector operations, no Gram-matrix bookkeeping).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from grad_harness import (CASES, F32_EPS, P, adam_ref, assert_close, jacobian, make, params_like,
                          run, step_keys, to_tree)
import mtl_optax
from mtl_optax.grad.pcgrad import task_orders

# -- PCGrad --

def pcgrad_ref(rows, orders):
  """Yu et al. 2020, Alg. 1 on the vectors themselves."""
  out = np.zeros(rows.shape[1])
  for i in range(rows.shape[0]):
    g = rows[i].copy()
    for j in orders[i]:
      if j != i and g @ rows[j] < 0:
        g -= (g @ rows[j]) / (rows[j] @ rows[j]) * rows[j]
    out += g
  return out


@pytest.mark.parametrize("k,kind", CASES)
def test_pcgrad_matches_numpy_with_the_same_orders(k, kind):
  seqs = [jacobian(k, kind, seed) for seed in range(3)]
  outs = run(make("pcgrad", k, key=0), seqs, key=7)
  for rows, out, sub in zip(seqs, outs, step_keys(7, 3)):
    orders = np.asarray(task_orders(sub, k))
    assert sorted(orders[0].tolist()) == list(range(k))
    assert_close(out, pcgrad_ref(rows, orders), rows)


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_two_tasks_closed_form_for_any_order(seed):
  rows = jacobian(2, "random", seed)
  rows[1] = -rows[0] + 0.3 * rows[1]  # make them conflict
  g1, g2 = rows
  dot = g1 @ g2
  assert dot < 0
  ref = g1 - dot / (g2 @ g2) * g2 + g2 - dot / (g1 @ g1) * g1
  for key in range(3):
    assert_close(run(make("pcgrad", 2, key=0), [rows], key=key)[0], ref, rows)


def test_pcgrad_keeps_non_conflicting_rows():
  rows = np.abs(jacobian(3, "random"))
  assert_close(run(make("pcgrad", 3, key=0), [rows])[0], rows.sum(0), rows)


# -- GradVac --

def gradvac_ref(rows_seq, orders_seq, beta):
  """Wang et al. 2021, Alg. 1 as in LibMTL, on vectors, over several steps."""
  k = rows_seq[0].shape[0]
  target, outs = np.zeros((k, k)), []
  for rows, orders in zip(rows_seq, orders_seq):
    pc = rows.copy()
    for i in range(k):
      for j in orders[i]:
        if j == i:
          continue
        pc_norm, g_norm = np.linalg.norm(pc[i]), np.linalg.norm(rows[j])
        phi = pc[i] @ rows[j] / (pc_norm * g_norm + 1e-8)
        t = target[i, j]
        if phi < t:
          w = pc_norm * (t * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - t**2))
          pc[i] += w / (g_norm * np.sqrt(1 - t**2) + 1e-8) * rows[j]
        target[i, j] = (1 - beta) * t + beta * phi
    outs.append(pc.sum(0))
  return outs


@pytest.mark.parametrize("k,kind", CASES)
def test_gradvac_matches_numpy_over_steps(k, kind):
  seqs = [jacobian(k, kind, seed) for seed in range(4)]
  beta = 0.5
  outs = run(make("gradvac", k, beta, key=0), seqs, key=3)
  orders = [np.asarray(task_orders(sub, k)) for sub in step_keys(3, 4)]
  for out, ref, rows in zip(outs, gradvac_ref(seqs, orders, beta), seqs):
    assert_close(out, ref, rows, rtol=1e-3)


def test_gradvac_first_step_is_pcgrad():
  """With zero targets, GradVac's first step projects conflicts to orthogonality like PCGrad."""
  rows = jacobian(3, "random", 5)
  rows[2] = -rows[0] + 0.2 * rows[2]
  out = run(make("gradvac", 3, key=0), [rows], key=11)[0]
  ref = pcgrad_ref(rows, np.asarray(task_orders(step_keys(11, 1)[0], 3)))
  assert_close(out, ref, rows)


def test_gradvac_identical_tasks_stay_finite():
  rows = np.repeat(jacobian(1, "random"), 3, axis=0)
  outs = run(make("gradvac", 3, key=0), [rows] * 40)
  for out in outs:
    assert np.all(np.isfinite(out))
  assert_close(outs[-1], rows.sum(0), rows, rtol=1e-3)


# -- IMTL-G --

def imtl_g_card(rows):
  """The card's closed form (Liu et al. 2021): alpha_{2..K} = g_1 U^T (D U^T)^-1."""
  units = rows / np.linalg.norm(rows, axis=1, keepdims=True)
  d_mat, u_mat = rows[:1] - rows[1:], units[:1] - units[1:]
  rest = rows[0] @ u_mat.T @ np.linalg.inv(d_mat @ u_mat.T)
  return np.concatenate([[1 - rest.sum()], rest])


def imtl_g_lstsq(rows):
  """Dependent rows: d is proportional to argmin_z ||U z - 1|| (least-squares equal unit
  projections), written d = sum_i alpha_i g_i with sum alpha = 1."""
  norms = np.linalg.norm(rows, axis=1)
  units = rows / norms[:, None]
  z = np.linalg.lstsq(units, np.ones(len(rows)), rcond=1e-6)[0]
  if z @ z < 1e-6:  # no direction has equal nonzero projections: d = 0
    return np.zeros(len(rows))
  v = np.linalg.lstsq(units.T, z, rcond=1e-6)[0] / norms
  return v / v.sum()


@pytest.mark.parametrize("k,kind", CASES)
def test_imtl_g_matches_numpy(k, kind):
  rows = jacobian(k, kind)
  out = run(make("imtl_g", len(rows)), [rows])[0]
  if kind == "rank_deficient":
    alpha = imtl_g_lstsq(rows)
  elif kind == "zero_row":
    keep = np.linalg.norm(rows, axis=1) > 0
    alpha = np.zeros(k)
    alpha[keep] = imtl_g_card(rows[keep])
  else:
    alpha = imtl_g_card(rows)
  assert_close(out, alpha @ rows, rows, rtol=1e-3)


@pytest.mark.parametrize("k,kind", [(k, kind) for k in (2, 3, 7) for kind in ("random", "scales")])
def test_imtl_g_equal_projections(k, kind):
  rows = jacobian(k, kind, seed=3)
  out = run(make("imtl_g", len(rows)), [rows])[0]
  proj = rows @ out / np.linalg.norm(rows, axis=1)
  np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)
  assert abs(proj.mean()) > 1e-3


def test_imtl_g_opposite_rows_give_zero():
  rows = jacobian(1, "random")
  rows = np.concatenate([rows, -3.0 * rows])
  np.testing.assert_allclose(run(make("imtl_g", len(rows)), [rows])[0], 0.0, atol=1e-5)


@pytest.mark.parametrize("k", (2, 3, 7))
def test_imtl_is_imtl_l_then_imtl_g(k):
  seqs = [jacobian(k, "random", seed) for seed in range(3)]
  losses = np.random.default_rng(1).uniform(0.2, 3.0, size=(3, k))
  lr = 0.3
  outs = run(make("imtl", k, learning_rate=lr), seqs, losses)
  s, adam = np.zeros(k), adam_ref(lr)
  for rows, loss, out in zip(seqs, losses, outs):
    scaled = np.exp(s)[:, None] * rows
    assert_close(out, imtl_g_card(scaled) @ scaled, scaled, rtol=1e-3)
    s = s + adam(np.exp(s) * loss - 1.0)


# -- Aligned-MTL --

def aligned_ref(rows, scale_mode="min"):
  """Senushkin et al. 2023, Alg. 1 in LibMTL's form, float64 eigendecomposition."""
  lam, vecs = np.linalg.eigh(rows @ rows.T)
  keep = lam > lam.max() * len(lam) * F32_EPS
  lam, vecs = lam[keep], vecs[:, keep]
  scale = lam.min() if scale_mode == "min" else lam.mean()
  balance = np.sqrt(scale) * (vecs / np.sqrt(lam)) @ vecs.T
  return balance.sum(1) @ rows


@pytest.mark.parametrize("k,kind", CASES)
@pytest.mark.parametrize("scale_mode", ("min", "rmse"))
def test_aligned_mtl_matches_numpy(k, kind, scale_mode):
  rows = jacobian(k, kind)
  out = run(make("aligned_mtl", len(rows), scale_mode), [rows])[0]
  assert_close(out, aligned_ref(rows, scale_mode), rows, rtol=1e-3)


def test_aligned_mtl_orthogonal_rows_are_rescaled_to_the_smallest_norm():
  rows = np.zeros((3, P))
  rows[0, 0], rows[1, 1], rows[2, 2] = 1.0, 4.0, -0.5
  out = run(make("aligned_mtl", len(rows)), [rows])[0]
  np.testing.assert_allclose(out[:3], [0.5, 0.5, -0.5], rtol=1e-5)


def test_aligned_mtl_rejects_unknown_scale_mode():
  with pytest.raises(ValueError, match="scale_mode"):
    mtl_optax.aligned_mtl(3, "median")


# -- GradNorm --

def gradnorm_ref(rows_seq, losses_seq, alpha, lr):
  """Chen et al. 2018, Alg. 1 with W = all shared parameters, Adam on w, renormalized to K."""
  k = rows_seq[0].shape[0]
  w, initial, adam, outs = np.ones(k), None, adam_ref(lr), []
  for rows, losses in zip(rows_seq, losses_seq):
    initial = losses if initial is None else initial
    outs.append(w @ rows)
    norms = np.linalg.norm(rows, axis=1)
    grad_norms = w * norms
    ratio = losses / initial
    target = grad_norms.mean() * (ratio / ratio.mean())**alpha
    w = w + adam(np.sign(grad_norms - target) * norms)
    w = np.maximum(w, 1e-8)
    w = k * w / w.sum()
  return outs


@pytest.mark.parametrize("k,kind", CASES)
def test_gradnorm_matches_numpy_over_steps(k, kind):
  seqs = [jacobian(k, kind, seed) for seed in range(5)]
  losses = np.random.default_rng(2).uniform(0.2, 3.0, size=(5, k))
  outs = run(make("gradnorm", k, 1.5, learning_rate=0.1), seqs, losses)
  for out, ref, rows in zip(outs, gradnorm_ref(seqs, losses, 1.5, 0.1), seqs):
    assert_close(out, ref, rows, rtol=1e-3)


def test_gradnorm_weights_stay_positive_and_sum_to_k():
  k = 3
  rows = jacobian(k, "scales")
  transform = mtl_optax.gradnorm(k, learning_rate=2.0)
  state = transform.init(params_like())
  for t in range(20):
    losses = jnp.array([1.0, 0.5 ** t, 2.0])
    _, state = transform.update(to_tree(rows), state, params_like(), losses=losses)
    assert np.all(np.asarray(state.inner.loss_weights) > 0)
    np.testing.assert_allclose(np.asarray(state.inner.loss_weights).sum(), k, rtol=1e-5)
