"""CR-MOGM: an exponential moving average of any Gram-based weighting's weights (Zhou et al.,
NeurIPS 2022)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_in_range, check_positive_int
from mtl_optax.grad.base import gram_aggregator

Weighting = Callable[[jax.Array], jax.Array]  # (K, K) Gram matrix -> (K,) weights


class CRMOGMState(NamedTuple):
  weights: jax.Array  # (K,) lambda_k, the moving average of the wrapped weighting's weights
  count: jax.Array    # int32, the number of updates so far


def cr_mogm_weights(gram: jax.Array, state: CRMOGMState, weighting: Weighting,
                    beta: float, present: jax.Array | None = None
                    ) -> tuple[jax.Array, CRMOGMState]:
  """lambda_k = beta lambda_{k-1} + (1 - beta) lambda-hat_k, lambda-hat_k = weighting(M),
  with lambda_0 = lambda-hat_1 (Zhou et al. 2022: CR-MOGM's composite weights, averaged
  exponentially over the steps).

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    state: the moving average lambda_{k-1} and the step count (0: no step yet).
    weighting: `M -> (K,)` weights, e.g. `mtl_optax.mgda_weights`.
    beta: the weight of the previous average, in [0, 1] (0: `weighting` alone).
    present: `(K,)` bool of the tasks that take part (None: all; M is 0 on the others' rows
      and columns): `weighting` gets it as `present=` where it takes that keyword (as
      `mgda_weights` does), and the others' averages keep their values.

  Returns:
    `(w, state)`: the `(K,)` weights lambda_k of d = sum_i lambda_k,i g_i, and the new state.

  References:
    Zhou, Zhang, Jiang, Zhong, Gu, Zhu 2022, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS (proceedings paper
    f91bd64a3620aad8e70a27ad9cb3ca57), CR-MOGM.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> state = mtl_optax.CRMOGMState(jnp.array([0.5, 0.5]), jnp.array(1))
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> w, state = mtl_optax.cr_mogm_weights(gram, state, mtl_optax.mgda_weights, beta=0.9)
    >>> print(np.asarray(w).round(3))  # 0.9 (0.5, 0.5) + 0.1 (0.76, 0.24)
    [0.526 0.474]
  """
  if present is not None and _takes_present(weighting):
    fresh = jnp.asarray(weighting(gram, present=present))
  else:
    fresh = jnp.asarray(weighting(gram))
  if fresh.shape != (gram.shape[0],):
    raise ValueError(f"cr_mogm: the weighting returned shape {fresh.shape}, expected "
                     f"({gram.shape[0]},) weights.")
  previous = jnp.where(state.count > 0, state.weights, fresh)
  w = (beta * previous + (1.0 - beta) * fresh).astype(state.weights.dtype)
  if present is not None:
    w = jnp.where(present, w, state.weights)
  return w, CRMOGMState(w, state.count + 1)


def _takes_present(weighting: Weighting) -> bool:
  """Whether `weighting` takes the keyword `present`."""
  try:
    params = inspect.signature(weighting).parameters
  except (TypeError, ValueError):
    return False
  return "present" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def cr_mogm(num_tasks: int, weighting: Weighting, *, beta: float = 0.9,
            shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """CR-MOGM: d = sum_i lambda_k,i g_i, lambda_k the moving average of `weighting`'s weights.

  Zhou et al. 2022 show that stochastic gradient manipulation (MGDA, PCGrad, CAGrad, ...) can
  fail to converge because the composite weights follow each mini-batch, and fix it by
  averaging the weights exponentially: lambda_k = beta lambda_{k-1} + (1 - beta) lambda-hat_k
  (weights `cr_mogm_weights`). As torchjd's CRMOGMWeighting (checked against its source in a
  torchjd newer than the snapshot of the other methods; its `alpha` is our `beta`), lambda_0
  is the first weights lambda-hat_1 and beta is constant (the paper's Cor. 1 lets it grow
  toward 1 as the learning rate decays: `optax.inject_hyperparams(cr_mogm,
  static_args=("num_tasks", "weighting"))` can set or schedule it).
  `weighting` is a pure function of the Gram matrix, such as `mgda_weights` or `upgrad_weights`
  (bind options with `functools.partial`). Task-specific leaves get the plain sum.

  Args:
    num_tasks: K.
    weighting: `(K, K)` Gram matrix -> `(K,)` weights.
    beta: the weight of the previous average, in [0, 1] (0: `weighting` alone).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `CRMOGMState`.

  References:
    Zhou, Zhang, Jiang, Zhong, Gu, Zhu 2022, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS (proceedings paper
    f91bd64a3620aad8e70a27ad9cb3ca57), CR-MOGM and Cor. 1 (the schedule of beta).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx, params = mtl_optax.cr_mogm(2, mtl_optax.mgda_weights), {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> for jac in (jnp.array([[1.0, 0.0], [-0.5, 2.0]]), jnp.array([[1.0, 0.0], [0.0, 1.0]])):
    ...   d, state = jax.jit(tx.update)({"w": jac}, state)
    >>> print(np.asarray(state.weights).round(3))  # 0.9 (0.76, 0.24) + 0.1 (0.5, 0.5)
    [0.734 0.266]
  """
  check_positive_int(num_tasks, "cr_mogm: num_tasks")
  if not callable(weighting):
    raise ValueError(f"cr_mogm: weighting must be a function Gram -> weights, got {weighting!r}.")
  check_in_range(beta, 0.0, 1.0, "cr_mogm: beta")

  def init(params):
    return CRMOGMState(jnp.zeros((num_tasks,), tree_lib.weight_dtype(params)),
                       jnp.zeros((), jnp.int32))

  def weights(gram, state, losses, present):
    del losses
    w, state = cr_mogm_weights(gram, state, weighting, beta, present)
    return w, None, state

  return gram_aggregator("cr_mogm", num_tasks, init, weights, shared=shared,
                         handles_absent=True)
