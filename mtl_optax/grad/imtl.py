"""Impartial multi-task learning (Liu et al., ICLR 2021): IMTL-G, and IMTL = IMTL-L + IMTL-G."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.loss.learned import imtl_l


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  """alpha with d = sum_i alpha_i g_i, sum alpha = 1 and d . u_i equal for all i.

  Liu et al. 2021, Sec. 3.1 (closed form of alpha): with N = diag(||g_i||) and the cosines
  C = N^-1 M N^-1, d . u_i = (C N alpha)_i is constant iff N alpha is proportional to C^-1 1,
  so alpha = N^-1 C^+ 1 / sum(N^-1 C^+ 1). Equal to the paper's closed form when the rows are
  independent; the pseudo-inverse of the well-scaled C handles dependent rows (d is then the
  least-squares fit of equal unit projections) and zero rows (alpha_i = 0). When no direction
  fits (1^T C^+ 1 ~ 0: opposite or all-zero rows) alpha = 0. As in the paper, a negative
  sum(N^-1 C^+ 1) gives equal but negative projections.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.

  Returns:
    `(K,)` weights alpha of d = sum_i alpha_i g_i (zeros when no direction fits).

  References:
    Liu et al. 2021, "Towards Impartial Multi-task Learning", ICLR 2021 (no arXiv version;
    OpenReview id IMPnRXEWpvr), Sec. 3.1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(mtl_optax.imtl_g_weights(gram)).round(3))
    [0.673 0.327]
  """
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
  nonzero = norms > 0
  inv = jnp.where(nonzero, 1.0 / jnp.where(nonzero, norms, 1.0), 0.0)
  cosines = gram * inv[:, None] * inv[None, :]
  fit = jnp.linalg.pinv(cosines, hermitian=True) @ jnp.ones_like(norms)
  v = inv * fit
  total = v.sum()
  usable = (fit.sum() > 1e-6) & (total != 0)
  return jnp.where(usable, v / jnp.where(usable, total, 1.0), 0.0)


def imtl_g(num_tasks: int, *,
           shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """IMTL-G: the combination of the rows, weights summing to 1, with equal projections on all
  unit rows (Liu et al. 2021, Sec. 3.1; weights `imtl_g_weights`). Task-specific leaves get
  the plain sum of their rows.

  Args:
    num_tasks: K.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Liu et al. 2021, "Towards Impartial Multi-task Learning", ICLR 2021 (no arXiv version;
    OpenReview id IMPnRXEWpvr), Sec. 3.1 (closed form of alpha).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.imtl_g(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.51  0.653]
  """
  return gram_aggregator("imtl_g", num_tasks, lambda params: optax.EmptyState(),
                         lambda gram, state, losses: (imtl_g_weights(gram), None, state),
                         shared=shared)


def imtl(num_tasks: int, learning_rate: optax.ScalarOrSchedule = 1e-3, init_scale: float = 0.0,
         *, shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """IMTL (Liu et al. 2021, Alg. 1): IMTL-L's learned loss scales, then IMTL-G on the rows.

  `optax.chain(imtl_l(num_tasks, learning_rate, init_scale), imtl_g(num_tasks, shared=shared))`:
  task-specific leaves get the sum of the IMTL-L-scaled rows. Needs `losses`.

  Args:
    num_tasks: K.
    learning_rate: of IMTL-L's Adam on the log-scales s.
    init_scale: the initial s_i (rows scaled by exp(s_i)).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    The `optax.GradientTransformationExtraArgs` chain of `imtl_l` and `imtl_g`: stacked
    per-task gradients (leading axis K) and `losses` to one gradient shaped like the parameters.

  References:
    Liu et al. 2021, "Towards Impartial Multi-task Learning", ICLR 2021 (no arXiv version;
    OpenReview id IMPnRXEWpvr), Alg. 1 (hybrid balance; IMTL-L Sec. 3.2, Eq. 3; IMTL-G Sec. 3.1).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.imtl(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.51  0.653]
  """
  return optax.chain(imtl_l(num_tasks, learning_rate, init_scale),
                     imtl_g(num_tasks, shared=shared))
