"""UPGrad: the average of the rows' projections onto the dual cone of the rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator


def upgrad_weights(gram: jax.Array, *, norm_eps: float = 0.0, reg_eps: float = 1e-4,
                   max_iter: int = 100, tol: float = 1e-7) -> jax.Array:
  """UPGrad's weights: the mean over i of v_i = argmin_{v >= e_i} v^T M v (Quinton & Rey 2024,
  Eq. 5 with Prop. 1), on M / trace(M) + reg_eps I as torchjd."""
  k = gram.shape[0]
  trace = jnp.trace(gram)
  m = jnp.where(trace >= norm_eps, gram / jnp.where(trace > 0, trace, 1.0), 0.0)
  m = m + reg_eps * jnp.eye(k, dtype=m.dtype)
  v = solvers.dual_cone_weights(m, jnp.eye(k, dtype=m.dtype) / k, max_iter=max_iter, tol=tol)
  return jnp.sum(v, axis=0)


def upgrad(
    num_tasks: int,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
    max_iter: int = 100,
    tol: float = 1e-7,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """UPGrad: d = 1/K sum_i pi_J(g_i), pi_J the projection onto {x : g_j . x >= 0 for all j}.

  Quinton & Rey 2024 (Jacobian Descent for Multi-Objective Optimization), Eq. 5 with Prop. 1:
  pi_J(G^T u) = G^T v, v = argmin_{v >= u} v^T M v, so the weights (`upgrad_weights`) are the
  mean over i of the v found for u = e_i. As in torchjd: M is divided by its trace (set to 0
  when the trace is below `norm_eps`), then `reg_eps * I` is added so the QP is strictly
  convex; each QP is solved exactly by an active-set method (`solvers.dual_cone_weights`).
  `norm_eps` is an absolute threshold below which d is the plain mean of the rows, so it
  defaults to 0 (scale-free: d(a G) = a d(G)); torchjd's 1e-4 turns UPGrad into the mean
  whenever ||G||_F < 1e-2. reg_eps must be > 0; it allows
  g_i . d >= -reg_eps * trace(M) * max(v) instead of g_i . d >= 0. Task-specific leaves get the
  plain sum.
  """
  def weights(m, state, losses):
    del losses
    w = upgrad_weights(m, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter, tol=tol)
    return w, None, state

  return gram_aggregator("upgrad", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared)
