"""FairGrad: alpha-fair resource allocation among the tasks' gradients."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.grad.base import gram_aggregator


class FairGradState(NamedTuple):
  # Whether the last solve met its tolerance for every task with a nonzero row; where it did
  # not, w is Newton's last iterate or, without a solution, MGDA's weights
  # (`mtl_optax.with_diagnostics` counts these fallbacks).
  converged: jax.Array | bool = True


def fairgrad_weights(gram: jax.Array, alpha: float = 1.0, *, max_iter: int = 50,
                     tol: float = 1e-4) -> jax.Array:
  """FairGrad's weights: w > 0 with M w = w^(-1/alpha) (Ban & Ji 2024, Eq. 9).

  Task i's utility is its gain g_i . d; the alpha-fair allocation of d = sum_i w_i g_i makes
  (M w)_i = g_i . d = w_i^(-1/alpha). Solved exactly by damped Newton on the equivalent strictly
  convex problem (`solvers.fair_weights`); alpha = 1 is Nash-MTL's fixed point.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    alpha: the fairness parameter, > 0 (alpha -> 0: the sum of utilities; alpha = 1:
      proportional fairness; alpha -> infinity: max-min fairness).
    max_iter: cap on the Newton steps.
    tol: accept when max_i |(M w)_i w_i^(1/alpha) - 1| < tol.

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i.

  References:
    Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning", ICML,
    arXiv:2402.15638, Eq. 9 (G G^T w = w^(-1/alpha)); checked against LibMTL's
    `LibMTL/weighting/FairGrad.py` (SciPy `least_squares` on the same equation).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> w = jax.jit(mtl_optax.fairgrad_weights)(gram, 2.0)
    >>> print(np.asarray(w).round(3), np.asarray(gram @ w * w**0.5).round(3))
    [1.165 0.478] [1. 1.]
  """
  return solvers.fair_weights(gram, alpha, max_iter=max_iter, tol=tol)[0]


def fairgrad(
    num_tasks: int,
    alpha: float = 1.0,
    *,
    max_iter: int = 50,
    tol: float = 1e-4,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """FairGrad: d = sum_i w_i g_i with w > 0 solving M w = w^(-1/alpha).

  Ban & Ji 2024 (Fair Resource Allocation in Multi-Task Learning), Eq. 9: every task's gain
  g_i . d equals w_i^(-1/alpha), so d never conflicts with a task (g_i . d > 0) when the
  equation has a solution. LibMTL solves it with SciPy's `least_squares` from w = 1/K on the
  host; here `fairgrad_weights` solves it exactly inside jit (damped Newton on a convex
  reformulation). As in LibMTL the weights multiply the losses, so task-specific leaves get
  sum_i w_i row_i too. Every step solves from scratch, as LibMTL does. Where the equation has
  no solution (0 a nonnegative combination of the rows, e.g. two opposite rows), Newton's
  iterate runs off to infinity; the weights are then MGDA's min-norm weights
  (`solvers.fair_weights`), finite and non-conflicting. Such a step, or one that stops short of
  `tol` after `max_iter` steps, is reported: `FairGradState.converged` is False (counted by
  `mtl_optax.with_diagnostics` as a fallback).

  Args:
    num_tasks: K.
    alpha: the fairness parameter, > 0 (LibMTL's default 1; the paper tunes it per data set).
    max_iter: cap on the Newton steps per solve.
    tol: accept when max_i |(M w)_i w_i^(1/alpha) - 1| < tol.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights around a `FairGradState` (whether the solve
    converged, read by `mtl_optax.with_diagnostics`).

  References:
    Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning", ICML,
    arXiv:2402.15638, Eq. 9; checked against LibMTL's `LibMTL/weighting/FairGrad.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.fairgrad(2, alpha=2.0)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}))
    >>> print(np.asarray(d["w"]).round(3), np.asarray(jac["w"] @ d["w"]).round(3))  # gains
    [0.926 0.955] [0.926 1.447]
  """
  check_positive_int(max_iter, "fairgrad: max_iter")
  if isinstance(alpha, numbers.Real) and not alpha > 0:
    raise ValueError(f"fairgrad: alpha must be > 0, got {alpha!r}.")

  def weights(m, state, losses):
    del state, losses
    w, ok = solvers.fair_weights(m, alpha, max_iter=max_iter, tol=tol)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
    active = norms > 1e-12 * jnp.max(norms)  # zero rows have no solution (solvers.py)
    return w, w, FairGradState(jnp.all(ok | ~active))

  # w(t^2 M) = t^(-2 alpha / (1 + alpha)) w(M), so d(t G) = t^h d(G), h = (1 - alpha) / (1 + alpha).
  return gram_aggregator("fairgrad", num_tasks, lambda params: FairGradState(jnp.array(True)),
                         weights, shared=shared, homogeneity=(1 - alpha) / (1 + alpha))
