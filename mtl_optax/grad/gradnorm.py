"""GradNorm: gradient normalization for adaptive loss balancing (Chen et al., ICML 2018)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.present import keep_absent
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
  dL_grad/dw, and w renormalized to sum to K. L_i(0) is the first step's loss (of a task that
  sits out the first steps: its first present step's; on a step with absent tasks the present
  ones' weights keep their sum and the others' are left as they were). The norms are
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
    # L_i(0) is 0 until task i's first present step records it (losses are positive).
    return GradNormState(weights, jnp.zeros((num_tasks,), weights.dtype),
                         jnp.zeros([], jnp.int32), optimizer.init(weights))

  def update_weights(gram, state, losses, present):
    every = jnp.all(present)
    first = (state.count == 0) | ~(state.initial_losses > 0)
    initial = jnp.where(first & present, losses, state.initial_losses)
    w = state.loss_weights
    sq_norms = jnp.diag(gram)
    grad = jnp.where(every, gradnorm_grad(w, sq_norms, losses / initial, alpha),
                     _present_grad(w, sq_norms, losses, initial, alpha, present))
    step, opt_state = optimizer.update(grad, state.opt_state, w)
    new = jnp.maximum(optax.apply_updates(w, step), _MIN_WEIGHT)
    # Renormalized to sum to K; on a step with absent tasks the present ones keep their sum
    # and the others their weights (and Adam moments).
    mass = jnp.sum(jnp.where(present, w, 0.0))
    some = jnp.where(present, mass * new / jnp.sum(jnp.where(present, new, 0.0)), w)
    new = jnp.where(every, num_tasks * new / new.sum(), some)
    opt_state = keep_absent(state.opt_state, opt_state, present)
    return w, w, GradNormState(new, initial, state.count + 1, opt_state)

  return gram_aggregator("gradnorm", num_tasks, init, update_weights, shared=shared,
                         needs_losses=True, needs_positive=True, handles_absent=True)


def _present_grad(weights: jax.Array, sq_norms: jax.Array, losses: jax.Array,
                  initial: jax.Array, alpha: float, present: jax.Array) -> jax.Array:
  """`gradnorm_grad` of the present tasks alone (means over them), 0 at the others."""
  n = jnp.maximum(jnp.sum(present), 1).astype(weights.dtype)
  ratios = jnp.where(present, losses / jnp.where(initial > 0, initial, 1.0), 1.0)
  norms = jnp.sqrt(jnp.maximum(sq_norms, 0.0))
  grad_norms = weights * norms
  rates = ratios / (jnp.sum(jnp.where(present, ratios, 0.0)) / n)
  target = jnp.sum(jnp.where(present, grad_norms, 0.0)) / n * rates**alpha
  return jnp.where(present, jnp.sign(grad_norms - target) * norms, 0.0)
