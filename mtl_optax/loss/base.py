"""The shape shared by every loss balancer: a row scaling of the stacked gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.present import finite_rows, keep_absent, task_present
from mtl_optax.rows import GramRows, StackedRows, carried_present, unstack
from mtl_optax.state import BalancerState

WeightFn = Callable[..., tuple[jax.Array, Any]]  # (losses, state, **extra) -> (s, state)

def reweighter(
    name: str,
    num_tasks: int,
    init_fn: Callable[[], Any],
    weight_fn: WeightFn,
    *,
    needs_losses: bool = True,
    needs_positive: bool = False,
    extra_args: tuple[str, ...] = (),
    handles_absent: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a loss balancer: row i of the stacked gradients is scaled by `s_i`.

  Absent tasks (the extra argument `present`, a `(K,)` bool, False for tasks without data this
  step; also tasks whose loss or row is not finite, or whose loss is not positive where
  `needs_positive`) get s_i = 0
  and their rows are dropped (a select, so NaN rows vanish); `weight_fn` sees the loss 1 in
  their place, and the per-task entries of its state (leaves with leading axis K) keep their old
  values, as does any entry the step would make non-finite. That is exact for methods whose
  s_i depends on task i alone; methods that couple the tasks take `present` themselves
  (`handles_absent`).

  Args:
    name: used in error messages.
    num_tasks: K (checked against every leaf).
    init_fn: returns the method's initial state.
    weight_fn: `(losses, state, **extra) -> (s, new_state)`, s of shape `(K,)`; `losses` is
      None when `needs_losses` is False and none were passed.
    needs_losses: whether `update` must be given `losses`.
    needs_positive: the balancer takes log(L_i); concrete non-positive losses raise.
    extra_args: names of extra keyword arguments passed on to `weight_fn` (None if absent).
    handles_absent: `weight_fn` takes the keyword `present` (the `(K,)` bool of the tasks that
      take part), weights the present tasks as if the others did not exist, and leaves their
      state as it was; the builder then guards only against non-finite state.

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

  def update(updates, state, params=None, *, losses=None, present=None, **extra):
    del params
    rows = unstack(updates)
    k = tree_lib.num_tasks(rows, num_tasks, name)
    if needs_losses or losses is not None:
      losses = tree_lib.check_losses(losses, k, name)
    present = task_present(present, losses, k, name, positive=needs_positive)
    if carried_present(updates) is not None:  # a loss balancer before it left those out
      present = present & carried_present(updates)
    if not isinstance(rows, GramRows):  # a non-finite row sits out too (rows on the Gram-only
      finite = finite_rows(rows)        # path: value_and_grad's `present` says)
      if extra.get("axis_name") is not None:
        finite = jax.lax.pmin(finite.astype(jnp.int32), extra["axis_name"]) > 0
      present = present & finite
    if losses is not None:
      losses = jnp.where(present, losses, jnp.ones((), losses.dtype))
    kwargs = {n: extra.get(n) for n in extra_args}
    if handles_absent:
      kwargs["present"] = present
    weights, inner = weight_fn(losses, state.inner, **kwargs)
    weights = jnp.where(present & jnp.isfinite(weights), weights, 0.0)
    inner = keep_absent(state.inner, inner, present, per_task=not handles_absent)
    if isinstance(rows, GramRows):
      out = rows.scale(weights, present)
    else:
      out = StackedRows(tree_lib.scale_rows(weights, rows, present), present)
    return out, BalancerState(weights.astype(state.weights.dtype), inner)

  return optax.GradientTransformationExtraArgs(init, update)
