"""Tests of IGBv2: its step-by-step schedule, jit/vmap/checkpointing, and fusion with aggregators."""

import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from covering import all_but
from mtl_optax.loss.igb_v2 import train_sizes


def _sharp_actor(actor):
  """The same actor with its log-std pinned at the lower clip: its action is K softmax(mu)."""
  head = actor["params"]["Dense_3"]  # heads: Dense_2 = mean, Dense_3 = log-std
  pinned = {"kernel": jnp.zeros_like(head["kernel"]), "bias": jnp.full_like(head["bias"], -30.0)}
  return {"params": {**actor["params"], "Dense_3": pinned}}


def _run_schedule(tx, losses):
  """Runs `task_weights` step by step from a sharp actor; returns w = s * L and the states."""
  step = jax.jit(lambda state, l: mtl_optax.task_weights(tx, state, l))
  state = jax.jit(tx.init)(None)
  inner = state.inner
  state = state._replace(inner=inner._replace(agent=inner.agent._replace(
      actor=_sharp_actor(inner.agent.actor))))
  weights, states = [], []
  for l in losses:
    s, state = step(state, l)
    weights.append(np.asarray(s) * l)
    states.append(state)
  return np.array(weights), states


@functools.lru_cache(maxsize=None)
def _greedy_policy(k):
  sac = mtl_optax.sac(k, k)
  return jax.jit(lambda agent, obs: sac.act(agent, obs, jax.random.PRNGKey(0), deterministic=True))


def _acts_greedily(state, obs):
  """The deterministic action K softmax(mu(obs)) of the agent in `state`."""
  return np.asarray(_greedy_policy(obs.shape[0])(state.inner.agent, obs))


def test_schedule_matches_card_step_by_step():
  k, spe, update_e, use_e, every, cap, batch = 3, 2, 3, 5, 3, 8, 4
  schedule = lambda t: 0.1 * 0.5 ** (t // 5)  # the model's learning rate
  tx = mtl_optax.igb_v2(k, spe, key=0, train_from_epoch=update_e, act_from_epoch=use_e, update_every=every,
                        buffer_size=cap, batch_size=batch, reward_lr_schedule=schedule)
  steps = 18
  losses = np.random.default_rng(0).uniform(0.2, 2.0, (steps, k)).astype(np.float32)
  weights, states = _run_schedule(tx, losses)
  base = losses[spe:2 * spe].mean(0)  # L_base: mean raw loss of epoch 2 (0-indexed epoch 1)

  updates_so_far = 0
  prev_actor = None
  for t, state in enumerate(states):
    w = weights[t]
    assert np.all(w > 0) and np.isclose(w.sum(), k, rtol=1e-5), (t, w)
    # 1. Transitions only once L_base exists (t >= 2 spe), one per step, in a ring.
    fill = min(max(0, t - 2 * spe + 1), cap)
    assert int(state.inner.agent.buffer.fill) == fill, t
    if t >= 2 * spe:
      row = (t - 2 * spe) % cap
      data = jax.tree.map(lambda x: np.asarray(x[row]), state.inner.agent.buffer.data)
      alpha = schedule(0) / schedule(t)
      reward = alpha * np.min((losses[t - 1] - losses[t]) / base)
      np.testing.assert_allclose(data.state, losses[t - 1], rtol=1e-6)
      np.testing.assert_allclose(data.action, weights[t - 1], rtol=1e-5)
      np.testing.assert_allclose(data.reward, reward, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(data.next_state, losses[t], rtol=1e-6)
    # 2. SAC updates from epoch update_e on, every `every` steps: int(every * k' / 2) of them.
    n = int(every * (1 + fill / cap) / 2) if t >= update_e * spe and t % every == 0 else 0
    updates_so_far += n
    assert int(state.inner.agent.actor_opt[0].count) == updates_so_far, t
    assert int(state.inner.agent.critic_opt[0].count) == updates_so_far, t
    actor = state.inner.agent.actor["params"]["Dense_0"]["kernel"]
    if prev_actor is not None:
      assert (n > 0) == (not np.array_equal(actor, prev_actor)), t
    prev_actor = actor
    # 3. RLW before epoch use_e, then the actor (after this step's training) on the raw losses.
    greedy = _acts_greedily(state, losses[t])
    if t < use_e * spe:
      assert np.abs(w - greedy).max() > 1e-2, t
    else:
      np.testing.assert_allclose(w, greedy, rtol=1e-4, atol=1e-5)
  assert updates_so_far > 0
  # 4. s_i = w_i / L_i: checked through w = s * L summing to K above; RLW weights vary.
  assert weights[:use_e * spe].std(0).min() > 0.05


def test_normalized_state_and_unit_reward_scale():
  k, spe, use_e = 2, 2, 3
  tx = mtl_optax.igb_v2(k, spe, key=1, train_from_epoch=100, act_from_epoch=use_e, buffer_size=4, batch_size=4,
                        normalize_state=True)
  losses = np.random.default_rng(1).uniform(0.5, 3.0, (8, k)).astype(np.float32)
  weights, states = _run_schedule(tx, losses)
  base = losses[spe:2 * spe].mean(0)
  data = jax.tree.map(np.asarray, states[-1].inner.agent.buffer.data)
  t = np.arange(2 * spe, 8)
  rows = (t - 2 * spe) % 4
  np.testing.assert_allclose(data.state[rows], losses[t - 1] / base, rtol=1e-5)
  np.testing.assert_allclose(data.next_state[rows], losses[t] / base, rtol=1e-5)
  reward = np.min((losses[t - 1] - losses[t]) / base, axis=1)  # no schedule: alpha = 1
  np.testing.assert_allclose(data.reward[rows], reward, rtol=1e-4, atol=1e-6)
  for t in range(use_e * spe, 8):
    np.testing.assert_allclose(weights[t], _acts_greedily(states[t], losses[t] / base),
                               rtol=1e-4, atol=1e-5)
    assert np.abs(weights[t] - _acts_greedily(states[t], losses[t])).max() > 1e-3


def test_train_sizes_match_reference_formula():
  for cap, every, batch in ((10_000, 50, 256), (7, 3, 5)):
    for fill in sorted({0, 1, cap // 3, cap // 2, cap - 1, cap}):
      k = 1 + fill / cap
      n, rows = train_sizes(jnp.int32(fill), cap, every, batch)
      assert int(n) == int(every * k / 2)
      assert int(rows) == max(int(batch * k / 2), 1)


def test_bad_input():
  tx = mtl_optax.igb_v2(3, 2, key=0)
  state = jax.eval_shape(tx.init, None)  # the checks fire before the state is read
  with pytest.raises(ValueError, match="losses"):
    tx.update(jnp.ones((3, 2)), state)
  with pytest.raises(ValueError, match="expected"):
    tx.update(jnp.ones((3, 2)), state, losses=jnp.ones(2))
  with pytest.raises(ValueError, match="positive"):
    tx.update(jnp.ones((3, 2)), state, losses=jnp.array([1.0, 0.0, 1.0]))
  with pytest.raises(ValueError, match="act_from_epoch"):
    mtl_optax.igb_v2(3, 2, key=0, act_from_epoch=-1)


# A toy multi-task regression: shared slope, one bias per task (task-specific).
K, STEPS, LR = 3, 10, 0.05
_rng = np.random.default_rng(2)
X = jnp.asarray(_rng.normal(size=(16, 4)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(16, K)), jnp.float32)
PARAMS = {"shared": jnp.zeros(4), "head": jnp.zeros(K)}
SHARED = {"shared": True, "head": False}
SEEDS = jax.random.split(jax.random.PRNGKey(0), 2)  # one key per seed


def loss_fn(params):
  pred = (X @ params["shared"])[:, None] + params["head"]
  return jnp.mean((pred - Y) ** 2, axis=0) + 0.05


def _igb(key=0):
  # All phases within STEPS: L_base from step 4, SAC training at steps 4, 6, 8, actor from 4.
  return mtl_optax.igb_v2(K, 2, key=key, train_from_epoch=1, act_from_epoch=2, update_every=2, buffer_size=8,
                          batch_size=4)


def _norm_rule(gram, state, losses):
  """A small Gram weight rule: w_i = 1 / ||g_i|| (unit-norm rows)."""
  del losses
  return 1.0 / (jnp.sqrt(jnp.diag(gram)) + 1e-8), None, state


def _norm_rule_numpy(rows):
  return (rows / (np.linalg.norm(rows, axis=1, keepdims=True) + 1e-8)).sum(0)


# name -> (aggregator factory, NumPy aggregation of the shared rows (K, d)). To add a gradient
# balancer (e.g. mtl_optax.nash_mtl), give its factory and a reference for its combination.
AGGREGATORS = {
    "sum": (mtl_optax.sum_tasks, lambda rows: rows.sum(0)),
    "norm": (lambda: mtl_optax.gram_aggregator("norm", K, lambda p: optax.EmptyState(),
                                               _norm_rule, shared=SHARED),
             _norm_rule_numpy),
}


@functools.lru_cache(maxsize=None)
def _stacked_step(name):
  """jit(vmap over seeds) of one step of sgd on chain(igb_v2, aggregator), with a record."""
  tx = optax.chain(_igb(), AGGREGATORS[name][0]())

  def step(params, state):
    losses, jac = mtl_optax.value_and_jacrev(loss_fn)(params)
    updates, state = tx.update(jac, state, params, losses=losses)
    params = jax.tree.map(lambda p, u: p - LR * u, params, updates)
    s = state[0].inner.prev_weights / losses  # this step's row scalings s_i = w_i / L_i
    return params, state, (losses, jac, s, updates)
  return jax.jit(jax.vmap(step))


@functools.lru_cache(maxsize=None)
def _stacked_init(name):
  init = lambda seed: optax.chain(_igb(seed), AGGREGATORS[name][0]()).init(PARAMS)
  return jax.jit(jax.vmap(init))


def _init_stacked(name):
  params = jax.tree.map(lambda x: jnp.stack([x] * len(SEEDS)), PARAMS)
  return params, _stacked_init(name)(SEEDS)


def _train_stacked(name, params, state, steps):
  records = []
  for _ in range(steps):
    params, state, record = _stacked_step(name)(params, state)
    records.append(jax.tree.map(np.asarray, record))
  return params, state, records


@pytest.mark.parametrize("name", all_but(sorted(AGGREGATORS), {"sum"}))  # "norm": the Gram path
def test_fusion_with_aggregator_under_jit_and_vmap(name):
  params, state, records = _train_stacked(name, *_init_stacked(name), STEPS)
  reference = AGGREGATORS[name][1]
  for losses, jac, s, updates in records:
    for seed in range(len(SEEDS)):
      w = s[seed] * losses[seed]
      np.testing.assert_allclose(w.sum(), K, rtol=1e-5)
      rows = s[seed][:, None] * jac["shared"][seed]
      np.testing.assert_allclose(updates["shared"][seed], reference(rows), rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(updates["head"][seed],
                                 (s[seed][:, None] * jac["head"][seed]).sum(0),
                                 rtol=1e-4, atol=1e-6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  # The seeds drive different weights, so the runs part.
  assert not np.allclose(params["shared"][0], params["shared"][1])
  assert int(state[0].inner.agent.actor_opt[0].count[0]) > 0


def test_single_backward_path_matches_stacked_sum():
  reweighter = _igb()
  grad_fn = mtl_optax.value_and_reweighted_grad(loss_fn, reweighter)

  def step(params, state):
    (_, grad), state = grad_fn(params, state)
    return jax.tree.map(lambda p, g: p - LR * g, params, grad), state

  params = jax.tree.map(lambda x: jnp.stack([x] * len(SEEDS)), PARAMS)
  state = jax.jit(jax.vmap(lambda seed: _igb(seed).init(PARAMS)))(SEEDS)
  step = jax.jit(jax.vmap(step))
  for _ in range(STEPS):
    params, state = step(params, state)
  stacked_params, stacked_state, _ = _train_stacked("sum", *_init_stacked("sum"), STEPS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params, stacked_params)
  np.testing.assert_allclose(state.inner.prev_weights, stacked_state[0].inner.prev_weights, rtol=1e-3)


def test_checkpoint_and_resume_is_exact():
  params, state = _init_stacked("sum")
  full_params, full_state, _ = _train_stacked("sum", params, state, STEPS)

  params, state, _ = _train_stacked("sum", params, state, 4)
  blob = flax.serialization.to_bytes((params, state))
  target = _init_stacked("sum")
  params, state = flax.serialization.from_bytes(target, blob)
  params, state, _ = _train_stacked("sum", params, state, STEPS - 4)
  jax.tree.map(np.testing.assert_array_equal, (params, state), (full_params, full_state))


def test_single_task_is_finite():
  tx = mtl_optax.igb_v2(1, 1, key=0, train_from_epoch=0, act_from_epoch=0, update_every=1, buffer_size=4,
                        batch_size=2)
  step = jax.jit(lambda state, l: mtl_optax.task_weights(tx, state, l))
  state = jax.jit(tx.init)(None)
  for l in (1.0, 0.5, 0.25, 0.25):
    s, state = step(state, jnp.array([l]))
    np.testing.assert_allclose(s * l, 1.0, rtol=1e-5)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
