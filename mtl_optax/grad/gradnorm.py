"""GradNorm: gradient normalization for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.checks import check_positive_int

_MIN_WEIGHT = 1e-8  # weights are floored here before renormalizing, so they stay positive


class GradNormState(NamedTuple):
  loss_weights: jax.Array     # (K,) the loss weights w_i for the next step, summing to K
  initial_losses: jax.Array   # (K,) L_i(0), recorded at the first step
  count: jax.Array            # steps taken
  opt_state: optax.OptState   # the inner optimizer's state for w


def gradnorm_grad(weights: jax.Array, sq_norms: jax.Array, loss_ratios: jax.Array,
                  alpha: float) -> jax.Array:
  """d/dw of L_grad = sum_i |w_i ||g_i|| - mean_j(w_j ||g_j||) r_i^alpha|, the target constant.

  Chen et al. 2018, Eqs. 1-2: G_i = ||w_i g_i||, r_i = L~_i / mean(L~), L~_i = L_i / L_i(0);
  for w > 0, dL_grad/dw_i = sign(G_i - target_i) ||g_i||.
  """
  norms = jnp.sqrt(jnp.maximum(sq_norms, 0.0))
  grad_norms = weights * norms
  rates = loss_ratios / loss_ratios.mean()
  target = grad_norms.mean() * rates**alpha
  return jnp.sign(grad_norms - target) * norms


def gradnorm(num_tasks: int, alpha: float = 1.5,
             learning_rate: optax.ScalarOrSchedule = 1e-3, *,
             shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """GradNorm: loss weights learned so that the weighted gradient norms train at equal rates.

  Chen et al. 2018, Alg. 1: d = sum_i w_i g_i with the current w (task-specific leaves get the
  same weighted sum, as the loss sum_i w_i L_i gives them); then one Adam step on w along
  dL_grad/dw, and w renormalized to sum to K. L_i(0) is the first step's loss. The norms are
  over all shared parameters (the diagonal of the Gram matrix), not only the last shared layer
  the paper uses: pass a `shared` mask holding that layer to follow the paper (then the other
  shared leaves count as task-specific and also get the weighted sum). Needs positive losses.

  Args:
    num_tasks: K.
    alpha: the asymmetry hyperparameter (restoring force towards equal training rates).
    learning_rate: of the Adam step on the loss weights w.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `GradNormState` (loss weights, L_i(0), count).

  References:
    Chen et al. 2018, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep
    Multitask Networks", ICML, arXiv:1711.02257, Alg. 1 and Eqs. 1-2.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.gradnorm(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.5 2. ]
  """
  check_positive_int(num_tasks, "gradnorm: num_tasks")
  optimizer = optax.adam(learning_rate)

  def init(params):
    weights = jnp.ones((num_tasks,), tree_lib.weight_dtype(params))
    return GradNormState(weights, jnp.ones((num_tasks,), weights.dtype),
                         jnp.zeros([], jnp.int32), optimizer.init(weights))

  def update_weights(gram, state, losses):
    initial = jnp.where(state.count == 0, losses, state.initial_losses)
    w = state.loss_weights
    grad = gradnorm_grad(w, jnp.diag(gram), losses / initial, alpha)
    step, opt_state = optimizer.update(grad, state.opt_state, w)
    new = jnp.maximum(optax.apply_updates(w, step), _MIN_WEIGHT)
    new = num_tasks * new / new.sum()
    return w, w, GradNormState(new, initial, state.count + 1, opt_state)

  return gram_aggregator("gradnorm", num_tasks, init, update_weights, shared=shared,
                         needs_losses=True, needs_positive=True)
