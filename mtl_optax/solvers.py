"""The small optimization problems of the gradient balancers, solved inside `jit`.

Every solver takes a K x K Gram matrix (and what else its problem needs), runs a `jax.lax` loop
with a fixed iteration cap and an explicit tolerance, and returns a finite answer even when it
does not converge. No host callbacks, so all of them work under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
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


def nash_lp(
    m: jax.Array,
    c: jax.Array,
    x0: jax.Array,
    *,
    gap_tol: float = 1e-7,
    mu: float = 10.0,
    newton_iter: int = 30,
) -> jax.Array:
  """argmin c^T x over the convex set {x > 0 : log x_i + log (M x)_i >= 0 for all i}.

  One convex step of Nash-MTL's CCP (Navon et al. 2022, Sec. 3.3); for c > 0 on the set's
  recession directions (as in `imbalance_nash_weights`) the minimum is attained. Log-barrier
  interior point (Boyd & Vandenberghe 2004, Sec. 11.3): damped Newton with Armijo backtracking
  on t c^T x - sum_i log(log x_i + log (M x)_i) (convex: -log of a positive concave function),
  t from 1 / (c^T x0) up by `mu` until the duality-gap bound K / t is below `gap_tol` * c^T x0;
  each centring stops at Newton decrement^2 < 1e-12, when no step decreases the barrier (in
  float32, rounding ends it early on nearly flat problems), or after `newton_iter` steps. `x0` must be strictly feasible; the iterates stay strictly
  feasible, so a stalled solve returns a feasible point (and a failed one gives x0). Solved
  in y = D^-1 x, D = diag(M)^-1/2: the same set for the unit-diagonal D M D (y_i (D M D y)_i =
  x_i (M x)_i), so rows of wildly different norms do not ill-condition the Newton systems.
  """
  k = c.shape[0]
  stages = max(1, int(np.ceil(np.log(k / gap_tol) / np.log(mu))) + 1)
  d = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(m), _TINY))
  x0, c, m = x0 / d, c * d, d[:, None] * m * d[None, :]

  def slack(x):
    mx = m @ x
    value = jnp.log(jnp.where(x > 0, x, 1.0)) + jnp.log(jnp.where(mx > 0, mx, 1.0))
    return value, jnp.all(x > 0) & jnp.all(mx > 0) & jnp.all(value > 0)

  barrier = lambda x, t: t * (c @ x) - jnp.sum(jnp.log(slack(x)[0]))
  grad, hess = jax.grad(barrier), jax.hessian(barrier)

  def centre(x, t):
    def body(carry):
      x, it, _ = carry
      g = grad(x, t)
      dx = -jnp.linalg.solve(hess(x, t), g)
      slope = g @ dx
      old = slack(x)[0]

      def increase(s):  # barrier(x + s dx) - barrier(x), without cancelling large terms
        new, inside = slack(x + s * dx)
        ratio = jnp.where(inside, new / old, 1.0)
        return jnp.where(inside, t * s * (c @ dx) - jnp.sum(jnp.log(ratio)), jnp.inf)

      too_long = lambda cr: (increase(cr[0]) > 0.25 * cr[0] * slope) & (cr[1] < 50)
      s, _ = jax.lax.while_loop(too_long, lambda cr: (0.5 * cr[0], cr[1] + 1), (1.0, 0))
      good = (increase(s) < 0) & (slope < 0) & jnp.all(jnp.isfinite(dx))
      done = ~good | (-slope < 1e-12)
      return jnp.where(good, x + s * dx, x), it + 1, done

    cond = lambda carry: ~carry[2] & (carry[1] < newton_iter)
    return jax.lax.while_loop(cond, body, (x, 0, jnp.array(False)))[0]

  t0 = 1.0 / jnp.maximum(jnp.abs(c @ x0), _TINY)
  x = jax.lax.fori_loop(0, stages, lambda s, x: centre(x, t0 * mu**s), x0)
  return d * jnp.where(jnp.all(jnp.isfinite(x)), x, x0)


def imbalance_nash_weights(
    m: jax.Array,
    cos: jax.Array,
    alpha0: jax.Array,
    *,
    max_iter: int = 20,
    tol: float = 1e-5,
    feas_tol: float = 1e-3,
) -> tuple[jax.Array, jax.Array]:
  """IMGrad's Nash-MTL variant: CCP for (1 - cos) sum_i beta_i(a) + cos phi(a) on Nash's set.

  Zhou et al. 2025, Eq. 13, on Nash-MTL's CCP (Navon et al. 2022, Sec. 3.3 and the reference
  AvivNavon/nash-mtl): beta_i(a) = (M a)_i, phi(a) = sum_i log a_i + log (M a)_i (concave,
  linearized at the previous iterate p: phi_tag = 1 / p + M (1 / (M p))), constraints
  phi_i(a) >= 0, i.e. a_i (M a)_i >= 1. Each step is `nash_lp` with
  c = (1 - cos) M 1 + cos phi_tag, from the strictly feasible 2 * (Nash fixed point).
  Scale-free: solved on M / ||M||_F (the reference's normalization) with the constraint on that
  scale, and mapped back by 1 / sqrt(||M||_F), so a_i (M a)_i >= 1 holds on M itself.

  The CCP starts at `alpha0` (the previous weights) where a > 0 and M a > 0, else at the Nash
  fixed point, and stops when an iterate moves by less than `tol` (relative max norm) or after
  `max_iter` steps. Tasks with a zero row are left out (decoupled). Returns `(alpha, ok)`:
  `ok[i]` is true where task i has a nonzero row, the set is nonempty (`nash_weights`
  converged), and the answer is finite with min_i log a_i (M a)_i >= -feas_tol; elsewhere 1.
  """
  k = m.shape[0]
  norm = jnp.maximum(jnp.sqrt(jnp.sum(m * m)), _TINY)
  root = jnp.sqrt(norm)
  nash, nash_ok = nash_weights(m / norm)
  active = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0)) > 1e-12 * jnp.sqrt(_scale(m))
  both = active[:, None] & active[None, :]
  mn = jnp.where(both, m / norm, jnp.eye(k, dtype=m.dtype))
  feasible = jnp.all(nash_ok | ~active)
  x_feas = 2.0 * nash

  p0 = alpha0.astype(m.dtype) * root
  start_ok = jnp.all(jnp.isfinite(p0)) & jnp.all(p0 > 0) & jnp.all(mn @ p0 > 0)
  p0 = jnp.where(start_ok, p0, nash)

  def body(carry):
    p, it, _ = carry
    c = (1.0 - cos) * jnp.sum(mn, axis=0) + cos * (1.0 / p + mn @ (1.0 / (mn @ p)))
    x = nash_lp(mn, c, x_feas)
    good = jnp.all(jnp.isfinite(x))
    x = jnp.where(good, x, p)
    done = ~good | (jnp.max(jnp.abs(x - p)) <= tol * jnp.max(jnp.abs(x)))
    return x, it + 1, done

  cond = lambda carry: ~carry[2] & (carry[1] < max_iter)
  x = jax.lax.while_loop(cond, body, (p0, 0, ~feasible))[0]
  mx = mn @ x
  slack = jnp.log(jnp.where(x > 0, x, 1.0)) + jnp.log(jnp.where(mx > 0, mx, 1.0))
  converged = (feasible & jnp.all(jnp.isfinite(x)) & jnp.all(x > 0) & jnp.all(mx > 0)
               & (jnp.min(slack) >= -feas_tol))
  ok = active & converged
  return jnp.where(ok, x / root, 1.0), ok
