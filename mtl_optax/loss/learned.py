"""Loss balancers with learned per-task scales, each trained by its own optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.checks import check_positive_int
from mtl_optax.loss.base import reweighter


class LearnedScaleState(NamedTuple):
  log_scale: jax.Array       # (K,) the learned s_i
  opt_state: optax.OptState  # the inner optimizer's state for s


def _learned_scale(
    name: str,
    num_tasks: int,
    init_value: float,
    optimizer: optax.GradientTransformation,
    weight: Callable[[jax.Array], jax.Array],
    grad: Callable[[jax.Array, jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
  """Rows scaled by `weight(s)`; s takes one `optimizer` step on `grad(s, losses)`."""
  num_tasks = check_positive_int(num_tasks, f"{name}: num_tasks")

  def init():
    log_scale = jnp.full((num_tasks,), init_value, jnp.float32)
    return LearnedScaleState(log_scale, optimizer.init(log_scale))

  def weights(losses, state):
    s = state.log_scale
    step, opt_state = optimizer.update(grad(s, losses), state.opt_state, s)
    return weight(s), LearnedScaleState(optax.apply_updates(s, step), opt_state)

  return reweighter(name, num_tasks, init, weights)


def uw(num_tasks: int, learning_rate: optax.ScalarOrSchedule = 1e-3,
       init_log_var: float = -0.5) -> optax.GradientTransformationExtraArgs:
  """UW: minimize sum_i exp(-s_i) L_i + s_i over the model and s (Adam on s).

  Kendall et al. 2018, Eq. 7 in LibMTL's form (s = log sigma^2, init -0.5; torchjd uses 0).
  Rows are scaled by exp(-s_i); d/ds_i = 1 - exp(-s_i) L_i.

  Args:
    num_tasks: K.
    learning_rate: of the Adam step on s.
    init_log_var: the initial s_i = log sigma_i^2.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is a
    `LearnedScaleState`. Needs `losses`.

  References:
    Kendall et al. 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR, arXiv:1705.07115, Eq. 7.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.uw(2)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # exp(0.5)
    [1.649 1.649]
  """
  return _learned_scale(
      "uw", num_tasks, init_log_var, optax.adam(learning_rate),
      weight=lambda s: jnp.exp(-s),
      grad=lambda s, losses: 1.0 - jnp.exp(-s) * losses)


def imtl_l(num_tasks: int, learning_rate: optax.ScalarOrSchedule = 1e-3,
           init_scale: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """IMTL-L: minimize sum_i exp(s_i) L_i - s_i over the model and s (Adam on s).

  Liu et al. 2021 (IMTL, ICLR), Sec. 3.2, Eq. 3. Rows are scaled by exp(s_i);
  d/ds_i = exp(s_i) L_i - 1.

  Args:
    num_tasks: K.
    learning_rate: of the Adam step on s.
    init_scale: the initial s_i.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is a
    `LearnedScaleState`. Needs `losses`.

  References:
    Liu et al. 2021, "Towards Impartial Multi-task Learning", ICLR 2021 (no arXiv version;
    OpenReview id IMPnRXEWpvr), Sec. 3.2, Eq. 3.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.imtl_l(2)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # exp(0)
    [1. 1.]
  """
  return _learned_scale(
      "imtl_l", num_tasks, init_scale, optax.adam(learning_rate),
      weight=jnp.exp,
      grad=lambda s, losses: jnp.exp(s) * losses - 1.0)
