"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_choice
from mtl_optax.grad.base import gram_aggregator

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
APPLY_TO = ("raw", "normalized")


def row_normalizers(m: jax.Array, losses: jax.Array | None, normalization: str) -> jax.Array:
  """n_i of Sener & Koltun's code (`gradient_normalizers`): 1, ||g_i||, L_i or L_i ||g_i||.

  Zero norms and non-positive losses are replaced by 1 (the balancer leaves tasks with
  non-positive losses out, see `gram_aggregator`), so the result is always finite.
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
  norms = jnp.where(norms > 0, norms, 1.0)
  ones = jnp.ones_like(norms)
  return {
      "none": lambda: ones,
      "l2": lambda: norms,
      "loss": lambda: jnp.where(losses > 0, losses, 1.0),
      "loss+": lambda: jnp.where(losses > 0, losses, 1.0) * norms,
  }[normalization]()


def mgda_weights(
    gram: jax.Array,
    losses: jax.Array | None = None,
    *,
    normalization: str = "none",
    apply_to: str = "raw",
    scale_by_num_tasks: bool = False,
    max_iter: int = 250,
    tol: float = 1e-7,
    present: jax.Array | None = None,
) -> jax.Array:
  """MGDA's weights: w = argmin_{w in simplex} ||sum_i w_i g_i / n_i||^2 (Sener & Koltun 2018,
  Eq. 3), divided by n with `apply_to='normalized'`, times K with `scale_by_num_tasks`.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    losses: `(K,)` losses; needed by the 'loss' and 'loss+' normalizations only.
    normalization: the row normalizers n_i, 'none' | 'l2' | 'loss' | 'loss+' (see `mgda`).
    apply_to: 'raw' (w on the rows g_i) or 'normalized' (w / n, i.e. w on g_i / n_i).
    scale_by_num_tasks: multiply the weights by K.
    max_iter: step cap of the active-set solver (`solvers.min_norm_weights`).
    tol: its relative tolerance.
    present: `(K,)` bool of the tasks that take part (None: all); M must be 0 on the others'
      rows and columns. The weights are those of the present rows alone (0 elsewhere, and K
      is their number).

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i.

  References:
    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS,
    arXiv:1810.04650, Eq. 3.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(jax.jit(mtl_optax.mgda_weights)(gram)).round(3))
    [0.76 0.24]
  """
  n = row_normalizers(gram, losses, normalization)
  w = solvers.min_norm_weights(gram / (n[:, None] * n[None, :]), max_iter=max_iter, tol=tol,
                              present=present)
  if apply_to == "normalized":
    w = w / n
  if not scale_by_num_tasks:
    return w
  return w * (gram.shape[0] if present is None else jnp.sum(present).astype(w.dtype))


def mgda(
    num_tasks: int,
    normalization: str = "none",
    *,
    apply_to: str = "raw",
    scale_by_num_tasks: bool = False,
    max_iter: int = 250,
    tol: float = 1e-7,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """MGDA: d = sum_i w_i g_i, w = argmin_{w in simplex} ||sum_i w_i g_i / n_i||^2.

  Sener & Koltun 2018 (Multi-Task Learning as Multi-Objective Optimization), Eq. 3; the
  row normalizers n_i ('none' | 'l2' | 'loss' | 'loss+') are from their code (Sec. 3.2
  mentions them only in passing). The min-norm problem is solved exactly (active set, see
  `solvers.min_norm_weights`) instead of the reference's Frank-Wolfe/projected-gradient loop.
  On the representation path this is their MGDA-UB (Sec. 3.3).

  How w is applied differs between implementations; `apply_to='raw'` (default, the authors'
  code: loss sum_i w_i L_i) gives d = sum_i w_i g_i, `apply_to='normalized'` (LibMTL) gives
  d = sum_i w_i g_i / n_i, and `scale_by_num_tasks=True` (Nash-MTL's code) multiplies by K so
  that the weights sum to K like the plain sum of losses. With no normalization the result
  satisfies g_i . d >= ||d||^2 for every task. Task-specific leaves get the plain sum.
  The weights are `mgda_weights`.

  Args:
    num_tasks: K.
    normalization: the row normalizers n_i: 'none' (1), 'l2' (||g_i||), 'loss' (L_i) or
      'loss+' (L_i ||g_i||); the last two need positive `losses` at every update.
    apply_to: 'raw' (d = sum_i w_i g_i) or 'normalized' (d = sum_i w_i g_i / n_i).
    scale_by_num_tasks: multiply d by K (Nash-MTL's code).
    max_iter: step cap of the min-norm solver (`solvers.min_norm_weights`).
    tol: its relative tolerance.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS,
    arXiv:1810.04650, Eq. 3 (MGDA-UB: Sec. 3.3).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.mgda(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.64 0.48]
  """
  check_choice(normalization, NORMALIZATIONS, "mgda: normalization")
  check_choice(apply_to, APPLY_TO, "mgda: apply_to")
  uses_losses = normalization in ("loss", "loss+")

  def weights(m, state, losses, present):
    w = mgda_weights(m, losses, normalization=normalization, apply_to=apply_to,
                     scale_by_num_tasks=scale_by_num_tasks, max_iter=max_iter, tol=tol,
                     present=present)
    return w, None, state

  return gram_aggregator("mgda", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared, needs_losses=uses_losses, needs_positive=uses_losses,
                         handles_absent=True)
