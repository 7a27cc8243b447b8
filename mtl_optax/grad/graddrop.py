"""Gradient sign dropout (Chen et al., NeurIPS 2020)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.base import aggregator
from mtl_optax.keys import as_key

_EPS = 1e-7  # LibMTL's guard in the purity's denominator (all-zero entries get P = 1/2)


class GradDropState(NamedTuple):
  key: jax.Array


def graddrop_leaf(rows: jax.Array, key: jax.Array, leak: jax.Array) -> jax.Array:
  """GradDrop on one stacked leaf, entry by entry.

  Chen et al. 2020, Alg. 1 and Eq. 1: purity P = (1 + sum_i g_i / sum_i |g_i|) / 2, U ~ U[0, 1)
  per entry; row i keeps its entry where (P > U and g_i > 0) or (P < U and g_i < 0); the
  output is sum_i (leak_i + (1 - leak_i) keep_i) g_i.
  """
  purity = 0.5 * (1.0 + rows.sum(0) / (jnp.abs(rows).sum(0) + _EPS))
  u = jax.random.uniform(key, purity.shape, jnp.float32)  # the same draw for every dtype
  keep = ((purity > u) & (rows > 0)) | ((purity < u) & (rows < 0))
  leak = jnp.broadcast_to(leak, rows.shape[:1]).reshape((-1,) + (1,) * (rows.ndim - 1))
  return ((leak + (1.0 - leak) * keep) * rows).sum(0)


def graddrop(num_tasks: int, leak: float | jax.Array = 0.0, *, key: jax.Array | int,
             shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """GradDrop: per entry, keep only the rows whose sign a random draw picks, then sum.

  Chen et al. 2020, Alg. 1, applied to the parameter gradients entry by entry (as torchjd does;
  the paper and LibMTL apply it at a shared activation, with the inputs' signs). `leak` (a float
  or one per task) lets that fraction of every row through; 0 is the paper's default. A fresh
  draw per leaf every step, from the key in the state. Task-specific leaves get the plain sum.

  Args:
    num_tasks: K.
    leak: a float or `(K,)` floats, the fraction of each row always let through.
    key: PRNG key or int seed of the per-entry draws.
    shared: the shared parameters: a pytree of bools like the parameters (a prefix is
      enough) or a callable on them; None: every leaf is shared.

  Returns:
    An `optax.GradientTransformationExtraArgs` from stacked per-task gradients (leading axis K
    on every leaf) to one gradient shaped like the parameters; its state is a `BalancerState`
    around a `GradDropState` (the key), whose `weights` are ones (each row enters with
    coefficient 1 on the entries it keeps).

  References:
    Chen et al. 2020, "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout", NeurIPS, arXiv:2010.06808, Alg. 1 and Eq. 1.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.graddrop(2, key=0)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(float(d["w"][0]) in (1.0, -0.5), float(d["w"][1]))  # one sign kept per entry
    True 2.0
  """
  leak = jnp.asarray(leak, jnp.float32)
  if leak.ndim > 1:
    raise ValueError(f"graddrop: leak must be a float or a vector of K floats, got {leak.shape}.")

  def aggregate(rows, state, losses, params):
    del losses, params
    key, sub = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(rows)
    keys = jax.random.split(sub, len(leaves))
    out = [graddrop_leaf(leaf, leaf_key, leak.astype(leaf.dtype))
           for leaf, leaf_key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out), jnp.ones((num_tasks,)), None, GradDropState(key)

  balancer = aggregator("graddrop", num_tasks, lambda params: GradDropState(as_key(key)),
                        aggregate, shared=shared)

  def update(updates, state, params=None, **extra_args):
    if extra_args.get("axis_name") is not None:
      raise ValueError("graddrop draws one number per row entry, so it cannot run on rows split "
                       "over devices (axis_name); under jit with NamedSharding its draws are "
                       "those of one device.")
    return balancer.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(balancer.init, update)
