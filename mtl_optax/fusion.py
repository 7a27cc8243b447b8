"""Loss balancing then gradient balancing (IGB, Dai et al. 2023, Algorithm 3), in two readings.

The IGB paper's Algorithm 3 and its reference code (IGB4MTL) differ on the task-specific
parameters (the heads):

- ``reading="reference"`` (the default, what IGB4MTL's `experiments/quantum_chemistry/trainer.py`
  does with `methods/gradient_weight_methods.py`): the loss-balanced losses go to the gradient
  balancer, which acts on every parameter as it does alone: for Nash-MTL the heads get the
  alpha-weighted sum of the loss-balanced rows. This is `optax.chain(loss_balancer,
  gradient_balancer)`.
- ``reading="algorithm3"`` (the paper's text: "task-specific parameters are updated by the
  loss balancing alone"): shared parameters get the gradient balancer's update of the
  loss-balanced rows, task-specific parameters the plain sum of the loss-balanced rows,
  sum_i s_i g_i.

The two differ only for gradient balancers that weight the heads (Nash-MTL, IMGrad-Nash,
FairGrad, GradNorm, IMTL, ExcessMTL); for the others (heads get the plain sum of their rows)
they are the same update. For a scale-invariant gradient balancer (registry property
"scale_invariant": Nash-MTL, FairGrad at alpha = 1, MGDA on l2-normalized rows) the shared
update ignores the loss balancer, so the reference reading equals the gradient balancer alone
(its heads too, for Nash-MTL), and Algorithm 3's reading differs from it on the heads only.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.rows import GramRows, GramUpdate, RepresentationRows, unstack

Reading = Literal["reference", "algorithm3"]
READINGS = ("reference", "algorithm3")


def fusion(loss_balancer: optax.GradientTransformation,
           gradient_balancer: optax.GradientTransformation, *,
           reading: Reading = "reference",
           shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """IGB's fusion of a loss balancer and a gradient balancer (Dai et al. 2023, Algorithm 3).

  Args:
    loss_balancer: a loss balancer (stacked -> stacked), e.g. `igb_v1(K, steps_per_epoch)`.
    gradient_balancer: a gradient balancer (stacked -> one gradient), e.g. `nash_mtl(K,
      shared=mask)`.
    reading: `"reference"` (default; IGB4MTL's code: the gradient balancer acts on the
      loss-balanced rows on every parameter, heads included; `optax.chain` of the two) or
      `"algorithm3"` (the paper's text: shared parameters get the gradient balancer's update
      of the loss-balanced rows, task-specific ones the loss-balanced sum sum_i s_i g_i).
    shared: for `"algorithm3"` on the stacked path, the mask of shared parameters: the same as
      the gradient balancer's (pytree of bools, a prefix, or a callable on the parameters;
      None: every leaf shared, and the two readings agree). On the Gram-only path the gradient
      balancer's own mask decides, on the representation path z is shared and the heads are
      not, so `shared` is not read there.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (or `GramRows`,
    or `RepresentationRows`) to one gradient, whose state is the tuple (loss balancer's state,
    gradient balancer's state), as `optax.chain`'s.

  References:
    Dai, Y., Fei, N., Lu, Z. "Improvable Gap Balancing for Multi-Task Learning", UAI 2023
    (arXiv:2307.15429), Algorithm 3; IGB4MTL `experiments/quantum_chemistry/trainer.py`.

  Example:
    >>> import jax.numpy as jnp, mtl_optax
    >>> mask = {"trunk": True, "heads": False}
    >>> tx = mtl_optax.fusion(mtl_optax.log_losses(2), mtl_optax.nash_mtl(2, shared=mask),
    ...                       reading="algorithm3", shared=mask)
    >>> jac = {"trunk": jnp.array([[1.0, 0.0], [0.0, 2.0]]),
    ...        "heads": jnp.array([[1.0, 1.0], [1.0, 1.0]])}
    >>> d, state = tx.update(jac, tx.init({"trunk": jnp.zeros(2), "heads": jnp.zeros(2)}),
    ...                      losses=jnp.array([1.0, 4.0]))
    >>> print(d["heads"])  # 1 / 1 + 1 / 4, the loss-balanced sum
    [1.25 1.25]
  """
  if reading not in READINGS:
    raise ValueError(f"fusion: reading must be one of {READINGS}, got {reading!r}.")
  if reading == "reference":
    return optax.chain(loss_balancer, gradient_balancer)

  def init(params):
    return (loss_balancer.init(params), gradient_balancer.init(params))

  def update(updates, state, params=None, **extra):
    rows, loss_state = loss_balancer.update(updates, state[0], params, **extra)
    out, grad_state = gradient_balancer.update(rows, state[1], params, **extra)
    return _loss_balanced_heads(out, unstack(rows), params, shared), (loss_state, grad_state)

  return optax.GradientTransformationExtraArgs(init, update)


def _loss_balanced_heads(out, rows, params, shared):
  """`out` with its task-specific part replaced by the plain sum of the (loss-balanced) rows."""
  if isinstance(out, GramUpdate):
    if not isinstance(rows, GramRows):
      raise TypeError("fusion: a GramUpdate from rows that are not GramRows.")
    ones = jnp.ones((rows.num_tasks,), rows.coef.dtype)
    return GramUpdate(out.shared, rows.coef.T @ ones, out.mask)
  if isinstance(rows, RepresentationRows):
    k = tree_lib.num_tasks(rows)
    return out._replace(specific=tree_lib.combine(jnp.ones((k,), jnp.float32), rows.specific))
  mask = tree_lib.rows_mask(shared, rows, params, "fusion")
  return jax.tree.map(
      lambda m, o, r: jax.tree.map(lambda oo, rr: oo if m else rr.sum(0), o, r),
      mask, out, rows)
