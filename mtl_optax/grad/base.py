"""The shape shared by every gradient balancer: stacked per-task gradients -> one gradient.

Shared leaves (the `shared` mask) are aggregated by the method; task-specific leaves get the
sum of their rows (or, where a method says so, its weighted sum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.present import finite_rows, keep_absent, task_present, zero_absent
from mtl_optax.rows import GramRows, RepresentationRows, carried_present, unstack
from mtl_optax.state import BalancerState

# (shared_rows, state, losses, params[, axis_name=]) -> (aggregated shared tree, weights (K,)
# of the update on the rows it combines, task-specific weights or None for the plain sum,
# new state)
AggregateFn = Callable[..., tuple[Any, jax.Array | None, Any]]
# (gram K x K, state, losses) -> (weights of the shared rows (K,), weights of the task-specific
# rows (K,) or None for the plain sum, new state)
GramWeightFn = Callable[[jax.Array, Any, jax.Array | None],
                        tuple[jax.Array, jax.Array | None, Any]]


def aggregator(
    name: str,
    num_tasks: int,
    init_fn: Callable[[Any], Any],
    aggregate_fn: AggregateFn,
    *,
    shared: tree_lib.MaskOrFn = None,
    needs_losses: bool = False,
    needs_positive: bool = False,
    extra_args: tuple[str, ...] = (),
    handles_absent: bool = False,
    _finite_shared: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Builds a gradient balancer from `aggregate_fn`, which sees only the shared rows.

  Runs on the stacked and representation paths; it is not Gram-based, so the Gram-only path
  rejects it. Absent tasks (the extra argument `present`, a `(K,)` bool; tasks whose loss or
  row is not finite) get weight 0 and zero rows; `aggregate_fn` sees the loss 1 in their place,
  the per-task entries of its state (leaves with leading axis K) keep their old values, and no
  entry of it takes a non-finite value.

  Args:
    name: used in error messages.
    num_tasks: K.
    init_fn: `params -> state` (the method's own state, `BalancerState.inner`).
    aggregate_fn: `(shared_rows, state, losses, params, **extra) -> (out, weights,
      specific_weights, state)`; `shared_rows` has None at task-specific leaves and `out` must
      keep them None; `weights` (K,) are the method's weights of this update on the rows it
      combines (kept in `BalancerState.weights`).
      When `update` gets the extra argument `axis_name` (inside `shard_map`, rows split over
      those mesh axes), it is passed on as `axis_name=`, for `tree.gram(rows, axis_name=...)`.
    shared: pytree of bools like params, or a callable on params (on the stacked updates when
      `params` is not passed), True where a leaf is shared. None: every leaf is shared.
    needs_losses: whether `losses` must be passed.
    needs_positive: whether losses must be positive (the method takes a log).
    extra_args: names of extra keyword arguments of `update` passed on to `aggregate_fn`
      (None if absent).
    handles_absent: `aggregate_fn` takes the keyword `present` (the `(K,)` bool of the tasks
      with finite losses and rows that take part; rows of the others may be non-finite),
      gives the others weight 0, combines the present rows as if the others did not exist and
      leaves their state as it was, selecting with `present` inside the expressions that update
      its per-task buffers; the builder then guards only the state's small leaves
      (`present.SMALL_LEAF`) against non-finite values.
    _finite_shared: (internal) with `handles_absent`, whether the builder checks the shared
      rows' finiteness for `present` (`gram_aggregator` reads it off the Gram diagonal).

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters: `aggregate_fn`'s output on the
    shared leaves, sum_i v_i row_i (v = `specific_weights`, or ones) on the task-specific ones.
    Its state is a `BalancerState` (`weights`: the last update's weights; `inner`: the
    method's state).

  Example:
    >>> import jax, jax.numpy as jnp, optax, mtl_optax
    >>> def first_row(rows, state, losses, params):  # keep task 0's gradient only
    ...   return jax.tree.map(lambda r: r[0], rows), jnp.array([1.0, 0.0]), None, state
    >>> tx = mtl_optax.aggregator("first_row", 2, lambda params: optax.EmptyState(), first_row)
    >>> d, state = tx.update({"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}, tx.init(None))
    >>> print(d["w"], state.weights)
    [1. 0.] [1. 0.]
  """
  check_positive_int(num_tasks, f"{name}: num_tasks")
  check = _input_checker(name, shared, num_tasks, needs_losses, needs_positive)

  def init(params):
    return BalancerState(jnp.ones((num_tasks,), tree_lib.weight_dtype(params)), init_fn(params))

  def update(updates, state, params=None, *, losses=None, present=None, axis_name=None,
             **extra):
    carried = carried_present(updates)
    updates = unstack(updates)
    if isinstance(updates, GramRows):
      raise ValueError(
          f"{name} is not Gram-based (its update is not sum_i w_i g_i with w from the Gram "
          "matrix), so it cannot run on the Gram-only path: use the stacked or the "
          "representation path.")
    k, losses, mask = check(updates, params, losses)
    present = task_present(present, losses, k, name, positive=needs_positive)
    if carried is not None:  # tasks a loss balancer before it left out (their rows are 0)
      present = present & carried
    shared_rows, specific_rows = tree_lib.split(updates, mask)
    present = present & _finite(specific_rows, k, axis_name)
    kwargs = {n: extra.get(n) for n in extra_args}
    if axis_name is not None:
      kwargs["axis_name"] = axis_name
    if not handles_absent or _finite_shared:
      present = present & _finite(shared_rows, k, axis_name)
    if handles_absent:
      kwargs["present"] = present
    else:
      shared_rows = zero_absent(shared_rows, present)
    if losses is not None:
      losses = jnp.where(present, losses, jnp.ones((), losses.dtype))
    out, weights, specific_weights, inner = aggregate_fn(
        shared_rows, state.inner, losses, params, **kwargs)
    if specific_weights is None:
      specific_weights = jnp.ones((k,), jnp.float32)
    specific_weights = jnp.where(present, specific_weights, 0.0)
    specific = tree_lib.combine(specific_weights, _zero_absent(specific_rows, present))
    weights = jnp.where(present, jnp.broadcast_to(weights, (k,)), 0.0)
    # A method that handles absent tasks selects its per-task buffers itself (inside the
    # expression that updates them, at no extra pass); the builder guards its small leaves.
    inner = keep_absent(state.inner, inner, present, per_task=not handles_absent,
                        large=not handles_absent)
    return (tree_lib.merge(out, specific, mask),
            BalancerState(weights.astype(state.weights.dtype), inner))

  return optax.GradientTransformationExtraArgs(init, update)


def _finite(rows: Any, k: int, axis_name: tree_lib.AxisName | None) -> jax.Array:
  """`(K,)`: whether row i is finite on every leaf of `rows` (all True for no leaves); inside
  `shard_map`, on every device."""
  if not jax.tree.leaves(rows):
    return jnp.ones((k,), bool)
  finite = finite_rows(rows)
  if axis_name is not None:
    finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name) > 0
  return finite


def _power_of_two(exponent: Any, power: float | jax.Array, dtype) -> jax.Array:
  """2^(exponent * power): exact (ldexp) for an integer power, else exp2."""
  if isinstance(power, (int, float)) and float(power).is_integer():
    return jnp.ldexp(jnp.ones((), dtype), jnp.asarray(exponent, jnp.int32) * int(power))
  return jnp.exp2(jnp.asarray(exponent, dtype) * jnp.asarray(power, dtype))


def safe_gram(rows: Any, axis_name: tree_lib.AxisName | None) -> tuple[jax.Array, jax.Array]:
  """(M, e): the Gram matrix of rows / 2^e, e = 0 unless M's largest finite diagonal entry is
  outside `tree.SAFE_DIAGONAL` (zero rows included, or M overflowed), then the exponent of the
  rows' largest finite entry (M formed again, at run time only then)."""
  gram = tree_lib.gram(rows, axis_name=axis_name)

  def rescaled(_):
    exponent = tree_lib.exponent_of(tree_lib.peak(rows, axis_name))
    scaled = jax.tree.map(lambda x: jnp.ldexp(x, -exponent), rows)
    return tree_lib.gram(scaled, axis_name=axis_name), exponent

  return jax.lax.cond(tree_lib.gram_in_range(gram), lambda _: (gram, jnp.zeros((), jnp.int32)),
                      rescaled, None)


def _combine(weights: jax.Array, rows: Any, present: jax.Array) -> Any:
  """sum_i w_i row_i over the present tasks' rows: absent ones (whose rows may be NaN) are
  dropped by a select, skipped (at run time) when every task is present, so the usual step
  costs one contraction."""
  return jax.lax.cond(jnp.all(present), lambda r: tree_lib.combine(weights, r),
                      lambda r: tree_lib.combine(weights, zero_absent(r, present)), rows)


def _zero_absent(rows: Any, present: jax.Array) -> Any:
  """`rows` with absent tasks' rows set to 0, skipped (at run time) when every task is present."""
  if not jax.tree.leaves(rows):
    return rows
  return jax.lax.cond(jnp.all(present), lambda r: r, lambda r: zero_absent(r, present), rows)


def _input_checker(name: str, shared: tree_lib.MaskOrFn, num_tasks: int | None,
                   needs_losses: bool, needs_positive: bool) -> Callable:
  """`(updates, params, losses) -> (K, losses, mask)`, checking K and the losses."""
  def check(updates, params, losses):
    k = tree_lib.num_tasks(updates, num_tasks, name)
    if needs_losses or losses is not None:
      losses = tree_lib.check_losses(losses, k, name)
    return k, losses, tree_lib.rows_mask(shared, updates, params, name)
  return check


def gram_aggregator(
    name: str,
    num_tasks: int,
    init_fn: Callable[[Any], Any],
    weight_fn: GramWeightFn,
    *,
    shared: tree_lib.MaskOrFn = None,
    needs_losses: bool = False,
    needs_positive: bool = False,
    cross_gram: bool = False,
    handles_absent: bool = False,
    homogeneity: float | jax.Array = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """A balancer d = sum_i w_i g_i with w computed from the Gram matrix M = G G^T of the rows.

  One definition for the three paths: on stacked or representation rows M is a sum of
  per-leaf contractions over the shared leaves and d is formed from the rows; on the Gram-only
  path (`GramRows`) M comes from the path and the weights go back to it. The weights used are
  kept in the state (`BalancerState.weights`; `effective_weights` along a chain). Inside
  `shard_map`, the extra argument `axis_name` of `update` sums M over the mesh axes the rows are
  split over (`tree.gram`), so every device solves for the same w; the Gram-only path's M is
  already that of the whole rows.

  Absent tasks (the extra argument `present`, a `(K,)` bool; tasks whose loss is not finite or
  whose Gram diagonal entry is not, i.e. whose row is not) get weight 0: their rows and columns
  of M are set to 0 and their rows left out of d, `weight_fn` sees the loss 1 in their place,
  and the per-task entries of its state (leaves with leading axis K) keep their old values, as
  does any entry the step would make non-finite.

  Any finite scale: when the rows' Gram matrix would leave float's safe range (its largest
  diagonal entry outside 2^-60..2^60, rows of norm beyond about 1e-9..1e9, or overflowing), M
  is formed again from the rows divided by a power of two 2^e near their largest entry (exact
  in binary floating point), so rows from 1e-30 to 1e30 in float32 are solved as rows of norm
  about 1, and the weights are mapped back by the method's degree of homogeneity h
  (d(t G) = t^h d(G), weights times 2^(e (h - 1))). On the Gram-only path M is formed from the
  path's VJPs, and formed again from VJPs of cotangents divided by 2^e in the same case
  (`GramRows.scaled_gram`).

  Args:
    name: used in error messages.
    num_tasks: K.
    init_fn: `params -> state` of the method (`BalancerState.inner`).
    weight_fn: `(M, state, losses) -> (w, v, state)`: shared leaves get sum_i w_i row_i,
      task-specific leaves sum_i v_i row_i (v None: the plain sum).
    shared, needs_losses, needs_positive: as for `aggregator`.
    cross_gram: the method reads the cross-Gram matrix C = G_a G_b^T of two other independent
      mini-batches a and b (MoDo, SDMGrad) instead of M: `update` takes the extra argument
      `sample_jacobians=(jac_a, jac_b)`, two stacked Jacobians shaped like the updates, and
      `weight_fn` receives C over their shared leaves; without it, M stands in for C (a and b
      the update's own batch). The weights apply to the update's rows (see README).
    handles_absent: `weight_fn` takes the keyword `present` (the `(K,)` bool of the tasks that
      take part; M is 0 on the others' rows and columns), weights the present tasks as if the
      others did not exist and leaves their state as it was (a zero row of M is what most
      methods cannot take as "absent": MGDA's minimum-norm point would be 0).
    homogeneity: h with d(t G) = t^h d(G) for t > 0: 1 for most methods, 0 for the
      scale-invariant ones (Nash-MTL); methods with neither are rescaled as if h = 1.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf), or `GramRows` on the Gram-only path, to one gradient shaped like the
    parameters (a `GramUpdate` on the Gram-only path); its state is a `BalancerState`.

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax
    >>> def inverse_norms(gram, state, losses):  # w_i = 1 / ||g_i||: sum of the unit rows
    ...   return 1.0 / jnp.sqrt(jnp.diag(gram)), None, state
    >>> tx = mtl_optax.gram_aggregator("unit", 2, lambda params: optax.EmptyState(), inverse_norms)
    >>> d, state = tx.update({"w": jnp.array([[2.0, 0.0], [0.0, 4.0]])}, tx.init(None))
    >>> print(d["w"], state.weights)
    [1. 1.] [0.5  0.25]
  """
  check_positive_int(num_tasks, f"{name}: num_tasks")
  checks = dict(shared=shared, needs_losses=needs_losses, needs_positive=needs_positive)
  check = _input_checker(name, num_tasks=num_tasks, **checks)

  def sample_gram(samples, params):
    """C = G_a G_b^T over the shared leaves of the two sample Jacobians."""
    jac_a, jac_b = check_samples(name, samples, num_tasks)
    mask = tree_lib.rows_mask(shared, jac_a, params, name)
    return tree_lib.gram(tree_lib.split(jac_a, mask)[0], tree_lib.split(jac_b, mask)[0])

  def solve(gram, inner, losses, present, exponent=0):
    """(w, v, new inner state, present): the tasks whose Gram diagonal is not finite left
    out; M is that of the rows divided by 2^exponent."""
    present = present & jnp.isfinite(jnp.diag(gram))
    gram = jnp.where(present[:, None] & present[None, :], gram, 0.0)
    kwargs = {"present": present} if handles_absent else {}
    weights, specific_weights, new_inner = weight_fn(gram, inner, losses, **kwargs)
    weights = jnp.where(present & jnp.isfinite(weights), weights, 0.0)
    specific_weights = present.astype(weights.dtype) if specific_weights is None else (
        jnp.where(present & jnp.isfinite(specific_weights), specific_weights, 0.0))
    new_inner = keep_absent(inner, new_inner, present, per_task=not handles_absent)
    if not (isinstance(homogeneity, (int, float)) and homogeneity == 1):
      factor = _power_of_two(exponent, homogeneity - 1, weights.dtype)
      weights, specific_weights = weights * factor, specific_weights * factor
    return weights, specific_weights, new_inner, present

  def aggregate(shared_rows, state, losses, params, present, sample_jacobians=None,
                axis_name=None):
    exponent = 0
    if sample_jacobians is None:
      gram, exponent = safe_gram(shared_rows, axis_name)
    else:
      present = present & _finite(shared_rows, present.shape[0], axis_name)
      gram = sample_gram(sample_jacobians, params)
    weights, specific_weights, state, present = solve(gram, state, losses, present, exponent)
    return _combine(weights, shared_rows, present), weights, specific_weights, state

  extra_args = ("sample_jacobians",) if cross_gram else ()
  on_rows = aggregator(name, num_tasks, init_fn, aggregate, extra_args=extra_args,
                       handles_absent=True, _finite_shared=False, **checks)

  def update(updates, state, params=None, *, losses=None, present=None, **extra):
    if not isinstance(updates, GramRows):
      return on_rows.update(updates, state, params, losses=losses, present=present, **extra)
    k, losses, mask = check(updates, params, losses)
    present = task_present(present, losses, k, name, positive=needs_positive)
    if updates.present is not None:  # tasks a loss balancer before it left out
      present = present & updates.present
    if losses is not None:
      losses = jnp.where(present, losses, jnp.ones((), losses.dtype))
    samples = extra.get("sample_jacobians") if cross_gram else None
    if samples is None:
      gram, exponent = updates.scaled_gram(mask)
    else:
      gram, exponent = sample_gram(samples, params), 0
    weights, specific_weights, inner, _ = solve(gram, state.inner, losses, present, exponent)
    new_state = BalancerState(weights.astype(state.weights.dtype), inner)
    return updates.combine(weights, specific_weights, mask), new_state

  return optax.GradientTransformationExtraArgs(on_rows.init, update)


def check_samples(name: str, samples: Any, num_tasks: int) -> tuple[Any, Any]:
  """The two stacked Jacobians of `sample_jacobians`, checked: same structure, K rows each."""
  if not isinstance(samples, (tuple, list)) or len(samples) != 2:
    raise ValueError(f"{name}: sample_jacobians must be a pair (jac_a, jac_b) of stacked "
                     f"Jacobians of two other mini-batches, got {type(samples).__name__}.")
  if any(isinstance(j, (GramRows, RepresentationRows)) for j in samples):
    raise ValueError(f"{name}: sample_jacobians must be stacked Jacobians (value_and_jacrev); "
                     "representation rows of different batches belong to different examples.")
  if jax.tree.structure(samples[0]) != jax.tree.structure(samples[1]):
    raise ValueError(f"{name}: the two sample_jacobians have different tree structures.")
  for jac in samples:
    tree_lib.num_tasks(jac, num_tasks, f"{name} (sample_jacobians)")
  return samples[0], samples[1]


def clip_weights(weights: jax.Array, gram: jax.Array, max_norm: float) -> jax.Array:
  """w scaled so that ||sum_i w_i g_i|| = sqrt(w^T M w) <= max_norm (<= 0: unchanged).

  `max_norm` may be traced (e.g. under `optax.inject_hyperparams`)."""
  norm = jnp.sqrt(jnp.maximum(weights @ gram @ weights, 0.0))
  clipped = weights * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
  return jnp.where(jnp.asarray(max_norm) > 0, clipped, weights)


def shared_zeros(params: Any, num_tasks: int, shared: tree_lib.MaskOrFn,
                 name: str = "mtl_optax") -> Any:
  """Zeros shaped like the stacked shared rows (K, *leaf.shape), None at task-specific leaves.

  The initial state of balancers that keep per-task gradient buffers (EMAs).
  """
  shared_params, _ = tree_lib.split(params, tree_lib.resolve_mask(shared, params, name))
  return jax.tree.map(
      lambda p: jnp.zeros((num_tasks,) + jnp.shape(p), jnp.result_type(p)), shared_params)


def check_buffers(name: str, buffers: Any, rows: Any) -> None:
  """Raises at trace time unless per-task buffers in a state fit the shared rows received.

  A state initialized for one path (`init(params)`) and used on another (the representation
  path's z-rows) would otherwise fail deep inside a tree map.
  """
  shape = tree_lib.shape_tree
  if not tree_lib.same_shapes(buffers, rows):
    raise ValueError(
        f"{name}: its state holds per-task buffers shaped {shape(buffers)}, but it received "
        f"rows shaped {shape(rows)}: the state was initialized for another path or model. "
        "Initialize it from what update receives: balancer.init(params) on the stacked and "
        "Gram-only paths, balancer.init(mtl_optax.row_like(rows)) on the representation "
        "path; mtl_optax.value_and_grad(...).init does this for every path.")


def _reduce(name: str, scale: Callable[[int], float]) -> optax.GradientTransformationExtraArgs:
  """The same weight scale(K) on every row; the state keeps it as a scalar (K is unknown at
  `init`)."""
  def init(params):
    return BalancerState(jnp.ones([], tree_lib.weight_dtype(params)), optax.EmptyState())

  def update(updates, state, params=None, *, present=None, **extra_args):
    del params, extra_args
    carried = carried_present(updates)
    updates = unstack(updates)
    k = tree_lib.num_tasks(updates, name=name)
    present = task_present(present, None, k, name)
    if carried is not None:  # tasks a loss balancer before it left out
      present = present & carried
    weights = jnp.where(present, scale(k), 0.0)
    new_state = BalancerState(jnp.asarray(scale(k), state.weights.dtype), state.inner)
    if isinstance(updates, GramRows):
      return updates.combine(weights.astype(updates.coef.dtype), None, None), new_state
    # A product with the weights, not x.sum(0): on a stacked Jacobian XLA's CPU backend ran
    # the sum over the leading axis 2.2x slower (a six-layer 512-wide MLP, K = 3).
    return _combine(weights, updates, present), new_state
  return optax.GradientTransformationExtraArgs(init, update)


def sum_tasks() -> optax.GradientTransformationExtraArgs:
  """Sum of the (possibly reweighted) rows: equal weighting, or the end of any loss balancer.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis
    K on every leaf) to their sum over the task axis, shaped like the parameters; its state
    is a `BalancerState` whose `weights` is the scalar 1.

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> tx = mtl_optax.sum_tasks()
    >>> d, state = tx.update({"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}, tx.init(None))
    >>> print(d["w"])
    [0.5 2. ]
  """
  return _reduce("sum_tasks", lambda k: 1.0)


def mean_tasks() -> optax.GradientTransformationExtraArgs:
  """Mean of the rows: equal weighting with weights 1/K.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis
    K on every leaf) to their mean over the task axis, shaped like the parameters; its state
    is a `BalancerState` whose `weights` is the scalar 1/K (1 before the first update).

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> tx = mtl_optax.mean_tasks()
    >>> d, state = tx.update({"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}, tx.init(None))
    >>> print(d["w"])
    [0.25 1.  ]
  """
  return _reduce("mean_tasks", lambda k: 1.0 / k)
