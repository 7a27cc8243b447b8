"""The state every balancer keeps: the weights of its last update, and its own state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class BalancerState(NamedTuple):
  """State of every balancer: the weights of its last update, and the method's own state.

  A loss balancer's `weights` are its row scalings s (row i became s_i g_i); a gradient
  balancer's are the weights w of its update d = sum_i w_i r_i on the rows r_i it received
  (for methods that combine other rows, such as DB-MTL's and MoCo's tracked gradients, the
  weights on those rows; each method's docstring says which). `sum_tasks` and `mean_tasks`
  keep a scalar (1 and 1/K), the same weight on every row. Before the first update the
  weights are ones. `effective_weights` multiplies them along a chain.
  """
  weights: jax.Array  # (K,), or () for sum_tasks / mean_tasks
  inner: Any          # the method's own state


def effective_weights(state: optax.OptState) -> jax.Array:
  """The weights of the last update on the raw rows: the product of a chain's weights.

  A loss balancer (s) followed by a gradient balancer (w) updated the shared parameters by
  sum_i s_i w_i g_i: this returns s * w. It walks `state` (a balancer's state, an
  `optax.chain`'s tuple of states, or any optax wrapper's state holding them) and multiplies
  the `weights` of every outermost `BalancerState` in it; a balancer built on another (a
  fusion, a threshold wrapper) already reports the weights of the whole. An optimizer in the
  chain holds none and is skipped.

  Args:
    state: the state of a balancer or of a chain holding balancers.

  Returns:
    The `(K,)` weights on the raw rows (on the shared leaves: task-specific leaves may be
    weighted differently, e.g. by Nash-MTL).

  Raises:
    ValueError: if `state` holds no balancer state.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax, mtl_optax
    >>> tx = optax.chain(mtl_optax.log_losses(2), mtl_optax.mgda(2))
    >>> jac = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init(None), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(mtl_optax.effective_weights(state)).round(3))  # s = (1, 0.5), w = (.5, .5)
    [0.5  0.25]
  """
  out = weights_product(state)
  if out is None:
    raise ValueError("effective_weights: the state holds no balancer state (BalancerState); "
                     "pass the state of a balancer or of a chain that contains one.")
  if jnp.ndim(out) == 0:
    raise ValueError("effective_weights: the state holds only sum_tasks / mean_tasks, whose "
                     "weight is the same on every row; there are no per-task weights to read.")
  return out


def weights_product(state: optax.OptState) -> jax.Array | None:
  """The product of the `weights` of the outermost `BalancerState`s in `state` (None if it
  holds none; a scalar if only `sum_tasks` / `mean_tasks`)."""
  found = [x.weights for x in
           jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, BalancerState))
           if isinstance(x, BalancerState)]
  if not found:
    return None
  found.sort(key=jnp.ndim, reverse=True)  # a vector first, so the product keeps its dtype
  out = found[0]
  for w in found[1:]:
    out = out * w.astype(out.dtype)
  return out
