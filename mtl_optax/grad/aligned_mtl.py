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
  """
  check_choice(scale_mode, ("min", "rmse"), "aligned_mtl: scale_mode")
  return gram_aggregator(
      "aligned_mtl", num_tasks, lambda params: optax.EmptyState(),
      lambda gram, state, losses: (aligned_mtl_weights(gram, scale_mode), None, state),
      shared=shared)
