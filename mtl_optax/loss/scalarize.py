"""Scalarizations of the losses as loss balancers: COSMOS and PBI (torchjd's scalarizers).

A scalarization S(L_1, ..., L_K) is minimized by the gradient sum_i (dS/dL_i) grad L_i, so it is
the loss balancer with s_i = dS/dL_i at the current losses (one backward pass on the
single-backward path, as for every loss balancer).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax.checks import check_positive_int
from mtl_optax.keys import as_key
from mtl_optax.loss.base import reweighter

# torchjd's PBI adds this under the square root of d_2 (finite gradient on the preference line).
PBI_EPSILON = 1e-12
# torch.nn.functional.cosine_similarity's eps (each norm floored at it).
COSINE_EPSILON = 1e-8


class COSMOSState(NamedTuple):
  key: jax.Array        # the Dirichlet draws' key (unused with fixed preferences)
  preference: jax.Array  # (K,) r of the last step


def _preference(weights, num_tasks: int, name: str) -> np.ndarray:
  r = np.ones(num_tasks) if weights is None else np.asarray(weights, np.float64)
  if r.shape != (num_tasks,):
    raise ValueError(f"{name}: weights must have shape ({num_tasks},), got {r.shape}.")
  if np.any(r < 0) or not np.any(r > 0):
    raise ValueError(f"{name}: weights must be non-negative and not all zero, got {r}.")
  return r


def cosmos_scalings(losses: jax.Array, preference: jax.Array, lambda_: float) -> jax.Array:
  """dS/dL_i of S(L) = r . L - lambda cos(r, L) (Ruchte & Grabocka 2021, Eq. 5).

  cos(r, L) = r . L / (max(||r||, eps) max(||L||, eps)), eps = 1e-8 as torch's
  `cosine_similarity`; its gradient in L is r / (||r|| ||L||) - (r . L) L / (||r|| ||L||^3).
  """
  r_norm = jnp.maximum(jnp.linalg.norm(preference), COSINE_EPSILON)
  l_norm = jnp.maximum(jnp.linalg.norm(losses), COSINE_EPSILON)
  dot = preference @ losses
  grad_cos = preference / (r_norm * l_norm) - dot * losses / (r_norm * l_norm**3)
  return preference - lambda_ * grad_cos


def cosmos(num_tasks: int, lambda_: float = 1.0, weights=None, *,
           key: jax.Array | int | None = None,
           concentration: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """COSMOS: minimize r . L - lambda cos(r, L), so s_i = r_i - lambda d cos(r, L) / dL_i.

  The linear scalarization with preference r, penalized by the cosine similarity between the
  losses and r (Ruchte & Grabocka 2021, Eq. 5; torchjd's `scalarization.COSMOS`), which pulls the
  loss vector towards the preference ray. With `key`, r is drawn afresh from
  Dirichlet(`concentration` 1) every step, as the paper does to cover the Pareto front (it also
  feeds r to the model, a modeling choice left to the user, as in torchjd); without, r is the
  fixed `weights`. lambda = 0 is the linear scalarization (EW for r = 1).

  Args:
    num_tasks: K.
    lambda_: the cosine penalty's coefficient (>= 0; the paper uses 0.01 to 8 across datasets).
    weights: the fixed preference r, shape (K,), non-negative (None: ones, so that lambda = 0 is
      the plain sum). Ignored when `key` is given.
    key: PRNG key or int seed: draw r ~ Dirichlet(concentration 1) every step.
    concentration: the Dirichlet's concentration (1: uniform on the simplex).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; its state is a
    `COSMOSState` (the key and the last preference). Needs `losses`.

  References:
    Ruchte, M., Grabocka, J. "Scalable Pareto Front Approximation for Deep Multi-Objective
    Learning", ICDM 2021, arXiv:2103.13392, Eq. 5; torchjd 0.18 `scalarization/_cosmos.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.cosmos(2, lambda_=1.0)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 3.0]))
    >>> print(np.asarray(state.weights).round(3))  # s_i: task 1, off the ray r, gets more
    [0.866 1.045]
  """
  check_positive_int(num_tasks, "cosmos: num_tasks")
  if lambda_ < 0:
    raise ValueError(f"cosmos: lambda_ must be non-negative, got {lambda_}.")
  fixed = jnp.asarray(_preference(weights, num_tasks, "cosmos"), jnp.float32)
  alphas = jnp.full((num_tasks,), concentration, jnp.float32)

  def init():
    return COSMOSState(as_key(0 if key is None else key), fixed)

  def weight_fn(losses, state, present):
    if key is None:
      r, new_key = fixed.astype(losses.dtype), state.key
    else:
      new_key, sub = jax.random.split(state.key)
      r = jax.random.dirichlet(sub, alphas).astype(losses.dtype)
    # Absent tasks leave the loss and preference vectors (their entries set to 0).
    s = cosmos_scalings(jnp.where(present, losses, 0.0), jnp.where(present, r, 0.0), lambda_)
    return s, COSMOSState(new_key, r.astype(jnp.float32))

  return reweighter("cosmos", num_tasks, init, weight_fn, handles_absent=True)


def pbi_scalings(losses: jax.Array, direction: jax.Array, theta: float,
                 reference: jax.Array | None = None) -> jax.Array:
  """dS/dL_i of PBI, S = d_1 + theta d_2 (Zhang & Li 2007, Eq. 4; torchjd's `PBI`).

  With f = L - z*, w_hat = w / ||w||, d_1 = f . w_hat, p = f - d_1 w_hat and
  d_2 = sqrt(p . p + 1e-12): dd_1/dL = w_hat, dd_2/dL = p / d_2 (p is orthogonal to w_hat).
  """
  w_hat = direction / jnp.linalg.norm(direction)
  f = losses if reference is None else losses - reference
  p = f - (f @ w_hat) * w_hat
  d2 = jnp.sqrt(p @ p + PBI_EPSILON)
  return w_hat + theta * p / d2


def pbi(num_tasks: int, theta: float = 5.0, weights=None, reference=None
        ) -> optax.GradientTransformationExtraArgs:
  """PBI: minimize d_1 + theta d_2, the penalty-based boundary intersection of MOEA/D.

  The losses relative to a reference point z* are split into d_1, their length along the
  preference direction w_hat = w / ||w||, and d_2, their distance to that line; S = d_1 +
  theta d_2 (Zhang & Li 2007, Sec. II-C, Eq. 4; torchjd's `scalarization.PBI`). So
  s = w_hat + theta p / d_2 with p = (L - z*) - d_1 w_hat: the rows of the tasks ahead of the
  preference line get a smaller, possibly negative, weight (their loss may rise), those behind
  it a larger one. theta = 0 is the projection on w_hat (EW scaled by 1 / sqrt(K) for w = 1).

  Args:
    num_tasks: K.
    theta: the penalty on d_2 (>= 0; the paper uses 5).
    weights: the preference w, shape (K,), non-negative (None: ones).
    reference: z*, shape (K,), a lower bound on the losses (None: the origin).

  Returns:
    An `optax.GradientTransformationExtraArgs` (a loss balancer) mapping stacked per-task
    gradients (leading axis K on every leaf) to the same rows scaled by s_i; stateless. Needs
    `losses`.

  References:
    Zhang, Q., Li, H. "MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition", IEEE Trans. Evol. Comput. 11(6), 2007, Sec. II-C, Eq. 4; torchjd 0.18
    `scalarization/_pbi.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.pbi(2, theta=5.0)
    >>> params, jac = {"w": jnp.zeros(3)}, {"w": jnp.ones((2, 3))}  # K = 2 stacked gradients
    >>> rows, state = tx.update(jac, tx.init(params), losses=jnp.array([1.0, 3.0]))
    >>> print(np.asarray(state.weights).round(3))  # task 0 ahead of the line, task 1 behind
    [-2.828  4.243]
  """
  check_positive_int(num_tasks, "pbi: num_tasks")
  if theta < 0:
    raise ValueError(f"pbi: theta must be non-negative, got {theta}.")
  w = jnp.asarray(_preference(weights, num_tasks, "pbi"), jnp.float32)
  z = None if reference is None else jnp.asarray(reference, jnp.float32)
  if z is not None and z.shape != (num_tasks,):
    raise ValueError(f"pbi: reference must have shape ({num_tasks},), got {z.shape}.")

  def weight_fn(losses, state, present):
    # Absent tasks leave the loss, preference and reference vectors (their entries set to 0).
    ref = None if z is None else jnp.where(present, z.astype(losses.dtype), 0.0)
    direction = jnp.where(present, w.astype(losses.dtype), 0.0)
    return pbi_scalings(jnp.where(present, losses, 0.0), direction, theta, ref), state

  return reweighter("pbi", num_tasks, lambda: optax.EmptyState(), weight_fn,
                    handles_absent=True)
