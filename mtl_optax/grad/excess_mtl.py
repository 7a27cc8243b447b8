"""ExcessMTL: task weights from the tasks' estimated excess risks (He et al. 2024)."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import _combine, aggregator, check_buffers, shared_zeros
from mtl_optax.present import num_present, softmax_present


class ExcessMTLState(NamedTuple):
  count: jax.Array        # steps taken
  grad_sq_sum: Any        # AdaGrad's sum of squared rows, shaped like the stacked shared rows
  first_risk: jax.Array   # (K,) the excess-risk estimates of the first step
  log_weights: jax.Array  # (K,) log of the task weights, up to a constant


def excess_mtl(
    num_tasks: int,
    robust_step_size: float = 1e-2,
    *,
    eps: float = 1e-7,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """ExcessMTL: d = sum_i w_i g_i, w updated by exponentiated gradient ascent on excess risks.

  He et al. 2024 (Robust Multi-Task Learning with Excess Risks), Alg. 1 with the
  diagonal-preconditioner estimate of Eq. 7: each step, with H_i = sum over steps of g_i^2
  (per coordinate, AdaGrad), task i's excess risk is estimated as
  e_i = g_i^T diag(1 / sqrt(H_i + eps)) g_i. The first step records e^(1) and keeps w = 1;
  afterwards w_i <- w_i exp(robust_step_size e_i / e_i^(1)), renormalized to sum K, before
  the update. As in LibMTL (`loss = sum_i w_i L_i`), task-specific leaves get sum_i w_i row_i.
  Not Gram-based: H is a per-coordinate state shaped like the shared rows.

  Deviations from LibMTL, for finiteness: w is kept as log-weights (K softmax of them, the
  same numbers without overflow), and a task whose first estimate e_i^(1) is 0 (a zero row)
  gets the ratio 0 instead of a division by zero.

  Args:
    num_tasks: K.
    robust_step_size: the step size of the weights' exponentiated update (LibMTL's 1e-2).
    eps: AdaGrad's eps inside the square root.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a `BalancerState`
    (`weights`: the last w) around an `ExcessMTLState`.

  References:
    He et al. 2024, "Robust Multi-Task Learning with Excess Risks", ICML, arXiv:2402.02009,
    Alg. 1 and Eq. 7; checked against LibMTL's `LibMTL/weighting/ExcessMTL.py`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.excess_mtl(2, robust_step_size=0.5)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> state = tx.init({"w": jnp.zeros(2)})
    >>> d, state = tx.update(jac, state)  # first step: w = 1
    >>> d, state = tx.update({"w": jnp.array([[2.0, 0.0], [-0.5, 2.0]])}, state)
    >>> print(np.asarray(state.weights).round(3))
    [1.264 0.736]
  """
  if isinstance(robust_step_size, numbers.Real) and not robust_step_size > 0:
    raise ValueError(f"excess_mtl: robust_step_size must be > 0, got {robust_step_size!r}.")
  if not eps > 0:
    raise ValueError(f"excess_mtl: eps must be > 0, got {eps!r}.")

  def init(params):
    dtype = tree_lib.weight_dtype(params)
    sums = jax.tree.map(lambda z: z.astype(jnp.promote_types(z.dtype, jnp.float32)),
                        shared_zeros(params, num_tasks, shared, "excess_mtl"))
    return ExcessMTLState(jnp.zeros([], jnp.int32), sums, jnp.zeros((num_tasks,), dtype),
                          jnp.zeros((num_tasks,), dtype))

  def aggregate(rows, state, losses, params, present, axis_name=None):
    del losses, params
    check_buffers("excess_mtl", state.grad_sq_sum, rows)
    # Absent tasks' rows (maybe NaN) are selected out inside each expression that reads them
    # (no zeroed copy of the rows), and their sums stay as they were.
    where = lambda r, x, other: jnp.where(  # noqa: E731
        present.reshape((-1,) + (1,) * (r.ndim - 1)), x, other)
    sums = jax.tree.map(lambda s, r: where(r, s + jnp.square(r.astype(s.dtype)), s),
                        state.grad_sq_sum, rows)
    per_leaf = jax.tree.map(
        lambda s, r: jnp.sum(where(r, jnp.square(r.astype(s.dtype)) / jnp.sqrt(s + eps), 0.0),
                             axis=tuple(range(1, r.ndim))), sums, rows)
    dtype = state.log_weights.dtype
    risk = sum(jax.tree.leaves(per_leaf), jnp.zeros((num_tasks,), dtype)).astype(dtype)
    if axis_name is not None:  # rows split over devices (shard_map): the whole rows' risk
      risk = jax.lax.psum(risk, axis_name)
    first = state.count == 0
    # A task's first risk is that of its first present step (0 until then).
    first_risk = jnp.where(present & (first | ~(state.first_risk > 0)), risk, state.first_risk)
    positive = first_risk > 0
    ratio = jnp.where(positive, risk / jnp.where(positive, first_risk, 1.0), 0.0)
    ratio = jnp.minimum(ratio, jnp.finfo(dtype).max)
    every = jnp.all(present)
    moved = state.log_weights + robust_step_size * ratio
    # With absent tasks: the exponentiated-gradient step over the present tasks, which keep
    # their total mass (logsumexp); the others keep their log-weights.
    some = jnp.where(present, jax.nn.logsumexp(state.log_weights, where=present)
                     + jax.nn.log_softmax(moved, where=present), state.log_weights)
    log_weights = jnp.where(first, state.log_weights,
                            jnp.where(every, jax.nn.log_softmax(moved), some))
    weights = jnp.where(every, num_tasks * jax.nn.softmax(log_weights),
                        num_present(present) * softmax_present(log_weights, present))
    new_state = ExcessMTLState(state.count + 1, sums, first_risk, log_weights.astype(dtype))
    return _combine(weights, rows, present), weights, weights, new_state

  return aggregator("excess_mtl", num_tasks, init, aggregate, shared=shared,
                    handles_absent=True)
