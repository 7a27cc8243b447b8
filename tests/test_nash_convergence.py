"""Nash-MTL's solver converges on many nearly opposite instances, and a solve that does not
converge (Nash-MTL's or FairGrad's) is visible to `with_diagnostics`.

The family is `test_solver_families.family("opposite", K, seed)` (i.i.d. rows of dimension
2K + 32, g_1 = -g_0 + 1% noise): the fixed point has b ~ 100 on the pair and ~1 elsewhere.
Each K is one jitted, vmapped solve over all seeds; the float64 reference is `np_nash`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax import solvers
from tests.test_solver_families import MIN_COS, cosine, family, np_nash

SEEDS = 20
MAX_STEPS = 10  # half the default cap (the damped steps from the ones vector took 16-21)


def opposite(k, seeds):
  """Rows (float64, float32-representable) and float32 Gram matrices of the seeds."""
  gs = np.stack([np.asarray(np.float32(family("opposite", k, s)), np.float64) for s in seeds])
  g32 = jnp.asarray(gs, jnp.float32)
  return gs, jnp.einsum("bkn,bjn->bkj", g32, g32, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def solve(ms):
  """(alpha, ok, steps) of every Gram matrix."""
  return jax.vmap(solvers._nash_solve)(ms)  # pylint: disable=protected-access


def check_family(k, seeds):
  gs, ms = opposite(k, seeds)
  alpha, ok, steps = (np.asarray(x) for x in solve(ms))
  assert np.all(ok), np.flatnonzero(~ok.all(1))
  cos = np.array([cosine(a @ g, np_nash(g @ g.T) @ g)
                  for a, g in zip(alpha.astype(np.float64), gs)])
  assert cos.min() >= MIN_COS, (cos.min(), np.argmin(cos))
  # Eq. 5 on the float32 Gram matrix the solver saw (float32 leaves |rho| ~ 1e-2 on the pair).
  m32 = np.asarray(ms, np.float64)
  residual = np.abs(alpha * np.einsum("bij,bj->bi", m32, alpha) - 1.0).max()
  assert residual < 0.1, residual
  assert steps.max() <= MAX_STEPS, steps


@pytest.mark.parametrize("k", [40, 64])
def test_nash_converges_on_nearly_opposite_rows(k):
  check_family(k, range(SEEDS))


@pytest.mark.slow
@pytest.mark.parametrize("k", [40, 64])
def test_nash_converges_on_nearly_opposite_rows_many_seeds(k):
  check_family(k, range(SEEDS, SEEDS + 200))


# -- non-convergence is reported --


def stacked(k, seed=0):
  return {"w": jnp.asarray(np.float32(family("opposite", k, seed)))}


def run_diagnosed(tx, jac, steps=1):
  """The state of `tx` after `steps` updates on the stacked rows `jac`."""
  params = {"w": jnp.zeros(jac["w"].shape[1])}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    _, state = update(jac, state, params)
  return state


@pytest.mark.parametrize("niter, converged", [(1, False), (20, True)])
def test_nash_non_convergence_is_a_counted_fallback(niter, converged):
  """One Newton step does not reach the fixed point on nearly opposite rows (Newton decrement
  still >= 1/2): the solve reports it, Nash-MTL keeps the previous alpha (ones) and
  `with_diagnostics` counts the fallback."""
  k = 64
  tx = mtl_optax.with_diagnostics(mtl_optax.nash_mtl(k, optim_niter=niter), k)
  state = run_diagnosed(tx, stacked(k))
  nash = state.inner.inner
  assert bool(nash.converged) == converged
  assert bool(state.diagnostics.converged) == converged
  assert int(state.fallbacks) == (0 if converged else 1) and int(state.steps) == 1
  if not converged:
    np.testing.assert_array_equal(np.asarray(nash.alpha), np.ones(k))


@pytest.mark.parametrize("max_iter, converged", [(1, False), (50, True)])
def test_fairgrad_non_convergence_is_a_counted_fallback(max_iter, converged):
  k = 11
  tx = mtl_optax.with_diagnostics(mtl_optax.fairgrad(k, max_iter=max_iter), k)
  state = run_diagnosed(tx, stacked(k))
  assert bool(state.inner.inner.converged) == converged
  assert bool(state.diagnostics.converged) == converged
  assert int(state.fallbacks) == (0 if converged else 1)


def test_fairgrad_without_solution_reports_the_mgda_fallback():
  """Two exactly opposite rows: no w > 0 solves M w = 1 / w; FairGrad gives MGDA's weights and
  says so."""
  tx = mtl_optax.with_diagnostics(mtl_optax.fairgrad(2), 2)
  state = run_diagnosed(tx, {"w": jnp.array([[1.0, 2.0], [-1.0, -2.0]])})
  assert not bool(state.diagnostics.converged) and int(state.fallbacks) == 1
