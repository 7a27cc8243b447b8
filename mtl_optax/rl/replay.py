"""A replay buffer as a fixed-size ring of arrays, so it can live in a jitted state."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Transition(NamedTuple):
  """One transition (or a batch of them, with a leading batch axis on every field)."""
  state: jax.Array       # (..., S)
  action: jax.Array      # (..., A)
  reward: jax.Array      # (...)
  next_state: jax.Array  # (..., S)


class ReplayBuffer(NamedTuple):
  data: Transition  # every field with a leading axis of size `capacity`
  fill: jax.Array   # int32, number of stored transitions (at most `capacity`)
  index: jax.Array  # int32, the row the next transition overwrites


def replay_init(capacity: int, state_dim: int, action_dim: int) -> ReplayBuffer:
  """An empty buffer of `capacity` rows (float32)."""
  data = Transition(
      state=jnp.zeros((capacity, state_dim), jnp.float32),
      action=jnp.zeros((capacity, action_dim), jnp.float32),
      reward=jnp.zeros((capacity,), jnp.float32),
      next_state=jnp.zeros((capacity, state_dim), jnp.float32),
  )
  return ReplayBuffer(data, jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))


def replay_capacity(buffer: ReplayBuffer) -> int:
  """The number of rows (static)."""
  return buffer.data.reward.shape[-1]


def replay_add(buffer: ReplayBuffer, transition: Transition) -> ReplayBuffer:
  """Writes one transition at `index`; once full, the oldest row is overwritten."""
  capacity = replay_capacity(buffer)
  data = jax.tree.map(
      lambda rows, x: rows.at[buffer.index].set(jnp.asarray(x, rows.dtype)),
      buffer.data, transition)
  return ReplayBuffer(data, jnp.minimum(buffer.fill + 1, capacity),
                      (buffer.index + 1) % capacity)


def replay_sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Transition:
  """`batch_size` rows drawn uniformly with replacement from the filled part.

  An empty buffer gives copies of row 0 (zeros); do not train on it.
  """
  rows = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buffer.fill, 1))
  return jax.tree.map(lambda x: x[rows], buffer.data)
