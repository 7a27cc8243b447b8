"""Diagnostics of a step against NumPy, their recording, and IMGrad's threshold baselines."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from mtl_optax import registry

EPS32 = float(np.finfo(np.float32).eps)
TOL = 1e-4


def rows_of(kind: str, k: int, seed: int, n: int = 6) -> np.ndarray:
  """Random rows with norms over 1e-2..1e2; `kind` adds zero, duplicated or opposite rows."""
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, n)) * 10.0 ** rng.uniform(-2, 2, size=(k, 1))
  if kind == "zero" and k > 1:
    g[rng.integers(k)] = 0.0
  if kind == "all_zero":
    g[:] = 0.0
  if kind == "duplicate" and k > 1:
    g[-1] = g[0]
  if kind == "opposite" and k > 1:
    g[-1] = -g[0]
  return g.astype(np.float32)


def reference(g: np.ndarray, w: np.ndarray) -> dict:
  """The diagnostics of d = sum_i w_i g_i, computed independently in float64 from the rows."""
  g64, w64 = g.astype(np.float64), w.astype(np.float64)
  d = w64 @ g64
  k = len(g)
  norms = np.array([np.sqrt(np.sum(r * r)) for r in g64])
  zero = norms <= EPS32 * norms.max()
  d_norm = np.sqrt(np.sum(d * d))
  d_zero = d_norm <= EPS32 * max(norms.max() * np.abs(w64).sum(), np.finfo(np.float32).tiny)
  progress = np.array([np.dot(r, d) for r in g64])
  cos = np.array([0.0 if (zero[i] or d_zero) else progress[i] / (norms[i] * d_norm)
                  for i in range(k)])
  if zero.all():
    ratio = 1.0
  elif zero.any():
    ratio = np.inf
  else:
    ratio = norms.max() / norms.min()
  pair = [0.0 if (zero[i] or zero[j]) else np.dot(g64[i], g64[j]) / (norms[i] * norms[j])
          for i in range(k) for j in range(i + 1, k)]
  conflict = sum(c < -TOL for c in pair) / max(len(pair), 1)
  a = np.abs(w64)
  if a.sum() > 0:
    p = a / a.sum()
    effective = np.exp(-sum(x * np.log(x) for x in p if x > 0))
    normalized = w64 / a.sum()
  else:
    effective, normalized = 0.0, np.zeros(k)
  return dict(progress=progress, cosines=cos, norms=norms, imbalance_ratio=ratio,
              pareto_failure=bool(np.any(cos < -TOL)), conflict_share=conflict,
              min_pair_cosine=min(pair) if pair else 1.0, normalized_weights=normalized,
              effective_tasks=effective)


def check(diag: mtl_optax.Diagnostics, ref: dict, scale: float) -> None:
  for field, want in ref.items():
    got = np.asarray(getattr(diag, field), np.float64)
    assert not np.any(np.isnan(got)), field
    if field in ("pareto_failure",):
      assert bool(got) == want, field
    elif field == "progress":
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * scale, err_msg=field)
    elif field == "imbalance_ratio":
      np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=field)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-3, atol=2e-4, err_msg=field)


KINDS = ("plain", "zero", "all_zero", "duplicate", "opposite")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_against_numpy_under_jit_and_vmap(k, kind):
  seeds = range(4)
  gs = np.stack([rows_of(kind, k, s) for s in seeds])
  rng = np.random.default_rng(k)
  ws = rng.uniform(-0.5, 2.0, size=(len(gs), k)).astype(np.float32)
  ws[0] = 1.0  # the plain sum
  if kind == "opposite" and k > 1:
    ws[1] = 0.0
    ws[1, [0, -1]] = 1.0  # d = 0 exactly: every cosine 0
  from_gram = jax.jit(jax.vmap(lambda g, w: mtl_optax.diagnostics_from_gram(g @ g.T, w)))
  from_rows = jax.jit(jax.vmap(lambda g, w: mtl_optax.diagnostics_from_rows(
      {"a": g[:, :2], "b": g[:, 2:].reshape(k, 2, -1)},
      {"a": w @ g[:, :2], "b": (w @ g[:, 2:]).reshape(2, -1)}, weights=w)))
  for diags in (from_gram(gs, ws), from_rows(gs, ws)):
    for i, (g, w) in enumerate(zip(gs, ws)):
      diag = jax.tree.map(lambda x, i=i: x[i], diags)
      scale = float(np.abs(g).max() ** 2 * np.abs(w).sum() + 1e-30)
      check(diag, reference(g, w), scale)
      assert bool(diag.converged)


def test_rows_recover_weights_and_use_the_mask():
  g = rows_of("plain", 3, 0)
  w = np.array([0.2, 1.0, 0.5], np.float32)
  rows = {"shared": jnp.asarray(g), "head": jnp.ones((3, 4))}
  update = {"shared": jnp.asarray(w @ g), "head": jnp.full((4,), 100.0)}
  diag = mtl_optax.diagnostics_from_rows(rows, update, {"shared": True, "head": False})
  np.testing.assert_allclose(diag.normalized_weights, w / w.sum(), rtol=2e-3)
  check(diag, reference(g, w), float(np.abs(g).max() ** 2 * 2))


def test_imbalance_ratio_definition_and_pareto_failure():
  gram = jnp.array([[4.0, -3.9], [-3.9, 4.0]])  # two nearly opposite rows of norm 2
  diag = mtl_optax.diagnostics_from_gram(gram, jnp.array([1.0, 0.1]))
  assert float(diag.imbalance_ratio) == 1.0 and bool(diag.pareto_failure)
  assert float(diag.conflict_share) == 1.0
  gram = jnp.diag(jnp.array([1.0, 9.0, 0.0]))
  diag = mtl_optax.diagnostics_from_gram(gram, jnp.ones(3))
  assert diag.imbalance_ratio == jnp.inf and float(diag.cosines[2]) == 0.0
  assert float(diag.effective_tasks) == pytest.approx(3.0)


# -- recording --

K = 3
PARAMS = {"trunk": jnp.linspace(-0.3, 0.4, 12).reshape(4, 3), "heads": jnp.ones((3, K)) * 0.1}
SHARED = {"trunk": True, "heads": False}
X = jnp.linspace(-1, 1, 40).reshape(10, 4)
Y = jnp.stack([jnp.sin(X[:, 0]), 3 * X[:, 1], X[:, 2] ** 2], 1)


def task_losses(params, x, y):
  return jnp.mean((encode(params, x, y) @ params["heads"] - y) ** 2, 0) * jnp.array([1.0, 10.0,
                                                                                     0.1])


def encode(params, x, y):
  return jnp.tanh(x @ params["trunk"])


def heads(params, z, x, y):
  return jnp.mean((z @ params["heads"] - y) ** 2, 0) * jnp.array([1.0, 10.0, 0.1])


def bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", ["nash_mtl", "mgda@imbalance", "graddrop"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("pcgrad", "igb_v1+cagrad")])
def test_recording_changes_no_update(name):
  """Two steps with and without the wrapper, on every path the method runs on: the same bits."""
  def build(shared):
    if name == "igb_v1+cagrad":
      return optax.chain(mtl_optax.igb_v1(K, 2), mtl_optax.cagrad(K, shared=shared))
    return registry.build(name, K, key=1, shared=shared)

  paths = ["stacked", "representation"] + (["gram"] if name != "graddrop" else [])
  for path in paths:
    shared = None if path == "representation" else SHARED
    plain, watched = build(shared), mtl_optax.with_diagnostics(build(shared), K, shared=shared)

    def run(tx):
      if path == "stacked":
        def step(state):
          losses, jac = mtl_optax.value_and_jacrev(task_losses)(PARAMS, X, Y)
          return tx.update(jac, state, PARAMS, losses=losses)
        state = tx.init(PARAMS)
      elif path == "gram":
        grad_fn = mtl_optax.value_and_reweighted_grad(task_losses, tx)

        def step(state):
          (_, grad), state = grad_fn(PARAMS, state, X, Y)
          return grad, state
        state = tx.init(PARAMS)
      else:
        rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=SHARED)

        def step(state):
          losses, rows, pullback = rep(PARAMS, X, Y)
          out, state = tx.update(rows, state, losses=losses)
          return pullback(out), state
        state = tx.init(mtl_optax.row_like(rep(PARAMS, X, Y)[1]))
      step = jax.jit(step)
      d1, state = step(state)
      d2, state = step(state)
      return (d1, d2), state

    (d_plain, s_plain), (d_watched, s_watched) = run(plain), run(watched)
    bitwise_equal(d_plain, d_watched)
    bitwise_equal(s_plain, s_watched.inner)
    diag = s_watched.diagnostics
    assert int(s_watched.steps) == 2
    assert all(np.all(np.isfinite(np.asarray(x, float))) for x in
               (diag.progress, diag.cosines, diag.norms, diag.normalized_weights))
    assert float(diag.imbalance_ratio) > 1.0


def test_same_diagnostics_on_stacked_and_gram_paths():
  tx = lambda: mtl_optax.with_diagnostics(mtl_optax.nash_mtl(K, shared=SHARED), K,  # noqa: E731
                                          shared=SHARED)
  t = tx()
  losses, jac = mtl_optax.value_and_jacrev(task_losses)(PARAMS, X, Y)
  _, stacked = jax.jit(t.update)(jac, t.init(PARAMS), PARAMS, losses=losses)
  _, gram = jax.jit(mtl_optax.value_and_reweighted_grad(task_losses, t))(PARAMS, t.init(PARAMS),
                                                                        X, Y)
  for a, b in zip(stacked.diagnostics, gram.diagnostics):
    np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-3, atol=1e-5)


def test_fallbacks_are_counted():
  """Nash-MTL has no solution for two opposite rows: it keeps alpha and reports it."""
  tx = mtl_optax.with_diagnostics(mtl_optax.nash_mtl(2), 2)
  opposite = {"w": jnp.array([[1.0, 2.0], [-1.0, -2.0]])}
  fine = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  state = tx.init({"w": jnp.zeros(2)})
  update = jax.jit(tx.update)
  for jac, converged in ((fine, True), (opposite, False), (opposite, False), (fine, True)):
    _, state = update(jac, state)
    assert bool(state.diagnostics.converged) == converged
  assert int(state.fallbacks) == 2 and int(state.steps) == 4



@pytest.mark.parametrize("path", ["stacked", "gram"])
def test_every_records_on_the_chosen_steps_only(path):
  """`every=3`: steps 0, 3, 6 are recorded (each equal to recording every step), the others keep
  the last record; the updates and the fallback count are those of recording every step."""
  def trajectory(every):
    tx = mtl_optax.with_diagnostics(mtl_optax.nash_mtl(K, shared=SHARED), K, shared=SHARED,
                                    every=every)
    if path == "stacked":
      def step(state, x):
        losses, jac = mtl_optax.value_and_jacrev(task_losses)(PARAMS, x, Y)
        return tx.update(jac, state, PARAMS, losses=losses)
    else:
      grad_fn = mtl_optax.value_and_reweighted_grad(task_losses, tx)

      def step(state, x):
        (_, grad), state = grad_fn(PARAMS, state, x, Y)
        return grad, state
    xs = X[None] * jnp.linspace(0.5, 1.5, 7)[:, None, None]  # a different batch per step
    _, (d, diags, fallbacks) = jax.jit(lambda s: jax.lax.scan(
        lambda s, x: (lambda o: (o[1], (o[0], o[1].diagnostics, o[1].fallbacks)))(step(s, x)),
        s, xs))(tx.init(PARAMS))
    return d, diags, fallbacks

  d_all, diag_all, fb_all = trajectory(1)
  d_some, diag_some, fb_some = trajectory(3)
  bitwise_equal(d_all, d_some)
  np.testing.assert_array_equal(fb_all, fb_some)
  last = [0, 0, 0, 3, 3, 3, 6]  # the step whose record each step holds
  for field_all, field_some in zip(diag_all, diag_some):
    np.testing.assert_array_equal(np.asarray(field_some), np.asarray(field_all)[last])
  assert len({float(r) for r in np.asarray(diag_all.imbalance_ratio)}) > 1  # steps differ
  with pytest.raises(ValueError, match="every"):
    mtl_optax.with_diagnostics(mtl_optax.mgda(K), K, every=0)

# -- threshold baselines --

def stacked_update(tx, jac, state=None, params=PARAMS):
  state = tx.init(params) if state is None else state
  return jax.jit(lambda j, s: tx.update(j, s, params, losses=jnp.ones(K)))(jac, state)


@pytest.mark.parametrize("inner", ["mgda", "pcgrad"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("cagrad", "nash_mtl")])
def test_threshold_limits(inner):
  _, jac = mtl_optax.value_and_jacrev(task_losses)(PARAMS, X, Y)
  base = registry.build(inner, K, key=3, shared=SHARED)
  d_inner, s_inner = stacked_update(base, jac)
  d_sum, _ = stacked_update(mtl_optax.sum_tasks(), jac)
  for level, criterion, want in ((0.0, "imbalance", "inner"), (np.inf, "imbalance", "sum"),
                                 (2.0, "similarity", "inner"), (-2.0, "similarity", "sum")):
    tx = mtl_optax.threshold(registry.build(inner, K, key=3, shared=SHARED), K, level,
                             criterion=criterion, shared=SHARED)
    d, state = stacked_update(tx, jac)
    expected = d_inner if want == "inner" else d_sum
    for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert bool(state.inner.applied) == (want == "inner")
    if want == "sum":
      np.testing.assert_array_equal(state.weights, np.ones(K))
    if want == "inner":
      np.testing.assert_array_equal(state.weights, mtl_optax.effective_weights(s_inner))
      for a, b in zip(jax.tree.leaves(state.inner.inner), jax.tree.leaves(s_inner)):
        np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-5)


def test_threshold_state_advances_only_when_applied():
  """Nash-MTL's step counter and warm start move only on the steps it balanced; the Gram-only
  path and vmap with a batched choice agree."""
  tx = mtl_optax.threshold(mtl_optax.nash_mtl(K, shared=SHARED), K, 5.0, shared=SHARED)
  _, jac = mtl_optax.value_and_jacrev(task_losses)(PARAMS, X, Y)
  ratio = float(mtl_optax.diagnostics_from_gram(
      mtl_optax.tree.gram({"t": jac["trunk"]}), jnp.ones(K)).imbalance_ratio)
  balanced_jac = jax.tree.map(lambda r: r / jnp.linalg.norm(jac["trunk"].reshape(K, -1), axis=1
                                                             ).reshape((K,) + (1,) * (r.ndim - 1)),
                              jac)
  assert ratio > 5.0
  d, state = stacked_update(tx, jac)
  assert int(state.inner.inner.inner.step) == 1 and int(state.inner.applied_steps) == 1
  d, state = stacked_update(tx, balanced_jac, state)  # ratio 1: the plain sum
  assert int(state.inner.inner.inner.step) == 1 and not bool(state.inner.applied)
  np.testing.assert_allclose(d["trunk"], balanced_jac["trunk"].sum(0), rtol=1e-6)
  # vmap over the two inputs: each keeps its own choice and state.
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), jac, balanced_jac)
  ds, states = jax.jit(jax.vmap(lambda j: tx.update(j, tx.init(PARAMS), PARAMS)))(both)
  assert list(np.asarray(states.inner.applied)) == [True, False]
  assert list(np.asarray(states.inner.inner.inner.step)) == [1, 0]
  # The Gram-only path: the same update as the stacked path.
  (_, grad), gstate = jax.jit(mtl_optax.value_and_reweighted_grad(task_losses, tx))(
      PARAMS, tx.init(PARAMS), X, Y)
  d_stacked, _ = stacked_update(tx, jac)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(d_stacked)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
  assert bool(gstate.inner.applied)


def test_threshold_registry_entries():
  for name in ("mgda@imbalance", "pcgrad@imbalance", "cagrad@imbalance", "nash_mtl@imbalance",
               "mgda@similarity"):
    assert registry.METHODS[name].kind == "gradient"
    assert "non_conflicting" not in registry.METHODS[name].properties
  tx = registry.build("cagrad@imbalance=1e9", K, shared=SHARED)
  _, jac = mtl_optax.value_and_jacrev(task_losses)(PARAMS, X, Y)
  d, _ = stacked_update(tx, jac)
  np.testing.assert_allclose(d["trunk"], jac["trunk"].sum(0), rtol=1e-6)
  with pytest.raises(ValueError, match="criterion"):
    registry.build("cagrad@conflict", K)
  with pytest.raises(ValueError, match="not a gradient balancer"):
    registry.build("ew@imbalance", K)


@pytest.mark.parametrize("path", ["stacked", "gram", "representation"])
def test_value_and_grad_returns_the_diagnostics(path):
  """The entry point hands back the diagnostics `with_diagnostics` recorded (None without it),
  on every path: those of the z-rows on the representation path."""
  shared = None if path == "representation" else SHARED
  tx = mtl_optax.with_diagnostics(mtl_optax.mgda(K, shared=shared), K, shared=shared)
  fun = (encode, heads) if path == "representation" else task_losses
  extra = {"shared": SHARED} if path == "representation" else {}
  vg = mtl_optax.value_and_grad(fun, tx, path=path, **extra)
  out, state = jax.jit(vg.update)(PARAMS, vg.init(PARAMS, X, Y), X, Y)
  for a, b in zip(jax.tree.leaves(out.diagnostics), jax.tree.leaves(state.diagnostics)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(out.diagnostics.normalized_weights * jnp.sum(out.weights),
                             out.weights, rtol=1e-5)
  plain = mtl_optax.value_and_grad(fun, mtl_optax.mgda(K, shared=shared), path=path, **extra)
  assert plain.update(PARAMS, plain.init(PARAMS, X, Y), X, Y)[0].diagnostics is None
