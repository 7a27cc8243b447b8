"""MoDo: multi-objective gradient with double sampling (Chen et al. 2023)."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.present import project_present, simplex_part


class MoDoState(NamedTuple):
  lambd: jax.Array  # (K,) the weights on the simplex (1/K at the start)


def modo_weights(cross_gram: jax.Array, lambd: jax.Array, *, gamma: float = 1e-3,
                 rho: float = 0.1) -> jax.Array:
  """MoDo's weight step: lambda <- Pi_simplex(lambda - gamma (G_a G_b^T lambda + rho lambda)).

  One projected stochastic gradient step on 1/2 ||G^T lambda||^2 + rho/2 ||lambda||^2, its
  gradient estimated without bias from two independent mini-batches a and b
  (Chen et al. 2023, Alg. 1, Eq. 8).

  Args:
    cross_gram: `(K, K)` cross-Gram matrix C = G_a G_b^T of two independent mini-batches'
      rows (the Gram matrix M of one batch for the deterministic variant).
    lambd: `(K,)` the current weights, on the simplex.
    gamma: the weights' step size.
    rho: the weights' L2 regularization.

  Returns:
    `(K,)` the new weights, on the simplex.

  References:
    Chen et al. 2023, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS, arXiv:2305.16419, Alg. 1 and Eq. 8;
    checked against LibMTL's `LibMTL/weighting/MoDo.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> cross = jnp.array([[1.0, -0.5], [-0.5, 4.25]])
    >>> print(np.asarray(mtl_optax.modo_weights(cross, jnp.full(2, 0.5), gamma=0.1)).round(3))
    [0.581 0.419]
  """
  step = lambd - gamma * (cross_gram @ lambd + rho * lambd)
  return optax.projections.projection_simplex(step).astype(lambd.dtype)


def modo(
    num_tasks: int,
    gamma: float = 1e-3,
    rho: float = 0.1,
    *,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """MoDo: d = sum_i lambda_i g_i^(c), lambda stepped with the cross-Gram of batches a and b.

  Chen et al. 2023 (Three-Way Trade-Off in Multi-Objective Learning), Alg. 1: three
  independent mini-batches per step; lambda takes one projected step with C = G_a G_b^T
  (`modo_weights`), then the update is the lambda-weighted sum of batch c's rows. Batch c is
  the stacked Jacobian passed as `updates`; batches a and b come as the extra argument
  `sample_jacobians=(jac_a, jac_b)` (see README, "More than one Jacobian"); without it, the
  Gram matrix of `updates` stands in for C (a deterministic variant, not the paper's).
  Task-specific leaves get the plain sum of batch c's rows (LibMTL: their mean over the three
  batches).

  Args:
    num_tasks: K.
    gamma: lambda's step size (LibMTL's `MoDo_gamma`, 1e-3).
    rho: lambda's L2 regularization (LibMTL's `MoDo_rho`, 0.1).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `MoDoState`.

  References:
    Chen et al. 2023, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS, arXiv:2305.16419, Alg. 1; checked
    against LibMTL's `LibMTL/weighting/MoDo.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.modo(2, gamma=0.1)
    >>> jac_c = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> jac_a = {"w": jnp.array([[1.0, 0.5], [0.0, 2.0]])}
    >>> jac_b = {"w": jnp.array([[2.0, 0.0], [-1.0, 1.0]])}
    >>> d, state = tx.update(jac_c, tx.init({"w": jnp.zeros(2)}),
    ...                      sample_jacobians=(jac_a, jac_b))
    >>> print(np.asarray(state.weights).round(3), np.asarray(d["w"]).round(3))
    [0.512 0.488] [0.269 0.975]
  """
  for value, what in ((gamma, "gamma"), (rho, "rho")):
    if isinstance(value, numbers.Real) and not value >= 0:
      raise ValueError(f"modo: {what} must be >= 0, got {value!r}.")

  def init(params):
    dtype = tree_lib.weight_dtype(params)
    return MoDoState(jnp.full((num_tasks,), 1.0 / num_tasks, dtype))

  def weights(cross, state, losses, present):
    del losses
    cross = cross.astype(state.lambd.dtype)

    def some(lambd):  # the step of MoDo on the present tasks, from their lambda renormalized
      part, mass = simplex_part(lambd, present)
      step = part - gamma * (cross @ part + rho * part)
      new = project_present(step, present)
      return new, jnp.where(present, mass * new, lambd).astype(lambd.dtype)

    full = lambda lambd: (modo_weights(cross, lambd, gamma=gamma, rho=rho),) * 2
    w, lambd = jax.lax.cond(jnp.all(present), full, some, state.lambd)
    return w, None, MoDoState(lambd)

  return gram_aggregator("modo", num_tasks, init, weights, shared=shared, cross_gram=True,
                         handles_absent=True)
