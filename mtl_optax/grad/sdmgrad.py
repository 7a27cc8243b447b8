"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao et al. 2023)."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_positive_int
from mtl_optax.grad.base import gram_aggregator
from mtl_optax.present import num_present, project_present, simplex_part


class SDMGradState(NamedTuple):
  w: jax.Array  # (K,) the inner weights on the simplex (1/K at the start)


def sdmgrad_weights(cross_gram: jax.Array, w: jax.Array, *, lam: float = 0.3, niter: int = 20,
                    lr: float = 5.0, momentum: float = 0.5, present: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """SDMGrad's weights: w <- Pi_simplex(w - lr v), v the heavy-ball sum of C w + lam C 1/K.

  `niter` projected momentum-SGD steps (fresh momentum each call, as LibMTL's per-step
  `torch.optim.SGD`) on 1/2 ||G^T w + lam g0||^2 over the simplex, its gradient estimated with
  C = G_a G_b^T from two independent mini-batches (Xiao et al. 2023, Alg. 1, Eq. 9), C first
  divided by the square of the mean over i of sqrt(max(C_ii, 0)). The update then weighs the
  rows with (w + lam / K) / (1 + lam): d = (G^T w + lam g0) / (1 + lam).

  Args:
    cross_gram: `(K, K)` cross-Gram matrix C = G_a G_b^T of two independent mini-batches' rows
      (the Gram matrix M of one batch for the deterministic variant).
    w: `(K,)` the current inner weights, on the simplex.
    lam: lambda, the pull towards the average gradient g0.
    niter: the SGD steps per call.
    lr: their step size (LibMTL's 5).
    momentum: their momentum (LibMTL's 0.5).
    present: `(K,)` bool of the tasks that take part (None: all; C 0 on the others' rows and
      columns): the steps run from w renormalized over the present tasks, on their simplex,
      with K their number; the new w keeps the others' entries and the present ones' mass.

  Returns:
    `(weights, w)`: `(K,)` weights of d = sum_i weights_i g_i, and the new inner weights.

  References:
    Xiao et al. 2023, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS, arXiv:2305.18409, Alg. 1 and Eq. 9; checked against
    LibMTL's `LibMTL/weighting/SDMGrad.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> cross = jnp.array([[1.0, -0.5], [-0.5, 4.25]])
    >>> weights, w = mtl_optax.sdmgrad_weights(cross, jnp.full(2, 0.5))
    >>> print(np.asarray(w).round(3), np.asarray(weights).round(3))
    [1. 0.] [0.885 0.115]
  """
  if present is not None:  # the usual step (every task present) as without `present`
    full = lambda w: sdmgrad_weights(cross_gram, w, lam=lam, niter=niter, lr=lr,
                                     momentum=momentum)

    def some(w):  # on the present tasks, from their w renormalized; the others keep theirs
      part, mass = simplex_part(w, present)
      out, new = _sdmgrad_weights(cross_gram, part, lam, niter, lr, momentum, present)
      return out, jnp.where(present, mass * new, w).astype(w.dtype)
    return jax.lax.cond(jnp.all(present), full, some, w)
  return _sdmgrad_weights(cross_gram, w, lam, niter, lr, momentum, None)


def _sdmgrad_weights(cross_gram, w, lam, niter, lr, momentum, present):
  k = cross_gram.shape[0]
  if present is None:
    norms = jnp.sqrt(jnp.maximum(jnp.diag(cross_gram), 0.0))
    scale = jnp.mean(norms) ** 2
    project = optax.projections.projection_simplex
  else:
    k = num_present(present).astype(w.dtype)
    scale = (jnp.sum(jnp.sqrt(jnp.maximum(jnp.diag(cross_gram), 0.0))) / k) ** 2
    project = lambda x: project_present(x, present)
  c = jnp.where(scale > 0, cross_gram / jnp.where(scale > 0, scale, 1.0), 0.0)
  pull = lam * (jnp.mean(c, axis=1) if present is None else jnp.sum(c, axis=1) / k)

  def step(i, carry):
    w, buf = carry
    grad = c @ w + pull
    buf = jnp.where(i == 0, grad, momentum * buf + grad)
    return project(w - lr * buf).astype(w.dtype), buf

  w, _ = jax.lax.fori_loop(0, niter, step, (w, jnp.zeros_like(w)))
  out = (w + lam / k) / (1.0 + lam)
  return (out if present is None else jnp.where(present, out, 0.0)), w


def sdmgrad(
    num_tasks: int,
    lam: float = 0.3,
    niter: int = 20,
    *,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """SDMGrad: d = (G^T w + lam g0) / (1 + lam), w from the cross-Gram of batches a and b.

  Xiao et al. 2023 (Direction-oriented Multi-objective Learning), Alg. 1: three independent
  mini-batches per step; w takes `niter` projected SGD steps with C = G_a G_b^T
  (`sdmgrad_weights`, warm-started from the previous w), then d is formed from the rows of
  the update batch (LibMTL's zeta batch). The update batch is the stacked Jacobian passed as
  `updates`; batches a and b come as the extra argument `sample_jacobians=(jac_a, jac_b)` (see
  README, "More than one Jacobian"); without it, the Gram matrix of `updates` stands in for
  C (a deterministic variant, not the paper's). Task-specific leaves get the plain sum of the
  update batch's rows (LibMTL: the sum over the three batches).

  Deviation from LibMTL: C is divided by scale^2 only when scale > 0 (LibMTL adds 1e-8 to
  scale^2, an absolute floor that makes C ~ 0 when gradients are below ~1e-4), so the
  weights do not depend on the gradients' overall scale.

  Args:
    num_tasks: K.
    lam: lambda (LibMTL's `SDMGrad_lamda`, 0.3).
    niter: SGD steps on w per update (LibMTL's `SDMGrad_niter`, 20).
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around an `SDMGradState`.

  References:
    Xiao et al. 2023, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS, arXiv:2305.18409, Alg. 1; checked against LibMTL's
    `LibMTL/weighting/SDMGrad.py`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.sdmgrad(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> jac_a = {"w": jnp.array([[1.0, 0.5], [0.0, 2.0]])}
    >>> jac_b = {"w": jnp.array([[2.0, 0.0], [-1.0, 1.0]])}
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), sample_jacobians=(jac_a, jac_b))
    >>> print(np.asarray(state.weights).round(3), np.asarray(d["w"]).round(3))
    [0.115 0.885] [-0.327  1.769]
  """
  check_positive_int(niter, "sdmgrad: niter")
  if isinstance(lam, numbers.Real) and not lam >= 0:
    raise ValueError(f"sdmgrad: lam must be >= 0, got {lam!r}.")

  def init(params):
    return SDMGradState(jnp.full((num_tasks,), 1.0 / num_tasks, tree_lib.weight_dtype(params)))

  def weights(cross, state, losses, present):
    del losses
    out, w = sdmgrad_weights(cross.astype(state.w.dtype), state.w, lam=lam, niter=niter,
                             present=present)
    return out, None, SDMGradState(w)

  return gram_aggregator("sdmgrad", num_tasks, init, weights, shared=shared, cross_gram=True,
                         handles_absent=True)
