"""Gradient Vaccine (Wang et al., ICLR 2021)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.grad.pcgrad import task_orders
from mtl_optax.keys import as_key

_EPS = 1e-8  # the reference's guard in both denominators (LibMTL GradVac)


class GradVacState(NamedTuple):
  key: jax.Array
  target: jax.Array  # (K, K) EMA of the cosine of gpc_i with g_j (the target phi-hat_ij)


def gradvac_weights(gram: jax.Array, target: jax.Array, orders: jax.Array,
                    beta: float) -> tuple[jax.Array, jax.Array]:
  """Weights w with sum_i gpc_i = sum_m w_m g_m, and the updated targets.

  Wang et al. 2021, Eq. 3 and Alg. 1 (as in LibMTL): for j in task i's order (j != i),
  phi = cos(gpc_i, g_j); if phi < target_ij, gpc_i += ||gpc_i|| (t sqrt(1 - phi^2) -
  phi sqrt(1 - t^2)) / (||g_j|| sqrt(1 - t^2)) g_j; then target_ij <- (1 - beta) t + beta phi.
  gpc_i = sum_m C_im g_m, so every dot product and norm comes from the Gram matrix.

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    target: `(K, K)` the EMA targets phi-hat_ij.
    orders: `(K, K)` ints, row i the order in which task i meets the tasks (`task_orders`).
    beta: the EMA rate of the targets.

  Returns:
    `(w, target)`: `(K,)` weights of sum_i gpc_i = sum_m w_m g_m, and the updated `(K, K)`
    targets.

  References:
    Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models", ICLR, arXiv:2010.05874, Eq. 3 and Alg. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> orders = jnp.array([[0, 1], [1, 0]])  # the order in which each task meets the others
    >>> w, target = mtl_optax.gradvac_weights(gram, jnp.zeros((2, 2)), orders, beta=0.5)
    >>> print(np.asarray(w).round(3))
    [1.5   1.118]
  """
  k = gram.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))

  def row(i, order, target_row):
    def vaccinate(carry, j):
      coef, target_row = carry
      pc_norm = jnp.sqrt(jnp.maximum(coef @ gram @ coef, 0.0))
      phi = jnp.clip(coef @ gram[:, j] / (pc_norm * norms[j] + _EPS), -1.0, 1.0)
      t = target_row[j]
      sin_t = jnp.sqrt(jnp.maximum(1.0 - t**2, 0.0))
      sin_phi = jnp.sqrt(jnp.maximum(1.0 - phi**2, 0.0))
      step = pc_norm * (t * sin_phi - phi * sin_t) / (norms[j] * sin_t + _EPS)
      other = j != i
      coef = coef.at[j].add(jnp.where(other & (phi < t), step, 0.0))
      new_t = jnp.where(other, (1.0 - beta) * t + beta * phi, t)
      target_row = target_row.at[j].set(new_t.astype(target_row.dtype))
      return (coef, target_row), None
    (coef, target_row), _ = jax.lax.scan(
        vaccinate, (jnp.eye(k, dtype=gram.dtype)[i], target_row), order)
    return coef, target_row

  coef, target = jax.vmap(row)(jnp.arange(k), orders, target)
  return coef.sum(0), target


def gradvac(num_tasks: int, beta: float = 0.5, *, key: jax.Array | int,
            shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """GradVac: raise each pair's gradient cosine to an EMA target, then sum.

  Wang et al. 2021, Alg. 1, in LibMTL's form: beta = 0.5, targets start at 0, one group (all
  shared parameters; LibMTL's `GradVac_group_type=0`), a fresh random order per task every
  step (weights `gradvac_weights`). Task-specific leaves get the plain sum of their rows.

  Args:
    num_tasks: K.
    beta: the EMA rate of the cosine targets.
    key: PRNG key or int seed of the task orders.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `GradVacState` (key, targets).

  References:
    Wang et al. 2021, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models", ICLR, arXiv:2010.05874, Alg. 1 (Eq. 3: the vaccinated
    gradient).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.gradvac(2, key=0), {"w": jnp.zeros(2)}
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = jax.jit(tx.update)(jac, tx.init(params), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.941 2.235]
  """

  def init(params):
    return GradVacState(as_key(key),
                        jnp.zeros((num_tasks, num_tasks), tree_lib.weight_dtype(params)))

  def weights(gram, state, losses, present):
    del losses
    key, sub = jax.random.split(state.key)
    w, target = gradvac_weights(gram, state.target, task_orders(sub, num_tasks), beta)
    # Absent tasks' rows are 0: nothing moves toward them (their w is dropped) and the targets
    # of the pairs with an absent task keep their values.
    target = jnp.where(present[:, None] & present[None, :], target, state.target)
    return w, None, GradVacState(key, target)

  return gram_aggregator("gradvac", num_tasks, init, weights, shared=shared,
                         handles_absent=True)
