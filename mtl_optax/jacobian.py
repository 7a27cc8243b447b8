"""Per-task gradients: the stacked Jacobian, and the single-backward path for loss balancers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _vjp(fun, params, args, kwargs, has_aux, name):
  """Forward pass of `fun` with its VJP; checks that it returns a vector of losses."""
  out = jax.vjp(lambda p: fun(p, *args, **kwargs), params, has_aux=has_aux)
  losses = out[0]
  if jnp.ndim(losses) != 1:
    raise ValueError(
        f"{name}: fun must return a vector of K losses, got shape {jnp.shape(losses)}.")
  aux = out[2] if has_aux else None
  return losses, out[1], ((losses, aux) if has_aux else losses)


def value_and_jacrev(fun: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
  """Wraps `fun(params, *args) -> losses[K]` to return `(losses, jac)`.

  `jac` is shaped like `params` with a leading task axis K on every leaf (row i is the
  gradient of loss i). It is one `jax.vjp` vmapped over the K one-hot cotangents, as
  `jax.jacrev` computes it, but the losses come back from the same forward pass.
  With `has_aux`, `fun` returns `(losses, aux)` and the wrapper `((losses, aux), jac)`.
  """
  def wrapped(params, *args, **kwargs):
    losses, vjp_fn, value = _vjp(fun, params, args, kwargs, has_aux, "value_and_jacrev")
    (jac,) = jax.vmap(vjp_fn)(jnp.eye(losses.shape[0], dtype=losses.dtype))
    return value, jac
  return wrapped


def task_weights(
    reweighter: optax.GradientTransformation,
    state: optax.OptState,
    losses: jax.Array,
    params: Any = None,
    **extra_args: Any,
) -> tuple[jax.Array, optax.OptState]:
  """Reads a reweighter's row scalings s (shape `(K,)`) by feeding it a vector of ones.

  Returns `(s, new_state)`, the same state update the stacked path makes.
  """
  update = optax.with_extra_args_support(reweighter).update
  ones = jnp.ones_like(losses)
  weights, new_state = update(ones, state, params, losses=losses, **extra_args)
  if not isinstance(weights, jax.Array) or weights.shape != ones.shape:
    raise ValueError(
        "task_weights needs a loss balancer (stacked -> stacked row scaling); this "
        "transformation reduced the task axis. Chain gradient balancers after it instead."
    )
  return jax.lax.stop_gradient(weights), new_state


def value_and_reweighted_grad(
    fun: Callable[..., Any], reweighter: optax.GradientTransformation, has_aux: bool = False
) -> Callable[..., Any]:
  """The single-backward path of a loss balancer.

  Wraps `fun(params, *args) -> losses[K]` into
  `f(params, state, *args, **extra_args) -> ((losses, grad), new_state)`, where
  `grad = d/dparams sum_i stop_gradient(s_i) L_i` for the reweighter's scalings s: one forward
  and one backward pass, equal to `sum_tasks` of the reweighted stacked Jacobian.
  `extra_args` go to the reweighter. With `has_aux`, `losses` is `(losses, aux)`.
  """
  def wrapped(params, state, *args, **extra_args):
    losses, vjp_fn, value = _vjp(fun, params, args, {}, has_aux, "value_and_reweighted_grad")
    weights, new_state = task_weights(reweighter, state, losses, params, **extra_args)
    (grad,) = vjp_fn(weights.astype(losses.dtype))
    return (value, grad), new_state
  return wrapped
