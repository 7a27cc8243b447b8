"""Per-task gradients: the stacked Jacobian, and the single-backward / Gram-only path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.rows import GramRows, GramUpdate


def task_vjp(fun: Callable[..., Any], params: Any, args: tuple, has_aux: bool, name: str,
             kwargs: dict | None = None) -> tuple[jax.Array, Callable, Any]:
  """Forward pass of `fun(params, *args, **kwargs)` with its VJP; checks that it returns a
  vector of losses. Returns `(losses, vjp_fn, value)`, `value` being `losses` or
  `(losses, aux)` with `has_aux`."""
  kwargs = kwargs or {}
  out = jax.vjp(lambda p: fun(p, *args, **kwargs), params, has_aux=has_aux)
  losses = out[0]
  if jnp.ndim(losses) != 1:
    raise ValueError(
        f"{name}: fun must return a vector of K losses, got shape {jnp.shape(losses)}.")
  aux = out[2] if has_aux else None
  return losses, out[1], ((losses, aux) if has_aux else losses)


def value_and_jacrev(fun: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
  """Wraps `fun(params, *args) -> losses[K]` to return `(losses, jac)`.

  `jac` is shaped like `params` with a leading task axis K on every leaf (row i is the
  gradient of loss i). It is one `jax.vjp` vmapped over the K one-hot cotangents, as
  `jax.jacrev` computes it, but the losses come back from the same forward pass.
  With `has_aux`, `fun` returns `(losses, aux)` and the wrapper `((losses, aux), jac)`.

  Args:
    fun: `fun(params, *args, **kwargs) -> losses` of shape `(K,)` (with `has_aux`:
      `(losses, aux)`).
    has_aux: whether `fun` also returns auxiliary data.

  Returns:
    A function with `fun`'s arguments returning `(losses, jac)` (with `has_aux`:
    `((losses, aux), jac)`), `jac` shaped like `params` with a leading axis K on every leaf:
    the input of every balancer's `update`.

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> fun = lambda p, x: jnp.stack([jnp.sum(p["w"] * x), jnp.sum(p["w"] ** 2)])  # K = 2
    >>> losses, jac = mtl_optax.value_and_jacrev(fun)({"w": jnp.ones(3)}, jnp.arange(3.0))
    >>> print(losses, jac["w"])
    [3. 3.] [[0. 1. 2.]
     [2. 2. 2.]]
  """
  def wrapped(params, *args, **kwargs):
    losses, vjp_fn, value = task_vjp(fun, params, args, has_aux, "value_and_jacrev", kwargs)
    (jac,) = jax.vmap(vjp_fn)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    return value, jac
  return wrapped


def task_weights(
    balancer: optax.GradientTransformation,
    state: optax.OptState,
    losses: jax.Array,
    params: Any = None,
    *,
    gram: jax.Array | None = None,
    **extra_args: Any,
) -> tuple[jax.Array, optax.OptState]:
  """The weights w (shape `(K,)`) of a balancer's update d = sum_i w_i g_i, with its new state.

  A loss balancer's weights are its row scalings s and need only `losses`. A Gram-based
  gradient balancer (or a chain of loss balancers and one) also needs `gram`, the K x K Gram
  matrix of the shared rows; w is then on the raw rows (a loss balancer before it included).
  The state update is the one the stacked path makes.

  Args:
    balancer: a loss balancer, a Gram-based gradient balancer, or an `optax.chain` of loss
      balancers and one gradient balancer (no optimizer).
    state: the balancer's state (`balancer.init(params)`).
    losses: `(K,)` losses.
    params: the parameters, for balancers whose `shared` mask is a callable on them.
    gram: `(K, K)` Gram matrix of the shared rows; needed by gradient balancers.
    **extra_args: further extra arguments of `update` (e.g. FAMO's `post_step_losses`).

  Returns:
    `(weights, new_state)`: the `(K,)` weights w of d = sum_i w_i g_i on the raw rows (not
    differentiated through) and the balancer's state after the update.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax, mtl_optax
    >>> tx = optax.chain(mtl_optax.log_losses(2), mtl_optax.imtl_g(2))
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> w, state = mtl_optax.task_weights(tx, tx.init(None), jnp.array([1.0, 2.0]), gram=gram)
    >>> print(np.asarray(w).round(3))  # on the raw rows, the 1 / L_i scaling included
    [0.508 0.246]
  """
  losses = jnp.asarray(losses)
  k = losses.shape[0]

  def gram_fn(mask):
    del mask
    if gram is None:
      raise ValueError("task_weights: this balancer is Gram-based; pass gram=, the K x K Gram "
                       "matrix of the shared rows.")
    if jnp.shape(gram) != (k, k):
      raise ValueError(f"task_weights: gram has shape {jnp.shape(gram)}, expected ({k}, {k}).")
    return jnp.asarray(gram)

  rows = GramRows(jnp.eye(k, dtype=jnp.promote_types(losses.dtype, jnp.float32)), gram_fn)
  out, new_state = apply_to_gram_rows(balancer, rows, state, params, losses, extra_args,
                                      "task_weights")
  weights = out.shared if isinstance(out, GramUpdate) else jnp.diag(out.coef)
  return jax.lax.stop_gradient(weights), new_state


def value_and_reweighted_grad(
    fun: Callable[..., Any],
    balancer: optax.GradientTransformation,
    has_aux: bool = False,
    *,
    chunk_size: int = 4,
) -> Callable[..., Any]:
  """The single-backward path of loss balancers, and the Gram-only path of gradient balancers.

  Wraps `fun(params, *args) -> losses[K]` into
  `f(params, state, *args, **extra_args) -> ((losses, grad), new_state)`, where `state` is
  `balancer.init(params)` and `extra_args` go to the balancer. `balancer` is a loss balancer
  (then `grad` is that of sum_i stop_gradient(s_i) L_i: one forward and one backward pass), a
  Gram-based gradient balancer (`mgda`, `nash_mtl`, `sum_tasks`, ...), or an `optax.chain` of
  loss balancers and one gradient balancer (no optimizer). A gradient balancer reads the K x K
  Gram matrix of the shared rows, computed without ever holding the K rows: for each chunk of
  `chunk_size` tasks, their rows (one VJP each) are contracted against the Jacobian (one JVP
  each), so memory is `chunk_size` rows rather than K; then `grad` = the VJP of
  sum_i w_i L_i (two VJPs when shared and task-specific leaves get different weights). Equal to
  the stacked path's update. With `has_aux`, `losses` is `(losses, aux)`.

  Args:
    fun: `fun(params, *args) -> losses` of shape `(K,)` (with `has_aux`: `(losses, aux)`).
    balancer: a loss balancer, a Gram-based gradient balancer, or an `optax.chain` of loss
      balancers and one gradient balancer, with no optimizer after it.
    has_aux: whether `fun` also returns auxiliary data.
    chunk_size: tasks whose rows are held at once while forming the Gram matrix.

  Returns:
    A function `f(params, state, *args, **extra_args) -> ((losses, grad), new_state)`, `grad`
    shaped like `params`: the stacked path's update, without the K rows.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> fun = lambda p, x: jnp.stack([jnp.sum((p["w"] - x) ** 2), jnp.sum(p["w"] ** 2)])
    >>> tx, params = mtl_optax.imtl_g(2), {"w": jnp.ones(2)}
    >>> step = mtl_optax.value_and_reweighted_grad(fun, tx)
    >>> (losses, grad), state = step(params, tx.init(params), jnp.array([2.0, 0.0]))
    >>> print(losses, np.asarray(grad["w"]).round(3))
    [2. 2.] [0. 2.]
  """
  check_positive_int(chunk_size, "value_and_reweighted_grad: chunk_size")

  def wrapped(params, state, *args, **extra_args):
    losses, vjp_fn, value = task_vjp(fun, params, args, has_aux, "value_and_reweighted_grad")
    gram_fn = chunked_gram(vjp_fn, losses, chunk_size)
    rows = GramRows(jnp.eye(losses.shape[0], dtype=losses.dtype), gram_fn)
    out, new_state = apply_to_gram_rows(balancer, rows, state, params, losses, extra_args,
                             "value_and_reweighted_grad")
    if isinstance(out, GramRows):  # loss balancers alone: the sum of the reweighted rows
      out = out.combine(jnp.ones(out.num_tasks, out.coef.dtype), None, None)
    present = jnp.isfinite(losses)
    return (value, pullback_present(vjp_fn, out, losses, present)[0]), new_state
  return wrapped


def apply_to_gram_rows(balancer: optax.GradientTransformation, rows: GramRows,
                       state: optax.OptState, params: Any, losses: jax.Array,
                       extra_args: dict, name: str) -> tuple[GramRows | GramUpdate, Any]:
  """Runs `balancer` on Gram rows; its output must be Gram rows or a Gram update.

  A transformation that is not a balancer (an optimizer) meets rows or weights it cannot
  compute with: the `TypeError` that gives, or an output that is neither, becomes a message
  saying what the path takes."""
  message = (f"{name} takes a loss balancer, a Gram-based gradient balancer, or an "
             "optax.chain of them, without an optimizer: apply the optimizer to the gradient "
             "it returns")
  update = optax.with_extra_args_support(balancer).update
  try:
    out, new_state = update(rows, state, params, losses=losses, **extra_args)
  except TypeError as error:  # an optimizer met GramRows or GramUpdate (no arrays to update)
    raise ValueError(f"{message}.") from error
  if not isinstance(out, (GramRows, GramUpdate)):
    raise ValueError(f"{message}; the balancer returned {type(out).__name__}, not task weights.")
  return out, new_state


class _ChunkedGram:
  """mask -> J M J^T, M the projection onto the leaves `mask` marks shared (None: all).

  Column i is J (M J^T e_i): a VJP, then a JVP (the VJP's transpose), in chunks of
  `chunk_size` tasks, so at most `chunk_size` rows of J exist at once. `scaled(mask)` gives
  the Gram matrix of J / 2^e with e the exponent of J's largest finite entry (K more VJPs to
  find it): the cotangents divided by 2^e make rows J^T e_i / 2^e, exactly, in binary floating
  point, so rows at any finite scale give a Gram matrix of order 1.
  """

  def __init__(self, vjp_fn: Callable, losses: jax.Array, chunk_size: int):
    self._vjp_fn, self._losses, self._chunk_size = vjp_fn, losses, chunk_size
    self._jvp_fn = jax.linear_transpose(vjp_fn, losses)

  def _row(self, e, mask):
    (row,) = self._vjp_fn(e)
    if mask is not None:
      row = tree_lib.map_masked(lambda x: x, jnp.zeros_like, mask, row)
    return row

  def _gram(self, mask, scale=None):
    def column(e):
      if scale is None:
        return self._jvp_fn((self._row(e, mask),))[0]
      (col,) = self._jvp_fn((self._row(e * scale, mask),))
      return col * scale

    k = self._losses.shape[0]
    cols = jax.lax.map(column, jnp.eye(k, dtype=self._losses.dtype),
                       batch_size=min(self._chunk_size, k))
    return 0.5 * (cols + cols.T)

  def __call__(self, mask):
    return self._gram(mask)

  def scaled(self, mask):
    k, dtype = self._losses.shape[0], self._losses.dtype
    peaks = jax.lax.map(lambda e: tree_lib.peak(self._row(e, mask)), jnp.eye(k, dtype=dtype))
    exponent = tree_lib.exponent_of(jnp.max(peaks))
    return self._gram(mask, jnp.ldexp(jnp.ones((), dtype), -exponent)), exponent


def chunked_gram(vjp_fn: Callable, losses: jax.Array, chunk_size: int) -> _ChunkedGram:
  """mask -> J M J^T, M the projection onto the leaves `mask` marks shared (None: all), formed
  `chunk_size` rows at a time (see `_ChunkedGram`, which also measures the rows' scale)."""
  return _ChunkedGram(vjp_fn, losses, chunk_size)


def pullback_gram(vjp_fn: Callable, out: GramUpdate, dtype) -> Any:
  """J^T w on shared leaves and J^T v on task-specific ones (one VJP when w is v).

  Two VJPs, each kept on its own leaves only, so XLA drops the rest of each: the second
  stops at the task-specific leaves, and on many devices one gradient is reduced, not two.
  """
  w = jax.lax.stop_gradient(out.shared).astype(dtype)
  if out.mask is None or out.specific is out.shared:
    return vjp_fn(w)[0]
  v = jax.lax.stop_gradient(out.specific).astype(dtype)
  shared, _ = tree_lib.split(vjp_fn(w)[0], out.mask)
  _, specific = tree_lib.split(vjp_fn(v)[0], out.mask)
  return tree_lib.merge(shared, specific, out.mask)


def pullback_present(vjp_fn: Callable, out: GramUpdate, losses: jax.Array,
                     present: jax.Array) -> tuple[Any, jax.Array]:
  """`pullback_gram`, with the tasks whose gradient row is not finite left out.

  One backward pass mixes every task's partial derivatives, so a task whose row has a NaN
  (a loss on a batch without its labels) makes J^T w NaN even at weight 0. When J^T w is not
  finite, it is formed again one row at a time (K more VJPs, run only then), leaving out the
  rows that are not finite.

  Args:
    vjp_fn: the VJP of the K losses.
    out: the balancer's weights on the rows.
    losses: the K losses (for their dtype and K).
    present: `(K,)` bool, the tasks taking part so far.

  Returns:
    `(grad, present)`: the gradient, and `present` without the tasks whose row was not finite.
  """
  k, dtype = losses.shape[0], losses.dtype
  grad = pullback_gram(vjp_fn, out, dtype)
  w = jax.lax.stop_gradient(out.shared).astype(dtype)
  v = jax.lax.stop_gradient(out.specific).astype(dtype)

  def finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))

  def by_rows(_):
    def body(i, carry):
      acc, rows_ok = carry
      (row,) = vjp_fn(jax.nn.one_hot(i, k, dtype=dtype))
      ok = finite(row) & present[i]
      if out.mask is None:
        scaled = jax.tree.map(lambda r: w[i] * r, row)
      else:
        scaled = tree_lib.map_masked(lambda r: w[i] * r, lambda r: v[i] * r, out.mask, row)
      acc = jax.tree.map(lambda a, s: a + jnp.where(ok, s, jnp.zeros((), s.dtype)), acc, scaled)
      return acc, rows_ok.at[i].set(ok)
    zeros = jax.tree.map(jnp.zeros_like, grad)
    return jax.lax.fori_loop(0, k, body, (zeros, present))

  return jax.lax.cond(finite(grad), lambda _: (grad, present), by_rows, None)
