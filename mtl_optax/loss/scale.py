"""Stateless, scale-invariant loss balancers."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from mtl_optax.loss.base import positive, reweighter


def equal_weights() -> optax.GradientTransformationExtraArgs:
  """EW: s_i = 1 (the identity; `sum_tasks` alone is equal weighting)."""
  return reweighter("equal_weights", lambda: optax.EmptyState(),
                    lambda losses, state: (jnp.ones_like(losses), state))


def log_losses(eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """SI: minimize sum_i log(L_i + eps), so s_i = 1 / (L_i + eps).

  Navon et al. 2022 (Nash-MTL, SI baseline); Lin et al. 2023 (DB-MTL, Sec. 3.1, eps = 1e-8).
  """
  def weights(losses, state):
    return 1.0 / (positive(losses) + eps), state
  return reweighter("log_losses", lambda: optax.EmptyState(), weights, needs_positive=True)


def gls() -> optax.GradientTransformationExtraArgs:
  """GLS: minimize (prod_i L_i)^(1/K), so s_i = GLS / (K L_i).

  Chennupati et al. 2019 (MultiNet++, geometric loss strategy).
  """
  def weights(losses, state):
    losses = positive(losses)
    geometric_mean = jnp.exp(jnp.mean(jnp.log(losses)))
    return geometric_mean / (losses.shape[0] * losses), state
  return reweighter("gls", lambda: optax.EmptyState(), weights, needs_positive=True)
