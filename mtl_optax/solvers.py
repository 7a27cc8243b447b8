"""The small optimization problems of the gradient balancers, solved inside `jit`.

Every solver takes a K x K Gram matrix (and what else its problem needs), runs a `jax.lax` loop
with a fixed iteration cap and a tolerance relative to the problem's scale (or to what the
floating-point type can reach), and returns a finite answer even when it does not converge. No
host callbacks, so all of them work under `jax.jit` and `jax.vmap`. Loop conditions only read
flags and counters carried from the body (`_while_loop` carries a computed one): under `vmap` a
batched condition is evaluated twice (for the loop, and again to pick the members that advance),
and float arithmetic there can round differently in the two copies, freezing a member while the
loop runs forever.
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


def _while_loop(cond_fun: Callable, body_fun: Callable, init):
  """`jax.lax.while_loop` for a condition that computes in floats: the condition is evaluated
  once per step inside the body and carried as a flag, so the loop reads a stored value (see the
  module docstring: under `vmap` a computed condition is evaluated twice and can disagree)."""
  step = lambda carry: (carry, cond_fun(carry))
  return jax.lax.while_loop(lambda c: c[1], lambda c: step(body_fun(c[0])), step(init))[0]


def _eps(x: jax.Array) -> float:
  """The machine epsilon of x's floating-point type."""
  return float(jnp.finfo(x.dtype).eps)


def cosines(m: jax.Array, scale: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`(norms, zero, inv, C)` of a Gram matrix M: the row norms ||g_i||, the rows counted as zero
  (norm <= eps * `scale`; default: the largest norm, floored), 1 / ||g_i|| (0 for those) and
  the cosines C = N^-1 M N^-1, clipped to [-1, 1] (rounding can push those of nearly
  (anti)parallel rows past +-1)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
  scale = jnp.maximum(jnp.max(norms), _TINY) if scale is None else scale
  zero = norms <= _eps(m) * scale
  inv = jnp.where(zero, 0.0, 1.0 / jnp.where(zero, 1.0, norms))
  return norms, zero, inv, jnp.clip(inv[:, None] * m * inv[None, :], -1.0, 1.0)


def _solve_on(a: jax.Array, rhs: jax.Array, passive: jax.Array) -> jax.Array:
  """z with A_PP z_P = rhs_P on the passive set P and z = 0 elsewhere (A_PP positive definite)."""
  both = passive[:, None] & passive[None, :]
  a_p = jnp.where(both, a, 0.0) + jnp.diag(jnp.where(passive, 0.0, 1.0))
  factor = jax.scipy.linalg.cho_factor(a_p, lower=True)
  return jnp.where(passive, jax.scipy.linalg.cho_solve(factor, jnp.where(passive, rhs, 0.0)), 0.0)


def nonneg_qp(
    a: jax.Array,
    b: jax.Array,
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    pdas_iter: int = 12,
) -> jax.Array:
  """argmin_{z >= 0} 1/2 z^T A z + b^T z for a positive definite A (K x K).

  First the primal-dual active-set method (Hintermueller, Ito & Kunisch 2002, SIAM J. Optim.
  13(3), Alg. 1 with c = 1): from P = {j : b_j < 0}, solve the equality problem on P, then
  P <- {j in P : z_j > 0} + {j not in P : (A z + b)_j < 0}, until P repeats (the KKT point,
  found in a few steps on these problems) or `pdas_iter` steps. The multiplier test is relative
  to its rounding level, max(tol, K eps) (|A| |z| + |b|)_j. If that does not settle, Lawson &
  Hanson's active-set method (Solving Least Squares Problems, 1974, Ch. 23; QP form as in Bro &
  de Jong 1997) continues from the feasible part of the last iterate: move the most negative
  gradient entry (below -tol, relative as above) into the passive set, solve the equality
  problem, step back to the boundary while a passive entry is non-positive, for at most
  `max_iter` steps. The answer is always feasible.
  """
  k = b.shape[0]
  idx = jnp.arange(k)
  rel = max(tol, k * _eps(b))
  level = lambda z: rel * (jnp.abs(a) @ jnp.abs(z) + jnp.abs(b))

  def pdas_body(carry):
    _, passive, it, _ = carry
    z = _solve_on(a, -b, passive)
    new = jnp.where(passive, z > 0.0, a @ z + b < -level(z))
    return z, new, it + 1, jnp.all(new == passive) | ~jnp.all(jnp.isfinite(z))

  pdas_cond = lambda carry: ~carry[3] & (carry[2] < pdas_iter)
  false = jnp.array(False)
  init = (jnp.zeros_like(b), b < 0.0, jnp.array(0), false)
  z, _, _, settled = jax.lax.while_loop(pdas_cond, pdas_body, init)
  settled = settled & jnp.all(jnp.isfinite(z)) & jnp.all(z >= 0.0)
  z = jnp.where(jnp.isfinite(z), jnp.maximum(z, 0.0), 0.0)

  def body(carry):
    z, passive, inner, it, _ = carry
    grad = a @ z + b
    free = jnp.where(passive, jnp.inf, grad + level(z))
    j = jnp.argmin(free)
    done = ~inner & (free[j] >= 0.0)
    new_passive = passive | (~inner & (idx == j))
    s = _solve_on(a, -b, new_passive)
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

  # inner=True first: re-solve on the warm start's support before testing optimality.
  init = (z, z > 0.0, jnp.array(True), jnp.array(0), settled)
  return jax.lax.while_loop(cond, body, init)[0]


def min_norm_weights(
    m: jax.Array, *, ridge: float | None = None, max_iter: int = 250, tol: float = 1e-7,
    present: jax.Array | None = None,
) -> jax.Array:
  """MGDA: argmin_{w in simplex} w^T M w, the min-norm point of the rows' convex hull.

  Sener & Koltun 2018, Eq. 3 (Desideri's MGDA). In the rows' cosines C = N^-1 M N^-1
  (N = diag ||g_i||, unit diagonal whatever the norms), w = z / sum(z) with z = N^-1 y,
  y = argmin_{y >= 0} 1/2 y^T (C + ridge I) y - (n_min / n)^T y (the same KKT system as the
  simplex problem, multiplier 1 / sum z), solved exactly by `nonneg_qp`. The ridge (default
  K * eps of the dtype) keeps the problem strictly convex for linearly dependent rows; it is
  relative to every row's own squared norm (w^T (M + ridge diag M) w), so rows of small norm
  are never swamped. The cosines are clipped to [-1, 1]: rounding can push those of nearly
  (anti)parallel rows past +-1 by more than the ridge. If some rows are zero (norm <=
  eps * the largest), the origin is in the hull: uniform weights over those rows. Uniform
  weights if the solve fails (never NaN).

  `present` (`(K,)` bool, None: all): the hull of the present rows only; the others (whose
  rows and columns of M must be 0) are decoupled (an identity block in the cosines, q_j = 0,
  so the QP keeps z_j = 0) and get weight 0.
  """
  k = m.shape[0]
  ridge = k * _eps(m) if ridge is None else ridge
  norms, zero, inv, c = cosines(m)
  c = jnp.where(jnp.eye(k, dtype=bool), 1.0 + ridge, c)
  uniform = 1.0 / k
  if present is not None:
    zero = zero & present
    uniform = jnp.where(present, 1.0 / jnp.maximum(jnp.sum(present), 1).astype(m.dtype), 0.0)
  q = jnp.min(jnp.where(zero if present is None else zero | ~present, jnp.inf, norms)) * inv
  z = inv * nonneg_qp(c, -q, max_iter=max_iter, tol=tol)
  total = jnp.sum(z)
  ok = jnp.isfinite(total) & (total > 0)
  w = jnp.where(ok, z / jnp.where(ok, total, 1.0), uniform)
  any_zero = jnp.any(zero)
  return jnp.where(any_zero, zero / jnp.maximum(jnp.sum(zero), 1), w)


def dual_cone_weights(
    m: jax.Array, u: jax.Array, *, max_iter: int = 100, tol: float = 1e-7
) -> jax.Array:
  """argmin_{v >= u} v^T M v: the projection of G^T u onto the dual cone {x : G x >= 0} is G^T v.

  Quinton & Rey 2024 (Jacobian Descent, Prop. 1). M must be positive definite (UPGrad adds
  reg_eps * I). Written v = u + z, z >= 0, it is `nonneg_qp(M, M u)`. `u` may be batched (..., K):
  all rows are solved as one batch, the primal-dual active-set steps of `nonneg_qp` in lockstep
  (one batched Cholesky per step, 1-4 steps on ordinary Gram matrices, from P = the rows
  conflicting with u), the exact active-set fallback running only if some row has not settled.
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
    newton_iter: int = 12,
    present: jax.Array | None = None,
) -> jax.Array:
  """argmin_{w in simplex} fun(w) for a smooth convex `fun` (CAGrad / IMGrad duals).

  FISTA (Beck & Teboulle 2009) with backtracking on the step size, projection onto the simplex
  (`optax.projections.projection_simplex`) and function-value restarts (O'Donoghue & Candes
  2015), until an accepted step moves w by less than `tol` (max norm) or `max_iter` steps; it
  finds the support. Then an active-set Newton method on the faces of the simplex (Nocedal &
  Wright 2006, Alg. 16.3 with the exact Hessian): a Newton step on the equality-constrained
  problem over the current face, cut back at the boundary (dropping the blocking entry), and a
  new entry added where the reduced gradient g_j - lambda is below its rounding level, for at
  most `newton_iter` steps. Float32 cannot rank nearly equal values of a flat `fun` (rows whose
  norms spread over 1e-2..1e2 make it flat), but its gradient still pins w down, so the answer
  is the last Newton iterate whose Frank-Wolfe gap g.w - min_i g_i (zero only at the minimum) is
  within its rounding level of the smallest seen (FISTA's best included); at worst `w0`.

  `present` (`(K,)` bool, None: all): the simplex of the present entries only (the others stay
  0: projected from -inf, never added to the Newton face, left out of the gap's minimum); `w0`
  must be 0 at the others.
  """
  value_and_grad = jax.value_and_grad(fun)
  grad_fn, hess_fn = jax.grad(fun), jax.hessian(fun)
  if present is None:
    project, outside = optax.projections.projection_simplex, None
  else:
    project = lambda x: optax.projections.projection_simplex(jnp.where(present, x, -jnp.inf))
    outside = ~present
  k = w0.shape[0]
  eps = _eps(w0)

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
  one = jnp.ones((), w0.dtype)
  init = (w0, w0, one, one, w0, fun(w0), jnp.array(0), jnp.array(False))
  w_fista = jax.lax.while_loop(cond, body, init)[4]

  def gap(w):  # Frank-Wolfe gap g.w - min_i g_i >= 0, zero exactly at the minimum
    g = grad_fn(w)
    r = g @ w - jnp.min(g if outside is None else jnp.where(outside, jnp.inf, g))
    return jnp.where(jnp.all(jnp.isfinite(w)) & jnp.isfinite(r), r, jnp.inf)

  def newton(carry):
    w, face, add, best, r_best, it, _ = carry
    g, h = grad_fn(w), hess_fn(w)
    face = face | add
    # [H_FF 1; 1^T 0] [dw; -lambda] = [-g_F; 0], identity off the face, ridge relative to diag H.
    both = face[:, None] & face[None, :]
    h_f = jnp.where(both, h + k * eps * jnp.diag(jnp.abs(jnp.diag(h))), 0.0)
    h_f = h_f + jnp.diag(jnp.where(face, 0.0, 1.0))
    ones = face.astype(w.dtype)
    system = jnp.block([[h_f, ones[:, None]], [ones[None, :], jnp.zeros((1, 1), w.dtype)]])
    rhs = jnp.concatenate([-jnp.where(face, g, 0.0), jnp.zeros(1, w.dtype)])
    sol = jnp.linalg.solve(system, rhs)
    dw, lam = jnp.where(face, sol[:k], 0.0), -sol[k]
    blocked = face & (w + dw < 0.0)
    ratio = jnp.where(blocked, w / jnp.maximum(-dw, _TINY), jnp.inf)
    theta = jnp.minimum(jnp.min(ratio), 1.0)
    w_new = jnp.maximum(w + theta * dw, 0.0)
    hit = blocked & (ratio <= theta)
    w_new = jnp.where(hit, 0.0, w_new)
    w_new = w_new / jnp.sum(w_new)
    face = face & ~hit
    reduced = grad_fn(w_new) - lam
    level = k * eps * (jnp.abs(grad_fn(w_new)) + jnp.abs(lam))
    free = jnp.where(face if outside is None else face | outside, jnp.inf, reduced + level)
    j = jnp.argmin(free)
    add = ~jnp.any(hit) & (free[j] < 0.0) & (jnp.arange(k) == j)
    r = gap(w_new)
    better = r <= r_best + k * eps * jnp.max(jnp.abs(reduced))  # later wins at rounding level
    settled = ~jnp.any(hit) & ~jnp.any(add) & (theta * jnp.max(jnp.abs(dw)) <= k * eps)
    return (w_new, face, add, jnp.where(better, w_new, best), jnp.where(better, r, r_best),
            it + 1, settled)

  r0 = gap(w_fista)
  start = (w_fista, w_fista > 0.0, jnp.zeros((k,), bool), w_fista, r0, jnp.array(0),
           jnp.array(False))
  stop = lambda carry: ~carry[6] & (carry[5] < newton_iter) & (carry[4] > 0.0)
  best = jax.lax.while_loop(stop, newton, start)[3]
  return jnp.where(jnp.all(jnp.isfinite(best)), best, w0)


def _nash_step(q: jax.Array, y: jax.Array, lam: jax.Array) -> jax.Array:
  """The step length t along the scaled Newton direction y of `nash_weights` (b -> b (1 + t y))
  for Newton decrement lam >= 1/2: the damped step t0 = 1 / (1 + lam), improved by one Newton
  step on phi(t) = F(b + t b y) - F(b) = -lam^2 t + q t^2 / 2 + sum_i (t y_i - log(1 + t y_i)),
  q = (b y)^T C (b y), where that lowers phi.

  phi is convex and self-concordant, so phi'(t0) <= 0 (Nesterov 2004, Sec. 4.1.4): its
  minimizer lies right of t0 and left of the domain edge min_{y_i < 0} -1 / y_i and of
  lam^2 / q (phi' >= 0 there); the Newton step is capped halfway to that bound. phi is never
  above phi(t0), the decrease the damped method's global bound needs. Where the minimizer is far
  beyond t0 (a nearly opposite pair, whose b must grow by 100x), this halves the Newton steps.
  """
  lam2 = lam * lam
  t0 = 1.0 / (1.0 + lam)
  neg = y < 0.0
  edge = jnp.min(jnp.where(neg, -1.0 / jnp.where(neg, y, -1.0), jnp.inf))
  bound = jnp.minimum(edge, lam2 / jnp.maximum(q, _TINY))

  def phi(t):
    ty = t * y
    value = -lam2 * t + 0.5 * t * t * q + jnp.sum(ty - jnp.log1p(ty))
    return jnp.where(jnp.isnan(value), jnp.inf, value)

  inside = 1.0 + t0 * y
  slope = -lam2 + t0 * (q + jnp.sum(y * y / inside))
  t1 = jnp.minimum(t0 - slope / (q + jnp.sum((y / inside) ** 2)), 0.5 * (t0 + bound))
  return jnp.where((t1 > 0.0) & (phi(t1) < phi(t0)), t1, t0)


def nash_weights(
    m: jax.Array, *, max_iter: int = 20, tol: float = 1e-4, prev: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Nash-MTL: alpha > 0 with alpha_i (M alpha)_i = 1 for every task (Navon et al. 2022, Eq. 5).

  That is the stationarity condition of the convex, self-concordant problem
  min_{alpha > 0} F(alpha) = 1/2 alpha^T M alpha - sum_i log alpha_i, solved by Newton's method
  on the rescaled problem b_i = ||g_i|| alpha_i (unit-diagonal C, so wildly different row norms
  do not matter). Each step solves (B C B + I) y = -rho by Cholesky, B = diag(b) (the Hessian
  scaled by B, eigenvalues >= 1; B times the gradient is rho_i = b_i (C b)_i - 1, the residual
  of Eq. 5), and sets b <- b (1 + t y); Newton decrement lambda = sqrt(-rho^T y). Full steps for
  lambda < 1/2, else the damped step 1 / (1 + lambda) (Nesterov & Nemirovski) improved by one
  Newton step along the line (`_nash_step`). The start is the lowest-F one of the best
  multiples of: the ones vector; v_i = (1 + min_{j != i} c_ij)^-1/2, the fixed point of task
  i's most conflicting pair alone (nearly opposite rows need b ~ (1 + c_ij)^-1/2 >> 1 there);
  and `prev`, if given and positive. 3-7 steps on ordinary and nearly opposite rows up to
  K = 64 (the damped steps from the ones vector took up to 20, the default cap).

  Stops, and accepts the iterate, when max_i |rho_i| < tol, or when lambda <= 0.1 is at its
  rounding level (F - F* <= lambda^2 then; nearly opposite rows leave |rho| ~ 1e-2 in float32):
  lambda <= sqrt(|y|^T e), e_i = eps b_i (|C| b)_i the rounding level of rho_i (an error e in
  rho moves lambda^2 by ~2 |y|^T e), or a full step from lambda' <= 0.1 left lambda above
  lambda' / 4 (exact arithmetic guarantees (lambda' / (1 - lambda'))^2 < lambda' / 8; Nesterov
  2004, Sec. 4.1.5); or after `max_iter` steps. Tasks with a zero row cannot satisfy the condition
  and are left out.

  Args:
    m: `(K, K)` Gram matrix M.
    max_iter: cap on the Newton steps.
    tol: accept when max_i |alpha_i (M alpha)_i - 1| < tol.
    prev: `(K,)` previous weights to start from, or None.

  Returns:
    `(alpha, ok)`: `ok[i]` is true where task i has a nonzero row, every iterate stayed finite
    and positive, ||d||^2 = b^T C b (K at the fixed point) is above its rounding level, and the
    iterate was accepted or (in the quadratic region, lambda < 1/2, so F is bounded below) has
    lower F than `prev`. Where `ok` is false, alpha is 1.

  References:
    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", arXiv:2202.01017, Eq. 5;
    Nesterov 2004, "Introductory Lectures on Convex Optimization", Sec. 4.1.4-4.1.5 (Newton's
    method on self-concordant functions).
  """
  return _nash_solve(m, max_iter=max_iter, tol=tol, prev=prev)[:2]


def _nash_solve(m: jax.Array, *, max_iter: int = 20, tol: float = 1e-4,
                prev: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`nash_weights`, and the number of loop steps it ran (Newton steps, plus 1 if it stopped
  by accepting the iterate)."""
  k = m.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
  active = norms > 1e-12 * jnp.max(norms)
  inv = jnp.where(active, 1.0 / jnp.where(active, norms, 1.0), 0.0)
  both = active[:, None] & active[None, :]
  c = jnp.where(both, inv[:, None] * m * inv[None, :], jnp.eye(k, dtype=m.dtype))
  eps = _eps(m)

  def objective(b):
    return 0.5 * b @ c @ b - jnp.sum(jnp.log(jnp.where(b > 0, b, 1.0)))

  def newton_step(b):  # (rho, y, lambda): B^-1 H B^-1 = B C B + I, B grad F = rho
    rho = b * (c @ b) - 1.0
    factor = jax.scipy.linalg.cho_factor(b[:, None] * c * b[None, :] + jnp.eye(k, dtype=m.dtype),
                                         lower=True)
    y = -jax.scipy.linalg.cho_solve(factor, rho)
    return rho, y, jnp.sqrt(jnp.maximum(-rho @ y, 0.0))

  def accepted(b, rho, y, decrement, last):
    # An error e in rho changes lambda^2 = -rho^T y by about 2 |y|^T e.
    floor = jnp.sqrt(eps * jnp.abs(y) @ (b * (jnp.abs(c) @ b)))
    # After a full step from lambda' <= 0.1, lambda <= (lambda' / (1 - lambda'))^2 < lambda' / 8
    # in exact arithmetic; above lambda' / 4, rounding (of rho or of the solve) dominates.
    stalled = (last <= 0.1) & (decrement > 0.25 * last)
    return ((jnp.max(jnp.abs(rho)) < tol) | (decrement <= jnp.minimum(0.1, floor))
            | (stalled & (decrement <= 0.1)))

  def body(carry):
    b, it, _, last, _, _ = carry
    rho, y, decrement = newton_step(b)
    s = b * y
    t = jnp.where(decrement < 0.5, 1.0, _nash_step(jnp.maximum(s @ c @ s, 0.0), y, decrement))
    b_new = b * (1.0 + t * y)
    good = jnp.all(jnp.isfinite(b_new)) & jnp.all(b_new > 0)
    done = accepted(b, rho, y, decrement, last)
    stop = done | ~good
    return (jnp.where(stop, b, b_new), it + 1, stop,
            jnp.where(stop, last, jnp.where(decrement < 0.5, decrement, jnp.inf)), done, decrement)

  def best_multiple(v):  # argmin_t F(t v) = sqrt(K / v^T C v)
    return v * jnp.sqrt(k / jnp.maximum(v @ c @ v, 1.0 / k))

  def lower(a, b):
    return jnp.where(objective(b) < objective(a), b, a)

  b0 = best_multiple(jnp.ones((k,), m.dtype))
  # The 2 x 2 problem of rows i, j has b_i = b_j = (1 + c_ij)^-1/2.
  gap = jnp.min(jnp.where(both & ~jnp.eye(k, dtype=bool), 1.0 + c, jnp.inf), axis=1)
  b0 = lower(b0, best_multiple(jnp.where(jnp.isfinite(gap),
                                         jax.lax.rsqrt(jnp.maximum(gap, k * eps)), 1.0)))
  if prev is not None:
    p = prev.astype(m.dtype) * norms
    usable = jnp.all(jnp.isfinite(p)) & jnp.all(jnp.where(active, p > 0, True))
    p = best_multiple(jnp.where(active & usable, p, 1.0))
    b0 = jnp.where(usable, lower(b0, p), b0)
  cond = lambda carry: ~carry[2] & (carry[1] < max_iter)
  inf, false = jnp.array(jnp.inf, m.dtype), jnp.array(False)
  b, steps, stopped, last, done, decrement = jax.lax.while_loop(
      cond, body, (b0, jnp.array(0), false, inf, false, inf))
  # Below its rounding level K eps b^T |C| b, Nash's set is empty but for rounding (no direction
  # improves every task) and d would be rounding noise.
  resolved = b @ c @ b > k * eps * (b @ jnp.abs(c) @ b)
  valid = jnp.all(jnp.isfinite(b)) & jnp.all(b > 0) & resolved

  def check():  # the loop ran out of steps: b is not tested yet
    rho, y, decrement = newton_step(b)
    return accepted(b, rho, y, decrement, last), decrement

  done, decrement = jax.lax.cond(stopped, lambda: (done, decrement), check)
  converged = valid & done
  if prev is not None:  # bounded (decrement < 1/2: F - F* <= decrement^2) and better than prev
    p = prev.astype(m.dtype) * norms
    p_ok = jnp.all(jnp.isfinite(p)) & jnp.all(jnp.where(active, p > 0, True))
    better = objective(b) < objective(jnp.where(active, p, 1.0))
    converged = converged | (valid & p_ok & (decrement < 0.5) & better)
  ok = active & converged
  return jnp.where(ok, b * inv, 1.0), ok, steps


def fair_weights(
    m: jax.Array, alpha: float = 1.0, *, max_iter: int = 50, tol: float = 1e-4
) -> tuple[jax.Array, jax.Array]:
  """FairGrad: w > 0 with M w = w^(-1/alpha) (Ban & Ji 2024, Eq. 9; alpha = 1 is Nash-MTL).

  With p = 1 / alpha, M w = w^-p is the stationarity condition of the strictly convex problem
  min_{w > 0} F(w) = 1/2 w^T M w - sum_i h(w_i), h' = w^-p (h = log w for p = 1,
  (w^(1-p) - 1) / (1-p) otherwise). The scale comes out first: with s the largest row norm, w =
  s^(-2 / (1 + p)) u and u solves the same problem for M / s^2; then b_i = n_i u_i (n_i the
  relative row norms) turns M / s^2 into the unit-diagonal cosine matrix C, and the condition
  into C b = n^(p-1) b^-p. Damped Newton with a backtracking (Armijo) line search that keeps
  b > 0, from the best multiple of the ones vector, for at most `max_iter` steps; it stops
  when max_i |r_i| < tol, r_i = (C b)_i / (n_i^(p-1) b_i^-p) - 1, or r is at its rounding
  level (K eps (|C| b)_i relative to the same denominator), or a step cannot decrease F.

  Tasks with a zero row (norm <= 1e-12 of the largest) have no solution (their weight would
  grow without bound): they get the largest weight of the others (1 if every row is zero).
  If 0 is a nonnegative combination of the nonzero rows, F is unbounded below and no solution
  exists: the iterate runs off to infinity. Where its ||d||^2 = b^T C b is then below its
  rounding level K eps b^T |C| b (d is rounding noise), the answer is MGDA's min-norm weights
  (`min_norm_weights`; d = 0 when 0 is a convex combination of the rows). Returns `(w, ok)`:
  `ok[i]` is true where task i's row is nonzero, the residual test passed and d is resolved.
  """
  k = m.shape[0]
  p = 1.0 / alpha
  norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
  s = jnp.maximum(jnp.max(norms), _TINY)
  n = norms / s
  active = n > 1e-12
  inv = jnp.where(active, 1.0 / jnp.where(active, n, 1.0), 0.0)
  both = active[:, None] & active[None, :]
  c = jnp.where(both, inv[:, None] * (m / s**2) * inv[None, :], jnp.eye(k, dtype=m.dtype))
  coef = jnp.where(active, jnp.where(active, n, 1.0) ** (p - 1.0), 1.0)
  eps = _eps(m)

  def h(b):  # alpha may be traced (optax.inject_hyperparams)
    log = p == 1.0
    return jnp.where(log, jnp.log(b), (b ** (1.0 - p) - 1.0) / jnp.where(log, 1.0, 1.0 - p))

  def objective(b):
    return 0.5 * b @ c @ b - coef @ h(b)

  def residual(b):
    target = coef * b**-p
    return (c @ b) / target - 1.0, k * eps * (jnp.abs(c) @ b) / target

  def body(carry):
    b, it, _ = carry
    grad = c @ b - coef * b**-p
    step = -jnp.linalg.solve(c + jnp.diag(coef * p * b ** (-p - 1.0)), grad)
    blocked = step < 0.0
    t_max = jnp.min(jnp.where(blocked, -0.99 * b / jnp.where(blocked, step, -1.0), 1.0))
    f0, slope = objective(b), grad @ step

    def shorter(carry):
      t, _ = carry
      return t * 0.5, objective(b + 0.5 * t * step)

    def too_long(carry):
      t, f = carry
      return ~(f <= f0 + 1e-4 * t * slope) & (t > 1e-10)

    t, f = _while_loop(too_long, shorter, (t_max, objective(b + t_max * step)))
    b_new = b + t * step
    good = jnp.all(jnp.isfinite(b_new)) & jnp.all(b_new > 0) & (f <= f0) & (slope < 0)
    r, level = residual(b)
    stop = jnp.all(jnp.abs(r) < jnp.maximum(tol, level)) | ~good
    return jnp.where(stop, b, b_new), it + 1, stop

  q = jnp.maximum(jnp.sum(c), _TINY)
  b0 = jnp.ones((k,), m.dtype) * (jnp.sum(coef) / q) ** (1.0 / (1.0 + p))
  cond = lambda carry: ~carry[2] & (carry[1] < max_iter)
  b, _, _ = jax.lax.while_loop(cond, body, (b0, jnp.array(0), jnp.array(False)))
  b = jnp.where(jnp.all(jnp.isfinite(b)) & jnp.all(b > 0), b, b0)
  r, level = residual(b)
  # Run off to infinity, the residual is within its rounding level, but d is not resolved.
  resolved = b @ c @ b > k * eps * (b @ jnp.abs(c) @ b)
  converged = jnp.all(jnp.abs(r) < jnp.maximum(tol, level)) & resolved
  w = b * inv * s ** (-2.0 / (1.0 + p))
  top = jnp.max(jnp.where(active, w, 0.0))
  w = jnp.where(active, w, jnp.where(top > 0, top, 1.0))
  w = jax.lax.cond(resolved | ~jnp.any(active), lambda: w,
                   lambda: min_norm_weights(m).astype(w.dtype))
  return w, active & converged


def _barrier_lp(
    m: jax.Array,
    c: jax.Array,
    x0: jax.Array,
    t0: jax.Array,
    t_final: jax.Array,
    *,
    mu: float,
    newton_iter: int,
    max_stages: int,
    keep_back: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The barrier method of `nash_lp` on a unit-diagonal M from the strictly feasible x0 at t0.

  Centres at t0, t0 mu, ... while t <= t_final (at most `max_stages` stages). Returns the last
  centre x and the centre x_w, with its t_w, of the stage `keep_back` stages before the last (or
  the first one): a strictly feasible, nearly central warm start for a nearby cost c.
  """
  eps = _eps(m)

  def slack(x):
    mx = m @ x
    value = jnp.log(jnp.where(x > 0, x, 1.0)) + jnp.log(jnp.where(mx > 0, mx, 1.0))
    return value, mx, jnp.all(x > 0) & jnp.all(mx > 0) & jnp.all(value > 0)

  def centre(x, t, final):
    def body(carry):
      x, it, _ = carry
      s, mx, _ = slack(x)
      # s_i = log x_i + log (M x)_i; rows of J are grad s_i; the barrier's exact derivatives.
      jac = jnp.diag(1.0 / x) + m / mx[:, None]
      g = t * c - jac.T @ (1.0 / s)
      h = ((jac.T / s**2) @ jac + jnp.diag(1.0 / (s * x**2))
           + (m.T / (s * mx**2)) @ m)
      dx = -jnp.linalg.solve(h, g)
      slope = g @ dx

      def increase(step):  # barrier(x + step dx) - barrier(x), without cancelling large terms
        new, _, inside = slack(x + step * dx)
        ratio = jnp.where(inside, new / s, 1.0)
        return jnp.where(inside, t * step * (c @ dx) - jnp.sum(jnp.log(ratio)), jnp.inf)

      too_long = lambda cr: (increase(cr[0]) > 0.25 * cr[0] * slope) & (cr[1] < 30)
      step, _ = _while_loop(too_long, lambda cr: (0.5 * cr[0], cr[1] + 1), (1.0, 0))
      good = (increase(step) < 0) & (slope < 0) & jnp.all(jnp.isfinite(dx))
      # Centred: lambda^2 = -slope below 1e-3 (inner stages) or the rounding level of the barrier.
      level = k * eps * (t * jnp.abs(c) @ x + jnp.sum(jnp.abs(jnp.log(s))) + 1.0)
      new_x = jnp.where(good, x + step * dx, x)
      # A step that leaves x unchanged in the dtype would repeat identically: stop there.
      done = ~good | (-slope < jnp.where(final, level, 1e-3)) | jnp.all(new_x == x)
      return new_x, it + 1, done

    cond = lambda carry: ~carry[2] & (carry[1] < newton_iter)
    return jax.lax.while_loop(cond, body, (x, 0, jnp.array(False)))[0]

  k = c.shape[0]
  history = jnp.zeros((keep_back + 1, k), m.dtype).at[:].set(x0)
  t_hist = jnp.zeros((keep_back + 1,), m.dtype).at[:].set(t0)

  def stage(carry):
    x, t, history, t_hist, n = carry
    x = centre(x, t, t * mu > t_final)
    history = jnp.roll(history, 1, axis=0).at[0].set(x)
    t_hist = jnp.roll(t_hist, 1).at[0].set(t)
    return x, t * mu, history, t_hist, n + 1

  go = lambda carry: (carry[1] <= t_final * (1.0 + eps)) & (carry[4] < max_stages)
  x, _, history, t_hist, n = _while_loop(go, stage, (x0, t0, history, t_hist, jnp.array(0)))
  back = jnp.minimum(keep_back, jnp.maximum(n - 1, 0))
  return x, history[back], t_hist[back]


def nash_lp(
    m: jax.Array,
    c: jax.Array,
    x0: jax.Array,
    *,
    gap_tol: float = 1e-7,
    mu: float = 30.0,
    newton_iter: int = 30,
) -> jax.Array:
  """argmin c^T x over the convex set {x > 0 : log x_i + log (M x)_i >= 0 for all i}.

  One convex step of Nash-MTL's CCP (Navon et al. 2022, Sec. 3.3); for c > 0 on the set's
  recession directions (as in `imbalance_nash_weights`) the minimum is attained. Log-barrier
  interior point (Boyd & Vandenberghe 2004, Sec. 11.3): damped Newton (exact gradient and
  Hessian) with Armijo backtracking on t c^T x - sum_i log(log x_i + log (M x)_i) (convex: -log
  of a positive concave function), t from 1 / (c^T x0) up by `mu` until the duality-gap bound
  K / t is below `gap_tol` * c^T x0. Inner centrings stop at Newton decrement^2 < 1e-3, the last
  one at the rounding level of the barrier (K eps times its terms), when no step decreases the
  barrier, or after `newton_iter` steps. `x0` must be strictly feasible; the iterates stay
  strictly feasible, so a stalled solve returns a feasible point (and a failed one gives x0).
  Solved in y = D^-1 x, D = diag(M)^-1/2: the same set for the unit-diagonal D M D (y_i (D M D
  y)_i = x_i (M x)_i), so rows of wildly different norms do not ill-condition the Newton systems.
  """
  k = c.shape[0]
  stages = max(1, int(np.ceil(np.log(k / gap_tol) / np.log(mu))) + 1)
  d = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(m), _TINY))
  y0, c, m = x0 / d, c * d, d[:, None] * m * d[None, :]
  t0 = 1.0 / jnp.maximum(jnp.abs(c @ y0), _TINY)
  x, _, _ = _barrier_lp(m, c, y0, t0, t0 * mu ** (stages - 1), mu=mu, newton_iter=newton_iter,
                        max_stages=stages, keep_back=0)
  return d * jnp.where(jnp.all(jnp.isfinite(x)), x, y0)


def imbalance_nash_weights(
    m: jax.Array,
    cos: jax.Array,
    alpha0: jax.Array,
    *,
    max_iter: int = 20,
    tol: float = 1e-5,
    feas_tol: float = 1e-3,
    gap_tol: float = 1e-7,
    mu: float = 30.0,
    warm_stages: int = 2,
    warm_change: float = 1e-2,
) -> tuple[jax.Array, jax.Array]:
  """IMGrad's Nash-MTL variant: CCP for (1 - cos) sum_i beta_i(a) + cos phi(a) on Nash's set.

  Zhou et al. 2025, Eq. 13, on Nash-MTL's CCP (Navon et al. 2022, Sec. 3.3 and the reference
  AvivNavon/nash-mtl): beta_i(a) = (M a)_i, phi(a) = sum_i log a_i + log (M a)_i (concave,
  linearized at the previous iterate p: phi_tag = 1 / p + M (1 / (M p))), constraints
  phi_i(a) >= 0, i.e. a_i (M a)_i >= 1. Each step is the barrier LP of `nash_lp` with
  c = (1 - cos) M 1 + cos phi_tag: the first from the strictly feasible 2 * (Nash fixed point)
  through all its stages, the later ones, while c moves by at most `warm_change` (relative L1),
  warm-started from the previous step's centre `warm_stages` stages before its last (the set is
  the same, c changes little), so they run only those last stages.
  Scale-free: solved on M / ||M||_F (the reference's normalization) with the constraint on
  that scale, and mapped back by 1 / sqrt(||M||_F), so a_i (M a)_i >= 1 holds on M itself.

  The CCP starts at `alpha0` (the previous weights) where a > 0 and M a > 0, else at the Nash
  fixed point, and stops when an iterate moves by less than max(tol, 100 eps) (relative max
  norm: float32 cannot resolve less), or after `max_iter` steps. Tasks with a zero row are left
  out (decoupled). Returns `(alpha, ok)`: `ok[i]` is true where task i has a nonzero row, the
  set is nonempty (`nash_weights` converged), and the answer is finite with
  min_i log a_i (M a)_i >= -feas_tol; elsewhere 1.
  """
  k = m.shape[0]
  norm = jnp.maximum(jnp.sqrt(jnp.sum(m * m)), _TINY)
  root = jnp.sqrt(norm)
  nash, nash_ok = nash_weights(m / norm)
  active = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0)) > 1e-12 * jnp.sqrt(_scale(m))
  both = active[:, None] & active[None, :]
  mn = jnp.where(both, m / norm, jnp.eye(k, dtype=m.dtype))
  feasible = jnp.all(nash_ok | ~active)
  stop_tol = max(tol, 100.0 * _eps(m)) if tol > 0 else 0.0

  # The LPs in y = x / d (unit-diagonal Gram), as in `nash_lp`.
  d = 1.0 / jnp.sqrt(jnp.maximum(jnp.diag(mn), _TINY))
  mu_n = d[:, None] * mn * d[None, :]
  stages = max(1, int(np.ceil(np.log(k / gap_tol) / np.log(mu))) + 1)
  y_feas = 2.0 * nash / d

  p0 = alpha0.astype(m.dtype) * root
  start_ok = jnp.all(jnp.isfinite(p0)) & jnp.all(p0 > 0) & jnp.all(mn @ p0 > 0)
  p0 = jnp.where(start_ok, p0, nash)

  def body(carry):
    p, c_old, y_w, t_w, it, _ = carry
    c = ((1.0 - cos) * jnp.sum(mn, axis=0) + cos * (1.0 / p + mn @ (1.0 / (mn @ p)))) * d
    t_cold = 1.0 / jnp.maximum(jnp.abs(c @ y_feas), _TINY)
    t_final = t_cold * mu ** (stages - 1)
    warm = jnp.sum(jnp.abs(c - c_old)) <= warm_change * jnp.sum(jnp.abs(c))
    y_start = jnp.where(warm, y_w, y_feas)
    t_start = jnp.where(warm, jnp.minimum(t_w, t_final), t_cold)
    y, y_w_new, t_w_new = _barrier_lp(mu_n, c, y_start, t_start, t_final, mu=mu, newton_iter=30,
                                      max_stages=stages, keep_back=warm_stages)
    x = d * y
    good = jnp.all(jnp.isfinite(x))
    x = jnp.where(good, x, p)
    done = ~good | (jnp.max(jnp.abs(x - p)) <= stop_tol * jnp.max(jnp.abs(x)))
    return x, c, y_w_new, t_w_new, it + 1, done

  cond = lambda carry: ~carry[5] & (carry[4] < max_iter)
  init = (p0, jnp.full((k,), jnp.inf, m.dtype), y_feas, jnp.ones((), m.dtype), jnp.array(0),
          ~feasible)
  x = jax.lax.while_loop(cond, body, init)[0]
  mx = mn @ x
  slack = jnp.log(jnp.where(x > 0, x, 1.0)) + jnp.log(jnp.where(mx > 0, mx, 1.0))
  converged = (feasible & jnp.all(jnp.isfinite(x)) & jnp.all(x > 0) & jnp.all(mx > 0)
               & (jnp.min(slack) >= -feas_tol))
  ok = active & converged
  return jnp.where(ok, x / root, 1.0), ok
