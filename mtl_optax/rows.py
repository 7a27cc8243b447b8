"""The rows a balancer receives and passes on, on each of the three paths.

On the stacked path a balancer receives the stacked Jacobian itself. The Gram-only path hands
it a `GramRows` instead (the same rows, seen only through their Gram matrix), and the
representation path a `RepresentationRows` (gradients with respect to the shared
representation z, plus the task-specific parameters' rows). A loss balancer passes its scaled
rows on as `StackedRows` (or `GramRows`), which no optimizer, `optax.apply_updates` or
`pullback` accepts: rows become an update only through a gradient balancer or `sum_tasks`.

The classes below name the fix in their type's repr, which is what JAX prints when a tree of
one of them meets a tree of parameters (`pytree structure error: ... a subtree of type ...`).
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


class _Hinted(type):
  """A metaclass whose repr carries the class's `_hint`: JAX prints a node's type, not the
  node, in its structure errors, so the hint reaches the user at the first wrong step."""

  def __repr__(cls) -> str:
    return f"<class 'mtl_optax.{cls.__name__}': {cls._hint}>"


_END_THE_CHAIN = ("end the balancer chain with a gradient balancer or mtl_optax.sum_tasks() "
                  "before an optimizer, optax.apply_updates or pullback, or use "
                  "mtl_optax.value_and_grad, which does")


@jax.tree_util.register_pytree_node_class
class StackedRows(metaclass=_Hinted):
  """K rows scaled by a loss balancer, not yet one update (the stacked and representation paths).

  A pytree node with one child, `rows` (every leaf with a leading task axis K). Gradient
  balancers and `sum_tasks` accept it like plain stacked rows; an optimizer, `apply_updates`
  or `pullback` meets a node type that the parameters do not have and fails at trace time
  with this class's hint, instead of broadcasting K rows against the parameters.
  """
  _hint = f"K stacked per-task rows, not one update: {_END_THE_CHAIN}"

  def __init__(self, rows: Any, present: jax.Array | None = None):
    self.rows = rows
    # (K,) bool of the tasks that took part in the loss balancer's step (None: not recorded):
    # the rows of the others are 0, and the balancers after it leave those tasks out too.
    self.present = present

  def tree_flatten(self):
    return (self.rows, self.present), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)

  def __repr__(self) -> str:
    return f"StackedRows({self.rows!r})"


def unstack(rows: Any) -> Any:
  """The plain stacked tree inside `StackedRows` (other rows unchanged)."""
  return rows.rows if isinstance(rows, StackedRows) else rows


def carried_present(rows: Any) -> jax.Array | None:
  """The `(K,)` bool of the tasks a loss balancer earlier in a chain let take part (`present`
  of `StackedRows` or `GramRows`), or None: a task that sat out there has a zero row here,
  which is not absent to most balancers, so the balancers after it leave it out too."""
  return rows.present if isinstance(rows, (StackedRows, GramRows)) else None


@dataclasses.dataclass(frozen=True)
class GramUpdate(metaclass=_Hinted):
  """A Gram-path balancer's output: d = sum_i w_i g_i, as the weights on the true rows g_i.

  Shared leaves get `shared` weights, task-specific leaves (`mask` False) `specific` weights;
  `mask` None means every leaf is shared. Not a pytree, so no optimizer can silently act on it.
  """
  _hint = ("a Gram-only path balancer's weights on the true rows, not an update: "
           "value_and_grad (path='gram') pulls them back to one gradient")
  shared: jax.Array    # (K,)
  specific: jax.Array  # (K,)
  mask: Tree


class GramRows(metaclass=_Hinted):
  """K virtual rows r_i = sum_m coef[i, m] g_m of the true rows g_m, known through their Gram.

  Loss balancers scale it (coef <- diag(s) coef); Gram-based gradient balancers read
  `gram(mask)` = coef G_mask coef^T and `combine` their weights into a `GramUpdate`, so a chain
  of loss and gradient balancers runs unchanged on it. `gram_fn(mask)` is called only by
  balancers that need the Gram matrix, so a chain of loss balancers never computes it.
  """
  _hint = ("the rows of the Gram-only path, not an update: pass value_and_grad (or "
           "value_and_reweighted_grad) the balancer alone and apply the optimizer to the "
           "gradient it returns")

  def __init__(self, coef: jax.Array, gram_fn: GramFn, present: jax.Array | None = None):
    self.coef = coef
    self._gram_fn = gram_fn
    self.present = present  # as `StackedRows.present`

  @property
  def num_tasks(self) -> int:
    return self.coef.shape[0]

  def scale(self, weights: jax.Array, present: jax.Array | None = None) -> GramRows:
    """Row i times `weights[i]` (`present`: the tasks that took part, see `StackedRows`)."""
    return GramRows(weights.astype(self.coef.dtype)[:, None] * self.coef, self._gram_fn,
                    self.present if present is None else present)

  def gram(self, mask: Tree) -> jax.Array:
    """The K x K Gram matrix of the virtual rows over the leaves `mask` marks shared."""
    g = self._gram_fn(mask)
    return self.coef @ g.astype(self.coef.dtype) @ self.coef.T

  def scaled_gram(self, mask: Tree) -> tuple[jax.Array, jax.Array]:
    """(V, f): the Gram matrix of the virtual rows divided by 2^f; f = 0 unless that Gram matrix
    would over- or underflow and the Gram function can measure the rows' scale (its `scaled`
    method: `mask -> (M / 4^e, e)`), then the true rows' exponent e plus that of the largest
    coefficient (so loss balancers' large or small s_i are taken out too)."""
    from mtl_optax import tree as tree_lib  # noqa: PLC0415 (tree imports this module)
    virtual = self.gram(mask)
    scaled = getattr(self._gram_fn, "scaled", None)
    if scaled is None:
      return virtual, jnp.zeros((), jnp.int32)

    def rescaled(_):
      g, e = scaled(mask)
      c = tree_lib.exponent_of(jnp.max(jnp.abs(self.coef)))
      coef = jnp.ldexp(self.coef, -c)
      return coef @ g.astype(coef.dtype) @ coef.T, e + c

    return jax.lax.cond(tree_lib.gram_in_range(virtual),
                        lambda _: (virtual, jnp.zeros((), jnp.int32)), rescaled, None)

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
  return jax.tree.map(lambda r: jnp.zeros(r.shape[1:], r.dtype), unstack(rows))
