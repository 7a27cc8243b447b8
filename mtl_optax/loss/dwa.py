"""Dynamic weight average."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.checks import check_positive_int
from mtl_optax.loss.base import reweighter
from mtl_optax.present import num_present, softmax_present


class DWAState(NamedTuple):
  count: jax.Array       # steps taken
  epoch_sum: jax.Array   # (K,) sum of raw losses over the current epoch
  epoch_steps: jax.Array  # (K,) steps of the current epoch each task took part in
  last: jax.Array        # (K,) average loss of the previous epoch
  before_last: jax.Array  # (K,) average loss of the epoch before it


def dwa(num_tasks: int, steps_per_epoch: int,
        temperature: float = 2.0) -> optax.GradientTransformationExtraArgs:
  """DWA: w = K softmax(r / T), r_i = Lbar_i(e-1) / Lbar_i(e-2); w = 1 in epochs 0 and 1.

  Liu et al. 2019 (MTAN), Eq. 1, with epoch-average losses as in LibMTL. A zero average in
  the denominator counts as 1, so zero losses give finite weights. An epoch's average of a
  task is over the steps it took part in; absent tasks are left out of the softmax.

  Args:
    num_tasks: K.
    steps_per_epoch: steps that make one epoch (the loss averages are per epoch).
    temperature: T of the softmax.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is a
    `DWAState`. Needs `losses`.

  References:
    Liu et al. 2019, "End-to-End Multi-Task Learning with Attention", CVPR, arXiv:1803.10704,
    Eq. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.dwa(2, steps_per_epoch=10)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # 1 in epochs 0 and 1
    [1. 1.]
  """
  num_tasks = check_positive_int(num_tasks, "dwa: num_tasks")
  steps_per_epoch = check_positive_int(steps_per_epoch, "dwa: steps_per_epoch")

  def init():
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return DWAState(jnp.zeros([], jnp.int32), zeros, jnp.zeros((num_tasks,), jnp.int32), zeros,
                    zeros)

  def weights(losses, state, present):
    ready = state.count >= 2 * steps_per_epoch
    ratio = state.last / jnp.where(ready & (state.before_last > 0), state.before_last, 1.0)
    softmax = softmax_present(ratio / temperature, present)
    w = jnp.where(ready, num_present(present) * softmax, 1.0)
    # An epoch's mean loss of a task is over the steps it took part in.
    epoch_sum = state.epoch_sum + jnp.where(present, losses, 0.0)
    epoch_steps = state.epoch_steps + present
    epoch_done = (state.count + 1) % steps_per_epoch == 0
    mean = jnp.where(epoch_steps > 0, epoch_sum / jnp.maximum(epoch_steps, 1), state.last)
    new_state = DWAState(
        count=state.count + 1,
        epoch_sum=jnp.where(epoch_done, 0.0, epoch_sum),
        epoch_steps=jnp.where(epoch_done, 0, epoch_steps),
        # A task absent for the whole epoch keeps both (the epoch did not happen for it).
        last=jnp.where(epoch_done & (epoch_steps > 0), mean, state.last),
        before_last=jnp.where(epoch_done & (epoch_steps > 0), state.last, state.before_last),
    )
    return w, new_state

  return reweighter("dwa", num_tasks, init, weights, handles_absent=True)
