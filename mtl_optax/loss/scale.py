"""Stateless, scale-invariant loss balancers."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mtl_optax.loss.base import reweighter
from mtl_optax.present import num_present


def equal_weights(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """EW: s_i = 1 (the identity; `sum_tasks` alone is equal weighting).

  Args:
    num_tasks: K.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; stateless.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.equal_weights(2)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params))
    >>> print(np.asarray(state.weights).round(3))  # s_i
    [1. 1.]
  """
  return reweighter("equal_weights", num_tasks, lambda: optax.EmptyState(),
                    lambda losses, state: (jnp.ones((num_tasks,)), state), needs_losses=False)


def log_losses(num_tasks: int, eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """SI: minimize sum_i log(L_i + eps), so s_i = 1 / (L_i + eps).

  Navon et al. 2022 (Nash-MTL, SI baseline); Lin et al. 2023 (DB-MTL, Sec. 3.1, eps = 1e-8).

  Args:
    num_tasks: K.
    eps: added to the losses, s_i = 1 / (L_i + eps).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; stateless. Needs
    positive `losses`.

  References:
    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", ICML, arXiv:2202.01017
    (the SI baseline); Lin et al. 2023, "Dual-Balancing for Multi-Task Learning",
    arXiv:2308.12029, Sec. 3.1 (log transformation, eps = 1e-8).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.log_losses(2)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # s_i
    [1.  0.5]
  """
  def weights(losses, state):
    return 1.0 / (losses + eps), state
  return reweighter("log_losses", num_tasks, lambda: optax.EmptyState(), weights,
                    needs_positive=True)


def gls(num_tasks: int) -> optax.GradientTransformationExtraArgs:
  """GLS: minimize (prod_i L_i)^(1/K), so s_i = GLS / (K L_i).

  Chennupati et al. 2019 (MultiNet++, geometric loss strategy).

  Args:
    num_tasks: K.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; stateless. Needs
    positive `losses`.

  References:
    Chennupati et al. 2019, "MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss
    Strategy for Multi-Task Learning", CVPR Workshops, arXiv:1904.08492, the geometric loss
    strategy (equation number not checked).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.gls(2)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # s_i
    [0.707 0.354]
  """
  def weights(losses, state, present):  # the geometric mean of the present tasks' losses
    n = num_present(present)
    geometric_mean = jnp.exp(jnp.sum(jnp.where(present, jnp.log(losses), 0.0)) / n)
    return geometric_mean / (n * losses), state
  return reweighter("gls", num_tasks, lambda: optax.EmptyState(), weights, needs_positive=True,
                    handles_absent=True)
