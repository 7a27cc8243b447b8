"""DualProj: the mean of the rows projected onto the dual cone of the rows (as in GEM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_in_range, check_positive_int
from mtl_optax.grad.base import gram_aggregator


def preference(pref_vector: np.typing.ArrayLike | None, num_tasks: int, default: float,
               what: str) -> np.ndarray:
  """The `(K,)` float64 preference vector u (`default` everywhere when None), checked."""
  if pref_vector is None:
    return np.full((num_tasks,), default)
  u = np.asarray(pref_vector, np.float64)
  if u.shape != (num_tasks,) or not np.all(np.isfinite(u)):
    raise ValueError(f"{what} must be {num_tasks} finite floats (one per task), got "
                     f"{pref_vector!r}.")
  return u


def dualproj_weights(gram: jax.Array, u: jax.Array | None = None, *, norm_eps: float = 0.0,
                     reg_eps: float = 1e-4, max_iter: int = 100,
                     tol: float = 1e-7, present: jax.Array | None = None) -> jax.Array:
  """DualProj's weights: w = argmin_{v >= u} v^T M v (Quinton & Rey 2024, Prop. 1; GEM,
  Lopez-Paz & Ranzato 2017, Eq. 11), on M / trace(M) + reg_eps I as torchjd.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    u: `(K,)` weights of the vector G^T u to project; None: the mean, u = 1/K.
    norm_eps: below this trace, M is taken as 0 (absolute threshold; 0: scale-free).
    reg_eps: the ridge added to M / trace(M); must be > 0.
    max_iter: step cap of the active-set QP solver (`solvers.dual_cone_weights`).
    tol: its relative tolerance.
    present: `(K,)` bool of the tasks that take part (None: all); M must be 0 on the others'
      rows and columns, so the ridge decouples them: u is 0 there (the default mean runs over
      the present tasks) and so are their weights.

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i.

  References:
    Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", NeurIPS,
    arXiv:1706.08840, Eq. 11 (the dual QP); Quinton & Rey 2024, "Jacobian Descent for
    Multi-Objective Optimization", arXiv:2406.16232, Prop. 1.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -2.0], [-2.0, 5.0]])  # rows (1, 0) and (-2, 1): mean conflicts
    >>> print(np.asarray(jax.jit(mtl_optax.dualproj_weights)(gram)).round(3))  # exact: (1, 0.5)
    [0.999 0.5  ]
  """
  k = gram.shape[0]
  if present is None:
    u = jnp.full((k,), 1.0 / k, gram.dtype) if u is None else jnp.asarray(u, gram.dtype)
  elif u is None:  # the mean of the present rows (1/K when every task is present)
    u = jnp.where(jnp.all(present), jnp.full((k,), 1.0 / k, gram.dtype), jnp.where(
        present, 1.0 / jnp.maximum(jnp.sum(present), 1).astype(gram.dtype), 0.0))
  else:
    u = jnp.where(present, jnp.asarray(u, gram.dtype), 0.0)
  trace = jnp.trace(gram)
  m = jnp.where(trace > norm_eps, gram / jnp.where(trace > 0, trace, 1.0), 0.0)
  m = m + reg_eps * jnp.eye(k, dtype=m.dtype)
  return solvers.dual_cone_weights(m, u, max_iter=max_iter, tol=tol)


def dualproj(
    num_tasks: int,
    *,
    pref_vector: np.typing.ArrayLike | None = None,
    norm_eps: float = 0.0,
    reg_eps: float = 1e-4,
    max_iter: int = 100,
    tol: float = 1e-7,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """DualProj: d = pi_J(G^T u), the projection of the mean row onto {x : g_j . x >= 0 for all j}.

  The projection of GEM (Lopez-Paz & Ranzato 2017, Eq. 11) applied to the mean of the rows,
  as torchjd's DualProj (checked against torchjd/aggregation/_dualproj.py): by Quinton & Rey
  2024, Prop. 1, pi_J(G^T u) = G^T v with v = argmin_{v >= u} v^T M v, the same dual-cone QP
  as UPGrad (`solvers.dual_cone_weights`) but one QP instead of K. As torchjd, M is divided by
  its trace and `reg_eps * I` is added, so g_i . d >= -reg_eps * trace(M) * max(v) instead of
  g_i . d >= 0. torchjd zeroes M when its trace is below norm_eps = 1e-4 (d is then the plain
  mean whenever ||G||_F < 1e-2); the default norm_eps = 0 keeps d(a G) = a d(G).
  Task-specific leaves get the plain sum. The weights are `dualproj_weights`.

  Args:
    num_tasks: K.
    pref_vector: `(K,)` weights u of the combination to project (torchjd's `pref_vector`);
      None: the mean, u = 1/K.
    norm_eps: below this trace, M is taken as 0 (absolute threshold; 0: scale-free).
    reg_eps: the ridge added to M / trace(M); must be > 0.
    max_iter: step cap of the active-set QP solver.
    tol: its relative tolerance.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning", NeurIPS,
    arXiv:1706.08840, Eq. 11; Quinton & Rey 2024, "Jacobian Descent for Multi-Objective
    Optimization", arXiv:2406.16232, Prop. 1.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.dualproj(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-2.0, 1.0]])}  # their mean (-0.5, 0.5) conflicts
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params))
    >>> print(np.asarray(d["w"]).round(3))  # exact: (0, 0.5)
    [-0.001  0.5  ]
  """
  check_positive_int(num_tasks, "dualproj: num_tasks")
  u = None if pref_vector is None else preference(pref_vector, num_tasks, 1.0 / num_tasks,
                                                  "dualproj: pref_vector")
  check_in_range(reg_eps, 0.0, float("inf"), "dualproj: reg_eps", open_low=True)
  check_in_range(norm_eps, 0.0, float("inf"), "dualproj: norm_eps")

  def weights(m, state, losses, present):
    del losses
    w = dualproj_weights(m, u, norm_eps=norm_eps, reg_eps=reg_eps, max_iter=max_iter, tol=tol,
                         present=present)
    return w, None, state

  return gram_aggregator("dualproj", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared, handles_absent=True)
