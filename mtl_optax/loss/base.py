"""The shape shared by every loss balancer: a row scaling of the stacked gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib

WeightFn = Callable[..., tuple[jax.Array, Any]]  # (losses, state, **extra) -> (s, state)

# Inside jit, loss values are unknown at trace time; log-based balancers clamp them here.
LOSS_FLOOR = 1e-12


def positive(losses: jax.Array) -> jax.Array:
  """Losses clamped to `LOSS_FLOOR`, so a log or 1/L stays finite inside jit."""
  return jnp.maximum(losses, LOSS_FLOOR)


def reweighter(
    name: str,
    init_fn: Callable[[], Any],
    weight_fn: WeightFn,
    *,
    num_tasks: int | None = None,
    needs_positive: bool = False,
    extra_args: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
  """Builds a loss balancer: row i of the stacked gradients is scaled by `s_i`.

  Args:
    name: used in error messages.
    init_fn: returns the initial state.
    weight_fn: `(losses, state, **extra) -> (s, new_state)`, s of shape `(K,)`.
    num_tasks: K, when the state is per task (checked against every leaf).
    needs_positive: the balancer takes log(L_i); concrete non-positive losses raise.
    extra_args: names of extra keyword arguments passed on to `weight_fn` (None if absent).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is
    `init_fn()`'s.

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax
    >>> inverse = lambda losses, state: (1.0 / losses, state)  # s_i = 1 / L_i
    >>> tx = mtl_optax.reweighter("inverse", optax.EmptyState, inverse)
    >>> jac = {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(None), losses=jnp.array([1.0, 4.0]))
    >>> print(rows["w"][:, 0])
    [1.   0.25]
  """
  def init(params):
    del params
    return init_fn()

  def update(updates, state, params=None, *, losses=None, **extra):
    del params
    k = tree_lib.num_tasks(updates, num_tasks, name)
    losses = tree_lib.check_losses(losses, k, name, positive=needs_positive)
    weights, state = weight_fn(losses, state, **{n: extra.get(n) for n in extra_args})
    return tree_lib.scale_rows(weights, updates), state

  return optax.GradientTransformationExtraArgs(init, update)
