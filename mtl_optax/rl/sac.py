"""Soft Actor-Critic (Haarnoja et al. 2018) with softmax actions, written with Flax.

The variant of the IGB reference code (github YanqiDai/IGB4MTL, methods/SAC_Agent.py, itself
adapted from XinJingHao/SAC-Continuous-Pytorch): a Gaussian actor whose sample u is squashed
to the action `action_dim * softmax(u)`, twin critics with Polyak-averaged targets, and a
learned temperature. Everything is a pytree in `SACState`, so the agent runs inside `jax.jit`,
`jax.vmap` and `jax.lax` control flow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax.checks import check_positive_int
from mtl_optax.rl.replay import (ReplayBuffer, Transition, replay_add, replay_init,
                                 replay_sample)

Params = Any

LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0


def _dense(features: int) -> nn.Dense:
  # PyTorch's nn.Linear kernel init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the reference;
  # biases start at zero.
  return nn.Dense(features, kernel_init=nn.initializers.variance_scaling(
      1.0 / 3.0, "fan_in", "uniform"))


class Actor(nn.Module):
  """Dense-ReLU trunk (ReLU after the last hidden layer too), then mean and log-std heads."""
  action_dim: int
  hidden: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    x = state
    for features in self.hidden:
      x = nn.relu(_dense(features)(x))
    mean = _dense(self.action_dim)(x)
    log_std = jnp.clip(_dense(self.action_dim)(x), LOG_STD_MIN, LOG_STD_MAX)
    return mean, log_std


class TwinCritic(nn.Module):
  """Two independent Q networks, Dense-ReLU MLPs on concat(state, action) with a scalar output."""
  hidden: Sequence[int] = (128, 128)

  @nn.compact
  def __call__(self, state: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
    def q_net(x):
      for features in self.hidden:
        x = nn.relu(_dense(features)(x))
      return _dense(1)(x)[..., 0]
    x = jnp.concatenate([state, action], axis=-1)
    return q_net(x), q_net(x)


class SACState(NamedTuple):
  actor: Params
  critic: Params         # twin critics
  target_critic: Params  # Polyak average of `critic`
  log_alpha: jax.Array   # log of the temperature alpha_T
  actor_opt: optax.OptState
  critic_opt: optax.OptState
  alpha_opt: optax.OptState
  buffer: ReplayBuffer
  key: jax.Array         # drives replay sampling and the policy noise of updates


class SAC(NamedTuple):
  """The agent's pure functions; build it with `sac(...)`, its state is a `SACState`.

  init(key) -> SACState
  act(agent, state, key, deterministic=False) -> action; `state` is (S,) or (B, S)
  add(agent, transition) -> SACState (one transition into the replay buffer)
  update(agent, batch, mask=None) -> SACState: one gradient step of critics, actor and
    temperature on `batch`; `mask` (B,) of 0/1 keeps only some rows in the loss means
  train(agent, num_updates, batch_size=None) -> SACState: `num_updates` updates, each on
    `batch_size` rows sampled from the buffer (both may be traced; batch_size at most the
    `batch_size` given to `sac`)
  """
  init: Callable[[jax.Array], SACState]
  act: Callable[..., jax.Array]
  add: Callable[[SACState, Transition], SACState]
  update: Callable[..., SACState]
  train: Callable[..., SACState]


def log_prob(mean: jax.Array, log_std: jax.Array, u: jax.Array) -> jax.Array:
  """log pi of the pre-squash sample u, summed over the last axis, as the reference computes it.

  Gaussian log-density minus sum_j log(1 - tanh(u_j)^2) = 2 (log 2 - u_j - softplus(-2 u_j)):
  the change of variables of a tanh squashing (Haarnoja et al. 2018, arXiv:1801.01290,
  App. C, Eq. 21). The action is a softmax, not a tanh, so this term is not its true
  Jacobian; we keep it because the reference code (and thus the IGB paper's results) uses it.
  """
  gauss = jax.scipy.stats.norm.logpdf(u, mean, jnp.exp(log_std))
  tanh_correction = 2.0 * (np.log(2.0) - u - jax.nn.softplus(-2.0 * u))
  return jnp.sum(gauss - tanh_correction, axis=-1)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sac(
    state_dim: int,
    action_dim: int,
    *,
    hidden: Sequence[int] = (128, 128),
    learning_rate: optax.ScalarOrSchedule = 3e-4,
    gamma: float = 0.99,
    tau: float = 0.005,
    init_temperature: float = 0.2,
    target_entropy: float | None = None,
    buffer_size: int = 10_000,
    batch_size: int = 256,
) -> SAC:
  """Builds a SAC agent whose actions are `action_dim * softmax(u)`, u ~ N(mu(s), sigma(s)^2).

  Haarnoja et al. 2018 (SAC with learned temperature, arXiv:1812.05905), Alg. 1: critic
  target r + gamma (min_j Q'_j(s', a') - alpha_T log pi(a'|s')), a' ~ pi(s') (Eqs. 3, 5);
  actor loss mean(alpha_T log pi(a|s) - min_j Q_j(s, a)) (Eq. 7); temperature loss
  -mean(log alpha_T (log pi + target_entropy)) (Eq. 18); targets by Polyak averaging with `tau`.
  No done flags (the IGB reference has none). Defaults follow the IGB reference code;
  `target_entropy=None` means -action_dim. Three Adam optimizers share `learning_rate`.

  Args:
    state_dim: S, the size of an observation.
    action_dim: A, the size of an action.
    hidden: widths of the hidden Dense-ReLU layers of the actor and of each critic.
    learning_rate: of the three Adam optimizers (actor, critics, temperature).
    gamma: the discount factor.
    tau: the Polyak rate of the target critics.
    init_temperature: the initial temperature alpha_T.
    target_entropy: the entropy target of the temperature loss (None: -action_dim).
    buffer_size: capacity of the replay buffer.
    batch_size: rows sampled per update (the largest batch `train` may use).

  Returns:
    A `SAC` of pure functions (`init`, `act`, `add`, `update`, `train`) acting on a `SACState`.

  References:
    Haarnoja et al. 2018, "Soft Actor-Critic: Off-Policy Maximum Entropy Deep Reinforcement
    Learning with a Stochastic Actor", ICML, arXiv:1801.01290; Haarnoja et al. 2018, "Soft
    Actor-Critic Algorithms and Applications", arXiv:1812.05905, Alg. 1 and Eqs. 3, 5, 7, 18.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> agent = mtl_optax.sac(2, 2, buffer_size=8, batch_size=4)  # S = A = 2
    >>> state = agent.init(jax.random.key(0))
    >>> action = agent.act(state, jnp.ones(2), jax.random.key(1))
    >>> print(action.shape, np.asarray(action.sum()).round(3))  # A softmax(u): sums to A
    (2,) 2.0
  """
  for value, what in ((state_dim, "state_dim"), (action_dim, "action_dim"),
                      (buffer_size, "buffer_size"), (batch_size, "batch_size")):
    check_positive_int(value, f"sac: {what}")
  actor_net = Actor(action_dim, tuple(hidden))
  critic_net = TwinCritic(tuple(hidden))
  optimizer = optax.adam(learning_rate)
  max_batch = batch_size
  if target_entropy is None:
    target_entropy = -float(action_dim)

  def init(key):
    key, actor_key, critic_key = jax.random.split(key, 3)
    s = jnp.zeros((1, state_dim), jnp.float32)
    a = jnp.zeros((1, action_dim), jnp.float32)
    actor = actor_net.init(actor_key, s)
    critic = critic_net.init(critic_key, s, a)
    log_alpha = jnp.asarray(np.log(init_temperature), jnp.float32)
    return SACState(
        actor=actor, critic=critic, target_critic=critic, log_alpha=log_alpha,
        actor_opt=optimizer.init(actor), critic_opt=optimizer.init(critic),
        alpha_opt=optimizer.init(log_alpha),
        buffer=replay_init(buffer_size, state_dim, action_dim), key=key)

  def policy(actor, state, key, deterministic=False):
    """(action, log pi) with the reparameterized sample u = mu + sigma * eps."""
    mean, log_std = actor_net.apply(actor, state)
    u = mean if deterministic else mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape)
    return action_dim * jax.nn.softmax(u, axis=-1), log_prob(mean, log_std, u)

  def act(agent, state, key, deterministic=False):
    return policy(agent.actor, jnp.asarray(state, jnp.float32), key, deterministic)[0]

  def add(agent, transition):
    return agent._replace(buffer=replay_add(agent.buffer, transition))

  def step(params, grads, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def update(agent, batch, mask=None):
    s, a, r, s_next = batch
    mask = jnp.ones(r.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    key, next_key, now_key = jax.random.split(agent.key, 3)
    alpha = jnp.exp(agent.log_alpha)

    a_next, log_pi_next = policy(agent.actor, s_next, next_key)
    q1_next, q2_next = critic_net.apply(agent.target_critic, s_next, a_next)
    target = r + gamma * (jnp.minimum(q1_next, q2_next) - alpha * log_pi_next)
    target = jax.lax.stop_gradient(target)

    def critic_loss(critic):
      q1, q2 = critic_net.apply(critic, s, a)
      return _masked_mean((q1 - target) ** 2, mask) + _masked_mean((q2 - target) ** 2, mask)
    critic, critic_opt = step(agent.critic, jax.grad(critic_loss)(agent.critic), agent.critic_opt)

    def actor_loss(actor):  # the freshly updated critics, held fixed
      a_new, log_pi = policy(actor, s, now_key)
      q1, q2 = critic_net.apply(critic, s, a_new)
      return _masked_mean(alpha * log_pi - jnp.minimum(q1, q2), mask), log_pi
    grads, log_pi = jax.grad(actor_loss, has_aux=True)(agent.actor)
    actor, actor_opt = step(agent.actor, grads, agent.actor_opt)

    entropy_gap = jax.lax.stop_gradient(log_pi + target_entropy)
    alpha_grad = jax.grad(lambda la: -_masked_mean(la * entropy_gap, mask))(agent.log_alpha)
    log_alpha, alpha_opt = step(agent.log_alpha, alpha_grad, agent.alpha_opt)

    target_critic = optax.incremental_update(critic, agent.target_critic, tau)
    return SACState(actor, critic, target_critic, log_alpha, actor_opt, critic_opt, alpha_opt,
                    agent.buffer, key)

  def train(agent, num_updates, batch_size=None):
    if isinstance(batch_size, int) and not 0 < batch_size <= max_batch:
      raise ValueError(f"sac.train: batch_size must be in [1, {max_batch}], got {batch_size}.")
    # Sample the largest batch and mask its rows beyond `batch_size`: fixed shapes under jit.
    mask = jnp.arange(max_batch) < (max_batch if batch_size is None else batch_size)

    def body(_, agent):
      key, sample_key = jax.random.split(agent.key)
      batch = replay_sample(agent.buffer, sample_key, max_batch)
      return update(agent._replace(key=key), batch, mask)
    return jax.lax.fori_loop(0, num_updates, body, agent)

  return SAC(init, act, add, update, train)
