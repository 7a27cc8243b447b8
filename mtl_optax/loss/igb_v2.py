"""Improvable gap balancing, version 2: task weights chosen by a Soft Actor-Critic agent."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax.checks import check_nonnegative_int, check_positive_int
from mtl_optax.loss.base import reweighter
from mtl_optax.loss.igb import (IGBv1State, base_loss_init, base_loss_ready, base_loss_update,
                                base_loss_value)
from mtl_optax.keys import as_key
from mtl_optax.loss.random import random_weights
from mtl_optax.present import num_present
from mtl_optax.rl.replay import Transition
from mtl_optax.rl.sac import SACState, sac


class IGBv2State(NamedTuple):
  base: IGBv1State            # step counter and L_base
  prev_losses: jax.Array    # (K,) raw losses of the previous step
  prev_weights: jax.Array   # (K,) weights w of the previous step
  key: jax.Array            # RLW draws and the actor's sampling noise
  agent: SACState           # networks, optimizer states, replay buffer, training key
  prev_present: jax.Array   # (K,) the tasks present at the previous step


def train_sizes(fill: jax.Array, capacity: int, update_every: int,
                batch_size: int) -> tuple[jax.Array, jax.Array]:
  """(number of SAC updates, rows per update) = int(update_every k / 2), int(batch_size k / 2).

  k = 1 + fill / capacity, in [1, 2] (IGB reference code, loss_weight_methods.py and
  SAC_Agent.py), computed in exact integer arithmetic; the batch is at least one row.
  """
  scaled = capacity + fill
  return ((update_every * scaled) // (2 * capacity),
          jnp.maximum((batch_size * scaled) // (2 * capacity), 1))


def igb_v2(
    num_tasks: int,
    steps_per_epoch: int,
    *,
    key: jax.Array | int,
    train_from_epoch: int = 3,
    act_from_epoch: int = 5,
    update_every: int = 50,
    buffer_size: int = 10_000,
    batch_size: int = 256,
    agent_learning_rate: optax.ScalarOrSchedule = 3e-4,
    gamma: float = 0.99,
    tau: float = 0.005,
    init_temperature: float = 0.2,
    target_entropy: float | None = None,
    reward_lr_schedule: optax.Schedule | None = None,
    normalize_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """IGBv2: minimize sum_i w_i log L_i with w picked by a SAC agent, so s_i = w_i / L_i.

  Dai et al. 2023 (Improvable Gap Balancing), Alg. 2 and Eq. 4; step order and defaults of the
  reference code (github YanqiDai/IGB4MTL). At (0-indexed) step t:
    1. once L_base exists (t >= 2 steps_per_epoch, as in `igb_v1`), store the transition
       (L(t-1), w(t-1), r, L(t)), r = alpha * min_i (L_i(t-1) - L_i(t)) / L_base,i, with
       alpha = schedule(0) / schedule(t) for `reward_lr_schedule` (the model's learning rate
       schedule), else 1;
    2. if t >= train_from_epoch * steps_per_epoch and t % update_every == 0 (and the buffer
       is not empty), run `train_sizes` SAC updates on rows sampled from the buffer;
    3. w = K softmax(z), z ~ N(0, I), before epoch `act_from_epoch`, then the actor's
       stochastic action for the state L(t) (divided by L_base with `normalize_state`).
  `train_from_epoch` and `act_from_epoch` are the reference's `update_e` and `use_e`.
  `agent_learning_rate`, `gamma`, `tau`, `init_temperature`, `target_entropy` (None: -K),
  `buffer_size` and `batch_size` configure the SAC agent (`mtl_optax.rl.sac`). Losses must be
  positive.

  As in the reference, the first transition (step 2 steps_per_epoch) starts from the last step
  of epoch 2 and its RLW weights. Differences: training is skipped while the buffer is empty
  (possible only with train_from_epoch < 2; the reference would fail to sample); the update
  counts use exact integer arithmetic and at least one row; the reference sets its reward scale
  once per epoch (and its QM9 trainer, reading the current rate twice, always gets 1), ours is
  schedule(0) / schedule(t) at every step.

  Args:
    num_tasks: K.
    steps_per_epoch: steps that make one epoch.
    key: PRNG key or int seed (RLW draws, the agent's initialization and sampling).
    train_from_epoch: the first epoch whose steps train the agent (the reference's
      `update_e`).
    act_from_epoch: the first epoch whose weights the agent picks (the reference's `use_e`).
    update_every: train the agent every this many steps.
    buffer_size: capacity of the replay buffer.
    batch_size: rows per SAC update at a full buffer.
    agent_learning_rate: of the agent's three Adam optimizers.
    gamma: the agent's discount factor.
    tau: its Polyak rate for the target critics.
    init_temperature: its initial entropy temperature.
    target_entropy: its target entropy (None: -K).
    reward_lr_schedule: the model's learning rate schedule; scales the reward by
      schedule(0) / schedule(t) (None: 1).
    normalize_state: the agent observes L / L_base instead of L.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is an
    `IGBv2State` (the agent included). Needs positive `losses`.

  References:
    Dai et al. 2023, "Improvable Gap Balancing for Multi-Task Learning", UAI,
    arXiv:2307.15429, Alg. 2 and Eq. 4; the agent: Haarnoja et al. 2018, arXiv:1812.05905.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.igb_v2(2, steps_per_epoch=10, key=0, buffer_size=8, batch_size=4)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(rows.rows["w"].shape)  # rows scaled by RLW weights / L_i before epoch 5
    (2, 3)
  """
  check_positive_int(num_tasks, "igb_v2: num_tasks")
  check_positive_int(steps_per_epoch, "igb_v2: steps_per_epoch")
  check_positive_int(update_every, "igb_v2: update_every")
  check_nonnegative_int(train_from_epoch, "igb_v2: train_from_epoch")
  check_nonnegative_int(act_from_epoch, "igb_v2: act_from_epoch")
  agent = sac(num_tasks, num_tasks, learning_rate=agent_learning_rate, gamma=gamma, tau=tau,
              init_temperature=init_temperature, target_entropy=target_entropy,
              buffer_size=buffer_size, batch_size=batch_size)

  def init():
    weights_key, agent_key = jax.random.split(as_key(key))
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    return IGBv2State(base_loss_init(num_tasks), zeros, zeros, weights_key,
                      agent.init(agent_key), jnp.ones((num_tasks,), bool))

  def weights(losses, state, present):
    # An absent task's loss is its last one: the agent observes it, and the transition of a
    # step with an absent task is not stored (its reward would compare a stale loss).
    losses = jnp.where(present, jnp.asarray(losses, jnp.float32), state.prev_losses)
    step = state.base.count
    base = base_loss_value(state.base, steps_per_epoch)
    observe = (lambda l: l / base) if normalize_state else (lambda l: l)

    alpha = 1.0 if reward_lr_schedule is None else (
        reward_lr_schedule(0) / reward_lr_schedule(step))
    reward = alpha * jnp.min((state.prev_losses - losses) / base)
    transition = Transition(observe(state.prev_losses), state.prev_weights, reward,
                            observe(losses))
    store = base_loss_ready(state.base, steps_per_epoch) & jnp.all(present & state.prev_present)
    agent_state = jax.lax.cond(store, lambda a: agent.add(a, transition), lambda a: a,
                               state.agent)

    fill = agent_state.buffer.fill
    train_now = ((step >= train_from_epoch * steps_per_epoch) & (step % update_every == 0)
                 & (fill > 0))
    num_updates, rows = train_sizes(fill, buffer_size, update_every, batch_size)
    # Zero updates when not training: the loop is then a no-op, also under vmap, where a
    # lax.cond with a batched predicate would run the training branch for every member.
    agent_state = agent.train(agent_state, jnp.where(train_now, num_updates, 0), rows)

    key, rlw_key, act_key = jax.random.split(state.key, 3)
    w = jnp.where(step < act_from_epoch * steps_per_epoch,
                  random_weights(rlw_key, num_tasks, float(num_tasks)),
                  agent.act(agent_state, observe(losses), act_key))
    new_state = IGBv2State(base_loss_update(state.base, losses, steps_per_epoch, present),
                           losses, w, key, agent_state, present)
    # With tasks absent, the present tasks' weights rescaled to sum to their number (as K
    # softmax on K tasks does).
    share = jnp.where(present, w, 0.0)
    w_present = share * num_present(present) / jnp.maximum(jnp.sum(share), 1e-30)
    return jnp.where(jnp.all(present), w, w_present) / losses, new_state

  return reweighter("igb_v2", num_tasks, init, weights, needs_positive=True, handles_absent=True)
