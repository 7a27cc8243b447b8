"""Helpers for stacked per-task trees: every leaf carries a leading task axis of size K."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mtl_optax.rows import GramRows, RepresentationRows

Tree = Any
MaskOrFn = Tree | Callable[[Tree], Tree] | None
AxisName = str | tuple[str, ...]  # mesh axes, as jax.lax.psum takes them


def num_tasks(stacked: Tree, expected: int | None = None, name: str = "mtl_optax") -> int:
  """Returns K, the common leading axis of all leaves; raises at trace time if it differs."""
  if isinstance(stacked, GramRows):
    if expected is not None and expected != stacked.num_tasks:
      raise ValueError(f"{name}: the rows have K={stacked.num_tasks} tasks, expected {expected}.")
    return stacked.num_tasks
  leaves = jax.tree_util.tree_leaves_with_path(stacked)
  if not leaves:
    raise ValueError(f"{name}: the stacked updates have no leaves.")
  sizes = {}
  for path, leaf in leaves:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      raise ValueError(
          f"{name}: leaf {jax.tree_util.keystr(path)} of the stacked gradients has dtype "
          f"{jnp.result_type(leaf)}; gradients must be floating point (weights would be "
          "truncated to integers): differentiate float parameters, or cast the rows with "
          "jax.tree.map(lambda g: g.astype(jnp.float32), rows).")
    if jnp.ndim(leaf) == 0:
      raise ValueError(
          f"{name}: leaf {jax.tree_util.keystr(path)} is a scalar; stacked per-task "
          "gradients need a leading task axis of size K (as jax.jacrev of K losses gives)."
      )
    sizes.setdefault(jnp.shape(leaf)[0], jax.tree_util.keystr(path))
  if expected is not None:
    sizes.setdefault(expected, "num_tasks")
  if len(sizes) > 1:
    detail = ", ".join(f"{where} has {k}" for k, where in sizes.items())
    raise ValueError(f"{name}: leading task axes disagree ({detail}); all must equal K.")
  return next(iter(sizes))


def check_losses(losses: jax.Array | None, k: int, name: str) -> jax.Array:
  """Validates the extra argument `losses` (shape `(K,)`) at trace time (their values:
  `present.task_present`)."""
  if losses is None:
    raise ValueError(
        f"{name} needs the task losses: call update(updates, state, params, losses=losses) "
        "with losses of shape (K,)."
    )
  losses = jnp.asarray(losses)
  if losses.shape != (k,):
    raise ValueError(f"{name}: losses have shape {losses.shape}, expected ({k},) for K={k} tasks.")
  return losses


def scale_rows(weights: jax.Array, stacked: Tree, present: jax.Array | None = None) -> Tree:
  """Row i of every leaf times `weights[i]`; with `present`, absent rows are set to 0 (a
  select, so their NaN or inf entries vanish)."""
  if isinstance(stacked, GramRows):
    return stacked.scale(weights)

  def scale(leaf):
    shape = (-1,) + (1,) * (leaf.ndim - 1)
    out = leaf * weights.astype(leaf.dtype).reshape(shape)
    return out if present is None else jnp.where(present.reshape(shape), out, 0)
  return jax.tree.map(scale, stacked)


def combine(weights: jax.Array, stacked: Tree) -> Tree:
  """The weighted sum of rows, `sum_i weights[i] * row_i`, shaped like the parameters."""
  return jax.tree.map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1), stacked)


def weight_dtype(params: Any) -> jnp.dtype:
  """The dtype of per-task weights for these parameters: that of their Gram matrix, float32
  for float32 or lower precision (bfloat16), float64 for float64 (under jax_enable_x64)."""
  leaves = [jnp.result_type(x) for x in jax.tree.leaves(params)]
  return jnp.promote_types(jnp.result_type(*leaves) if leaves else jnp.float32, jnp.float32)


def gram(stacked: Tree, other: Tree | None = None,
         axis_name: AxisName | None = None) -> jax.Array:
  """The K x K Gram matrix `G G^T` of the rows, as a sum of per-leaf contractions; with
  `other` (rows H of the same structure) the cross-Gram matrix `G H^T`.

  Each leaf is contracted over all its axes but the first: under `jit` with sharded leaves
  (automatic or explicit axes) without a reshape, so a leaf split along any of them is
  contracted shard by shard and only K x K partial sums cross devices; otherwise as one matrix
  product of the flattened rows (on CPU twice as fast). Inside `shard_map`, where each device
  holds a shard of every row (z split over the batch, or parameter-sharded leaves),
  `axis_name` names the mesh axes the rows are split over, and the per-device Gram matrices are
  summed over them (`jax.lax.psum`).
  """
  def leaf_gram(leaf, other_leaf):
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)  # bfloat16 rows: a float32 Gram
    contract = lambda x, y, axes, **where: jax.lax.dot_general(  # noqa: E731
        x, y, ((axes, axes), ((), ())), **where, precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=dtype)
    sharding = jax.typeof(leaf).sharding
    axes = tuple(range(1, leaf.ndim))
    if any(name is not None for name in sharding.spec[1:]):
      # Explicit sharding (jax.make_mesh's default) asks where a contraction over split axes
      # goes: replicated, a sum of the per-shard contractions.
      return contract(leaf, other_leaf, axes,
                      out_sharding=NamedSharding(sharding.mesh, PartitionSpec()))
    if AxisType.Auto in sharding.mesh.axis_types:
      # Automatic sharding may split any axis; flattening one split behind another would
      # gather the rows, the contraction over all of them is partitioned shard by shard.
      return contract(leaf, other_leaf, axes)
    # One device, local shards (shard_map) or explicit axes not split: one matrix product of
    # the flattened rows; XLA's CPU backend copies a transposed operand for a contraction
    # over several axes (the Gram matrix then takes twice as long).
    flat = lambda x: x.reshape(x.shape[0], math.prod(x.shape[1:]))  # noqa: E731
    return contract(flat(leaf), flat(other_leaf), (1,))
  other = stacked if other is None else other
  g = sum(jax.tree.leaves(jax.tree.map(leaf_gram, stacked, other)))
  return g if axis_name is None else jax.lax.psum(g, axis_name)


# The range of a Gram matrix's largest diagonal entry (squared row norm) used as formed; outside
# it (or overflowed) the Gram matrix is formed again from the rows divided by a power of two.
SAFE_DIAGONAL = (2.0**-60, 2.0**60)


def gram_in_range(gram: jax.Array) -> jax.Array:
  """Whether M's largest finite diagonal entry lies in `SAFE_DIAGONAL` and none overflowed."""
  diag = jnp.diag(gram)
  top = jnp.max(jnp.where(jnp.isfinite(diag), diag, 0.0))
  return ~jnp.any(diag == jnp.inf) & (top > SAFE_DIAGONAL[0]) & (top < SAFE_DIAGONAL[1])


def exponent_of(peak: jax.Array) -> jax.Array:
  """e with 2^(e-1) <= peak < 2^e (0 for peak 0): rows divided by 2^e have entries below 1."""
  return jnp.where(peak > 0, jnp.frexp(peak)[1], 0).astype(jnp.int32)


def peak(stacked: Tree, axis_name: AxisName | None = None) -> jax.Array:
  """The largest finite |entry| of the rows (inside `shard_map`, over the mesh axes)."""
  peaks = [jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0)) for x in jax.tree.leaves(stacked)]
  out = functools.reduce(jnp.maximum, peaks)
  return out if axis_name is None else jax.lax.pmax(out, axis_name)


def row_norms(stacked: Tree, axis_name: AxisName | None = None) -> jax.Array:
  """The K row norms ||g_i||: the Gram matrix's diagonal in K P work instead of its K^2 P.

  Reduced over every axis but the first of each leaf (shard by shard when leaves are split over
  devices); inside `shard_map`, `axis_name` sums the squares over the mesh axes the rows are
  split over, as for `gram`. Rows whose squares would over- or underflow (norms beyond about
  1e-15..1e15 in float32) are measured again divided by a power of two (at run time only then),
  so any finite scale gives its norm.
  """
  def norms(rows):
    def leaf_squares(leaf):
      leaf = leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))
      return jnp.sum(jnp.square(leaf), axis=tuple(range(1, leaf.ndim)))
    squares = sum(jax.tree.leaves(jax.tree.map(leaf_squares, rows)))
    return jnp.sqrt(squares if axis_name is None else jax.lax.psum(squares, axis_name))

  out = norms(stacked)
  top = jnp.max(jnp.where(jnp.isfinite(out), out, 0.0))
  safe = ~jnp.any(out == jnp.inf) & (top > 2.0**-50) & (top < 2.0**50)

  def rescaled(_):
    exponent = exponent_of(peak(stacked, axis_name))
    scaled = norms(jax.tree.map(lambda x: jnp.ldexp(x, -exponent), stacked))
    return jnp.ldexp(scaled, exponent)

  return jax.lax.cond(safe, lambda _: out, rescaled, None)


def shape_tree(tree: Tree) -> Tree:
  """The tree of its leaves' shapes, for error messages."""
  return jax.tree.map(jnp.shape, tree)


def same_shapes(a: Tree, b: Tree) -> bool:
  """Whether two trees have the same structure and the same leaf shapes (checked at trace
  time)."""
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and [jnp.shape(x) for x in jax.tree.leaves(a)]
          == [jnp.shape(x) for x in jax.tree.leaves(b)])


def resolve_mask(shared: MaskOrFn, params: Tree, name: str = "mtl_optax") -> Tree:
  """The `shared` mask as a pytree of bools like `params` (None: every leaf is shared).

  On representation-path rows (`RepresentationRows`) z is shared and the task-specific rows
  are not; a given mask must say the same. A mask that does not fit `params` (other keys, a
  callable that cannot read them) raises a `ValueError` naming `name` and `shared`.
  """
  if isinstance(params, RepresentationRows):
    return _representation_mask(shared, params, name)
  if shared is None:
    return jax.tree.map(lambda _: True, params)
  if callable(shared):
    try:
      mask = shared(params)
    except Exception as error:  # a user's function: any failure means it cannot read params
      raise ValueError(
          f"{name}: the shared= mask function raised {type(error).__name__}: {error}, on a "
          f"tree of structure {jax.tree.structure(params)}; it must map the parameters to a "
          "pytree of bools (True at shared leaves).") from error
  else:
    mask = shared
  try:
    map_masked(lambda _: None, lambda _: None, mask, params)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{name}: the shared= mask does not match the parameters: the mask has structure "
        f"{jax.tree.structure(mask)}, which must be a prefix of the parameters' "
        f"{jax.tree.structure(params)}.") from error
  return mask


def rows_mask(shared: MaskOrFn, updates: Tree, params: Tree | None,
              name: str = "mtl_optax") -> Tree:
  """The mask a gradient balancer applies to `updates`, resolved on the parameters.

  Stacked rows: on `params` (on the rows when `params` is None). Representation rows: on the
  rows. Gram rows: on `params`, or None (the Gram matrix given is that of the shared rows).
  """
  if isinstance(updates, GramRows):
    return None if params is None else resolve_mask(shared, params, name)
  if isinstance(updates, RepresentationRows) or params is None:
    return resolve_mask(shared, updates, name)
  return resolve_mask(shared, params, name)


def _representation_mask(shared: MaskOrFn, rows: RepresentationRows,
                         name: str) -> RepresentationRows:
  expected = RepresentationRows(jax.tree.map(lambda _: True, rows.z),
                                jax.tree.map(lambda _: False, rows.specific))
  if shared is None:
    return expected
  try:
    mask = shared(rows) if callable(shared) else shared
    full = map_masked(lambda _: True, lambda _: False, mask, rows)
    same = (jax.tree.structure(full) == jax.tree.structure(expected)
            and jax.tree.leaves(full) == jax.tree.leaves(expected))
  except Exception:  # a mask (or mask function) written for the parameters, not these rows
    same = False
  if not same:
    raise ValueError(
        f"{name}: on the representation path the rows say what is shared (z) and what is "
        "task-specific, so the balancer's shared= mask, written for the parameters, cannot "
        "be applied to them: build the balancer with shared=None there (the split's own "
        "shared= marks the encoder's parameters).")
  return expected


def map_masked(if_shared: Callable, if_specific: Callable, mask: Tree, tree: Tree) -> Tree:
  """`if_shared` on the leaves that `mask` (a prefix of `tree` allowed) marks True, else
  `if_specific`."""
  return jax.tree.map(
      lambda m, sub: jax.tree.map(if_shared if m else if_specific, sub), mask, tree)


def split(stacked: Tree, mask: Tree) -> tuple[Tree, Tree]:
  """Splits a tree into its shared and task-specific parts (the others set to None)."""
  shared = jax.tree.map(lambda m, x: x if m else None, mask, stacked)
  specific = jax.tree.map(lambda m, x: None if m else x, mask, stacked)
  return shared, specific


def merge(shared: Tree, specific: Tree, mask: Tree) -> Tree:
  """Inverse of `split`."""
  return jax.tree.map(
      lambda m, a, b: a if m else b, mask, shared, specific, is_leaf=lambda x: x is None
  )
