"""The representation path: per-task gradients with respect to the shared representation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mtl_optax import tree as tree_lib
from mtl_optax.rows import RepresentationRows, StackedRows

Pullback = Callable[[RepresentationRows], Any]


def value_and_representation_jacrev(
    encode: Callable[..., Any],
    task_losses: Callable[..., Any],
    *,
    shared: tree_lib.MaskOrFn,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, RepresentationRows, Pullback]]:
  """Rows of the representation path (Sener & Koltun 2018, Sec. 3.3; LibMTL's `rep_grad`).

  The model is split into `encode(params, *args) -> z` (the shared trunk; z any pytree of float
  arrays, e.g. `(batch, d)`) and `task_losses(params, z, *args) -> losses[K]` (the heads). The
  wrapper `f(params, *args)` returns `(losses, rows, pullback)`:
    rows: `RepresentationRows(z, specific)`, row i holding dL_i/dz and dL_i/d(task-specific
      params); only the heads are backpropagated K times;
    pullback: maps a balancer's output on those rows (one row, shaped like `rows` without the
      task axis) to a full gradient shaped like `params`: one VJP of its z part through the
      encoder, plus its task-specific part.
  Any balancer runs on `rows` unchanged, with z shared (build it with `shared=None`; its
  `init` takes `row_like(rows)`). `shared` marks the encoder's leaves of `params`: `encode`
  is differentiated with respect to them only and `task_losses` with respect to the others
  only (and z), so the encoder must not read task-specific parameters nor the heads shared
  ones. With `has_aux`, `task_losses` returns `(losses, aux)` and `f` `((losses, aux), ...)`.

  Args:
    encode: `encode(params, *args) -> z`, the shared trunk.
    task_losses: `task_losses(params, z, *args) -> losses` of shape `(K,)` (with `has_aux`:
      `(losses, aux)`), the heads.
    shared: the encoder's parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them.
    has_aux: whether `task_losses` also returns auxiliary data.

  Returns:
    A function `f(params, *args) -> (losses, rows, pullback)` as described above.

  References:
    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS,
    arXiv:1810.04650, Sec. 3.3 (MGDA-UB).

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> encode = lambda p, x: x @ p["enc"]  # z: (batch, 3)
    >>> heads = lambda p, z, x: jnp.mean((z @ p["heads"]) ** 2, axis=0)  # K = 2 losses
    >>> params = {"enc": jnp.ones((2, 3)), "heads": jnp.ones((3, 2))}
    >>> shared = {"enc": True, "heads": False}  # the encoder's leaves
    >>> f = mtl_optax.value_and_representation_jacrev(encode, heads, shared=shared)
    >>> losses, rows, pullback = f(params, jnp.ones((4, 2)))
    >>> tx = mtl_optax.imtl_g(2)
    >>> d, state = tx.update(rows, tx.init(mtl_optax.row_like(rows)), losses=losses)
    >>> print(rows.z.shape, pullback(d)["enc"].shape)
    (2, 4, 3) (2, 3)
  """
  def wrapped(params, *args):
    mask = tree_lib.resolve_mask(shared, params)
    shared_params, specific_params = tree_lib.split(params, mask)
    z, encode_vjp = jax.vjp(
        lambda sp: encode(tree_lib.merge(sp, specific_params, mask), *args), shared_params)
    _check_representation(z)
    out = jax.vjp(
        lambda sp, z: task_losses(tree_lib.merge(shared_params, sp, mask), z, *args),
        specific_params, z, has_aux=has_aux)
    losses, heads_vjp = out[0], out[1]
    if jnp.ndim(losses) != 1:
      raise ValueError("value_and_representation_jacrev: task_losses must return a vector of K "
                       f"losses, got shape {jnp.shape(losses)}.")
    specific_rows, z_rows = jax.vmap(heads_vjp)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    rows = RepresentationRows(z_rows, specific_rows)

    def pullback(update: RepresentationRows) -> Any:
      _check_one_row(update, rows)
      (shared_grad,) = encode_vjp(update.z)
      return tree_lib.merge(shared_grad, update.specific, mask)

    return ((losses, out[2]) if has_aux else losses), rows, pullback
  return wrapped


def _check_one_row(update: Any, rows: RepresentationRows) -> None:
  """Raises at trace time unless `update` is one row shaped like `rows` without the K axis."""
  if isinstance(update, StackedRows):
    raise ValueError("pullback takes one row, a gradient balancer's output, but got the K rows "
                     f"a loss balancer scaled: {StackedRows._hint}.")
  shape = tree_lib.shape_tree
  expected = jax.tree.map(lambda r: r.shape[1:], rows)
  if (jax.tree.structure(update) != jax.tree.structure(rows)
      or [jnp.shape(x) for x in jax.tree.leaves(update)]
      != [r.shape[1:] for r in jax.tree.leaves(rows)]):
    raise ValueError(f"pullback takes one row shaped {expected} (the rows without their task "
                     "axis: what a gradient balancer or mtl_optax.sum_tasks() makes of them), "
                     f"got {shape(update)}; mtl_optax.value_and_grad(..., "
                     "path='representation') calls it for you.")


def _check_representation(z: Any) -> None:
  leaves = jax.tree.leaves(z)
  if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves):
    shapes = jax.tree.map(lambda x: f"{jnp.result_type(x)}{list(jnp.shape(x))}", z)
    raise ValueError("value_and_representation_jacrev: encode must return a non-empty pytree "
                     f"of float arrays (the representation z), got {shapes}.")
