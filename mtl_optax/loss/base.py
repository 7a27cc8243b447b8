"""The shape shared by every loss balancer: a row scaling of the stacked gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.rows import GramRows, StackedRows, unstack
from mtl_optax.state import BalancerState

WeightFn = Callable[..., tuple[jax.Array, Any]]  # (losses, state, **extra) -> (s, state)

# Inside jit, loss values are unknown at trace time; log-based balancers clamp them here.
LOSS_FLOOR = 1e-12


def positive(losses: jax.Array) -> jax.Array:
  """Losses clamped to `LOSS_FLOOR`, so a log or 1/L stays finite inside jit."""
  return jnp.maximum(losses, LOSS_FLOOR)


def reweighter(
    name: str,
    num_tasks: int,
    init_fn: Callable[[], Any],
    weight_fn: WeightFn,
    *,
    needs_losses: bool = True,
    needs_positive: bool = False,
    extra_args: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
  """Builds a loss balancer: row i of the stacked gradients is scaled by `s_i`.

  Args:
    name: used in error messages.
    num_tasks: K (checked against every leaf).
    init_fn: returns the method's initial state.
    weight_fn: `(losses, state, **extra) -> (s, new_state)`, s of shape `(K,)`; `losses` is
      None when `needs_losses` is False and none were passed.
    needs_losses: whether `update` must be given `losses`.
    needs_positive: the balancer takes log(L_i); concrete non-positive losses raise.
    extra_args: names of extra keyword arguments passed on to `weight_fn` (None if absent).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i, as
    `StackedRows` (or `GramRows` on the Gram-only path): a gradient balancer or `sum_tasks`
    must follow. Its state is a `BalancerState` (`weights`: the last s; `inner`:
    `init_fn()`'s state).

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax
    >>> inverse = lambda losses, state: (1.0 / losses, state)  # s_i = 1 / L_i
    >>> tx = mtl_optax.reweighter("inverse", 2, optax.EmptyState, inverse)
    >>> jac = {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(None), losses=jnp.array([1.0, 4.0]))
    >>> print(rows.rows["w"][:, 0], state.weights)
    [1.   0.25] [1.   0.25]
  """
  check_positive_int(num_tasks, f"{name}: num_tasks")

  def init(params):
    return BalancerState(jnp.ones((num_tasks,), tree_lib.weight_dtype(params)), init_fn())

  def update(updates, state, params=None, *, losses=None, **extra):
    del params
    rows = unstack(updates)
    k = tree_lib.num_tasks(rows, num_tasks, name)
    if needs_losses or losses is not None:
      losses = tree_lib.check_losses(losses, k, name, positive=needs_positive)
    weights, inner = weight_fn(losses, state.inner, **{n: extra.get(n) for n in extra_args})
    scaled = tree_lib.scale_rows(weights, rows)
    out = scaled if isinstance(scaled, GramRows) else StackedRows(scaled)
    return out, BalancerState(weights.astype(state.weights.dtype), inner)

  return optax.GradientTransformationExtraArgs(init, update)
