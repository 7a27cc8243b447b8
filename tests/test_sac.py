"""Tests of the Flax SAC agent and its replay buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax.rl import Transition, replay_add, replay_init, replay_sample, sac
from mtl_optax.rl.sac import Actor, TwinCritic, log_prob

K = 3


def _filled(agent, key, n):
  """Agent state whose buffer holds n random transitions."""
  state = jax.jit(agent.init)(key)
  keys = jax.random.split(jax.random.fold_in(key, 1), 4)
  data = Transition(jax.random.normal(keys[0], (n, K)),
                    K * jax.nn.softmax(jax.random.normal(keys[1], (n, K))),
                    jax.random.normal(keys[2], (n,)),
                    jax.random.normal(keys[3], (n, K)))
  return state._replace(buffer=state.buffer._replace(data=data, fill=jnp.int32(n)))


def test_learns_contextual_bandit():
  """Context c (one-hot), reward a_c / K: a random or uniform policy earns 1/K, the best 1."""
  n, num_updates, num_seeds = 512, 300, 4
  agent = sac(K, K, learning_rate=1e-3, gamma=0.0, buffer_size=n, batch_size=64)

  def run(seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    context = jax.random.randint(keys[0], (n,), 0, K)
    # Off-policy data: broad random actions K softmax(2 z).
    action = K * jax.nn.softmax(2.0 * jax.random.normal(keys[1], (n, K)))
    reward = action[jnp.arange(n), context] / K
    next_state = jax.nn.one_hot(jax.random.randint(keys[2], (n,), 0, K), K)
    state = agent.init(keys[3])
    data = Transition(jax.nn.one_hot(context, K), action, reward, next_state)
    state = state._replace(buffer=state.buffer._replace(data=data, fill=jnp.int32(n)))
    state = agent.train(state, num_updates)
    test_context = jnp.arange(300) % K
    obs = jax.nn.one_hot(test_context, K)
    ret = lambda a: jnp.mean(a[jnp.arange(300), test_context]) / K
    random_policy = K * jax.nn.softmax(jax.random.normal(keys[4], (300, K)))
    return (ret(agent.act(state, obs, keys[5])),
            ret(agent.act(state, obs, keys[5], deterministic=True)),
            ret(random_policy), state.critic_opt[0].count)

  stochastic, deterministic, random_return, count = jax.jit(jax.vmap(run))(jnp.arange(num_seeds))
  np.testing.assert_array_equal(count, num_updates)
  np.testing.assert_allclose(random_return, 1.0 / K, atol=0.05)
  assert np.all(stochastic > 1.0 / K + 0.2), stochastic
  assert np.all(deterministic > 1.0 / K + 0.25), deterministic


def test_action_and_log_prob_match_numpy():
  agent = sac(4, K)
  state = jax.jit(agent.init)(jax.random.PRNGKey(0))
  obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  mean, log_std = [np.asarray(x, np.float64) for x in Actor(K).apply(state.actor, obs)]
  assert np.all(log_std >= -20) and np.all(log_std <= 2)

  key = jax.random.PRNGKey(1)
  act = jax.jit(agent.act, static_argnames="deterministic")
  action = np.asarray(act(state, obs, key))
  u = mean + np.exp(log_std) * np.asarray(jax.random.normal(key, mean.shape))
  softmax = np.exp(u) / np.exp(u).sum(-1, keepdims=True)
  np.testing.assert_allclose(action, K * softmax, rtol=1e-5)
  np.testing.assert_allclose(action.sum(-1), K, rtol=1e-5)
  det = np.asarray(act(state, obs, key, deterministic=True))
  np.testing.assert_allclose(det, K * np.exp(mean) / np.exp(mean).sum(-1, keepdims=True),
                             rtol=1e-5)

  std = np.exp(log_std)
  gauss = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
  expected = (gauss - np.log(1 - np.tanh(u) ** 2)).sum(-1)
  np.testing.assert_allclose(log_prob(mean, log_std, u), expected, rtol=1e-4, atol=1e-4)
  q1, q2 = TwinCritic().apply(state.critic, obs, action)  # two independent networks
  assert q1.shape == (5,) and not np.allclose(q1, q2)


# One agent and one compiled update shared by the tests below.
TAU, LR, TARGET_ENTROPY = 0.1, 1e-2, -50.0
AGENT = sac(K, K, tau=TAU, learning_rate=LR, target_entropy=TARGET_ENTROPY, batch_size=8)
UPDATE = jax.jit(AGENT.update)


def _pin_log_std(actor, value):
  """The same actor with a constant log-std head (Dense_3); Dense_2 is the mean head."""
  head = actor["params"]["Dense_3"]
  pinned = {"kernel": jnp.zeros_like(head["kernel"]), "bias": jnp.full_like(head["bias"], value)}
  return {"params": {**actor["params"], "Dense_3": pinned}}


def test_update_polyak_and_temperature():
  state = _filled(AGENT, jax.random.PRNGKey(0), 8)
  np.testing.assert_allclose(np.exp(state.log_alpha), 0.2, rtol=1e-6)
  # log pi is about -K (0.92 + 0.5) for sigma = 1, about +K * 18 for sigma = e^-20, so the
  # entropy is above, then below, the target -50.
  for log_std, direction in ((0.0, -1.0), (-20.0, 1.0)):
    start = state._replace(actor=_pin_log_std(state.actor, log_std))
    new = UPDATE(start, start.buffer.data, jnp.ones(8))
    # Polyak averaging of the freshly updated critics.
    jax.tree.map(lambda t, c, t0: np.testing.assert_allclose(t, TAU * c + (1 - TAU) * t0,
                                                             rtol=1e-5, atol=1e-7),
                 new.target_critic, new.critic, start.target_critic)
    # The first Adam step moves log alpha by lr against the sign of its gradient
    # -mean(log pi + target_entropy): up when the entropy is below target, else down.
    np.testing.assert_allclose(new.log_alpha - start.log_alpha, direction * LR, rtol=1e-3)
    for name in ("actor", "critic"):
      moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).max(),
                           getattr(new, name), getattr(start, name))
      assert max(jax.tree.leaves(moved)) > 0
    assert not np.array_equal(new.key, start.key)


def test_masked_rows_are_ignored():
  state = _filled(AGENT, jax.random.PRNGKey(0), 8)
  batch = state.buffer.data
  mask = (jnp.arange(8) < 5).astype(jnp.float32)
  garbage = jax.tree.map(lambda x: x.at[5:].set(1e3), batch)
  a = UPDATE(state, batch, mask)
  b = UPDATE(state, garbage, mask)
  c = UPDATE(state, garbage, jnp.ones(8))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.allclose(a.critic["params"]["Dense_0"]["kernel"],
                         c.critic["params"]["Dense_0"]["kernel"])


def test_bad_input():
  state = _filled(AGENT, jax.random.PRNGKey(0), 5)
  with pytest.raises(ValueError, match="batch_size"):
    AGENT.train(state, 1, 9)
  with pytest.raises(ValueError, match="state_dim"):
    sac(0, K)


def test_replay_ring_and_uniform_sampling():
  buffer = replay_init(4, 2, 1)
  for i in range(7):
    buffer = replay_add(buffer, Transition(jnp.full((2,), i), jnp.full((1,), -i), i, jnp.ones(2)))
    assert int(buffer.fill) == min(i + 1, 4) and int(buffer.index) == (i + 1) % 4
  # Rows 0..2 were overwritten by transitions 4..6, row 3 still holds transition 3.
  np.testing.assert_array_equal(buffer.data.reward, [4, 5, 6, 3])
  np.testing.assert_array_equal(buffer.data.state[:, 0], [4, 5, 6, 3])
  np.testing.assert_array_equal(buffer.data.action[:, 0], [-4, -5, -6, -3])

  partial = replay_init(10, 1, 1)
  for i in range(3):
    partial = replay_add(partial, Transition(jnp.ones(1), jnp.ones(1), i + 1, jnp.ones(1)))
  rewards = np.asarray(replay_sample(partial, jax.random.PRNGKey(0), 3000).reward)
  counts = np.bincount(rewards.astype(int), minlength=4)
  assert counts[0] == 0  # never the empty rows
  np.testing.assert_allclose(counts[1:] / 3000, 1 / 3, atol=0.04)
