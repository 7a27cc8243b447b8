"""IMGrad: CAGrad (or Nash-MTL) made sensitive to task imbalance through the MGDA direction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.checks import check_choice
from mtl_optax.grad.cagrad import (RESCALES, Rescale, ball_weights, combined_norm,
                                    present_count, resolved_sq_norm, unit_gram)
from mtl_optax.grad.nash_mtl import nash_aggregator

FORMS = ("reference", "paper_eq11", "paper_eq9")


def imbalance_cos(m: jax.Array, present: jax.Array | None = None) -> jax.Array:
  """cos(g0, g_m) in [0, 1] from the Gram matrix: g0 the mean row, g_m the MGDA min-norm point.

  Zhou et al. 2025 (IMGrad, Sec. 3): the imbalance measure that weights the two objectives.
  g0 . g_m >= ||g_m||^2 >= 0, so it is never negative; 0 when g_m = 0 (or all rows are zero),
  also when ||g_m||^2 is at its rounding level (`resolved_sq_norm`), where the ratio would be
  rounding over rounding (any value: IMGrad's weights then reached 1e7); clipped to [0, 1].
  With `present` (`(K,)` bool; M 0 on the others' rows and columns), that of the present rows.
  """
  if present is not None:  # the usual step (every task present) as without `present`
    return jax.lax.cond(jnp.all(present), imbalance_cos,
                        lambda g: _imbalance_cos(g, present), m)
  return _imbalance_cos(m, None)


def _imbalance_cos(m, present):
  if present is None:
    m = unit_gram(m)
    mean, mean_row = jnp.mean(m), jnp.mean(m, axis=1)
  else:
    present, n = present_count(m, present)
    m = unit_gram(m, n)
    mean, mean_row = jnp.sum(m) / (n * n), jnp.sum(m, axis=1) / n
  w_m = solvers.min_norm_weights(m, present=present)
  gm_norm = jnp.sqrt(resolved_sq_norm(w_m, m))
  g0_norm = jnp.sqrt(jnp.maximum(mean, 0.0))
  cos = (w_m @ mean_row) / jnp.maximum(g0_norm * gm_norm, 1e-8)
  return jnp.where(gm_norm > 0, jnp.clip(cos, 0.0, 1.0), 0.0)


def imgrad_weights(
    gram: jax.Array,
    c: float = 0.8,
    *,
    form: str = "reference",
    rescale: Rescale = "1+c^2",
    scale_by_num_tasks: bool = True,
    max_iter: int = 500,
    tol: float = 1e-7,
    present: jax.Array | None = None,
) -> jax.Array:
  """IMGrad's weights (Zhou et al. 2025, Eqs. 9 and 11, and the reference code's form; see
  `imgrad`): CAGrad's ball step with the dual objective weighted by cos(g0, g_m).

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    c: the radius factor, sqrt(phi) = c ||g0||.
    form: the dual objective, 'reference' | 'paper_eq11' | 'paper_eq9' (see `imgrad`).
    rescale: 'none' | '1+c^2' | '1+c', the division of d (as in `cagrad`).
    scale_by_num_tasks: multiply the weights by K (the reference code).
    max_iter: step cap of the simplex solver (`solvers.simplex_minimize`).
    tol: its tolerance on the change of w.

  Returns:
    `(K,)` weights of d = sum_i w_i g_i.

  References:
    Zhou et al. 2025, "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI,
    arXiv:2503.08006, Eqs. 9 and 11.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(jax.jit(mtl_optax.imgrad_weights)(gram)).round(3))
    [1.615 0.61 ]
  """
  if present is not None:  # the usual step (every task present) as without `present`
    kwargs = dict(form=form, rescale=rescale, scale_by_num_tasks=scale_by_num_tasks,
                  max_iter=max_iter, tol=tol)
    return jax.lax.cond(jnp.all(present), lambda g: imgrad_weights(g, c, **kwargs),
                        lambda g: _imgrad_weights(g, c, present=present, **kwargs), gram)
  return _imgrad_weights(gram, c, form=form, rescale=rescale,
                         scale_by_num_tasks=scale_by_num_tasks, max_iter=max_iter, tol=tol,
                         present=None)


def _imgrad_weights(gram, c, *, form, rescale, scale_by_num_tasks, max_iter, tol, present):
  k = gram.shape[0]
  if present is None:
    m = unit_gram(gram)
    mean_row, g0_sq = jnp.mean(m, axis=1), jnp.mean(m)
    cos = imbalance_cos(m)
    w0 = jnp.full((k,), 1.0 / k, m.dtype)
  else:
    present, n = present_count(gram, present)
    m = unit_gram(gram, n)
    mean_row, g0_sq = jnp.sum(m, axis=1) / n, jnp.sum(m) / (n * n)
    cos = _imbalance_cos(m, present)
    w0 = jnp.where(present, 1.0 / n, 0.0).astype(m.dtype)
  radius = c * jnp.sqrt(jnp.maximum(g0_sq, 0.0) + 1e-8) + 1e-8
  objectives = {
      "reference": lambda w: ((1.5 - cos) * (w @ mean_row)
                              + cos * radius * combined_norm(w, m)),
      "paper_eq11": lambda w: (1.0 - cos) * (w @ mean_row) + cos * radius * (w @ m @ w),
      "paper_eq9": lambda w: ((1.0 - cos) * (w @ mean_row + radius * combined_norm(w, m))
                              + cos * (w @ m @ w)),
  }
  w = solvers.simplex_minimize(objectives[form], w0, max_iter=max_iter, tol=tol,
                               present=present)
  return ball_weights(m, w, radius, c, rescale, scale_by_num_tasks, present)


def imgrad(
    num_tasks: int,
    c: float = 0.8,
    *,
    form: str = "reference",
    rescale: Rescale = "1+c^2",
    scale_by_num_tasks: bool = True,
    max_iter: int = 500,
    tol: float = 1e-7,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """IMGrad: CAGrad's update with a dual objective weighted by cos = cos(g0, g_m).

  Zhou et al. 2025 (Injecting Imbalance Sensitivity for Multi-Task Learning). g_m is the MGDA
  min-norm point of the rows (recomputed each step), sqrt(phi) = c ||g0||, and w minimizes over
  the simplex, by `form`:
    'reference' (default; zzpustc/IMGrad, NYUv2): (1.5 - cos) g_w.g0 + cos sqrt(phi) ||g_w||;
    'paper_eq11': (1 - cos) g_w.g0 + cos sqrt(phi) ||g_w||^2 (Eq. 11);
    'paper_eq9': (1 - cos)(g_w.g0 + sqrt(phi) ||g_w||) + cos ||g_w||^2 (Eq. 9).
  Then d = g0 + sqrt(phi) / (||g_w|| + 1e-8) g_w, rescaled as in `cagrad` (rescale
  '1+c^2': d / (1 + c^2), then times K as the reference does). c = 0.8 is the reference's
  NYUv2 script.
  All terms are computed on M / (trace/K), which also fixes the scale of the paper forms (they
  mix g^2 and g^3 terms). The weights are `imgrad_weights`; the Nash-MTL variant (Eq. 13) is
  `imgrad_nash`. Task-specific leaves get the plain sum.

  Args:
    num_tasks: K.
    c: the radius factor, sqrt(phi) = c ||g0||.
    form: the dual objective: 'reference', 'paper_eq11' or 'paper_eq9'.
    rescale: 'none' (d), '1+c^2' (d / (1 + c^2)) or '1+c' (d / (1 + c)).
    scale_by_num_tasks: multiply d by K (the reference code).
    max_iter: step cap of the simplex solver (`solvers.simplex_minimize`).
    tol: its tolerance on the change of w.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Zhou et al. 2025, "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI,
    arXiv:2503.08006, Eqs. 9 and 11 (Sec. 3: the imbalance measure cos(g0, g_m)).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.imgrad(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [1.311 1.22 ]
  """
  check_choice(form, FORMS, "imgrad: form")
  check_choice(rescale, RESCALES, "imgrad: rescale")

  def weights(m, state, losses, present):
    del losses
    w = imgrad_weights(m, c, form=form, rescale=rescale, scale_by_num_tasks=scale_by_num_tasks,
                       max_iter=max_iter, tol=tol, present=present)
    return w, None, state

  return gram_aggregator("imgrad", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared, handles_absent=True)


def imgrad_nash_weights(gram: jax.Array, prev: jax.Array, *, optim_niter: int = 20,
                        tol: float = 1e-5, present: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """IMGrad-Nash's alpha (Zhou et al. 2025, Eq. 13; see `imgrad_nash`) from the previous alpha,
  and per task whether it was found.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    prev: `(K,)` the previous alpha, where the CCP starts (if a > 0 and M a > 0).
    optim_niter: cap on the CCP steps.
    tol: stop when an iterate moves by less than this (relative max norm).
    present: `(K,)` bool of the tasks that take part (None: all; M 0 on the others' rows and
      columns, which the CCP decouples): cos is that of the present rows.

  Returns:
    `(alpha, ok)`: `(K,)` weights of d = sum_i alpha_i g_i, and `(K,)` bools, true where
    task i's alpha was found (alpha is 1 elsewhere).

  References:
    Zhou et al. 2025, "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI,
    arXiv:2503.08006, Eq. 13.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> alpha, ok = jax.jit(mtl_optax.imgrad_nash_weights)(gram, jnp.ones(2))
    >>> print(np.asarray(alpha).round(3), ok)
    [1.149 0.557] [ True  True]
  """
  return solvers.imbalance_nash_weights(gram, imbalance_cos(gram, present), prev,
                                        max_iter=optim_niter, tol=tol)


def imgrad_nash(
    num_tasks: int,
    *,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    max_norm: float = 1.0,
    tol: float = 1e-5,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """IMGrad's Nash-MTL variant: d = sum_i alpha_i g_i, alpha from Nash's CCP with cos weights.

  Zhou et al. 2025, Eq. 13 (no released code): each CCP step minimizes
  (1 - cos) sum_i g_i^T G alpha + cos phi_lin(alpha) subject to alpha_i (M alpha)_i >= 1, with
  cos = cos(g0, g_m) (`imbalance_cos`) and phi_lin Nash-MTL's linearized concave term
  (`solvers.imbalance_nash_weights`, log-barrier instead of cvxpy; scale-free, on M / ||M||_F).
  cos = 1 leads to Nash-MTL's fixed point; cos = 0 minimizes sum_i g_i . d on Nash's set.
  As `nash_mtl`: up to `optim_niter` CCP steps from the previous alpha (stop at relative change
  < `tol`), the previous alpha kept on failure (per task for zero rows), weights recomputed
  every `update_weights_every` steps, the shared part clipped to global norm `max_norm`
  (<= 0: none), and task-specific leaves get sum_i alpha_i row_i (unclipped). The weights are
  `imgrad_nash_weights`.

  Args:
    num_tasks: K.
    update_weights_every: recompute alpha every this many steps (reuse it in between).
    optim_niter: cap on the CCP steps per solve.
    max_norm: clip the shared part of d to this global norm (<= 0: no clipping).
    tol: stop the CCP when an iterate moves by less than this (relative max norm).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `NashMTLState` (step count, last alpha).

  References:
    Zhou et al. 2025, "Injecting Imbalance Sensitivity for Multi-Task Learning", IJCAI,
    arXiv:2503.08006, Eq. 13 (on Navon et al. 2022, arXiv:2202.01017, Sec. 3.3).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.imgrad_nash(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.615 0.788]
  """
  def solve(m, prev, present):
    return imgrad_nash_weights(m, prev, optim_niter=optim_niter, tol=tol, present=present)
  return nash_aggregator("imgrad_nash", num_tasks, solve,
                         update_weights_every=update_weights_every, optim_niter=optim_niter,
                         max_norm=max_norm, shared=shared)
