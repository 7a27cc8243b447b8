"""Random loss weighting."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from mtl_optax.keys import as_key
from mtl_optax.loss.base import reweighter
from mtl_optax.present import softmax_present


class RLWState(NamedTuple):
  key: jax.Array


def random_weights(key: jax.Array, k: int, scale: float,
                   present: jax.Array | None = None) -> jax.Array:
  """scale * softmax(z), z ~ N(0, I_K): Lin et al. 2022 (RLW), Sec. 3; with `present`, the
  softmax over the present tasks (0 for the others)."""
  z = jax.random.normal(key, (k,))
  return scale * (jax.nn.softmax(z) if present is None else softmax_present(z, present))


def rlw(num_tasks: int, scale: float = 1.0, *,
        key: jax.Array | int) -> optax.GradientTransformationExtraArgs:
  """RLW: fresh weights scale * softmax(N(0, I)) every step (Lin et al. 2022, TMLR).

  `scale=1` follows LibMTL; the IGB paper uses `scale=K`.

  Args:
    num_tasks: K.
    scale: the weights' sum (K: mean weight 1).
    key: PRNG key or int seed of the draws.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is an
    `RLWState` (the key).

  References:
    Lin et al. 2022, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR, arXiv:2111.10603, Sec. 3.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.rlw(2, key=0)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params))
    >>> print(np.asarray(state.weights).sum().round(3))  # random s, summing to scale
    1.0
  """
  def weights(losses, state, present):
    key, sub = jax.random.split(state.key)
    return random_weights(sub, num_tasks, scale, present), RLWState(key)
  return reweighter("rlw", num_tasks, lambda: RLWState(as_key(key)), weights,
                    needs_losses=False, handles_absent=True)
