"""Aligned-MTL: independent component alignment (Senushkin et al., CVPR 2023)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_choice
from mtl_optax.grad.base import gram_aggregator

ScaleMode = Literal["min", "rmse"]


def aligned_mtl_weights(gram: jax.Array, scale_mode: ScaleMode = "min") -> jax.Array:
  """Row sums of B = sqrt(s) V diag(lambda^-1/2) V^T over the numerically nonzero eigenpairs.

  Senushkin et al. 2023, Alg. 1 (as in LibMTL and torchjd): M = V diag(lambda) V^T, eigenvalues
  kept above max(lambda) * K * eps; s = the smallest kept one ("min") or their mean ("rmse",
  the original code's option). With no kept eigenvalue (all-zero rows) B = I.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    scale_mode: 'min' (s = smallest kept eigenvalue) or 'rmse' (their mean).

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i (the row sums of B).

  References:
    Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning", CVPR,
    arXiv:2305.19000, Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(mtl_optax.aligned_mtl_weights(gram)).round(3))
    [1.067 0.553]
  """
  lam, vecs = jnp.linalg.eigh(gram)
  keep = lam > lam.max() * gram.shape[0] * jnp.finfo(gram.dtype).eps
  inv_sqrt = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
  if scale_mode == "min":
    scale = jnp.min(jnp.where(keep, lam, jnp.inf))
  else:
    scale = jnp.where(keep, lam, 0.0).sum() / jnp.maximum(keep.sum(), 1)
  balance = jnp.sqrt(jnp.where(keep.any(), scale, 0.0)) * (vecs * inv_sqrt) @ vecs.T
  return jnp.where(keep.any(), balance.sum(1), 1.0)


def aligned_mtl(num_tasks: int, scale_mode: ScaleMode = "min", *,
                shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """Aligned-MTL: the rows' singular values equalized to sqrt(s), then summed.

  Senushkin et al. 2023, Alg. 1 with equal task preferences, the weights summed as in LibMTL
  (torchjd averages them: 1/K times ours); weights `aligned_mtl_weights`. Task-specific leaves
  get the plain sum of their rows.

  Args:
    num_tasks: K.
    scale_mode: 'min' (s = smallest kept eigenvalue of M) or 'rmse' (their mean).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Senushkin et al. 2023, "Independent Component Alignment for Multi-Task Learning", CVPR,
    arXiv:2305.19000, Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.aligned_mtl(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.79  1.107]
  """
  check_choice(scale_mode, ("min", "rmse"), "aligned_mtl: scale_mode")
  return gram_aggregator(
      "aligned_mtl", num_tasks, lambda params: optax.EmptyState(),
      lambda gram, state, losses: (aligned_mtl_weights(gram, scale_mode), None, state),
      shared=shared)
