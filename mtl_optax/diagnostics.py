"""What a training step did: conflict and imbalance diagnostics of d = sum_i w_i g_i.

Everything is computed from the K x K Gram matrix M = G G^T of the (shared) rows g_i and the
weights w of the update d = sum_i w_i g_i (`diagnostics_from_gram`), or, for methods that are
not Gram-based, from the rows and d themselves (`diagnostics_from_rows`). Both are pure, work
under `jit` and `vmap`, and never return NaN for zero, duplicated or opposite rows.

`with_diagnostics(balancer, num_tasks)` records them in the state at every step (or every N-th:
`every=N`), on all three paths (stacked Jacobian, Gram-only `GramRows`, representation rows:
there those of the z-rows), without changing the update. It costs nothing unless used.

Definitions (Zhou et al. 2025, "Injecting Imbalance Sensitivity for Multi-Task Learning",
arXiv:2503.08006, Definitions 1-3):

- progress_i = g_i . d = (M w)_i, the first-order decrease of loss i along -d (per unit step);
- cosines_i = cos(g_i, d); the cosine of a zero vector (a zero row, or d = 0) is 0;
- imbalance_ratio = ||g_max|| / ||g_min|| (Definition 2); +inf when some rows are zero and some
  are not, 1 when all are zero; rows count as zero below eps * the largest norm (eps of the
  dtype), as the library's solvers do;
- pareto_failure: some cos(g_i, d) < -tol (Definition 3: the step increases loss i to first
  order); `tol` (1e-4) keeps rounding around d ~ 0 or g_i . d ~ 0 from counting;
- conflict_share: the share of the K (K - 1) / 2 pairs with cos(g_i, g_j) < -tol (Definition 1),
  0 for K = 1; min_pair_cosine the smallest cos(g_i, g_j) over pairs (1 for K = 1), IMGrad's
  gradient similarity;
- normalized_weights = w / sum_i |w_i| (zeros when w = 0) and effective_tasks = exp(entropy of
  |w| / sum |w|), between 1 (one task) and K (equal weights); 0 when w = 0;
- converged: whether the method's solver succeeded this step, where the method reports it
  (`nash_mtl` and `imgrad_nash`: `NashMTLState.converged`; `fairgrad`:
  `FairGradState.converged`); True for every other method.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.present import finite_rows, task_present
from mtl_optax.rows import GramRows, GramUpdate, StackedRows, carried_present, unstack
from mtl_optax.state import weights_product

Tree = Any
TOL = 1e-4  # cosines within this of 0 are not failures or conflicts (rounding)


class Diagnostics(NamedTuple):
  """One step's conflict and imbalance diagnostics (see the module docstring)."""
  progress: jax.Array            # (K,) g_i . d = (M w)_i
  cosines: jax.Array             # (K,) cos(g_i, d), 0 for a zero vector
  norms: jax.Array               # (K,) ||g_i||
  imbalance_ratio: jax.Array     # () ||g_max|| / ||g_min|| (+inf with a zero row)
  pareto_failure: jax.Array      # () bool: some cos(g_i, d) < -tol
  conflict_share: jax.Array      # () share of pairs with cos(g_i, g_j) < -tol
  min_pair_cosine: jax.Array     # () min_{i<j} cos(g_i, g_j) (1 for K = 1)
  normalized_weights: jax.Array  # (K,) w / sum |w|
  effective_tasks: jax.Array     # () exp(entropy of |w| / sum |w|)
  converged: jax.Array           # () bool: the method's solver succeeded (True if unreported)


def empty_diagnostics(num_tasks: int, dtype: Any = jnp.float32) -> Diagnostics:
  """The diagnostics before any step: zeros, ratio 1, no failure, converged."""
  zeros = jnp.zeros((num_tasks,), dtype)
  return Diagnostics(zeros, zeros, zeros, jnp.ones([], dtype), jnp.array(False),
                     jnp.zeros([], dtype), jnp.ones([], dtype), zeros, jnp.zeros([], dtype),
                     jnp.array(True))


def _from_parts(gram: jax.Array, progress: jax.Array, d_sq: jax.Array, weights: jax.Array,
                converged: jax.Array | bool | None, tol: float,
                present: jax.Array | None = None) -> Diagnostics:
  gram = jnp.asarray(gram)
  dtype = jnp.promote_types(gram.dtype, jnp.float32)
  gram, progress = gram.astype(dtype), jnp.asarray(progress, dtype)
  weights = jnp.asarray(weights, dtype)
  k = gram.shape[-1]
  if present is not None:  # absent tasks (rows possibly non-finite) read as zero rows
    gram = jnp.where(present[:, None] & present[None, :], gram, 0.0)
    progress = jnp.where(present, progress, 0.0)
    weights = jnp.where(present, weights, 0.0)
    d_sq = jnp.where(jnp.isfinite(d_sq), d_sq, 0.0)
  eps = jnp.finfo(dtype).eps
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
  largest = jnp.max(norms)
  zero = norms <= eps * largest
  inv = jnp.where(zero, 0.0, 1.0 / jnp.where(zero, 1.0, norms))
  d_norm = jnp.sqrt(jnp.maximum(d_sq.astype(dtype), 0.0))
  d_zero = d_norm <= eps * jnp.maximum(largest * jnp.sum(jnp.abs(weights)), jnp.finfo(dtype).tiny)
  d_inv = jnp.where(d_zero, 0.0, 1.0 / jnp.where(d_zero, 1.0, d_norm))
  cosines = jnp.clip(progress * inv * d_inv, -1.0, 1.0)
  upper = jnp.triu(jnp.ones((k, k), bool), 1)
  pairs = max(k * (k - 1) // 2, 1)
  if present is not None:  # over the present tasks only (the same when all are present)
    zero = zero & present
    upper = upper & present[:, None] & present[None, :]
    n = jnp.sum(present)
    pairs = jnp.maximum(n * (n - 1) // 2, 1)
  smallest = jnp.min(jnp.where(zero, 0.0, norms if present is None else
                               jnp.where(present, norms, jnp.inf)))
  none_zero = jnp.all(zero) if present is None else ~jnp.any(present & ~zero)
  ratio = jnp.where(none_zero, 1.0,
                    jnp.where(jnp.any(zero), jnp.inf,
                              largest / jnp.where(jnp.any(zero), 1.0, smallest)))
  pair_cos = jnp.clip(inv[:, None] * gram * inv[None, :], -1.0, 1.0)
  conflict_share = jnp.sum(upper & (pair_cos < -tol)) / pairs
  min_pair = jnp.min(jnp.where(upper, pair_cos, 1.0)) if k > 1 else jnp.ones([], dtype)
  total = jnp.sum(jnp.abs(weights))
  none = total <= 0
  p = jnp.where(none, 0.0, jnp.abs(weights) / jnp.where(none, 1.0, total))
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  effective = jnp.where(none, 0.0, jnp.exp(entropy))
  normalized = jnp.where(none, 0.0, weights / jnp.where(none, 1.0, total))
  converged = jnp.array(True) if converged is None else jnp.all(jnp.asarray(converged, bool))
  return Diagnostics(progress, cosines, norms, ratio.astype(dtype), jnp.any(cosines < -tol),
                     conflict_share.astype(dtype), min_pair.astype(dtype), normalized,
                     effective.astype(dtype), converged)


def diagnostics_from_gram(gram: jax.Array, weights: jax.Array,
                          converged: jax.Array | bool | None = None, *,
                          tol: float = TOL, present: jax.Array | None = None) -> Diagnostics:
  """The diagnostics of d = sum_i w_i g_i from the Gram matrix M = G G^T of the rows and w.

  Args:
    gram: `(K, K)` Gram matrix of the (shared) rows.
    weights: `(K,)` weights w of the update on those rows.
    converged: whether the method's solver succeeded (a bool, or per-task bools: all of
      them); None: True.
    tol: cosines above -tol are not counted as Pareto failures or conflicts.

  Returns:
    A `Diagnostics`, in M's dtype (at least float32).

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.0]])  # rows (1, 0) and (-0.5, ~1.94)
    >>> diag = mtl_optax.diagnostics_from_gram(gram, jnp.ones(2))  # d = g_1 + g_2
    >>> print(diag.progress, float(diag.imbalance_ratio), bool(diag.pareto_failure))
    [0.5 3.5] 2.0 False
  """
  gram = jnp.asarray(gram)
  weights = jnp.asarray(weights, jnp.promote_types(gram.dtype, jnp.float32))
  if present is not None:
    gram = jnp.where(present[:, None] & present[None, :], gram, 0.0)
    weights = jnp.where(present, weights, 0.0)
  progress = gram.astype(weights.dtype) @ weights
  return _from_parts(gram, progress, weights @ progress, weights, converged, tol, present)


def diagnostics_from_rows(rows: Tree, update: Tree, mask: Tree = None,
                          weights: jax.Array | None = None,
                          converged: jax.Array | bool | None = None, *,
                          tol: float = TOL, axis_name: Any = None,
                          present: jax.Array | None = None) -> Diagnostics:
  """The diagnostics of an update d from the stacked rows and d themselves (any method).

  Args:
    rows: stacked rows (leading axis K on every leaf), e.g. a stacked Jacobian.
    update: d, shaped like one row (the balancer's output).
    mask: bools like the rows (a prefix is enough), True on the leaves to use (the shared
      ones); None: every leaf.
    weights: `(K,)` weights of d on the rows, if known (used where M w = G d holds to 1e-3
      relative, so weights on other rows, e.g. DB-MTL's EMAs, are not taken for d's); None or
      not consistent: w = M^+ (G d), the coefficients of d's projection onto the rows' span
      (the weights themselves when the rows are linearly independent and d is in their span,
      as for every Gram-based method).
    converged, tol: as for `diagnostics_from_gram`.
    axis_name: inside `shard_map`, the mesh axes the rows and d are split over (z split over
      the batch): the contractions are summed over them (`jax.lax.psum`).

  Returns:
    A `Diagnostics`.

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> rows = {"w": jnp.array([[1.0, 0.0], [-1.0, 0.1]])}
    >>> diag = mtl_optax.diagnostics_from_rows(rows, {"w": jnp.array([0.0, 0.1])})  # the sum
    >>> print(diag.cosines.round(3), bool(diag.pareto_failure), float(diag.conflict_share))
    [0.  0.1] False 1.0
  """
  if mask is not None:
    rows, update = tree_lib.split(rows, mask)[0], tree_lib.split(update, mask)[0]
  gram = tree_lib.gram(rows, axis_name=axis_name)
  dtype = gram.dtype
  psum = (lambda x: x) if axis_name is None else (lambda x: jax.lax.psum(x, axis_name))

  def leaf_progress(row, d):
    flat = row.reshape(row.shape[0], -1).astype(dtype)
    return flat @ d.reshape(-1).astype(dtype)

  progress = psum(sum(jax.tree.leaves(jax.tree.map(leaf_progress, rows, update))))
  d_sq = psum(sum(jnp.sum(jnp.square(d.astype(dtype))) for d in jax.tree.leaves(update)))
  if present is not None:  # absent tasks' rows (possibly non-finite) read as zero rows
    gram = jnp.where(present[:, None] & present[None, :], gram, 0.0)
    progress = jnp.where(present, progress, 0.0)
    if weights is not None:
      weights = jnp.where(present, jnp.asarray(weights, dtype), 0.0)
  projected = lambda: jnp.linalg.pinv(gram, hermitian=True) @ progress  # noqa: E731
  if weights is not None:
    weights = jnp.asarray(weights, dtype)
    scale = jnp.max(jnp.abs(progress)) + jnp.finfo(dtype).tiny
    consistent = jnp.max(jnp.abs(gram @ weights - progress)) <= 1e-3 * scale
    weights = jax.lax.cond(consistent, lambda: weights, projected)
  else:
    weights = projected()
  return _from_parts(gram, progress, jnp.asarray(d_sq, dtype), weights, converged, tol, present)


# -- recording them in the state --

class DiagnosticsState(NamedTuple):
  """State of `with_diagnostics`: the wrapped balancer's state, the last step's diagnostics,
  and the number of steps whose solver did not converge (fell back)."""
  inner: Any
  diagnostics: Diagnostics
  fallbacks: jax.Array  # () int32
  steps: jax.Array      # () int32


class _MemoGram:
  """The Gram function of `GramRows` with each mask's result kept, so a wrapper and the
  balancer inside it read the same K x K matrix from one computation."""

  def __init__(self, gram_fn):
    self._gram_fn, self._seen = gram_fn, []

  def _key(self, mask):
    try:
      return jax.tree.structure(mask), tuple(bool(x) for x in jax.tree.leaves(mask))
    except (TypeError, jax.errors.ConcretizationTypeError):
      return None

  def __call__(self, mask):
    key = self._key(mask)
    for seen_mask, seen_key, value in self._seen:
      if seen_mask is mask or (key is not None and key == seen_key):
        return value
    value = self._gram_fn(mask)
    self._seen.append((mask, key, value))
    return value

  def __getattr__(self, name):  # the wrapped function's `scaled`, if it has one
    if name == "scaled":
      return getattr(self._gram_fn, "scaled")
    raise AttributeError(name)


def memo_rows(rows: GramRows) -> tuple[GramRows, _MemoGram]:
  """`rows` with a Gram function that computes each mask's Gram matrix once (the true rows')."""
  memo = _MemoGram(rows._gram_fn)  # pylint: disable=protected-access
  return GramRows(rows.coef, memo, rows.present), memo


def reported_convergence(state: Any) -> jax.Array:
  """True unless a `converged` field in `state` (Nash-MTL, IMGrad-Nash, FairGrad) says otherwise."""
  flags = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
           if path and getattr(path[-1], "name", None) == "converged"]
  return jnp.all(jnp.array([jnp.all(f) for f in flags])) if flags else jnp.array(True)


def _present(extra_args: dict, finite: jax.Array, num_tasks: int,
             carried: jax.Array | None) -> jax.Array:
  """The tasks the diagnostics run over: `present` (all if not given), with finite losses (if
  given) and finite rows, and not left out by a loss balancer before (`carried`)."""
  losses = extra_args.get("losses")
  if losses is not None and jnp.shape(losses) != (num_tasks,):
    losses = None  # the balancer reports the wrong shape
  present = task_present(extra_args.get("present"), losses, num_tasks, "with_diagnostics")
  return present & finite if carried is None else present & finite & carried


def with_diagnostics(balancer: optax.GradientTransformation, num_tasks: int, *,
                     shared: tree_lib.MaskOrFn = None, every: int = 1,
                     tol: float = TOL) -> optax.GradientTransformationExtraArgs:
  """`balancer` with the diagnostics of each update kept in its state (`DiagnosticsState`).

  The update is `balancer`'s, bitwise with `every=1` (tested on all three paths; with
  `every > 1` the conditional can make XLA compile the step differently: the plain sum on the
  stacked path then agrees to rounding); the wrapper reads the rows it received and the update
  it made:

  - Gram-only path (`GramRows`): the Gram matrix the balancer computed (the same computation,
    kept once; a balancer that never reads it, e.g. a loss balancer alone, makes the wrapper
    compute it) and the weights of the `GramUpdate` on the true rows;
  - stacked and representation paths: `diagnostics_from_rows` on the rows and the update over
    the leaves `shared` marks (on representation rows: the z-rows), with the weights the
    balancer's state keeps (`effective_weights`, a chain's product) where d is their
    combination of the rows, else M^+ (G d).

  Args:
    balancer: a gradient balancer, or a chain of loss balancers and one (no optimizer after
      it), or a loss balancer alone on the Gram-only path.
    num_tasks: K.
    shared: the shared parameters, as for the balancer (pass the same mask). On the Gram-only
      path the balancer's own mask is used.
    every: record the diagnostics on the first step and every `every`-th after it (a
      `lax.cond`: the other steps skip their cost and keep the last record, as a training loop
      that logs every N steps needs); `fallbacks` still counts every step. Under `vmap` over
      states the condition is batched and both branches run.
    tol: as for `diagnostics_from_gram`.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `balancer`'s update; its state is a
    `DiagnosticsState` (`state.diagnostics`, `state.fallbacks`: steps whose solver reported
    no convergence).

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> tx = mtl_optax.with_diagnostics(mtl_optax.mgda(2), 2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-1.0, 2.0]])}
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}))
    >>> print(state.diagnostics.cosines.round(3), bool(state.diagnostics.pareto_failure))
    [0.707 0.316] False
  """
  check_positive_int(num_tasks, "with_diagnostics: num_tasks")
  check_positive_int(every, "with_diagnostics: every")
  inner = optax.with_extra_args_support(balancer)

  def recorded(compute, state):
    """`compute()` (the diagnostics, cast to the state's dtypes) on recording steps, else the last."""
    cast = lambda: jax.tree.map(lambda new, old: new.astype(old.dtype),  # noqa: E731
                                compute(), state.diagnostics)
    if every == 1:
      return cast()
    return jax.lax.cond(state.steps % every == 0, cast, lambda: state.diagnostics)

  def init(params):
    dtype = tree_lib.weight_dtype(params)
    return DiagnosticsState(inner.init(params), empty_diagnostics(num_tasks, dtype),
                            jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, **extra_args):
    if isinstance(updates, GramRows):
      rows, memo = memo_rows(updates)
      out, inner_state = inner.update(rows, state.inner, params, **extra_args)
      converged = reported_convergence(inner_state)
      if isinstance(out, GramUpdate):
        weights, mask = out.shared, out.mask
      else:  # loss balancers alone: the sum of the reweighted rows
        weights, mask = out.coef.T @ jnp.ones((out.num_tasks,), out.coef.dtype), None

      def compute():
        gram = memo(mask)
        present = _present(extra_args, jnp.isfinite(jnp.diag(gram)), num_tasks, rows.present)
        return diagnostics_from_gram(gram, weights, converged, tol=tol, present=present)
    else:
      out, inner_state = inner.update(updates, state.inner, params, **extra_args)
      if isinstance(out, StackedRows):
        raise ValueError("with_diagnostics: the balancer returned rows (a loss balancer alone); "
                         "on the stacked and representation paths end it with a gradient "
                         "balancer or mtl_optax.sum_tasks().")
      converged = reported_convergence(inner_state)
      rows = unstack(updates)
      mask = tree_lib.rows_mask(shared, rows, params, "with_diagnostics")
      weights = weights_product(inner_state)
      weights = None if weights is None else jnp.broadcast_to(weights, (num_tasks,))

      def compute():
        present = _present(extra_args, finite_rows(rows), num_tasks, carried_present(updates))
        if extra_args.get("axis_name") is not None:
          present = jax.lax.pmin(present.astype(jnp.int32), extra_args["axis_name"]) > 0
        return diagnostics_from_rows(jax.lax.stop_gradient(rows), jax.lax.stop_gradient(out),
                                     mask, weights, converged, tol=tol,
                                     axis_name=extra_args.get("axis_name"), present=present)
    diag = recorded(compute, state)
    fallbacks = state.fallbacks + jnp.where(converged, 0, 1).astype(jnp.int32)
    return out, DiagnosticsState(inner_state, diag, fallbacks, state.steps + 1)

  return optax.GradientTransformationExtraArgs(init, update)
