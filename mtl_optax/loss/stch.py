"""STCH: smooth Tchebycheff scalarization of the task losses (Lin et al., ICML 2024)."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.checks import check_nonnegative_int, check_positive_int
from mtl_optax.loss.base import reweighter
from mtl_optax.present import num_present, softmax_present


class STCHState(NamedTuple):
  count: jax.Array      # steps taken
  nadir_sum: jax.Array  # (K,) sum of the raw losses over the nadir epoch
  nadir_steps: jax.Array  # (K,) steps of the nadir epoch each task took part in


def stch(num_tasks: int, steps_per_epoch: int, mu: float = 1.0,
         warmup_epochs: int = 4) -> optax.GradientTransformationExtraArgs:
  """STCH: minimize K mu log sum_i exp(log(L_i / z_i) / mu), so s_i = K softmax(l / mu)_i / L_i.

  Lin et al. 2024 (Smooth Tchebycheff Scalarization for Multi-Objective Optimization),
  Eq. 9 on log losses as LibMTL's `STCH.py`: with l_i = log(L_i / z_i), the smooth maximum
  mu log sum_i exp(l_i / mu), times K; its gradient in L_i is K softmax(l / mu)_i / L_i.
  Epochs 0 .. `warmup_epochs` - 1 minimize sum_i log L_i (s_i = 1 / L_i); epoch
  `warmup_epochs` does the same while averaging the raw losses into the nadir point z; the
  smooth Tchebycheff objective takes over from the next epoch. LibMTL takes
  log(L_i / z_i + 1e-20); here losses must be positive (inside jit, a task with a non-positive loss sits out the step), as for
  every log-based balancer.

  Args:
    num_tasks: K.
    steps_per_epoch: steps that make one epoch (z is the mean over one epoch's steps).
    mu: the smoothing parameter, > 0 (LibMTL's `STCH_mu`, 1; mu -> 0: the Tchebycheff max).
    warmup_epochs: epochs of log losses before the nadir epoch (LibMTL's `STCH_warmup_epoch`).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is an
    `STCHState`. Needs positive `losses`.

  References:
    Lin et al. 2024, "Smooth Tchebycheff Scalarization for Multi-Objective Optimization",
    ICML, arXiv:2402.19078, Eq. 9; checked against LibMTL's `LibMTL/weighting/STCH.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.stch(2, steps_per_epoch=1, warmup_epochs=0)
    >>> jac, state = {"w": jnp.ones((2, 3))}, tx.init(None)  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, state, losses=jnp.array([1.0, 2.0]))  # nadir epoch: 1 / L
    >>> rows, state = tx.update(jac, state, losses=jnp.array([0.5, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # 2 softmax(log(L / z)) / L
    [1.333 0.667]
  """
  num_tasks = check_positive_int(num_tasks, "stch: num_tasks")
  steps_per_epoch = check_positive_int(steps_per_epoch, "stch: steps_per_epoch")
  warmup_epochs = check_nonnegative_int(warmup_epochs, "stch: warmup_epochs")
  if isinstance(mu, numbers.Real) and not mu > 0:
    raise ValueError(f"stch: mu must be > 0, got {mu!r}.")

  def init():
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return STCHState(jnp.zeros([], jnp.int32), zeros, jnp.zeros((num_tasks,), jnp.int32))

  def weights(losses, state, present):
    epoch = state.count // steps_per_epoch
    # The nadir of a task is its mean loss over the steps of the nadir epoch it took part in
    # (1 if none).
    seen = state.nadir_steps > 0
    nadir = jnp.where(seen, state.nadir_sum / jnp.where(seen, state.nadir_steps, 1), 1.0)
    smooth = num_present(present) * softmax_present(jnp.log(losses / nadir) / mu, present)
    s = jnp.where(epoch > warmup_epochs, smooth, 1.0) / losses
    add = (epoch == warmup_epochs) & present
    nadir_sum = state.nadir_sum + jnp.where(add, losses, 0.0)
    return s, STCHState(state.count + 1, nadir_sum.astype(jnp.float32), state.nadir_steps + add)

  return reweighter("stch", num_tasks, init, weights, needs_positive=True, handles_absent=True)
