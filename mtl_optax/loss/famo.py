"""Fast adaptive multitask optimization (FAMO)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.loss.base import reweighter
from mtl_optax.present import softmax_present

# FAMO's D_i = L_i - L_min,i + GAP_EPS (the reference code's 1e-8).
GAP_EPS = 1e-8


class FAMOState(NamedTuple):
  count: jax.Array           # steps taken
  logits: jax.Array          # (K,) w; the task weights are z = softmax(w)
  opt_state: optax.OptState  # Adam (with L2 weight decay) state of the logits
  prev_losses: jax.Array     # (K,) the losses passed at the previous step (a task's last
                             # one while it is absent)
  prev_present: jax.Array    # (K,) the tasks present at the previous step


def famo(
    num_tasks: int,
    learning_rate: optax.ScalarOrSchedule = 0.025,
    weight_decay: float = 1e-3,
    min_losses: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  """FAMO: s_i = (z_i / D_i) / sum_j (z_j / D_j), z = softmax(w), D = L - L_min + 1e-8.

  Liu et al. 2023 (FAMO, NeurIPS), Alg. 1, with the reference code's Adam on w (L2 weight
  decay, as torch.optim.Adam): grad_w = J_softmax(w)^T delta,
  delta = log D(L_{t-1} at theta_{t-1}) - log D(L_{t-1} at theta_t).

  The logits need the previous batch's losses after the parameter step, so their step is
  taken at the NEXT call, before the weights are computed:
  `update(updates, state, params, losses=L_t, post_step_losses=L_{t-1}(theta_t))`, where
  `post_step_losses` is the previous step's batch re-evaluated at the current parameters.
  This reproduces the reference's sequence of weights exactly. Without `post_step_losses`,
  the current losses `L_t` stand in for it (a cheaper variant: delta then mixes the loss
  change with the change of batch). The first call takes no logit step. The reference also
  clips the gradient norm (max_norm = 1): chain `optax.clip_by_global_norm` for that.

  Args:
    num_tasks: K.
    learning_rate: of the logits' Adam (the reference's `w_lr`).
    weight_decay: gamma, the L2 regularization of the logits (the card's 1e-3; the reference
      famo.py defaults to 1e-2 and its experiments set it per data set).
    min_losses: L_min, known lower bounds of the losses (default 0); losses must be >= them.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is a
    `FAMOState`. Needs `losses` (and optionally `post_step_losses`) at every update.

  References:
    Liu et al. 2023, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS, arXiv:2306.03792,
    Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.famo(2)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(state.weights).round(3))  # z uniform: s = (1/L) / sum(1/L)
    [0.667 0.333]
  """
  num_tasks = check_positive_int(num_tasks, "famo: num_tasks")
  floor = (jnp.zeros((num_tasks,), jnp.float32) if min_losses is None
           else jnp.asarray(min_losses, jnp.float32))
  if floor.shape != (num_tasks,):
    raise ValueError(f"famo: min_losses has shape {floor.shape}, expected ({num_tasks},).")
  optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

  def gap(losses: jax.Array, what: str) -> jax.Array:
    """D, checking concrete losses against L_min (inside jit, `present` leaves those tasks
    out)."""
    if not isinstance(losses, jax.core.Tracer):
      bad = np.flatnonzero(np.isfinite(losses) & ~(np.asarray(losses) >= np.asarray(floor)))
      if bad.size:
        raise ValueError(
            f"famo takes log(L_i - L_min,i) and needs {what} >= min_losses; tasks "
            f"{bad.tolist()} have {np.asarray(losses)[bad].tolist()}.")
    return losses - floor + GAP_EPS

  def init():
    logits = jnp.zeros((num_tasks,), jnp.float32)
    return FAMOState(jnp.zeros([], jnp.int32), logits, optimizer.init(logits), floor,
                     jnp.ones((num_tasks,), bool))

  def weights(losses, state, post_step_losses, present):
    after = losses if post_step_losses is None else tree_lib.check_losses(
        post_step_losses, num_tasks, "famo (post_step_losses)")
    # A task sits out when its loss or its post-step loss is at or below L_min (no log) or not
    # finite; then the logit step, which needs every task's loss change, is skipped too.
    present = present & (gap(losses, "losses") > 0) & jnp.isfinite(after) & (
        gap(after, "post_step_losses") > 0)
    losses = jnp.where(present, losses, state.prev_losses)
    after = jnp.where(present, after, state.prev_losses)
    d = gap(losses, "losses")
    # Logit step for the previous call: J_softmax(w)^T delta = z * (delta - z . delta).
    delta = jnp.log(gap(state.prev_losses, "losses")) - jnp.log(gap(after, "post_step_losses"))
    z = jax.nn.softmax(state.logits)
    step, opt_state = optimizer.update(z * (delta - z @ delta), state.opt_state, state.logits)
    logits, opt_state = jax.tree.map(
        lambda new, old: jnp.where(
            (state.count > 0) & jnp.all(present & state.prev_present), new, old),
        (optax.apply_updates(state.logits, step), opt_state), (state.logits, state.opt_state))
    ratio = jnp.where(present, softmax_present(logits, present) / d, 0.0)
    new_state = FAMOState(state.count + 1, logits, opt_state, losses.astype(jnp.float32),
                          present)
    return ratio / jnp.sum(ratio), new_state

  return reweighter("famo", num_tasks, init, weights, extra_args=("post_step_losses",),
                    handles_absent=True)
