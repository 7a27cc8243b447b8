"""Nash-MTL: the Nash bargaining solution of the tasks' gradients."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import solvers
from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import clip_weights, gram_aggregator
from mtl_optax.checks import check_positive_int


class NashMTLState(NamedTuple):
  step: jax.Array   # updates taken
  alpha: jax.Array  # (K,) the last weights (ones at the start, as the reference)
  # Whether the last solve succeeded for every task with a nonzero row (True on steps that
  # reuse alpha); where it did not, the previous alpha was kept (`mtl_optax.with_diagnostics`
  # counts these fallbacks).
  converged: jax.Array | bool = True


def nash_mtl_weights(gram: jax.Array, prev: jax.Array | None = None, *, optim_niter: int = 20,
                     tol: float = 1e-4) -> tuple[jax.Array, jax.Array]:
  """Nash-MTL's alpha > 0 with alpha_i (M alpha)_i = 1 (Navon et al. 2022, Eq. 5), warm-started
  from the previous alpha `prev`, and per task whether it was found (`solvers.nash_weights`).

  Args:
    gram: `(K, K)` Gram matrix M = G G^T of the rows g_i.
    prev: `(K,)` previous alpha to warm-start from (None: a multiple of the ones vector).
    optim_niter: cap on the damped Newton steps.
    tol: accept when max_i |alpha_i (M alpha)_i - 1| < tol.

  Returns:
    `(alpha, ok)`: `(K,)` weights of d = sum_i alpha_i g_i, and `(K,)` bools, true where
    task i's alpha was found (alpha is 1 elsewhere).

  References:
    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", ICML, arXiv:2202.01017,
    Eq. 5.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax
    >>> gram = jnp.array([[1.0, -0.5], [-0.5, 4.25]])  # rows (1, 0) and (-0.5, 2)
    >>> alpha, ok = jax.jit(mtl_optax.nash_mtl_weights)(gram)
    >>> print(np.asarray(alpha).round(3), ok)
    [1.149 0.557] [ True  True]
  """
  return solvers.nash_weights(gram, max_iter=optim_niter, tol=tol, prev=prev)


def nash_mtl(
    num_tasks: int,
    *,
    update_weights_every: int = 1,
    optim_niter: int = 20,
    max_norm: float = 1.0,
    tol: float = 1e-4,
    shared: tree_lib.MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """Nash-MTL: d = sum_i alpha_i g_i with alpha > 0 solving alpha_i (M alpha)_i = 1.

  Navon et al. 2022 (Multi-Task Learning as a Bargaining Game), Eq. 5 (G^T G alpha = 1/alpha).
  The reference (AvivNavon/nash-mtl) runs up to 20 convex-concave steps with cvxpy and often
  stops far from that fixed point; here `optim_niter` damped Newton steps on the equivalent
  convex problem min 1/2 alpha^T M alpha - sum log alpha (`nash_mtl_weights`) reach it to
  float precision, warm-started from the previous alpha. An iterate is accepted when
  max_i |alpha_i (M alpha)_i - 1| < `tol`, when it is at the float rounding floor of that
  residual, or when it is better than the previous alpha; otherwise, or where a task's row is
  zero, the previous alpha is kept (for that task), as the reference does on failure.
  At the fixed point ||d|| = sqrt(K). As in the reference, the shared part of d is clipped to
  global norm `max_norm` (<= 0: no clipping), weights are recomputed every
  `update_weights_every` steps, and task-specific leaves get sum_i alpha_i row_i (unclipped).

  Args:
    num_tasks: K.
    update_weights_every: recompute alpha every this many steps (reuse it in between).
    optim_niter: cap on the damped Newton steps per solve.
    max_norm: clip the shared part of d to this global norm (<= 0: no clipping).
    tol: accept alpha when max_i |alpha_i (M alpha)_i - 1| < tol.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a
    `BalancerState` around a `NashMTLState` (step count, last alpha).

  References:
    Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", ICML, arXiv:2202.01017,
    Eq. 5 (G^T G alpha = 1/alpha).

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.nash_mtl(2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.615 0.788]
  """
  return nash_aggregator(
      "nash_mtl", num_tasks,
      lambda m, prev, present: nash_mtl_weights(m, prev, optim_niter=optim_niter, tol=tol),
      update_weights_every=update_weights_every, optim_niter=optim_niter, max_norm=max_norm,
      shared=shared)


def nash_aggregator(
    name: str,
    num_tasks: int,
    solve: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]],
    *,
    update_weights_every: int,
    optim_niter: int,
    max_norm: float,
    shared: tree_lib.MaskOrFn,
) -> optax.GradientTransformationExtraArgs:
  """d = sum_i alpha_i g_i with alpha = solve(M, previous alpha, present) -> (alpha, ok per task).

  The machinery Nash-MTL and its variants share: alpha recomputed every
  `update_weights_every` steps and kept where `ok` is false, the shared part of d clipped to
  global norm `max_norm` (<= 0: none; `clip_weights`), task-specific leaves get
  sum_i alpha_i row_i.
  """
  check_positive_int(update_weights_every, f"{name}: update_weights_every")
  check_positive_int(optim_niter, f"{name}: optim_niter")

  def init(params):
    return NashMTLState(jnp.zeros([], jnp.int32),
                        jnp.ones((num_tasks,), tree_lib.weight_dtype(params)), jnp.array(True))

  def weights(m, state, losses, present):
    del losses

    def update_alpha(prev):
      alpha, ok = solve(m, prev, present)  # absent tasks (zero rows) are decoupled, ok False
      norms = jnp.sqrt(jnp.maximum(jnp.diag(m), 0.0))
      active = norms > 1e-12 * jnp.max(norms)  # zero rows cannot be solved for (solvers.py)
      return jnp.where(ok, alpha, prev).astype(prev.dtype), jnp.all(ok | ~active)

    alpha, converged = jax.lax.cond(state.step % update_weights_every == 0, update_alpha,
                                    lambda prev: (prev, jnp.array(True)), state.alpha)
    return (clip_weights(alpha, m, max_norm), alpha,
            NashMTLState(state.step + 1, alpha, converged))

  # alpha(t^2 M) = alpha(M) / t: d = sum_i alpha_i g_i does not change with the rows' scale.
  return gram_aggregator(name, num_tasks, init, weights, shared=shared, handles_absent=True,
                         homogeneity=0.0)
