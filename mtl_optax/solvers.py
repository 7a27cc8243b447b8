"""The small optimization problems of the gradient balancers, solved inside `jit`.

Every solver takes a K x K Gram matrix (and what else its problem needs), runs a `jax.lax` loop
with a fixed iteration cap and an explicit tolerance, and returns a finite answer even when it
does not converge. No host callbacks, so all of them work under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

_TINY = 1e-30


def _scale(m: jax.Array) -> jax.Array:
  """The largest diagonal entry of a Gram matrix, floored so that dividing by it is safe."""
  return jnp.maximum(jnp.max(jnp.diag(m)), _TINY)


def nonneg_qp(
    a: jax.Array, b: jax.Array, *, max_iter: int = 100, tol: float = 1e-6
) -> jax.Array:
  """argmin_{z >= 0} 1/2 z^T A z + b^T z for a positive definite A (K x K).

  Lawson & Hanson's active-set method (Solving Least Squares Problems, 1974, Ch. 23), in its
  quadratic-programming form (Bro & de Jong 1997): move the most negative gradient entry into
  the passive set, solve the equality problem on it, step back to the boundary while a passive
  entry is non-positive. Exact after finitely many steps; stops when min of the gradient over
  the zero entries is >= -tol, or after `max_iter` steps. The iterate is always feasible.
  """
  k = b.shape[0]
  idx = jnp.arange(k)

  def solve_on(passive):
    both = passive[:, None] & passive[None, :]
    a_p = jnp.where(both, a, 0.0) + jnp.diag(jnp.where(passive, 0.0, 1.0))
    return jnp.where(passive, jnp.linalg.solve(a_p, jnp.where(passive, -b, 0.0)), 0.0)

  def body(carry):
    z, passive, inner, it, _ = carry
    grad = a @ z + b
    free = jnp.where(passive, jnp.inf, grad)
    j = jnp.argmin(free)
    done = ~inner & (free[j] >= -tol)
    new_passive = passive | (~inner & (idx == j))
    s = solve_on(new_passive)
    blocked = new_passive & (s <= 0.0)
    ratio = jnp.where(blocked, z / jnp.maximum(z - s, _TINY), jnp.inf)
    theta = jnp.clip(jnp.min(ratio), 0.0, 1.0)
    feasible = ~jnp.any(blocked)
    stepped = jnp.where(blocked & (ratio <= theta), 0.0, z + theta * (s - z))
    z_new = jnp.where(feasible, s, jnp.maximum(stepped, 0.0))
    passive_new = jnp.where(feasible, new_passive, new_passive & (z_new > 0.0))
    keep = lambda old, new: jnp.where(done, old, new)
    return keep(z, z_new), keep(passive, passive_new), ~feasible & ~done, it + 1, done

  def cond(carry):
    *_, it, done = carry
    return ~done & (it < max_iter)

  false = jnp.array(False)
  init = (jnp.zeros_like(b), jnp.zeros((k,), bool), false, jnp.array(0), false)
  return jax.lax.while_loop(cond, body, init)[0]


def min_norm_weights(
    m: jax.Array, *, ridge: float = 1e-7, max_iter: int = 250, tol: float = 1e-7
) -> jax.Array:
  """MGDA: argmin_{w in simplex} w^T M w, the min-norm point of the rows' convex hull.

  Sener & Koltun 2018, Eq. 3 (Desideri's MGDA). With A = M / max diag + ridge * I, the
  simplex problem is z / sum(z) for z = argmin_{z >= 0} 1/2 z^T A z - 1^T z (same KKT system,
  multiplier 1 / sum z), solved exactly by `nonneg_qp`. The ridge keeps A positive definite
  when the rows are linearly dependent; it moves ||d||^2 by at most ridge * max_i ||g_i||^2.
  Returns the uniform weights if the solve fails (never NaN).
  """
  k = m.shape[0]
  a = m / _scale(m) + ridge * jnp.eye(k, dtype=m.dtype)
  z = nonneg_qp(a, -jnp.ones((k,), m.dtype), max_iter=max_iter, tol=tol)
  total = jnp.sum(z)
  ok = jnp.isfinite(total) & (total > 0)
  return jnp.where(ok, z / jnp.where(ok, total, 1.0), 1.0 / k)


def dual_cone_weights(
    m: jax.Array, u: jax.Array, *, max_iter: int = 100, tol: float = 1e-7
) -> jax.Array:
  """argmin_{v >= u} v^T M v: the projection of G^T u onto the dual cone {x : G x >= 0} is G^T v.

  Quinton & Rey 2024 (Jacobian Descent, Prop. 1). M must be positive definite (UPGrad adds
  reg_eps * I). Written v = u + z, z >= 0, it is `nonneg_qp(M, M u)`. `u` may be batched (..., K).
  """
  solve = lambda row: row + nonneg_qp(m, m @ row, max_iter=max_iter, tol=tol)
  flat = u.reshape(-1, u.shape[-1])
  return jax.vmap(solve)(flat).reshape(u.shape)


def simplex_minimize(
    fun: Callable[[jax.Array], jax.Array],
    w0: jax.Array,
    *,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> jax.Array:
  """argmin_{w in simplex} fun(w) for a smooth convex `fun` (CAGrad / IMGrad duals).

  FISTA (Beck & Teboulle 2009) with backtracking on the step size, projection onto the simplex
  (`optax.projections.projection_simplex`) and function-value restarts (O'Donoghue & Candes
  2015). Stops when an accepted step moves w by less than `tol` (max norm) or after `max_iter`
  steps; returns the best iterate seen, so a failed solve gives at worst `w0`.
  """
  value_and_grad = jax.value_and_grad(fun)
  project = optax.projections.projection_simplex

  def backtrack(y, fy, gy, lip):
    def step(lip):
      p = project(y - gy / lip)
      bound = fy + gy @ (p - y) + 0.5 * lip * jnp.sum((p - y) ** 2)
      return p, fun(p) > bound + 1e-12 * jnp.abs(fy)

    def cond(carry):
      lip, _, too_big, n = carry
      return too_big & (n < 40)

    def body(carry):
      lip, *_, n = carry
      p, too_big = step(2.0 * lip)
      return 2.0 * lip, p, too_big, n + 1

    p, too_big = step(lip)
    lip, p, *_ = jax.lax.while_loop(cond, body, (lip, p, too_big, 0))
    return p, lip

  def body(carry):
    w, y, t, lip, best, f_best, it, _ = carry
    fy, gy = value_and_grad(y)
    w_new, lip = backtrack(y, fy, gy, lip)
    f_new = fun(w_new)
    t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
    restart = f_new > fun(w)
    y_new = jnp.where(restart, w_new, w_new + (t - 1.0) / t_new * (w_new - w))
    improved = f_new < f_best
    done = jnp.max(jnp.abs(w_new - w)) < tol
    return (w_new, y_new, jnp.where(restart, 1.0, t_new), 0.9 * lip,
            jnp.where(improved, w_new, best), jnp.where(improved, f_new, f_best), it + 1, done)

  def cond(carry):
    *_, it, done = carry
    return ~done & (it < max_iter)

  w0 = project(w0)
  f0 = fun(w0)
  one = jnp.ones((), w0.dtype)
  init = (w0, w0, one, one, w0, f0, jnp.array(0), jnp.array(False))
  best = jax.lax.while_loop(cond, body, init)[4]
  return jnp.where(jnp.all(jnp.isfinite(best)), best, w0)


def nash_weights(
    m: jax.Array, *, max_iter: int = 20, tol: float = 1e-4
) -> tuple[jax.Array, jax.Array]:
  """Nash-MTL: alpha > 0 with alpha_i (M alpha)_i = 1 for every task (Navon et al. 2022, Eq. 5).

  That is the stationarity condition of the convex, self-concordant problem
  min_{alpha > 0} 1/2 alpha^T M alpha - sum_i log alpha_i, solved by damped Newton (Nesterov &
  Nemirovski: step 1 / (1 + lambda) for Newton decrement lambda >= 1/2, full steps after) on
  the rescaled problem b_i = ||g_i|| alpha_i (unit-diagonal M, so wildly different row norms
  do not matter), from the best multiple of the ones vector.

  Tasks with a zero row cannot satisfy the condition and are left out. Returns `(alpha, ok)`:
  `ok[i]` is true where task i has a nonzero row, every iterate stayed finite and positive, and
  max_i |alpha_i (M alpha)_i - 1| < tol over those tasks. Where `ok` is false, alpha is 1.
  """
  k = m.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
  active = norms > 1e-12 * jnp.max(norms)
  inv = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  both = active[:, None] & active[None, :]
  c = jnp.where(both, inv[:, None] * m * inv[None, :], jnp.eye(k, dtype=m.dtype))

  def newton(_, b):
    residual = c @ b - 1.0 / b
    step = -jnp.linalg.solve(c + jnp.diag(1.0 / b**2), residual)
    decrement = jnp.sqrt(jnp.maximum(-residual @ step, 0.0))
    return b + jnp.where(decrement < 0.5, 1.0, 1.0 / (1.0 + decrement)) * step

  b0 = jnp.sqrt(k / jnp.maximum(jnp.sum(c), 1.0 / k)) * jnp.ones((k,), m.dtype)
  b = jax.lax.fori_loop(0, max_iter, newton, b0)
  residual = jnp.where(active, jnp.abs(b * (c @ b) - 1.0), 0.0)
  converged = jnp.all(jnp.isfinite(b)) & jnp.all(b > 0) & (jnp.max(residual) < tol)
  ok = active & converged
  return jnp.where(ok, b * inv, 1.0), ok
