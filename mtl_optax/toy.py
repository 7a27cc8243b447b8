"""The two-task toy problem of the CAGrad, Nash-MTL and IMGrad papers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Starting points of Navon et al. 2022 (Nash-MTL), Fig. 1.
TOY_STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))


def toy_losses(x: jax.Array) -> jax.Array:
  """(f1, f2) at x in R^2 (Liu et al. 2021a, CAGrad, Appendix; reference code Cranial-XIX/CAGrad).

  Task minima near (+-7, -8.3552); the minimum of their mean near (0, -8.3552). The papers
  train with Adam, lr 1e-3: CAGrad's toy.py for 100k steps, Nash-MTL for 35k with f1 scaled by
  0.1; IMGrad weights the objectives 0.9 and 0.1 (examples/toy.py has each paper's settings).
  """
  x1, x2 = x[0], x[1]
  eps = 5e-6
  h1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7.0) - jnp.tanh(-x2)), eps)) + 6.0
  h2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3.0) + jnp.tanh(-x2) + 2.0), eps)) + 6.0
  c1 = jnp.maximum(jnp.tanh(0.5 * x2), 0.0)
  c2 = jnp.maximum(jnp.tanh(-0.5 * x2), 0.0)
  q1 = ((7.0 - x1) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
  q2 = ((x1 + 7.0) ** 2 + 0.1 * (x2 + 8.0) ** 2) / 10.0 - 20.0
  return jnp.stack([c1 * h1 + c2 * q1, c1 * h2 + c2 * q2])
