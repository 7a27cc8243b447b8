"""PCGrad: projecting conflicting gradients (Yu et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.keys import as_key


class PCGradState(NamedTuple):
  key: jax.Array


def task_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """Row i is a fresh random permutation of the K tasks: the order in which task i meets them."""
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda sub: jax.random.permutation(sub, num_tasks))(keys)


def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """Weights w with sum_i gpc_i = sum_m w_m g_m, tracked on the Gram matrix alone.

  Yu et al. 2020, Alg. 1: for j in task i's order (j != i), if gpc_i . g_j < 0,
  gpc_i -= (gpc_i . g_j) / ||g_j||^2 g_j. With gpc_i = sum_m C_im g_m, gpc_i . g_j = (C M)_ij
  and the projection only changes C_ij; the output sum_i gpc_i has weights sum_i C_im.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    orders: `(K, K)` ints, row i the order in which task i meets the tasks (`task_orders`).

  Returns:
    `(K,)` weights w of sum_i gpc_i = sum_m w_m g_m.

  References:
    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS, arXiv:2001.06782,
    Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> orders = jnp.array([[0, 1], [1, 0]])
    >>> print(np.asarray(mtl_optax.pcgrad_weights(gram, orders)).round(3))
    [1.5   1.118]
  """
  k = gram.shape[0]
  sq_norms = jnp.diag(gram)

  def row(i, order):
    def project(coef, j):
      dot = coef @ gram[:, j]
      conflict = (j != i) & (dot < 0)
      step = jnp.where(conflict, dot / jnp.where(conflict, sq_norms[j], 1.0), 0.0)
      return coef.at[j].add(-step), None
    coef, _ = jax.lax.scan(project, jnp.eye(k, dtype=gram.dtype)[i], order)
    return coef

  return jax.vmap(row)(jnp.arange(k), orders).sum(0)


def pcgrad(num_tasks: int, *, key: jax.Array | int,
           shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """PCGrad: each task's gradient projected off the ones it conflicts with, then summed.

  Yu et al. 2020, Alg. 1, with a fresh random order per task every step (drawn from the key
  in the state; weights `pcgrad_weights`). Task-specific leaves get the plain sum of their rows.

  Args:
    num_tasks: K.
    key: PRNG key or int seed of the task orders.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `PCGradState`.

  References:
    Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS, arXiv:2001.06782,
    Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.pcgrad(2, key=0)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.941 2.235]
  """
  def weights(gram, state, losses):
    del losses
    key, sub = jax.random.split(state.key)
    return pcgrad_weights(gram, task_orders(sub, gram.shape[0])), None, PCGradState(key)

  return gram_aggregator("pcgrad", num_tasks, lambda params: PCGradState(as_key(key)), weights,
                         shared=shared)
