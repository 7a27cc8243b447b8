"""One call shape on every path: the losses, a balanced gradient, the new state, the weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.checks import check_choice, check_positive_int
from mtl_optax.diagnostics import Diagnostics, DiagnosticsState
from mtl_optax.jacobian import apply_to_gram_rows, chunked_gram, pullback_present, task_vjp
from mtl_optax.present import check_present, finite_rows
from mtl_optax.representation import value_and_representation_jacrev
from mtl_optax.rows import GramRows, GramUpdate, StackedRows, row_like, unstack
from mtl_optax.state import BalancerState, weights_product

Path = Literal["stacked", "gram", "representation"]
PATHS = ("stacked", "gram", "representation")


class BalancedGrad(NamedTuple):
  """What `value_and_grad(...).update` returns besides the new state, on every path.

  `losses`: the K task losses; `grad`: the balanced gradient, shaped like the parameters (give
  it to the optimizer); `weights`: the weights w of the update on the raw rows (the shared
  leaves' d = sum_i w_i g_i, a loss balancer's scaling included; on the representation path
  the rows are the z-rows); `aux`: what the loss function returned besides the losses
  (`has_aux`), else None; `diagnostics`: the step's `Diagnostics` when the balancer is wrapped
  in `with_diagnostics` (on the representation path, those of the z-rows), else None;
  `present`: `(K,)` bool, the tasks that took part in the step (marked present, with a finite
  loss and a finite gradient row; absent tasks have weight 0).
  """
  losses: jax.Array
  grad: Any
  weights: jax.Array
  aux: Any = None
  diagnostics: Diagnostics | None = None
  present: jax.Array | None = None


class ValueAndGrad(NamedTuple):
  """A balanced gradient step, optax-style: `init(params, *args) -> state` and
  `update(params, state, *args, present=None, **extra_args) -> (BalancedGrad, state)`."""
  init: Callable[..., optax.OptState]
  update: Callable[..., tuple[BalancedGrad, optax.OptState]]


def value_and_grad(
    fun: Callable[..., Any] | tuple[Callable[..., Any], Callable[..., Any]],
    balancer: optax.GradientTransformation,
    *,
    path: Path = "stacked",
    shared: tree_lib.MaskOrFn = None,
    has_aux: bool = False,
    chunk_size: int = 4,
) -> ValueAndGrad:
  """The balanced gradient of K task losses, with one call shape on the three paths.

  `balancer` is a loss balancer, a gradient balancer, or an `optax.chain` of loss balancers
  and at most one gradient balancer, with no optimizer: the optimizer takes the returned
  `grad`. A chain of loss balancers alone ends in the sum of its rows (no `sum_tasks` needed).
  The paths compute the same update where they meet:

  - `"stacked"`: `fun(params, *args) -> losses[K]`; the K rows are the parameter gradients
    (K backward passes, K copies of the parameters); any balancer.
  - `"gram"`: the same `fun`; loss balancers take one backward pass, Gram-based gradient
    balancers the K x K Gram matrix (formed `chunk_size` rows at a time) and one more VJP.
    Gradient balancers that are not Gram-based are rejected at trace time.
  - `"representation"`: `fun` is a pair `(encode, task_losses)` with
    `encode(params, *args) -> z` and `task_losses(params, z, *args) -> losses[K]`, and
    `shared` marks the encoder's parameters; the rows are the gradients with respect to z
    (and the heads' own rows), and one VJP through the encoder maps the balanced row back
    (Sener & Koltun 2018, Sec. 3.3). Build gradient balancers with `shared=None` there.

  Absent tasks: `update(..., present=mask)` with a `(K,)` bool (e.g. which tasks have labels in
  this batch) makes the tasks marked False sit out the step, as do tasks whose loss or gradient
  row is not finite (a batch without labels for a task has a NaN mean loss) and, for balancers
  that take a log of the losses, tasks with a non-positive loss (an error under
  `jax.experimental.checkify`). A task that sits out gets weight 0, the other tasks are
  balanced as the method balances them without it, and the per-task state it left keeps its
  values; no state takes a non-finite value from the input. `BalancedGrad.present` says which
  tasks took part.

  Args:
    fun: the task losses, or `(encode, task_losses)` on the representation path; with
      `has_aux`, the losses function returns `(losses, aux)`.
    balancer: the balancer (no optimizer).
    path: `"stacked"`, `"gram"` or `"representation"`.
    shared: the encoder's parameters on the representation path (a pytree of bools like the
      parameters, a prefix allowed, or a callable on them); unused on the other paths, where
      gradient balancers carry their own `shared=`.
    has_aux: whether the losses function also returns auxiliary data.
    chunk_size: on the Gram-only path, the rows held at once while forming the Gram matrix.

  Returns:
    A `ValueAndGrad`: `init(params, *args)` builds the balancer's state for this path (on the
    representation path from the shapes of z, found with `jax.eval_shape`), and
    `update(params, state, *args, present=None, **extra_args)` returns
    `(BalancedGrad(losses, grad, weights, aux, diagnostics, present), new_state)`; `args` go to
    the loss function(s), `present` is the optional `(K,)` bool of the tasks taking part, and
    `extra_args` (e.g. FAMO's `post_step_losses`) go to the balancer.

  References:
    Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS,
    arXiv:1810.04650, Sec. 3.3 (the representation path, MGDA-UB).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax, mtl_optax
    >>> def losses(p, x):  # K = 2
    ...   return jnp.stack([jnp.sum((p["w"] - x) ** 2), jnp.sum(p["w"] ** 2)])
    >>> params, x = {"w": jnp.ones(2)}, jnp.array([2.0, 0.0])
    >>> for path in ("stacked", "gram"):
    ...   vg = mtl_optax.value_and_grad(losses, mtl_optax.imtl_g(2), path=path)
    ...   out, state = jax.jit(vg.update)(params, vg.init(params), x)
    ...   print(path, np.asarray(out.grad["w"]).round(3), np.asarray(out.weights).round(3))
    stacked [0. 2.] [0.5 0.5]
    gram [0. 2.] [0.5 0.5]
  """
  check_choice(path, PATHS, "value_and_grad: path")
  check_positive_int(chunk_size, "value_and_grad: chunk_size")
  if path == "representation":
    if not (isinstance(fun, tuple) and len(fun) == 2 and all(map(callable, fun))):
      raise ValueError("value_and_grad: the representation path takes fun=(encode, "
                       "task_losses), the shared trunk and the heads.")
    if shared is None:
      raise ValueError("value_and_grad: the representation path needs shared=, the mask of "
                       "the encoder's parameters.")
    return _representation(fun, balancer, shared, has_aux)
  if not callable(fun):
    raise ValueError(f"value_and_grad: the {path!r} path takes one function "
                     "fun(params, *args) -> losses[K]; a pair (encode, task_losses) is for "
                     "path='representation'.")
  if shared is not None:
    raise ValueError(f"value_and_grad: shared= splits the model on the representation path; "
                     f"on the {path!r} path gradient balancers take shared= themselves.")
  return (_stacked if path == "stacked" else _gram)(fun, balancer, has_aux, chunk_size)


def _present(present: Any, losses: jax.Array, name: str) -> jax.Array:
  """The tasks marked present (all if None) whose loss is finite."""
  present = check_present(present, losses.shape[0], name)
  return jnp.isfinite(losses) if present is None else present & jnp.isfinite(losses)


def _split_value(value, has_aux):
  return value if has_aux else (value, None)


def _weights(state: optax.OptState, k: int, name: str) -> jax.Array:
  """The raw-row weights of the last update, read from the balancer's new state."""
  w = weights_product(state)
  if w is None:
    raise ValueError(f"{name}: the balancer's state holds no BalancerState, so its weights "
                     "cannot be read; build custom balancers with mtl_optax.reweighter, "
                     "aggregator or gram_aggregator.")
  return jnp.broadcast_to(w, (k,))


def _diagnostics(state: optax.OptState) -> Diagnostics | None:
  """The last step's diagnostics, from the outermost `DiagnosticsState` in `state`."""
  found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, DiagnosticsState))
           if isinstance(x, DiagnosticsState)]
  return found[0].diagnostics if found else None


def _reduced(out: Any, k: int) -> Any:
  """A loss-balancer-only chain's rows summed into one row; a gradient balancer's output as
  it is."""
  if isinstance(out, StackedRows):
    return tree_lib.combine(jnp.ones((k,), jnp.float32), unstack(out))
  return out


_NO_OPTIMIZER = ("Pass the balancer alone (loss balancers, then at most one gradient balancer), "
                 "without an optimizer, and give the optimizer out.grad.")


def _check_no_optimizer(name: str, state: optax.OptState) -> None:
  """Raises at trace time if a chain in `state` has a part holding no `BalancerState`: an
  optimizer chained after the balancer, which would act on the rows (or, after a gradient
  balancer, on the gradient before `value_and_grad` returns it) instead of on `out.grad`."""
  if isinstance(state, BalancerState):  # a balancer, whatever it is built on
    return
  if type(state) is tuple:  # an optax.chain's states
    for part in state:
      if weights_product(part) is None:
        raise ValueError(f"{name}: the balancer chain contains a transformation that is not a "
                         f"balancer (state {type(part).__name__}), e.g. an optimizer. "
                         f"{_NO_OPTIMIZER}")
      _check_no_optimizer(name, part)
  elif isinstance(state, tuple) and hasattr(state, "_fields"):  # a wrapper's NamedTuple state
    for part in state:
      _check_no_optimizer(name, part)


def _check_grad(name: str, grad: Any, params: Any) -> None:
  """Raises at trace time unless `grad` is shaped like `params`."""
  shape = tree_lib.shape_tree
  if not tree_lib.same_shapes(grad, params):
    raise ValueError(
        f"{name}: the balancer returned {shape(grad)}, not one gradient shaped like the "
        f"parameters {shape(params)}. {_NO_OPTIMIZER}")


def _stacked(fun, balancer, has_aux, chunk_size) -> ValueAndGrad:
  del chunk_size
  name = "value_and_grad (stacked path)"
  update_fn = optax.with_extra_args_support(balancer).update

  def update(params, state, *args, present=None, **extra_args):
    _check_no_optimizer(name, state)
    losses, vjp_fn, value = task_vjp(fun, params, args, has_aux, name)
    k = losses.shape[0]
    (jac,) = jax.vmap(vjp_fn)(jnp.eye(k, dtype=losses.dtype))
    present = _present(present, losses, name) & finite_rows(jac)
    out, state = update_fn(jac, state, params, losses=losses, present=present, **extra_args)
    grad = _reduced(out, k)
    _check_grad(name, grad, params)
    losses, aux = _split_value(value, has_aux)
    weights = jnp.where(present, _weights(state, k, name), 0.0)
    return BalancedGrad(losses, grad, weights, aux, _diagnostics(state), present), state

  return ValueAndGrad(lambda params, *args: balancer.init(params), update)


def _gram(fun, balancer, has_aux, chunk_size) -> ValueAndGrad:
  name = "value_and_grad (Gram-only path)"

  def update(params, state, *args, present=None, **extra_args):
    losses, vjp_fn, value = task_vjp(fun, params, args, has_aux, name)
    present = _present(present, losses, name)
    rows = GramRows(jnp.eye(losses.shape[0], dtype=losses.dtype),
                    chunked_gram(vjp_fn, losses, chunk_size))
    out, state = apply_to_gram_rows(balancer, rows, state, params, losses,
                                    dict(extra_args, present=present), name)
    if isinstance(out, GramRows):  # loss balancers alone: the sum of the reweighted rows
      out = out.combine(jnp.ones(out.num_tasks, out.coef.dtype), None, None)
    grad, present = pullback_present(vjp_fn, out, losses, present)
    losses, aux = _split_value(value, has_aux)
    weights = jnp.where(present, _raw_weights(out), 0.0)
    return BalancedGrad(losses, grad, weights, aux, _diagnostics(state), present), state

  return ValueAndGrad(lambda params, *args: balancer.init(params), update)


def _raw_weights(out: GramUpdate) -> jax.Array:
  return jax.lax.stop_gradient(out.shared)


def _representation(fun, balancer, shared, has_aux) -> ValueAndGrad:
  name = "value_and_grad (representation path)"
  encode, task_losses = fun
  rows_fn = value_and_representation_jacrev(encode, task_losses, shared=shared, has_aux=has_aux)
  update_fn = optax.with_extra_args_support(balancer).update

  def init(params, *args):
    _, rows, _ = jax.eval_shape(lambda p: rows_fn(p, *args)[:2] + (None,), params)
    return balancer.init(row_like(rows))

  def update(params, state, *args, present=None, **extra_args):
    _check_no_optimizer(name, state)
    value, rows, pullback = rows_fn(params, *args)
    losses, aux = _split_value(value, has_aux)
    present = _present(present, losses, name) & finite_rows(rows)
    out, state = update_fn(rows, state, None, losses=losses, present=present, **extra_args)
    grad = pullback(_reduced(out, losses.shape[0]))
    weights = jnp.where(present, _weights(state, losses.shape[0], name), 0.0)
    return BalancedGrad(losses, grad, weights, aux, _diagnostics(state), present), state

  return ValueAndGrad(init, update)
