"""DB-MTL: dual-balancing multi-task learning (Lin et al. 2023)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import aggregator, check_buffers, shared_zeros
from mtl_optax.checks import check_positive_int
from mtl_optax.loss.scale import log_losses

_EPS = 1e-8  # the reference's guard in u_max / (u_i + eps)


class DBMTLState(NamedTuple):
  count: jax.Array  # steps taken (k - 1)
  grads: Any        # ghat: EMA of the per-task gradients, shaped like the stacked shared rows


def db_mtl(num_tasks: int, beta: float = 0.9, beta_sigma: float = 0.0, *,
           log_transform: bool = True, eps: float = 1e-8,
           shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """DB-MTL: log losses, then EMA gradients rescaled to the largest one's norm and summed.

  Lin et al. 2023, Alg. 1, Eqs. 1-2 (LibMTL DB_MTL): rows grad log(L_i + eps); at step k (from 1)
  ghat_i <- beta_k ghat_i + (1 - beta_k) g_i with beta_k = beta / k^beta_sigma (no bias
  correction, ghat starts at 0); u_i = ||ghat_i||, d = max_j u_j sum_i ghat_i / (u_i + 1e-8).
  All-zero gradients give d = 0. Task-specific leaves get grad sum_i log(L_i + eps).

  The one-call API is `optax.chain(log_losses(num_tasks, eps), <gradient part>)` (needs
  positive `losses`); `log_transform=False` returns the gradient part alone, for rows that
  another loss balancer chained before it has already transformed.

  Args:
    num_tasks: K.
    beta: the EMA rate, beta_k = beta / k^beta_sigma.
    beta_sigma: its decay exponent (0: a constant rate).
    log_transform: chain `log_losses(num_tasks, eps)` in front (the full method; needs
      `losses`).
    eps: the eps of log(L_i + eps).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters: with `log_transform`, the chain
    of `log_losses` and the gradient part, whose state is a `BalancerState` around a
    `DBMTLState`; its `weights` are max_j u_j / (u_i + 1e-8), on the EMA rows ghat_i.

  References:
    Lin et al. 2023, "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029, Alg. 1 and
    Eqs. 1-2.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.db_mtl(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.078 0.1  ]
  """
  check_positive_int(num_tasks, "db_mtl: num_tasks")

  def init(params):
    return DBMTLState(jnp.zeros([], jnp.int32),
                      shared_zeros(params, num_tasks, shared, "db_mtl"))

  def aggregate(rows, state, losses, params, present, axis_name=None):
    del losses, params
    check_buffers("db_mtl", state.grads, rows)
    beta_k = beta / (state.count + 1).astype(jnp.float32)**beta_sigma
    # Absent tasks' EMAs as they were (their rows, maybe NaN, are not read): one select inside
    # the EMA's own expression, no extra pass over the K buffers.
    ema = optax.tree.cast_like(optax.tree.update_moment(rows, state.grads, beta_k, 1),
                               state.grads)
    grads = jax.tree.map(
        lambda new, old: jnp.where(present.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
        ema, state.grads)
    norms = tree_lib.row_norms(grads, axis_name=axis_name)
    # The largest present norm, and absent tasks' EMAs left out of d (the identity when every
    # task is present).
    weights = jnp.where(present, jnp.max(jnp.where(present, norms, 0.0)) / (norms + _EPS), 0.0)
    return tree_lib.combine(weights, grads), weights, None, DBMTLState(state.count + 1, grads)

  balancer = aggregator("db_mtl", num_tasks, init, aggregate, shared=shared,
                        handles_absent=True)
  return optax.chain(log_losses(num_tasks, eps), balancer) if log_transform else balancer
