"""optax wrappers for transformations that change the update's shape (stacked -> one row)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def apply_if_finite(inner: optax.GradientTransformation,
                    max_consecutive_errors: int) -> optax.GradientTransformationExtraArgs:
  """`optax.apply_if_finite` for a chain that starts with a balancer.

  Skips the step (zero update, `inner`'s state unchanged) when the stacked gradients or the
  `losses` extra argument hold a NaN or an infinity, unless that happened more than
  `max_consecutive_errors` times in a row. optax's own wrapper returns zeros shaped like its
  input, which for a gradient balancer (input stacked, output one gradient) cannot be the
  update; here the zeros are shaped like `inner`'s output. The state is optax's
  `ApplyIfFiniteState` (`last_finite`, `notfinite_count`, `total_notfinite`, `inner_state`).

  Args:
    inner: the transformation to protect, e.g. `optax.chain(balancer, optax.adam(1e-3))`.
    max_consecutive_errors: non-finite steps in a row that are skipped before one is applied.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(jnp.zeros([], jnp.int32), jnp.array(True),
                                    jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None, **extra_args):
    checked = (updates, extra_args.get("losses"))
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(checked)]))
    count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))

    def apply(_):
      return inner.update(updates, state.inner_state, params, **extra_args)

    def skip(_):
      out_shape = jax.eval_shape(apply, None)[0]
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)
      return zeros, state.inner_state

    out, inner_state = jax.lax.cond(finite | (count > max_consecutive_errors), apply, skip,
                                    None)
    total = jnp.where(finite, state.total_notfinite,
                      optax.safe_increment(state.total_notfinite))
    return out, optax.ApplyIfFiniteState(count, finite, total, inner_state)

  return optax.GradientTransformationExtraArgs(init, update)
