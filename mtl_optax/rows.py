"""The rows a balancer receives on the Gram-only and representation paths.

On the stacked path a balancer receives the stacked Jacobian itself. The Gram-only path hands
it a `GramRows` instead (the same rows, seen only through their Gram matrix), and the
representation path a `RepresentationRows` (gradients with respect to the shared
representation z, plus the task-specific parameters' rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Tree = Any
# mask (bool tree like the parameters, or None for every leaf) -> K x K Gram matrix of the rows
GramFn = Callable[[Tree], jax.Array]


@dataclasses.dataclass(frozen=True)
class GramUpdate:
  """A Gram-path balancer's output: d = sum_i w_i g_i, as the weights on the true rows g_i.

  Shared leaves get `shared` weights, task-specific leaves (`mask` False) `specific` weights;
  `mask` None means every leaf is shared. Not a pytree, so no optimizer can silently act on it.
  """
  shared: jax.Array    # (K,)
  specific: jax.Array  # (K,)
  mask: Tree


class GramRows:
  """K virtual rows r_i = sum_m coef[i, m] g_m of the true rows g_m, known through their Gram.

  Loss balancers scale it (coef <- diag(s) coef); Gram-based gradient balancers read
  `gram(mask)` = coef G_mask coef^T and `combine` their weights into a `GramUpdate`, so a chain
  of loss and gradient balancers runs unchanged on it. `gram_fn(mask)` is called only by
  balancers that need the Gram matrix, so a chain of loss balancers never computes it.
  """

  def __init__(self, coef: jax.Array, gram_fn: GramFn):
    self.coef = coef
    self._gram_fn = gram_fn

  @property
  def num_tasks(self) -> int:
    return self.coef.shape[0]

  def scale(self, weights: jax.Array) -> GramRows:
    """Row i times `weights[i]`."""
    return GramRows(weights.astype(self.coef.dtype)[:, None] * self.coef, self._gram_fn)

  def gram(self, mask: Tree) -> jax.Array:
    """The K x K Gram matrix of the virtual rows over the leaves `mask` marks shared."""
    g = self._gram_fn(mask)
    return self.coef @ g.astype(self.coef.dtype) @ self.coef.T

  def combine(self, shared: jax.Array, specific: jax.Array | None, mask: Tree) -> GramUpdate:
    """sum_i w_i r_i on shared leaves and sum_i v_i r_i (v = 1 if None) on the others."""
    if specific is None:
      specific = jnp.ones_like(shared)
    to_true = lambda w: self.coef.T @ w.astype(self.coef.dtype)
    true_shared = to_true(shared)
    return GramUpdate(true_shared, true_shared if specific is shared else to_true(specific), mask)


class RepresentationRows(NamedTuple):
  """Rows of the representation path (Sener & Koltun 2018, Sec. 3.3: MGDA-UB).

  `z`: per-task gradients with respect to the shared representation z (leading axis K on each
  leaf of z); `specific`: per-task gradients of the task-specific parameters, shaped like the
  parameters with None at the shared (encoder) leaves. Balancers treat `z` as shared and
  `specific` as task-specific.
  """
  z: Tree
  specific: Tree


def row_like(rows: Tree) -> Tree:
  """Zeros shaped like one row of a stacked tree: what `balancer.init` takes on the
  representation path (e.g. `balancer.init(row_like(rows))`), where state lives in z-space.

  Args:
    rows: a stacked tree (leading axis K on every leaf), e.g. `RepresentationRows`.

  Returns:
    The same tree structure with zeros of shape `leaf.shape[1:]` and the leaves' dtypes.

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> print(mtl_optax.row_like({"w": jnp.ones((3, 4, 2))})["w"].shape)  # K = 3 dropped
    (4, 2)
  """
  return jax.tree.map(lambda r: jnp.zeros(jnp.shape(r)[1:], r.dtype), rows)
