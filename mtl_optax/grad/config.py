"""ConFIG: the conflict-free direction of equal cosines with all rows (Liu et al., ICLR 2025)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.grad.dualproj import preference


def config_weights(gram: jax.Array, p: jax.Array | None = None) -> jax.Array:
  """ConFIG's weights: d = (sum_i g_i . e) e, e = U^+ p / ||U^+ p||, U the unit rows g_i /
  ||g_i|| (Liu et al. 2025, Eq. 2; p = 1 by default), from the Gram matrix alone.

  With N = diag(||g_i||) and the cosines C = N^-1 M N^-1: U^+ p = U^T C^+ p = G^T a with
  a = N^-1 C^+ p, so ||U^+ p||^2 = (C^+ p)^T C (C^+ p) and sum_i g_i . U^+ p = n^T C C^+ p
  (n the row norms), hence w = a (n^T C C^+ p) / ((C^+ p)^T C (C^+ p)). C^+ drops the
  eigenvalues below 10 K eps times the largest, as `jax.numpy.linalg.pinv`. Zero rows get weight
  0 (torchjd's `nan_to_num` of their unit rows); w = 0 when U^+ p = 0 up to rounding (all rows
  zero, or two opposite rows: there torchjd normalizes rounding noise).

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    p: `(K,)` the target of the unit rows' projections U e ~ p; None: ones.

  Returns:
    `(K,)` weights w of d = sum_i w_i g_i.

  References:
    Liu, Chu, Thuerey 2025, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR, arXiv:2408.11104, Eq. 2.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(mtl_optax.config_weights(gram)).round(3))
    [1.531 0.743]
  """
  k = gram.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
  nonzero = norms > 0
  inv = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
  p = jnp.ones_like(norms) if p is None else jnp.asarray(p, gram.dtype)
  # C^+ by eigendecomposition, dropping eigenvalues below rtol * the largest (jnp's pinv rule).
  lam, vec = jnp.linalg.eigh(gram * inv[:, None] * inv[None, :])
  rtol = 10 * k * float(jnp.finfo(gram.dtype).eps)
  keep = lam > rtol * jnp.max(lam)
  coef = jnp.where(keep, vec.T @ p, 0.0)  # p's components in the range of C
  lam = jnp.where(keep, lam, 1.0)
  fit = vec @ (coef / lam)  # C^+ p
  projections = vec @ coef  # C C^+ p = U U^+ p: the unit rows' projections on U^+ p
  sq_norm = jnp.sum(coef**2 / lam)  # ||U^+ p||^2, a sum of positive terms
  # p orthogonal to the range of C up to rounding (e.g. two opposite rows): U^+ p = 0.
  usable = (coef @ coef > rtol**2 * (p @ p)) & (sq_norm > 0)
  return jnp.where(usable, inv * fit * (norms @ projections) / jnp.where(usable, sq_norm, 1.0),
                   0.0)


def config(num_tasks: int, *, pref_vector: np.typing.ArrayLike | None = None,
           shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """ConFIG: d = (sum_i g_i . e) e, e the unit vector along U^+ p, U the unit rows.

  Liu et al. 2025, Eq. 2, as torchjd's ConFIG (checked against
  torchjd/aggregation/_config.py, itself adapted from the authors' `conflictfree` package):
  e is the least-squares direction with equal projections (p = 1) on every unit row, d its
  multiple of length the sum of the rows' projections on it. It is Gram-based:
  U^+ = U^T (U U^T)^+ and U U^T is the rows' cosine matrix, so the weights
  (`config_weights`) need only M; torchjd forms the pseudo-inverse of the K x n matrix U.
  With linearly independent rows U e ~ p exactly, so d conflicts with no row (g_i . d > 0);
  with dependent rows e is a least-squares fit and may conflict with some. Task-specific
  leaves get the plain sum.

  Args:
    num_tasks: K.
    pref_vector: `(K,)` the target p of the unit rows' projections (torchjd's `pref_vector`);
      None: ones.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Liu, Chu, Thuerey 2025, "ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks", ICLR, arXiv:2408.11104, Eq. 2.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.config(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init(params))
    >>> print(np.asarray(d["w"]).round(3))
    [1.16  1.485]
  """
  check_positive_int(num_tasks, "config: num_tasks")
  p = preference(pref_vector, num_tasks, 1.0, "config: pref_vector")
  return gram_aggregator("config", num_tasks, lambda params: optax.EmptyState(),
                         lambda gram, state, losses: (config_weights(gram, p), None, state),
                         shared=shared)
