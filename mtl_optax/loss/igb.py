"""Improvable gap balancing, version 1 (Dai et al., UAI 2023), and its base-loss bookkeeping."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.checks import check_positive_int
from mtl_optax.loss.base import reweighter
from mtl_optax.present import num_present, softmax_present


class IGBv1State(NamedTuple):
  """Running sum of the raw losses of epoch 2 (0-indexed epoch 1); L_base is its mean over the
  steps each task took part in."""
  count: jax.Array     # steps taken
  epoch2_sum: jax.Array  # (K,)
  epoch2_steps: jax.Array  # (K,) steps of epoch 2 each task took part in


def base_loss_init(num_tasks: int) -> IGBv1State:
  return IGBv1State(jnp.zeros([], jnp.int32), jnp.zeros((num_tasks,), jnp.float32),
                    jnp.zeros((num_tasks,), jnp.int32))


def base_loss_ready(base: IGBv1State, steps_per_epoch: int) -> jax.Array:
  """Whether L_base exists: true from the first step of epoch 3 on."""
  return base.count >= 2 * steps_per_epoch


def base_loss_value(base: IGBv1State, steps_per_epoch: int) -> jax.Array:
  """L_base = mean over epoch 2's batches of the raw losses (ones until it exists, and for a
  task absent from every step of epoch 2)."""
  seen = base.epoch2_steps > 0
  mean = base.epoch2_sum / jnp.where(seen, base.epoch2_steps, 1)
  return jnp.where(base_loss_ready(base, steps_per_epoch) & seen, mean, 1.0)


def base_loss_update(base: IGBv1State, losses: jax.Array, steps_per_epoch: int,
                     present: jax.Array) -> IGBv1State:
  """Counts a step and adds the present tasks' losses to the sum when it falls in epoch 2."""
  add = (base.count // steps_per_epoch == 1) & present
  return IGBv1State(base.count + 1, base.epoch2_sum + jnp.where(add, losses, 0.0),
                    base.epoch2_steps + add)


def igb_v1(num_tasks: int, steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
  """IGBv1: minimize sum_i lambda_i log L_i, lambda = K softmax(L / L_base) from epoch 3.

  Dai et al. 2023 (Improvable Gap Balancing), Alg. 1 and Eq. 3: lambda = 1 in epochs 1-2
  (plain log losses), L_base = mean raw loss over epoch 2, lambda treated as a constant,
  so s_i = lambda_i / L_i.

  Args:
    num_tasks: K.
    steps_per_epoch: steps that make one epoch (L_base is the mean over epoch 2's steps).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is an
    `IGBv1State`. Needs positive `losses`.

  References:
    Dai et al. 2023, "Improvable Gap Balancing for Multi-Task Learning", UAI,
    arXiv:2307.15429, Alg. 1 and Eq. 3.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.igb_v1(2, steps_per_epoch=10)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # 1 / L_i before epoch 3
    [1.  0.5]
  """
  num_tasks = check_positive_int(num_tasks, "igb_v1: num_tasks")
  steps_per_epoch = check_positive_int(steps_per_epoch, "igb_v1: steps_per_epoch")

  def weights(losses, state, present):
    gap = losses / base_loss_value(state, steps_per_epoch)
    lam = jnp.where(base_loss_ready(state, steps_per_epoch),
                    num_present(present) * softmax_present(gap, present), 1.0)
    return lam / losses, base_loss_update(state, losses, steps_per_epoch, present)

  return reweighter("igb_v1", num_tasks, lambda: base_loss_init(num_tasks), weights,
                    needs_positive=True, handles_absent=True)
