"""UPGrad: the average of the rows' projections onto the dual cone of the rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator


def upgrad_weights(gram: jax.Array, *, norm_eps: float = 0.0, reg_eps: float = 1e-4,
                   max_iter: int = 100, tol: float = 1e-7,
                   present: jax.Array | None = None) -> jax.Array:
  """UPGrad's weights: the mean over i of v_i = argmin_{v >= e_i} v^T M v (Quinton & Rey 2024,
  Eq. 5 with Prop. 1), on M / trace(M) + reg_eps I as torchjd.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    norm_eps: below this trace, M is taken as 0 (absolute threshold).
    reg_eps: the ridge added to M / trace(M); must be > 0.
    max_iter: step cap of the active-set QP solver (`solvers.dual_cone_weights`).
    tol: its relative tolerance.
    present: `(K,)` bool of the tasks that take part (None: all); M must be 0 on the others'
      rows and columns, so the ridge decouples them: the mean runs over the present i
      (u = e_i / number present), and the others get weight 0.

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i.

  References:
    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, Eq. 5 and Prop. 1.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(jax.jit(mtl_optax.upgrad_weights)(gram)).round(3))
    [0.75  0.559]
  """
  k = gram.shape[0]
  trace = jnp.trace(gram)
  m = jnp.where(trace >= norm_eps, gram / jnp.where(trace > 0, trace, 1.0), 0.0)
  m = m + reg_eps * jnp.eye(k, dtype=m.dtype)
  u = jnp.eye(k, dtype=m.dtype) / k
  if present is not None:  # equal to u when every task is present
    u = jnp.where(present[:, None] & jnp.eye(k, dtype=bool),
                  1.0 / jnp.maximum(jnp.sum(present), 1).astype(m.dtype), 0.0)
  v = solvers.dual_cone_weights(m, u, max_iter=max_iter, tol=tol)
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

  Args:
    num_tasks: K.
    norm_eps: below this trace, M is taken as 0 (absolute threshold).
    reg_eps: the ridge added to M / trace(M); must be > 0.
    max_iter: step cap of the active-set QP solver (`solvers.dual_cone_weights`).
    tol: its relative tolerance.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232, Eq. 5 and Prop. 1.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.upgrad(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.47  1.118]
  """
  def weights(m, state, losses, present):
    del losses
    w = upgrad_weights(m, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter, tol=tol,
                       present=present)
    return w, None, state

  return gram_aggregator("upgrad", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared, handles_absent=True)
