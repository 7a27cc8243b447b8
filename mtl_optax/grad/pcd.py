"""PCD: priority-constrained descent, the primary task's gradient under progress guarantees for
the secondary tasks (Varam & AlHajri, TMLR 2026)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_in_range, check_positive_int
from mtl_optax.grad.base import gram_aggregator

TauLike = float | ArrayLike


class PCDState(NamedTuple):
  sq_norms: jax.Array  # (K,) v, the moving average of the squared norms ||g_i||^2 (biased)
  count: jax.Array     # int32, the number of updates so far


def check_tau(tau: TauLike, num_tasks: int, what: str = "pcd: tau") -> TauLike:
  """Raises unless `tau` is a number in [0, 1] or a vector of `num_tasks - 1` such numbers (one
  per secondary task). Traced values (`optax.inject_hyperparams`) are not checked."""
  if isinstance(tau, numbers.Real):
    return check_in_range(tau, 0.0, 1.0, what)
  if isinstance(tau, jax.core.Tracer):
    return tau
  t = np.asarray(tau, np.float64)
  if t.ndim == 0:  # e.g. a float made an array by optax.inject_hyperparams
    check_in_range(float(t), 0.0, 1.0, what)
    return tau
  if t.ndim != 1 or t.shape[0] != num_tasks - 1:
    raise ValueError(f"{what} must be a float or a vector of K - 1 = {num_tasks - 1} floats "
                     f"(one per secondary task), got shape {t.shape}.")
  if not np.all((t >= 0.0) & (t <= 1.0)):
    raise ValueError(f"{what} must be in [0, 1], got {tau!r}.")
  return tau


def _constrained_weights(gt: jax.Array, tau: jax.Array) -> jax.Array:
  """w~ = (1, mu): argmin_d 1/2 ||d - g~_1||^2 s.t. g~_j . d >= tau_j ||g~_j||^2 (j >= 2) is
  d = sum_i w~_i g~_i, from the normalized Gram matrix `gt`; (1, 0, ..., 0) if infeasible.

  The dual, min_{mu >= 0} 1/2 mu^T G~s mu - b^T mu (b = tau diag G~s - G~[1:, 0]), is solved in
  nu_j = ||g~_j|| mu_j, where G~s becomes the secondaries' cosines C (`solvers.cosines`, clipped
  to [-1, 1], as for MGDA) and b becomes q_j = b_j / ||g~_j||, by `solvers.nonneg_qp` at its
  rounding-level tolerance, with a ridge r for rank-deficient C: (K - 1) eps, or twice C's most
  negative eigenvalue where rounding made it more negative than that (the Gram matrix's rounding
  grows with the rows' length: two such float64 draws at length 2000 in the tests). Secondaries
  of norm <= eps times the largest normalized norm have a void constraint (0 >= 0 up to
  rounding) and are left out.

  The constraints are infeasible exactly when the dual is unbounded: some y >= 0 has C y = 0
  and q^T y > 0. The ridged dual is the dual of the problem whose constraints are relaxed by
  r nu_j (in units of ||g~_j||); when they are infeasible, r nu tends to the least relaxation
  that makes them feasible (of the order of tau_j ||g~_j||), so nu grows like 1 / r, while for
  feasible constraints nu has a finite limit. So the dual is solved with the ridges r and 4 r
  (one batched solve), and the constraints count as infeasible when max nu > 10 max |q| (a
  rounding-level q^T y, as for two equal secondaries, moves nu by O(|q|) only) and nu moves by
  more than 0.3 of its size between the two ridges: 3/4 for an unbounded dual, 3 r / (lambda +
  4 r) along an eigenvalue lambda of C, so a feasible problem is taken for infeasible only when
  it rests on an eigenvalue below 6 r, C's rounding level. A solve that is not finite counts as
  infeasible too.
  """
  k = gt.shape[0]
  eps = float(jnp.finfo(gt.dtype).eps)
  largest = jnp.sqrt(jnp.max(jnp.maximum(jnp.diag(gt), 0.0)))
  n, void, inv, cosines = solvers.cosines(gt[1:, 1:], scale=largest)
  q = jnp.where(void, 0.0, tau * n - gt[1:, 0] * inv)  # b_j / ||g~_j||
  eye = jnp.eye(k - 1, dtype=bool)
  solve = lambda ridge: solvers.nonneg_qp(jnp.where(eye, 1.0 + ridge, cosines), -q, tol=0.0)
  ridge = jnp.maximum((k - 1) * eps, -2.0 * jnp.linalg.eigvalsh(cosines)[0])
  nu, stiff = jax.vmap(solve)(jnp.stack([ridge, 4.0 * ridge]))
  size = jnp.max(jnp.abs(nu))
  unbounded = (size > 10.0 * jnp.max(jnp.abs(q))) & (jnp.max(jnp.abs(nu - stiff)) > 0.3 * size)
  feasible = jnp.all(jnp.isfinite(nu)) & jnp.all(jnp.isfinite(stiff)) & ~unbounded
  mu = jnp.where(feasible, nu * inv, 0.0)
  return jnp.concatenate([jnp.ones((1,), gt.dtype), mu])


def pcd_weights(gram: jax.Array, state: PCDState, tau: TauLike = 0.02, beta: float = 0.999,
                eps: float = 1e-8, present: jax.Array | None = None
                ) -> tuple[jax.Array, PCDState]:
  """PCD's weights: row 0 (the primary task) followed as closely as the secondary tasks'
  progress guarantees allow, rescaled to the primary gradient's norm.

  v <- beta v + (1 - beta) diag(M), v^_i = v_i / (1 - beta^n) at step n, s_i = 1 / sqrt(v^_i +
  eps) (0 where that is 0), g~_i = s_i g_i (Gram M~ = M * s s^T);
  d~ = argmin_d 1/2 ||d - g~_1||^2 s.t. g~_j . d >= tau_j ||g~_j||^2 for j >= 2, i.e.
  d~ = g~_1 + sum_j mu_j g~_j with mu >= 0 the dual solution (`solvers.nonneg_qp`), and
  d = d~ ||g_1|| / ||d~||: w = (1, mu) * s * sqrt(M_11 / ||d~||^2). Special cases, as torchjd:
  infeasible constraints (e.g. two opposite secondaries) give g_1; g_1 = 0, or d~ = 0 up to its
  rounding level 10 eps (sum_i |w~_i| ||g~_i||)^2, give 0. A Gram matrix with a NaN or an
  infinity leaves the state as it was and gives NaN weights (`apply_if_finite` skips the step).

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i; row 0 is the primary task.
    state: the moving average v of the squared norms and the step count n (0: no step yet).
    tau: the fraction in [0, 1] of normalized progress guaranteed to each secondary task: a
      float, or a vector with one value per secondary task (length K - 1).
    beta: the decay of the moving average, in [0, 1).
    eps: added to v^ before the inverse square root, >= 0.
    present: `(K,)` bool of the tasks that take part (None: all; M 0 on the others' rows and
      columns): the first present task is the primary (as in a build without the others),
      absent secondaries are left out (a zero row), and the others' v keep their values.

  Returns:
    `(w, state)`: the `(K,)` weights w of d = sum_i w_i g_i, and the new state.

  References:
    Varam & AlHajri 2026, "Not All Objectives Are Born Equal: Priority-Constrained Descent for
    Hierarchical Multi-Objective Optimization", TMLR, arXiv:2606.29521 (the QP on normalized
    gradients and its dual); checked against torchjd's `aggregation/_pcd.py`.

  Example:
    >>> import functools, jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> state = mtl_optax.PCDState(jnp.zeros(2), jnp.array(0))
    >>> gram = jnp.array([[1.0, -1.0], [-1.0, 2.0]])  # rows (1, 0) and (-1, 1)
    >>> w, state = jax.jit(functools.partial(mtl_optax.pcd_weights, tau=0.1))(gram, state)
    >>> print(np.asarray(w).round(3))  # d = 1.4 g_1 + 0.799 g_2 = (0.601, 0.799): norm ||g_1||
    [1.4   0.799]
  """
  k = gram.shape[0]
  tau = check_tau(tau, k)
  dtype = gram.dtype
  finite = jnp.all(jnp.isfinite(gram))
  safe = jnp.where(finite, gram, jnp.eye(k, dtype=dtype))
  sq = jnp.maximum(jnp.diag(safe), 0.0)

  count = optax.safe_increment(state.count)
  # 1 - beta and 1 - beta^n = -expm1(n log beta) from a float beta in float64, so that neither
  # loses digits to beta's rounding (float32(0.999) is 1.3e-5 off in 1 - beta).
  if isinstance(beta, numbers.Real):
    log_beta, complement = (math.log(beta) if beta > 0 else -math.inf), 1.0 - beta
  else:  # an array, e.g. from optax.inject_hyperparams
    beta = jnp.asarray(beta, dtype)
    log_beta, complement = jnp.log(beta), 1.0 - beta
  v = beta * state.sq_norms.astype(dtype) + complement * sq
  if present is not None:
    v = jnp.where(present, v, state.sq_norms.astype(dtype))
  correction = -jnp.expm1(count.astype(dtype) * log_beta)
  denom = jnp.sqrt(v / correction + eps)
  s = jnp.where(denom > 0.0, 1.0 / jnp.where(denom > 0.0, denom, 1.0), 0.0)
  gt = safe * s[:, None] * s[None, :]
  taus = jnp.broadcast_to(jnp.asarray(tau, dtype), (k - 1,))
  if present is not None:
    # The present tasks first, in their order (the identity when every task is present): the
    # first present task is the primary; each secondary keeps its tau.
    order = jnp.argsort(~present, stable=True)
    taus = jnp.concatenate([jnp.zeros((1,), dtype), taus])[order][1:]
    gt, s, sq = gt[order][:, order], s[order], sq[order]

  if k == 1:
    w_tilde = jnp.ones((1,), dtype)
  else:
    w_tilde = _constrained_weights(gt, taus)
  d_sq = w_tilde @ gt @ w_tilde
  level = 10.0 * float(jnp.finfo(dtype).eps) * (
      jnp.abs(w_tilde) @ jnp.sqrt(jnp.maximum(jnp.diag(gt), 0.0))) ** 2
  ok = (sq[0] > 0.0) & (d_sq > level)
  w = jnp.where(ok, w_tilde * s * jnp.sqrt(sq[0] / jnp.where(ok, d_sq, 1.0)), 0.0)
  if present is not None:
    w = jnp.zeros_like(w).at[order].set(w)
  w = jnp.where(finite, w, jnp.nan)
  new = PCDState(v.astype(state.sq_norms.dtype), count)
  return w, jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)


def pcd(num_tasks: int, *, tau: TauLike = 0.02, beta: float = 0.999, eps: float = 1e-8,
        shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """PCD: the primary task's gradient g_1, moved just enough that every secondary task j gets
  at least a fraction tau_j of the progress of a step along its own normalized gradient.

  Varam & AlHajri 2026: with g~_i = g_i / sqrt(v^_i + eps), v^_i the bias-corrected moving
  average (decay beta) of ||g_i||^2, d~ = argmin_d ||d - g~_1||^2 s.t. g~_j . d >=
  tau_j ||g~_j||^2 for j >= 2, and the update is d~ rescaled to ||g_1|| (weights
  `pcd_weights`). The tasks are not exchangeable: row 0 (the first loss) is the primary task
  (on a step where it sits out, the first present task is, as in a build without it).
  Because of the normalization, multiplying a secondary row by the same constant at every step
  leaves d unchanged, and multiplying every row at every step by a > 0 multiplies d by a, both
  up to eps (which the squared norms must dominate). The guarantee g~_j . d~ >= tau_j ||g~_j||^2
  does not make d non-conflicting with g_1 (a secondary opposed to the primary can turn d
  against it), and infeasible constraints (e.g. two opposite secondaries) give g_1 itself.
  As torchjd's PCD (checked against `torchjd/aggregation/_pcd.py`), but the QP is solved inside
  jit in the Gram matrix's dtype by the library's active-set non-negative QP on the dual
  (`solvers.nonneg_qp`, ridged; torchjd runs Goldfarb and Idnani's dual method in float64: the
  same minimizer). A Gram matrix with a NaN or an infinity gives NaN weights and leaves the
  moving average and step count as they were, as in torchjd (the state's `weights` hold the NaN
  weights; `mtl_optax.apply_if_finite` skips such a step whole). Task-specific leaves get the
  plain sum.

  Args:
    num_tasks: K (row 0 the primary task).
    tau: the guaranteed fraction in [0, 1]: a float, or a vector of K - 1 values (one per
      secondary task).
    beta: the decay of the moving average of the squared norms, in [0, 1).
    eps: added to the bias-corrected average before the inverse square root, >= 0.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `PCDState`.

  References:
    Varam & AlHajri 2026, "Not All Objectives Are Born Equal: Priority-Constrained Descent for
    Hierarchical Multi-Objective Optimization", TMLR, arXiv:2606.29521; torchjd's
    `aggregation/_pcd.py`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.pcd(2, tau=0.1), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # the secondary conflicts
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params))
    >>> print(np.asarray(d["w"]).round(3), np.asarray(jac["w"] @ d["w"]).round(3))  # gains
    [0.601 0.799] [0.601 0.198]
  """
  check_positive_int(num_tasks, "pcd: num_tasks")
  check_tau(tau, num_tasks)
  check_in_range(beta, 0.0, 1.0, "pcd: beta", open_high=True)
  check_in_range(eps, 0.0, float("inf"), "pcd: eps")

  def init(params):
    return PCDState(jnp.zeros((num_tasks,), tree_lib.weight_dtype(params)),
                    jnp.zeros((), jnp.int32))

  def weights(gram, state, losses, present):
    del losses
    w, state = pcd_weights(gram, state, tau, beta, eps, present)
    return w, None, state

  return gram_aggregator("pcd", num_tasks, init, weights, shared=shared, handles_absent=True)
