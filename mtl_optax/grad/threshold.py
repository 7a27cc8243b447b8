"""IMGrad's threshold baselines: a gradient balancer on some steps, the plain sum on the others."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.grad.base import _combine, _finite, safe_gram
from mtl_optax.present import task_present
from mtl_optax.rows import GramRows, GramUpdate, carried_present, unstack
from mtl_optax.state import BalancerState, weights_product

Criterion = Literal["imbalance", "similarity"]


class ThresholdState(NamedTuple):
  """State of `threshold`: the inner balancer's state (advanced only on the steps it ran),
  whether it ran on the last step, and on how many steps it has run."""
  inner: Any
  applied: jax.Array        # () bool
  applied_steps: jax.Array  # () int32


def imbalance_and_similarity(gram: jax.Array, present: jax.Array | None = None
                             ) -> tuple[jax.Array, jax.Array]:
  """IMGrad's imbalance ratio ||g_max|| / ||g_min|| (Definition 2; +inf with a zero row, 1 when
  all rows are zero) and gradient similarity min_{i<j} cos(g_i, g_j) (Definition 1, its
  minimum over pairs; the cosine of a zero row is 0; 1 for K = 1), from the Gram matrix (of the
  `present` rows only, when given)."""
  from mtl_optax.diagnostics import diagnostics_from_gram  # noqa: PLC0415 (import cycle)
  diag = diagnostics_from_gram(gram, jnp.zeros(gram.shape[:1], gram.dtype), present=present)
  return diag.imbalance_ratio, diag.min_pair_cosine


def threshold(
    inner: optax.GradientTransformation,
    num_tasks: int,
    threshold: float,  # pylint: disable=redefined-outer-name
    *,
    criterion: Criterion = "imbalance",
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """IMGrad's "Adaptive Threshold" baseline and its control (Zhou et al. 2025, Sec. 4.3, Fig. 5).

  At each step, from the Gram matrix M of the shared rows: with `criterion="imbalance"` the
  gradient balancer `inner` runs when the imbalance ratio ||g_max|| / ||g_min|| (Definition 2)
  exceeds `threshold`; with `criterion="similarity"` (the paper's control) when the gradient
  similarity, the smallest pairwise cosine cos(g_i, g_j) (Definition 1 over all pairs), falls
  below `threshold`. On the other steps the update is the plain sum of the rows (linear
  scalarization, every leaf). So `threshold=0` (imbalance) or any threshold above 1
  (similarity) is `inner` itself, and `threshold=inf` (imbalance) or -1 (similarity) the plain
  sum. The paper does not say which similarity it thresholds for more than two tasks; the
  minimum over pairs is the one that flags any conflict.

  The choice is a `jax.lax.cond`: `inner` runs only on the steps it is chosen for, and its
  state advances only then (a stateful balancer, e.g. Nash-MTL's warm start or PCGrad's key,
  sees only the steps it balanced, as if the others had not happened); a skipped step costs
  the Gram matrix only (which `inner` reuses on the steps it runs: on the Gram-only path the
  same computation, on stacked rows the same expression, merged by XLA). Under `vmap` with a
  batched predicate (e.g. over seeds) `lax.cond` becomes a select: both branches run and each
  run's state still advances only where it chose `inner`.

  Args:
    inner: a gradient balancer (or a chain of loss balancers and one; no optimizer after it).
    num_tasks: K.
    threshold: the imbalance ratio above which, or the similarity below which, `inner` runs.
    criterion: "imbalance" or "similarity".
    shared: the shared parameters (pass `inner`'s mask): M is that of these leaves' rows.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (or `GramRows`,
    or representation rows) to one gradient; its state is a `BalancerState` (`weights`: the
    inner balancer's when it ran, else ones) around a `ThresholdState`. Tasks that sit out
    (the extra argument `present`, non-finite losses or rows) are left out of the choice and
    of the plain sum (weight 0), and `present` goes on to `inner`.

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> tx = mtl_optax.threshold(mtl_optax.mgda(2), 2, 3.0)  # MGDA when ||g_max|| > 3 ||g_min||
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-2.0, 2.0]])}  # ratio 2.83: the plain sum
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}))
    >>> print(d["w"], bool(state.inner.applied), state.weights)
    [-1.  2.] False [1. 1.]
  """
  check_positive_int(num_tasks, "threshold: num_tasks")
  if criterion not in ("imbalance", "similarity"):
    raise ValueError(f"threshold: criterion must be 'imbalance' or 'similarity', got "
                     f"{criterion!r}.")
  if isinstance(threshold, (int, float)) and math.isnan(threshold):
    raise ValueError("threshold: threshold is NaN.")
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return BalancerState(jnp.ones((num_tasks,), tree_lib.weight_dtype(params)),
                         ThresholdState(inner.init(params), jnp.array(False),
                                        jnp.zeros([], jnp.int32)))

  def inner_weights(inner_state, dtype):
    """The inner balancer's weights of its last update (a chain's product)."""
    return jnp.broadcast_to(weights_product(inner_state), (num_tasks,)).astype(dtype)

  def choose(gram, present):
    ratio, similarity = imbalance_and_similarity(gram, present)
    if criterion == "imbalance":
      return ratio > threshold
    return similarity < threshold

  def given(k, extra_args, carried):
    """The tasks that take part as far as `present`, the losses and a loss balancer before it
    say (the rows: below)."""
    losses = extra_args.get("losses")
    if losses is not None:
      losses = tree_lib.check_losses(losses, k, "threshold")
    present = task_present(extra_args.get("present"), losses, k, "threshold")
    return present if carried is None else present & carried

  def update(updates, state, params=None, **extra_args):
    carried, received = carried_present(updates), updates
    updates = unstack(updates)
    dtype, state = state.weights.dtype, state.inner
    if isinstance(updates, GramRows):
      from mtl_optax.diagnostics import memo_rows  # noqa: PLC0415 (import cycle)
      rows, memo = memo_rows(updates)
      mask = tree_lib.rows_mask(shared, updates, params, "threshold")
      gram = memo(mask)
      present = given(updates.num_tasks, extra_args, carried) & jnp.isfinite(jnp.diag(gram))
      apply = choose(gram, present)
      seen = {}

      def balanced(inner_state):
        out, new_state = inner.update(rows, inner_state, params, **extra_args)
        if not isinstance(out, GramUpdate):
          raise ValueError("threshold: the inner balancer must end in a gradient balancer.")
        seen["mask"] = out.mask
        return out.shared, out.specific, new_state

      shape = jax.eval_shape(balanced, state.inner)
      ones = updates.coef.T @ present.astype(updates.coef.dtype)

      def plain(inner_state):
        return ones.astype(shape[0].dtype), ones.astype(shape[1].dtype), inner_state

      w, v, inner_state = jax.lax.cond(apply, balanced, plain, state.inner)
      out = GramUpdate(w, v, seen["mask"])
    else:
      mask = tree_lib.rows_mask(shared, updates, params, "threshold")
      k = tree_lib.num_tasks(updates, num_tasks, "threshold")
      # Inside shard_map with rows split over devices, the devices' Gram matrices are summed
      # (as the inner balancer does), so every device takes the same branch.
      shared_rows, specific_rows = tree_lib.split(updates, mask)
      axis_name = extra_args.get("axis_name")
      gram = safe_gram(shared_rows, axis_name)[0]  # any finite scale
      # The tasks that take part: given, finite losses, finite rows (absent rows sit out).
      present = given(k, extra_args, carried) & jnp.isfinite(jnp.diag(gram)) & _finite(
          specific_rows, k, axis_name)
      apply = choose(gram, present)

      def balanced(inner_state):
        return inner.update(received, inner_state, params, **extra_args)

      def plain(inner_state):  # the sum of the present rows
        return _combine(present.astype(jnp.float32), updates, present), inner_state

      out, inner_state = jax.lax.cond(apply, balanced, plain, state.inner)
    weights = jnp.where(apply, inner_weights(inner_state, dtype), present.astype(dtype))
    return out, BalancerState(weights, ThresholdState(
        inner_state, apply, state.applied_steps + apply.astype(jnp.int32)))

  return optax.GradientTransformationExtraArgs(init, update)
