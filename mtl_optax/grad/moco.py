"""MoCo: multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import aggregator, check_buffers, shared_zeros
from mtl_optax.present import project_present, simplex_part, softmax_present
from mtl_optax.checks import check_choice, check_positive_int

_EPS = 1e-8  # LibMTL's guard when normalizing the rows

SimplexMap = Literal["softmax", "projection"]


class MoCoState(NamedTuple):
  count: jax.Array    # steps taken
  tracking: Any       # y: the tracked per-task gradients, shaped like the stacked shared rows
  weights: jax.Array  # (K,) lambda, on the simplex


def moco(num_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, *, normalize: bool = True,
         simplex: SimplexMap = "softmax",
         shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """MoCo: lambda-weighted sum of tracked gradients y, lambda updated on the simplex.

  Fernando et al. 2023, Alg. 1, in LibMTL's form (its defaults): at step k (from 1),
  y_i <- y_i - beta_k (y_i - g_i) with beta_k = beta / k^beta_sigma;
  lambda <- S(lambda - gamma_k (Y Y^T + rho I) lambda) with gamma_k = gamma / k^gamma_sigma;
  d = sum_i lambda_i y_i. S is a softmax (LibMTL, and the authors' Cityscapes code) or the
  Euclidean projection onto the simplex (`simplex="projection"`: the paper, and the authors'
  NYUv2 code). With `normalize` (LibMTL) the rows enter as g_i / (||g_i|| + 1e-8) * L_i, which
  needs `losses`. y starts at 0 and lambda at 1/K. Task-specific leaves get the plain sum.

  Args:
    num_tasks: K.
    beta: the tracking rate, beta_k = beta / k^beta_sigma.
    beta_sigma: its decay exponent.
    gamma: the step size of lambda, gamma_k = gamma / k^gamma_sigma.
    gamma_sigma: its decay exponent.
    rho: the ridge in (Y Y^T + rho I).
    normalize: rows enter as g_i / (||g_i|| + 1e-8) * L_i (LibMTL); needs `losses`.
    simplex: 'softmax' or 'projection', the map S onto the simplex.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a `BalancerState`
    (`weights`: lambda, on the tracked gradients) around a `MoCoState` (count, tracked
    gradients, lambda).

  References:
    Fernando et al. 2023, "Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach", ICLR, arXiv:2210.12624, Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.moco(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.136 0.476]
  """
  check_positive_int(num_tasks, "moco: num_tasks")
  check_choice(simplex, ("softmax", "projection"), "moco: simplex")
  to_simplex = (jax.nn.softmax if simplex == "softmax"
                else optax.projections.projection_simplex)
  simplex_of_present = softmax_present if simplex == "softmax" else project_present

  def init(params):
    return MoCoState(jnp.zeros([], jnp.int32),
                     shared_zeros(params, num_tasks, shared, "moco"),
                     jnp.full((num_tasks,), 1.0 / num_tasks, tree_lib.weight_dtype(params)))

  def aggregate(rows, state, losses, params, present, axis_name=None):
    del params
    check_buffers("moco", state.tracking, rows)
    # Absent tasks' y stay as they were: one select inside the EMA's expression, so their rows
    # (maybe NaN, and NaN after the normalization) are never read into the state.
    step = (state.count + 1).astype(jnp.float32)
    if normalize:
      norms = tree_lib.row_norms(rows, axis_name=axis_name)
      rows = tree_lib.scale_rows(losses / (norms + _EPS), rows)
    beta_k = beta / step**beta_sigma
    tracking = optax.tree.cast_like(  # y <- y - beta (y - g)
        optax.tree.update_moment(rows, state.tracking, 1.0 - beta_k, 1), state.tracking)
    tracking = jax.tree.map(
        lambda new, old: jnp.where(present.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
        tracking, state.tracking)
    gram = tree_lib.gram(tracking, axis_name=axis_name) + rho * jnp.eye(num_tasks)
    rate = gamma / step**gamma_sigma

    def some(w):  # MoCo's step on the present tasks, from their lambda renormalized
      part, mass = simplex_part(w, present)
      both = present[:, None] & present[None, :]
      new = simplex_of_present(part - rate * jnp.where(both, gram, 0.0) @ part, present)
      return new, jnp.where(present, mass * new, w).astype(w.dtype)

    full = lambda w: (to_simplex(w - rate * gram @ w),) * 2
    weights, kept = jax.lax.cond(jnp.all(present), full, some, state.weights)
    return (tree_lib.combine(weights, tracking), weights, None,
            MoCoState(state.count + 1, tracking, kept))

  return aggregator("moco", num_tasks, init, aggregate, shared=shared, needs_losses=normalize,
                    handles_absent=True)
