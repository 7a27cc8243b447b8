"""Constant: fixed, user-given weights of the rows (torchjd's Constant)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator


def constant(weights: np.typing.ArrayLike, *,
             shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """Constant: d = sum_i w_i g_i with the fixed weights w given here (K = len(w)).

  torchjd's Constant (checked against torchjd/aggregation/_constant.py). A Gram-based method
  whose weights ignore the Gram matrix, so it runs on all three paths; the fixed weights of a
  weighted sum of losses, sum_i w_i L_i. Task-specific leaves get the plain sum.

  Args:
    weights: `(K,)` finite floats.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the weights.

  References:
    torchjd, `torchjd.aggregation.Constant` (https://github.com/TorchJD/torchjd).

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> tx = mtl_optax.constant([0.25, 2.0])
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init(None))
    >>> print(d["w"])
    [-0.75  4.  ]
  """
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)):
    raise ValueError(f"constant: weights must be a non-empty vector of finite floats, got "
                     f"{weights!r}.")
  return gram_aggregator("constant", w.size, lambda params: optax.EmptyState(),
                         lambda gram, state, losses: (jnp.asarray(w, gram.dtype), None, state),
                         shared=shared)
