"""Which tasks take part in a step: absent tasks, non-finite inputs, state they cannot touch.

A task sits out a step when the user says so (the extra argument `present`, a `(K,)` bool: a
batch without that task's labels) or when its loss or its gradient row is not finite. It then
gets weight 0, the per-task entries of every balancer's state keep their values, and the other
tasks are weighted as the method weights them without it. No state takes a non-finite value
from the input: `keep_absent` restores the old value wherever the new one is not finite.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Tree = Any


def check_present(present: Any, k: int, name: str) -> jax.Array | None:
  """The extra argument `present`, checked at trace time: a `(K,)` bool array (or None).

  Args:
    present: None (every task takes part) or a `(K,)` boolean array.
    k: K.
    name: the balancer or entry point, for the message.

  Returns:
    `present` as a bool array, or None.
  """
  if present is None:
    return None
  present = jnp.asarray(present)
  if present.shape != (k,) or present.dtype != jnp.bool_:
    raise ValueError(
        f"{name}: present= must be a ({k},) bool array, True for the tasks that take part in "
        f"this step (e.g. labels_available.any(axis=0)), got {present.dtype}{list(present.shape)}.")
  return present


def task_present(present: jax.Array | None, losses: jax.Array | None, k: int,
                 name: str, *, positive: bool = False) -> jax.Array:
  """The tasks that take part: `present` (all if None), with a finite loss (when losses are
  given), and a positive one where the balancer takes its log (`positive`).

  A finite non-positive loss of a present task, for a log-taking balancer, raises outside
  `jit`; inside `jit` that task sits out the step (a log has no value there) and
  `jax.experimental.checkify` reports it as an error when the step is checkified.
  """
  present = check_present(present, k, name)
  out = jnp.ones((k,), bool) if present is None else present
  if losses is not None:
    out = out & jnp.isfinite(losses)
    if positive and not isinstance(losses, jax.core.Tracer) and not isinstance(
        out, jax.core.Tracer):
      bad = np.flatnonzero(np.asarray(out) & ~(np.asarray(losses) > 0))
      if bad.size:
        raise ValueError(
            f"{name} takes log(L_i) and needs positive losses; tasks {bad.tolist()} have "
            f"losses {np.asarray(losses)[bad].tolist()} (mark a task without data this step "
            "absent with present=, or use a balancer that takes no log).")
    if positive:
      from jax.experimental import checkify  # noqa: PLC0415 (keeps the import off the hot path)
      checkify.debug_check(
          jnp.all(jnp.where(out, losses > 0, True)),
          f"{name} takes log(L_i) and needs positive losses; got {{losses}}: those tasks sat "
          "out the step.", losses=losses)
      out = out & (losses > 0)
  return out


def softmax_present(x: jax.Array, present: jax.Array) -> jax.Array:
  """softmax over the present entries of `x` (0 at the absent ones, and everywhere if none
  is present): the softmax of the method run on the present tasks alone."""
  out = jax.nn.softmax(jnp.where(present, x, -jnp.inf))
  return jnp.where(present, out, 0.0)


def num_present(present: jax.Array) -> jax.Array:
  """The number of present tasks, at least 1 (a float, for K-scaled weights)."""
  return jnp.maximum(jnp.sum(present), 1).astype(jnp.float32)


def finite_rows(rows: Tree) -> jax.Array:
  """`(K,)`: whether every entry of row i, on every leaf, is finite."""
  finite = [jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
            for x in jax.tree.leaves(rows)]
  return functools.reduce(jnp.logical_and, finite)


def zero_absent(rows: Tree, present: jax.Array) -> Tree:
  """The rows with those of absent tasks set to 0 (a select, so NaN and inf rows vanish)."""
  def zero(leaf):
    mask = present.reshape((-1,) + (1,) * (leaf.ndim - 1))
    return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))
  return jax.tree.map(zero, rows)


# State leaves up to this many entries are always guarded against non-finite values; larger
# ones (per-task gradient buffers, K copies of the parameters) only with `large`: a select over
# them after the step that made them cost DB-MTL's update 2-3x (K = 11, 400k parameters), so
# methods that keep such buffers select inside the expression that updates them.
SMALL_LEAF = 1 << 16


def keep_absent(old: Tree, new: Tree, present: jax.Array, *, per_task: bool = True,
                large: bool = True) -> Tree:
  """The new state, with the old values kept where a task sat out or a value is not finite.

  Every floating leaf keeps its old value wherever the new one is not finite (leaves larger
  than `SMALL_LEAF` entries only with `large`). With
  `per_task`, a leaf whose leading axis is K holds per-task entries, and entry i keeps its old
  value when task i is absent (methods whose state has K-sized axes of another meaning, such as
  IGBv2's agent, handle absent tasks themselves and pass `per_task=False`). PRNG keys take
  their new value.
  """
  k = present.shape[0]

  def keep(o, n):
    if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
      return n
    floating = jnp.issubdtype(n.dtype, jnp.inexact)

    def select():
      take = jnp.isfinite(n) if floating else jnp.ones((), bool)
      if per_task and n.shape[:1] == (k,):
        take = take & present.reshape((-1,) + (1,) * (n.ndim - 1))
      return jnp.where(take, n, o)

    return select() if large or n.size <= SMALL_LEAF else n
  return jax.tree.map(keep, old, new)


def simplex_part(w: jax.Array, present: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`(w_p, mass)`: a state on the simplex restricted to the present tasks and renormalized
  (uniform over them if they have no mass; 0 at the absent ones), and that mass. Balancers with
  such a state (MoCo, MoDo, SDMGrad) step from w_p as the method without the absent tasks
  would, and store mass * (its new w_p) there, so the absent tasks keep their entries and the
  whole stays on the simplex."""
  mass = jnp.sum(jnp.where(present, w, 0.0))
  uniform = 1.0 / num_present(present).astype(w.dtype)
  w_p = jnp.where(mass > 0, w / jnp.where(mass > 0, mass, 1.0), uniform)
  return jnp.where(present, w_p, 0.0).astype(w.dtype), mass


def project_present(x: jax.Array, present: jax.Array) -> jax.Array:
  """The projection onto the simplex of the present entries of `x` (0 at the absent ones)."""
  out = optax.projections.projection_simplex(jnp.where(present, x, -jnp.inf))
  return jnp.where(present, out, 0.0).astype(x.dtype)
