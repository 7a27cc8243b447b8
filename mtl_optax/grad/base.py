"""The shape shared by every gradient balancer: stacked per-task gradients -> one gradient.

Shared leaves (the `shared` mask) are aggregated by the method; task-specific leaves get the
sum of their rows (or, where a method says so, its weighted sum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib

# (shared_rows, state, losses, params) -> (aggregated shared tree, task-specific weights or
# None for the plain sum, new state)
AggregateFn = Callable[..., tuple[Any, jax.Array | None, Any]]
# (gram K x K, state, losses) -> (weights (K,), new state)
GramWeightFn = Callable[[jax.Array, Any, jax.Array | None], tuple[jax.Array, Any]]


def aggregator(
    name: str,
    init_fn: Callable[[Any], Any],
    aggregate_fn: AggregateFn,
    *,
    shared: tree_lib.MaskOrFn = None,
    num_tasks: int | None = None,
    needs_losses: bool = False,
    needs_positive: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a gradient balancer from `aggregate_fn`, which sees only the shared rows.

  Args:
    name: used in error messages.
    init_fn: `params -> state`.
    aggregate_fn: `(shared_rows, state, losses, params) -> (out, specific_weights, state)`;
      `shared_rows` has None at task-specific leaves and `out` must keep them None.
    shared: pytree of bools like params, or a callable on params (on the stacked updates when
      `params` is not passed), True where a leaf is shared. None: every leaf is shared.
    num_tasks: K, when the state is per task.
    needs_losses: whether `losses` must be passed.
    needs_positive: whether losses must be positive (the method takes a log).
  """
  def update(updates, state, params=None, *, losses=None, **extra_args):
    del extra_args
    k = tree_lib.num_tasks(updates, num_tasks, name)
    if needs_losses or losses is not None:
      losses = tree_lib.check_losses(losses, k, name, positive=needs_positive)
    mask = tree_lib.resolve_mask(shared, updates if params is None else params)
    shared_rows, specific_rows = tree_lib.split(updates, mask)
    out, specific_weights, state = aggregate_fn(shared_rows, state, losses, params)
    if specific_weights is None:
      specific_weights = jnp.ones((k,), jnp.float32)
    specific = tree_lib.combine(specific_weights, specific_rows)
    return tree_lib.merge(out, specific, mask), state

  return optax.GradientTransformationExtraArgs(init_fn, update)


def gram_aggregator(
    name: str,
    init_fn: Callable[[Any], Any],
    weight_fn: GramWeightFn,
    *,
    weight_task_specific: bool = False,
    **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """A balancer of the form d = sum_i w_i g_i with w computed from the Gram matrix G G^T.

  The Gram matrix is a sum of per-leaf contractions over the shared leaves. With
  `weight_task_specific`, task-specific leaves get sum_i w_i row_i instead of the sum.
  """
  def aggregate(shared_rows, state, losses, params):
    del params
    weights, state = weight_fn(tree_lib.gram(shared_rows), state, losses)
    out = tree_lib.combine(weights, shared_rows)
    return out, (weights if weight_task_specific else None), state
  return aggregator(name, init_fn, aggregate, **kwargs)


def shared_zeros(params: Any, num_tasks: int, shared: tree_lib.MaskOrFn) -> Any:
  """Zeros shaped like the stacked shared rows (K, *leaf.shape), None at task-specific leaves.

  The initial state of balancers that keep per-task gradient buffers (EMAs).
  """
  shared_params, _ = tree_lib.split(params, tree_lib.resolve_mask(shared, params))
  return jax.tree.map(
      lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.result_type(p)), shared_params)


def _reduce(name: str, scale: Callable[[int], float]) -> optax.GradientTransformationExtraArgs:
  def update(updates, state, params=None, **extra_args):
    del params, extra_args
    k = tree_lib.num_tasks(updates, name=name)
    return jax.tree.map(lambda x: x.sum(0) * scale(k), updates), state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def sum_tasks() -> optax.GradientTransformationExtraArgs:
  """Sum of the (possibly reweighted) rows: equal weighting, or the end of any loss balancer."""
  return _reduce("sum_tasks", lambda k: 1.0)


def mean_tasks() -> optax.GradientTransformationExtraArgs:
  """Mean of the rows: equal weighting with weights 1/K."""
  return _reduce("mean_tasks", lambda k: 1.0 / k)
