"""`mtl_optax.fusion`: IGB's Algorithm 3 in the reference code's reading and as its text says,
on the three paths, against an independent NumPy computation of each reading.

Model: z = tanh(x W) (shared trunk W), L_i = mean_b (z_b . h_i - y_bi)^2 + c_i (heads h_i).
Loss balancer: log losses (s_i = 1 / L_i), and IGBv1 over a few steps. Gradient balancers:
Nash-MTL (scale-invariant, weights its heads by alpha) and MGDA (neither).

- reference: shared d = B(s_i g_i) on the shared rows, heads as B weights them (Nash-MTL:
  sum_i alpha'_i s_i h_i, alpha' of the scaled rows; MGDA: sum_i s_i h_i);
- algorithm3: shared as above, heads sum_i s_i h_i.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from covering import covering

K, D, H, B = 3, 4, 5, 12
MASK = {"trunk": True, "heads": False}
BALANCERS = {"nash_mtl": lambda shared: mtl_optax.nash_mtl(K, shared=shared),
             "mgda": lambda shared: mtl_optax.mgda(K, shared=shared)}


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"trunk": jnp.asarray(rng.normal(size=(D, H)) * 0.5, jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(H, K)) * 0.5, jnp.float32)}
  x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(B, K)) * [1.0, 10.0, 0.1], jnp.float32)
  return params, x, y


def encode(params, x, y):
  return jnp.tanh(x @ params["trunk"])


def heads(params, z, x, y):
  return jnp.mean((z @ params["heads"] - y) ** 2, axis=0) + jnp.array([0.1, 0.5, 2.0])


def task_losses(params, x, y):
  return heads(params, encode(params, x, y), x, y)


# -- the NumPy side --

def np_nash_alpha(m: np.ndarray) -> np.ndarray:
  """alpha > 0 with alpha_i (M alpha)_i = 1: Newton on 1/2 a^T M a - sum log a, float64."""
  a = np.ones(len(m)) / np.sqrt(np.trace(m) / len(m))
  for _ in range(200):
    grad = m @ a - 1.0 / a
    hess = m + np.diag(1.0 / a**2)
    step = np.linalg.solve(hess, grad)
    t = 1.0
    while np.any(a - t * step <= 0):
      t /= 2
    a = a - t * step
  np.testing.assert_allclose(a * (m @ a), 1.0, rtol=1e-9)
  return a


def np_min_norm(m: np.ndarray) -> np.ndarray:
  """MGDA's min-norm weights on the simplex, by projected gradient (float64)."""
  w = np.ones(len(m)) / len(m)
  lr = 1.0 / np.linalg.eigvalsh(m)[-1]
  for _ in range(20000):
    v = w - lr * (m @ w)  # projection onto the simplex (Duchi et al. 2008)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    w = np.maximum(v - css[rho] / (rho + 1), 0)
  return w


def np_fusion(name: str, reading: str, shared_rows: np.ndarray, head_rows: np.ndarray,
              s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(shared update, heads update) of one fusion step on flat rows (K, P) and (K, Q)."""
  gs, hs = s[:, None] * shared_rows, s[:, None] * head_rows
  m = gs @ gs.T
  if name == "nash_mtl":
    alpha = np_nash_alpha(m)
    d = alpha @ gs
    d = d / max(1.0, np.linalg.norm(d))  # the shared part clipped to norm 1
    heads_out = alpha @ hs if reading == "reference" else hs.sum(0)
  else:
    d = np_min_norm(m) @ gs
    heads_out = hs.sum(0)
  return d, heads_out


def np_igb_v1_scalings(losses: np.ndarray, spe: int) -> np.ndarray:
  """s_t = lambda_t / L_t of IGBv1 (Dai et al. 2023, Eq. 3) for losses (T, K)."""
  base = losses[spe:2 * spe].mean(0)
  out = []
  for t, loss in enumerate(losses):
    lam = np.ones(K)
    if t >= 2 * spe:
      e = np.exp(loss / base - (loss / base).max())
      lam = K * e / e.sum()
    out.append(lam / loss)
  return np.stack(out)


def flat_jacobian(params, x, y):
  jac = jax.jacrev(task_losses)(params, x, y)
  return (np.asarray(jac["trunk"], np.float64).reshape(K, -1),
          np.asarray(jac["heads"], np.float64).reshape(K, -1))


def check(name, reading, got_trunk, got_heads, want):
  tol = dict(rtol=2e-3, atol=2e-5)
  np.testing.assert_allclose(np.ravel(got_trunk), want[0], **tol)
  np.testing.assert_allclose(np.ravel(got_heads), want[1], **tol)


# -- the three paths --

@pytest.mark.parametrize("name,reading", covering(sorted(BALANCERS), ["reference", "algorithm3"]))
def test_stacked_and_gram_only_paths_match_numpy(name, reading):
  params, x, y = problem()
  losses = np.asarray(task_losses(params, x, y), np.float64)
  want = np_fusion(name, reading, *flat_jacobian(params, x, y), 1.0 / losses)
  tx = mtl_optax.fusion(mtl_optax.log_losses(K), BALANCERS[name](MASK), reading=reading,
                        shared=MASK)
  losses_, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
  d, _ = jax.jit(tx.update)(jac, tx.init(params), params, losses=losses_)
  check(name, reading, d["trunk"], d["heads"], want)
  (_, g), _ = jax.jit(mtl_optax.value_and_reweighted_grad(task_losses, tx))(
      params, tx.init(params), x, y)
  check(name, reading, g["trunk"], g["heads"], want)


@pytest.mark.parametrize("name,reading", covering(sorted(BALANCERS), ["reference", "algorithm3"]))
def test_representation_path_matches_numpy(name, reading):
  params, x, y = problem(1)
  rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=MASK)
  losses, rows, pullback = rep(params, x, y)
  z_rows = np.asarray(rows.z, np.float64).reshape(K, -1)
  head_rows = np.asarray(rows.specific["heads"], np.float64).reshape(K, -1)
  want = np_fusion(name, reading, z_rows, head_rows, 1.0 / np.asarray(losses, np.float64))
  tx = mtl_optax.fusion(mtl_optax.log_losses(K), BALANCERS[name](None), reading=reading)
  out, _ = jax.jit(tx.update)(rows, tx.init(mtl_optax.row_like(rows)), losses=losses)
  check(name, reading, out.z, out.specific["heads"], want)
  assert pullback(out)["trunk"].shape == (D, H)


@pytest.mark.parametrize("reading", ["reference", "algorithm3"])
def test_igb_v1_then_nash_mtl_over_steps(reading):
  """IGBv1's epoch-based weights over several steps, both readings, on the stacked path."""
  spe, steps = 2, 6
  tx = mtl_optax.fusion(mtl_optax.igb_v1(K, spe), mtl_optax.nash_mtl(K, shared=MASK),
                        reading=reading, shared=MASK)
  update = jax.jit(tx.update)
  state, all_losses, wants, gots = None, [], [], []
  for t in range(steps):
    params, x, y = problem(t)
    state = tx.init(params) if state is None else state
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
    all_losses.append(np.asarray(losses, np.float64))
    d, state = update(jac, state, params, losses=losses)
    gots.append(d)
  s = np_igb_v1_scalings(np.stack(all_losses), spe)
  for t in range(steps):
    params, x, y = problem(t)
    want = np_fusion("nash_mtl", reading, *flat_jacobian(params, x, y), s[t])
    check("nash_mtl", reading, gots[t]["trunk"], gots[t]["heads"], want)


def test_reference_reading_is_the_chain_and_nash_mtl_ignores_the_loss_balancer():
  """The default reading is `optax.chain`; for Nash-MTL (scale-invariant) it is Nash-MTL's
  own update, heads included; Algorithm 3's reading changes the heads only."""
  params, x, y = problem(2)
  losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
  nash = mtl_optax.nash_mtl(K, shared=MASK)
  alone, _ = nash.update(jac, nash.init(params), params, losses=losses)
  ref = mtl_optax.fusion(mtl_optax.log_losses(K), nash)
  fused, _ = ref.update(jac, ref.init(params), params, losses=losses)
  chained = optax.chain(mtl_optax.log_losses(K), nash)
  assert jax.tree.structure(ref.init(params)) == jax.tree.structure(chained.init(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), fused, alone)
  alg3 = mtl_optax.fusion(mtl_optax.log_losses(K), nash, reading="algorithm3", shared=MASK)
  out, _ = alg3.update(jac, alg3.init(params), params, losses=losses)
  np.testing.assert_allclose(out["trunk"], alone["trunk"], rtol=1e-4, atol=1e-6)
  assert not np.allclose(out["heads"], alone["heads"], rtol=1e-2)


def test_bad_reading():
  with pytest.raises(ValueError, match="reading"):
    mtl_optax.fusion(mtl_optax.log_losses(K), mtl_optax.nash_mtl(K), reading="paper")


def test_benchmark_names_of_both_readings():
  """`benchmarks.methods`: `igb_v1+nash_mtl` is the reference reading, `...@alg3` Algorithm 3's,
  on both paths; MGDA's fusion has one reading (its heads get the plain sum)."""
  from benchmarks import methods
  reg = methods.registry("qm9")
  key = jax.random.PRNGKey(0)
  for name, reading in (("igb_v1+nash_mtl", "reference"), ("igb_v1+nash_mtl@alg3", "algorithm3"),
                        ("igb_v2+nash_mtl@alg3", "algorithm3"), ("igb_v1+mgda", "reference")):
    for suffix, path in (("", "stacked"), ("_rep", "representation")):
      links = reg[name + suffix](K, 2, key)
      assert (links.reading, links.path) == (reading, path)
  assert "igb_v1+mgda@alg3" not in reg
