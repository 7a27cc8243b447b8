"""CAGrad: the best worst-case improvement within a ball around the mean gradient."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_choice
from mtl_optax.grad.base import gram_aggregator

Rescale = Literal["none", "1+c^2", "1+c"]
RESCALES: tuple[Rescale, ...] = ("none", "1+c^2", "1+c")


def unit_gram(m: jax.Array, n: jax.Array | int | None = None) -> jax.Array:
  """M divided by the mean squared row norm trace(M) / K (floored), so the reference code's
  absolute epsilons (1e-8) act relative to the gradients' scale (K: `n` when given, the number
  of present tasks)."""
  return m / jnp.maximum(jnp.trace(m) / (m.shape[0] if n is None else n), 1e-30)


def present_count(m: jax.Array, present: jax.Array | None) -> tuple[jax.Array, jax.Array | int]:
  """`(present, n)`: the `(K,)` bool of the present tasks (all when None) and their number
  (K, a Python int, when None; else a float of M's dtype, at least 1)."""
  if present is None:
    return jnp.ones(m.shape[:1], bool), m.shape[0]
  return present, jnp.maximum(jnp.sum(present), 1).astype(m.dtype)


def combined_norm(w: jax.Array, m: jax.Array) -> jax.Array:
  """sqrt(w^T M w + 1e-8) = ||g_w|| as the reference codes smooth it (rounding kept >= 0)."""
  return jnp.sqrt(jnp.maximum(w @ m @ w, 0.0) + 1e-8)


def resolved_sq_norm(w: jax.Array, m: jax.Array) -> jax.Array:
  """||g_w||^2 = w^T M w, or 0 at its rounding level K eps |w|^T |M| |w| (g_w = 0 to rounding)."""
  sq = w @ m @ w
  level = m.shape[0] * jnp.finfo(m.dtype).eps * (jnp.abs(w) @ jnp.abs(m) @ jnp.abs(w))
  return jnp.where(sq > level, sq, 0.0)


def ball_weights(
    m: jax.Array, w: jax.Array, radius: jax.Array, c: float, rescale: Rescale,
    scale_by_num_tasks: bool, present: jax.Array | None = None
) -> jax.Array:
  """Weights of d = g0 + radius / (||g_w|| + 1e-8) g_w, rescaled (Liu et al. 2021a, Eq. 9).

  rescale 'none': d; '1+c^2': d / (1 + c^2); '1+c': d / (1 + c); then times K if
  `scale_by_num_tasks`. A g_w that is 0 to rounding (`resolved_sq_norm`) adds nothing, as
  g_w = 0 does: its weights radius / 1e-8 w would multiply the rounding of the rows' sum.
  With `present`, g0 and K are those of the present tasks.
  """
  present, k = present_count(m, present)
  gw_sq = resolved_sq_norm(w, m)
  d = jnp.where(present, 1.0 / k, 0.0) + jnp.where(
      gw_sq > 0, radius / (jnp.sqrt(gw_sq) + 1e-8), 0.0) * w
  d = d / {"none": 1.0, "1+c^2": 1.0 + c**2, "1+c": 1.0 + c}[rescale]
  return d * k if scale_by_num_tasks else d


def cagrad_weights(
    gram: jax.Array,
    c: float = 0.4,
    *,
    rescale: Rescale = "1+c^2",
    scale_by_num_tasks: bool = True,
    max_iter: int = 500,
    tol: float = 1e-7,
    present: jax.Array | None = None,
) -> jax.Array:
  """CAGrad's weights: d = g0 + c ||g0|| g_w / ||g_w|| with w = argmin_{simplex}
  g_w . g0 + c ||g0|| ||g_w|| (Liu et al. 2021a, Eq. 9), as weights on the rows.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    c: the radius factor of the ball around the mean gradient g0.
    rescale: 'none' | '1+c^2' | '1+c', the division of d (see `cagrad`).
    scale_by_num_tasks: multiply the weights by K (the authors' code).
    max_iter: step cap of the simplex solver (`solvers.simplex_minimize`).
    tol: its tolerance on the change of w.
    present: `(K,)` bool of the tasks that take part (None: all); M must be 0 on the others'
      rows and columns. The weights are those of the present rows alone (0 elsewhere): the
      simplex, g0 and K are the present tasks'.

  Returns:
    `(K,)` weights of d = sum_i w_i g_i.

  References:
    Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS,
    arXiv:2110.14048, Eq. 9.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> print(np.asarray(jax.jit(mtl_optax.cagrad_weights)(gram)).round(3))
    [1.573 0.862]
  """
  if present is not None:  # the usual step (every task present) as without `present`
    full = lambda g: cagrad_weights(g, c, rescale=rescale, scale_by_num_tasks=scale_by_num_tasks,
                                    max_iter=max_iter, tol=tol)
    some = lambda g: _cagrad_weights(g, c, rescale, scale_by_num_tasks, max_iter, tol, present)
    return jax.lax.cond(jnp.all(present), full, some, gram)
  return _cagrad_weights(gram, c, rescale, scale_by_num_tasks, max_iter, tol, None)


def _cagrad_weights(gram, c, rescale, scale_by_num_tasks, max_iter, tol, present):
  k = gram.shape[0]
  if present is None:
    m = unit_gram(gram)
    mean, mean_row, w0 = jnp.mean(m), jnp.mean(m, axis=1), jnp.full((k,), 1.0 / k, m.dtype)
  else:
    present, n = present_count(gram, present)
    m = unit_gram(gram, n)
    mean, mean_row = jnp.sum(m) / (n * n), jnp.sum(m, axis=1) / n
    w0 = jnp.where(present, 1.0 / n, 0.0).astype(m.dtype)
  radius = c * jnp.sqrt(jnp.maximum(mean, 0.0) + 1e-8) + 1e-8
  objective = lambda w: w @ mean_row + radius * combined_norm(w, m)
  w = solvers.simplex_minimize(objective, w0, max_iter=max_iter, tol=tol, present=present)
  return ball_weights(m, w, radius, c, rescale, scale_by_num_tasks, present)


def cagrad(
    num_tasks: int,
    c: float = 0.4,
    *,
    rescale: Rescale = "1+c^2",
    scale_by_num_tasks: bool = True,
    max_iter: int = 500,
    tol: float = 1e-7,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """CAGrad: d = g0 + c ||g0|| g_w / ||g_w||, w = argmin_{simplex} g_w . g0 + c ||g0|| ||g_w||.

  Liu et al. 2021a (Conflict-Averse Gradient Descent), Eq. 9 (the dual of Eq. 3), as in the
  reference code (Cranial-XIX/CAGrad): ||g0|| = sqrt(mean(M) + 1e-8), radius c ||g0|| + 1e-8,
  objective w^T M 1/K + radius sqrt(w^T M w + 1e-8), solved by FISTA on the simplex
  (`solvers.simplex_minimize`) instead of SLSQP. Defaults: c = 0.4 (the NYUv2 script), rescale
  '1+c^2' (d / (1 + c^2): the reference's rescale=1; 'none' and '1+c' are its 0 and 2), and
  `scale_by_num_tasks=True`: the authors' code multiplies d by K to
  match the sum of losses (LibMTL does not: pass False). The epsilons act on M / (trace/K), a
  scale-free deviation from the reference. Task-specific leaves get the plain sum. The
  weights are `cagrad_weights`.

  Args:
    num_tasks: K.
    c: the radius factor of the ball around the mean gradient g0 (c = 0: g0 itself).
    rescale: 'none' (d), '1+c^2' (d / (1 + c^2)) or '1+c' (d / (1 + c)).
    scale_by_num_tasks: multiply d by K (the authors' code; LibMTL: False).
    max_iter: step cap of the simplex solver (`solvers.simplex_minimize`).
    tol: its tolerance on the change of w.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` holding the last weights.

  References:
    Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS,
    arXiv:2110.14048, Eq. 9 (dual of Eq. 3).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.cagrad(2), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [1.142 1.724]
  """
  check_choice(rescale, RESCALES, "cagrad: rescale")

  def weights(m, state, losses, present):
    del losses
    w = cagrad_weights(m, c, rescale=rescale, scale_by_num_tasks=scale_by_num_tasks,
                       max_iter=max_iter, tol=tol, present=present)
    return w, None, state

  return gram_aggregator("cagrad", num_tasks, lambda params: optax.EmptyState(), weights,
                         shared=shared, handles_absent=True)
