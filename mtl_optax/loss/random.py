"""Random loss weighting."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from mtl_optax.keys import as_key
from mtl_optax.loss.base import reweighter


class RLWState(NamedTuple):
  key: jax.Array


def random_weights(key: jax.Array, k: int, scale: float) -> jax.Array:
  """scale * softmax(z), z ~ N(0, I_K): Lin et al. 2022 (RLW), Sec. 3."""
  return scale * jax.nn.softmax(jax.random.normal(key, (k,)))


def rlw(scale: float = 1.0, *, key: jax.Array | int) -> optax.GradientTransformationExtraArgs:
  """RLW: fresh weights scale * softmax(N(0, I)) every step (Lin et al. 2022, TMLR).

  `scale=1` follows LibMTL; the IGB paper uses `scale=K`.
  """
  def weights(losses, state):
    key, sub = jax.random.split(state.key)
    return random_weights(sub, losses.shape[0], scale), RLWState(key)
  return reweighter("rlw", lambda: RLWState(as_key(key)), weights)
