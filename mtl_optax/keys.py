"""PRNG keys of the random balancers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def as_key(key: jax.Array | int) -> jax.Array:
  """A PRNG key from an int seed, or the key itself (raw uint32 or typed)."""
  return jax.random.PRNGKey(key) if isinstance(key, int) else jnp.asarray(key)
