"""Absent tasks over the whole registry (issue 24): a task that sits out a step.

A task sits out when the extra argument `present` marks it False, or when its loss or gradient
row is not finite (or, for a balancer that takes the log of the losses, not positive: under
`jit` it then sits out). It gets weight 0, its per-task state keeps its values, and the other
tasks are balanced as the method balances them without it; no state takes a non-finite value.

Every registered balancer (loss and gradient), jitted, K = 3 (Krum: 4, as it needs K - 1 >= 3):

- `test_absent_task_is_the_method_without_it`: on random stacked rows, the update with task j
  marked absent equals the update of the method built for K - 1 tasks on the other rows, from a
  fresh state and after warm-up steps (the K - 1 state sliced from the K state; a state on the
  simplex renormalized), the absent
  task's weight is 0 and its per-task state entries (leaves with leading axis K) are unchanged.
  Methods that draw random numbers (the draws of a K - 1 build differ) and those whose state
  cannot be sliced (see `NOT_SLICED`) are checked for weight 0, finiteness and untouched state.
- `test_one_bad_step`: after warm-up, one step with a NaN loss, an infinite loss, a NaN row, a
  zero or a negative loss, then good steps: every state leaf stays finite, the bad task's weight
  is 0 on the bad step and its per-task state entries are unchanged (a zero or negative loss:
  for the balancers taking the log of the losses) and, for stateless methods without random
  draws, the later updates equal those of a run without the bad step.
- `test_paths`: the same through `mtl_optax.value_and_grad` on a tiny model, on the "stacked",
  "gram" (Gram-based methods and loss balancers) and "representation" paths: the update with a
  task absent equals that of the model and method without the task (a few methods in the
  default run, all under `-m slow`).

Each (method, K) compiles one step function; the steps differ only in their inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax import registry
from mtl_optax.rows import StackedRows
from mtl_optax.state import BalancerState, effective_weights
import tiny_model
from tiny_model import MASK, encode, heads, task_losses

N = 5  # parameters per row (not K, so that state leaves of shape (K, N) are told apart)
NAMES = registry.names()
LOSS = set(registry.names("loss"))
RANDOM = set(registry.names(having=("random",)))
STATEFUL = set(registry.names(having=("stateful",)))
# Balancers that take the log of the losses: a zero or negative loss makes the task sit out.
# FAMO takes log(L - L_min + eps): a zero loss is its minimum, only a negative one sits out.
LOG_TAKING = {"si", "gls", "igb_v1", "igb_v2", "stch", "gradnorm", "db_mtl"}
# Not compared with a K - 1 build: the weights are fixed per task (the registry's ramp
# 1..K / sum is not that of K - 1 tasks; the present tasks keep their own weights).
NOT_COMPARABLE = {"constant": "fixed per-task weights: the present tasks keep theirs"}
# States that slicing the K-task state does not turn into a (K-1)-task state: on the simplex
# (or summing to K), the present tasks' part is renormalized by the method itself, so the
# K - 1 build would need the renormalized slice; from a fresh state they are compared.
NOT_SLICED = {
    "gradnorm": "weights summing to K: the present ones keep their sum",
    "excess_mtl": "log-weights normalized over K tasks",
    "famo": "the logit step for the previous step needs every task's loss change: skipped on "
            "a step with an absent task (the K - 1 build takes it)",
}
# States on the simplex: the method steps from the present part renormalized (and keeps its
# mass), so the K - 1 state is the slice renormalized.
SIMPLEX_STATE = {"moco": "weights", "modo": "lambd", "sdmgrad": "w"}
# Per-task state entries of these methods are checked by the method's own tests: IGBv2's
# agent has K-sized axes of another meaning.
NOT_PER_TASK = {"igb_v2"}


def num_tasks(name: str) -> int:
  return max(3, registry.METHODS[name].min_tasks + 1)


def data(seed: int, k: int) -> tuple[dict, jax.Array]:
  rng = np.random.default_rng(seed)
  g = rng.normal(size=(k, N)) * 10.0 ** rng.uniform(-0.5, 0.5, size=(k, 1))
  rows = {"w": jnp.asarray(g, jnp.float32), "b": jnp.asarray(g[:, :2] * 0.5, jnp.float32)}
  return rows, jnp.asarray(rng.uniform(0.5, 2.0, size=k), jnp.float32)


PARAMS = {"w": jnp.zeros(N), "b": jnp.zeros(2)}


@functools.lru_cache(maxsize=None)
def stepper(name: str, k: int):
  """`(tx, step)`: the balancer and its jitted step `(rows, state, losses, present) -> (rows
  (K, N) or d (N,), weights (K,), state)`."""
  tx = registry.build(name, k)

  def step(rows, state, losses, present):
    out, state = tx.update(rows, state, PARAMS, losses=losses, present=present)
    if isinstance(out, StackedRows):  # a loss balancer: the scaled rows
      scaled = out.rows["w"]  # column 1: finite in the rows of the tests (a NaN row: column 0)
      weights = jnp.where(jnp.all(scaled == 0, axis=1), 0.0, scaled[:, 1] / rows["w"][:, 1])
      return out.rows, weights, state
    return out, jnp.broadcast_to(effective_weights(state), (k,)), state
  return tx, jax.jit(step)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)
          if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]


def assert_finite(tree, what):
  for x in leaves(tree):
    if np.issubdtype(x.dtype, np.inexact):
      assert np.all(np.isfinite(x)), f"{what}: {x}"


def per_task(state, k):
  """The leaves of `state` with leading axis K (its per-task entries), but the last update's
  weights (`BalancerState.weights`, 0 for an absent task) and bool flags."""
  def strip(x):
    if isinstance(x, BalancerState):
      return BalancerState(None, strip_all(x.inner))
    return x
  strip_all = lambda t: jax.tree.map(strip, t, is_leaf=lambda x: isinstance(x, BalancerState))
  # Bool leaves record the last step (FAMO's prev_present), not a task's state.
  return [x for x in leaves(strip_all(state))
          if x.ndim >= 1 and x.shape[0] == k and x.dtype != bool]


def sliced(state, keep, k, name):
  """The K - 1 state: per-task leaves sliced (both axes of a K x K leaf), a simplex state
  renormalized (`SIMPLEX_STATE`)."""
  def cut(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or x.ndim == 0 or x.shape[0] != k:
      return x
    x = x[keep]
    return x[:, keep] if x.ndim >= 2 and x.shape[1] == k else x
  state = jax.tree.map(cut, state)
  if name in SIMPLEX_STATE:
    field = SIMPLEX_STATE[name]
    part = getattr(state.inner, field)  # no mass left: uniform, as the method takes it
    part = jnp.where(jnp.sum(part) > 0, part / jnp.sum(part), 1.0 / part.shape[0])
    state = state._replace(inner=state.inner._replace(**{field: part}))
  return state


def warm_up(name, k, steps, seed=0):
  tx, step = stepper(name, k)
  state = tx.init(PARAMS)
  for t in range(steps):
    rows, losses = data(seed + 100 + t, k)
    _, _, state = step(rows, state, losses, jnp.ones((k,), bool))
  return state


def output_close(a, b, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.max(np.abs(b)), 1e-6)
  np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * scale, err_msg=what)


def present_rows(out, keep, name):
  """The update restricted to what the K - 1 build returns (the present rows of a loss
  balancer's scaled rows; the whole update of a gradient balancer)."""
  if name in LOSS:
    return jax.tree.map(lambda x: np.asarray(x)[keep], out)
  return out


@pytest.mark.parametrize("name", NAMES)
def test_absent_task_is_the_method_without_it(name):
  k = num_tasks(name)
  tx, step = stepper(name, k)
  comparable = name not in RANDOM and name not in NOT_COMPARABLE
  if comparable:
    tx_less, step_less = stepper(name, k - 1)
  for warm in (0, 3):
    state = warm_up(name, k, warm)
    rows, losses = data(7 + warm, k)
    for j in range(k):
      keep = np.arange(k) != j
      present = jnp.asarray(keep)
      out, weights, new_state = step(rows, state, losses, present)
      what = f"{name}, task {j} absent after {warm} steps"
      assert np.asarray(weights)[j] == 0, what
      assert_finite((out, weights, new_state), what)
      if name in LOSS:
        for x in leaves(out):
          np.testing.assert_array_equal(x[j], 0, err_msg=what)
      if name not in NOT_PER_TASK:
        for old, new in zip(per_task(state, k), per_task(new_state, k)):
          np.testing.assert_array_equal(new[j], old[j], err_msg=f"{what}: its state moved")
      if not comparable or (warm and name in NOT_SLICED):
        continue
      less_state = tx_less.init(PARAMS) if warm == 0 else sliced(state, keep, k, name)
      less_rows = jax.tree.map(lambda x: x[keep], rows)
      out_less, weights_less, _ = step_less(less_rows, less_state, losses[keep],
                                            jnp.ones((k - 1,), bool))
      for a, b in zip(leaves(present_rows(out, keep, name)), leaves(out_less)):
        output_close(a, b, what)
      output_close(np.asarray(weights)[keep], weights_less, what + " (weights)")


BAD = {
    "nan_loss": (lambda rows, losses, j: (rows, losses.at[j].set(jnp.nan))),
    "inf_loss": (lambda rows, losses, j: (rows, losses.at[j].set(jnp.inf))),
    "nan_row": (lambda rows, losses, j: (jax.tree.map(lambda x: x.at[j, 0].set(jnp.nan), rows),
                                         losses)),
    "zero_loss": (lambda rows, losses, j: (rows, losses.at[j].set(0.0))),
    "negative_loss": (lambda rows, losses, j: (rows, losses.at[j].set(-1.0))),
}


@pytest.mark.parametrize("name", NAMES)
def test_one_bad_step(name):
  k = num_tasks(name)
  j = 1
  tx, step = stepper(name, k)
  warm = warm_up(name, k, 3)
  every = jnp.ones((k,), bool)
  later = [data(50 + t, k) for t in range(2)]
  clean = []  # the later updates of a run without the bad step
  state = warm
  for rows, losses in later:
    out, _, state = step(rows, state, losses, every)
    clean.append(out)
  for bad, corrupt in BAD.items():
    rows, losses = corrupt(*data(40, k), j)
    what = f"{name}, {bad} of task {j}"
    out, weights, state = step(rows, warm, losses, every)
    assert_finite((out, state), what)
    sits_out = bad in ("nan_loss", "inf_loss", "nan_row") or (
        bad in ("zero_loss", "negative_loss") and name in LOG_TAKING) or (
        bad == "negative_loss" and name == "famo")
    if sits_out:
      assert np.asarray(weights)[j] == 0, what
      if name in LOSS:
        for x in leaves(out):
          np.testing.assert_array_equal(x[j], 0, err_msg=what)
      if name not in NOT_PER_TASK:
        for old, new in zip(per_task(warm, k), per_task(state, k)):
          np.testing.assert_array_equal(new[j], old[j], err_msg=f"{what}: its state moved")
    for t, (rows, losses) in enumerate(later):
      out, _, state = step(rows, state, losses, every)
      assert_finite((out, state), f"{what}, step {t} after it")
      if name not in STATEFUL and name not in RANDOM:
        for a, b in zip(leaves(out), leaves(clean[t])):
          output_close(a, b, f"{what}, step {t} after it")


# -- through value_and_grad on the three paths --

D, H, B = 3, 4, 8
FAST = ("mgda", "db_mtl", "gls", "trimmed_mean")  # the default run; the rest: -m slow


def model(k):
  return tiny_model.model(k, k, d=D, h=H, b=B)



def paths(name):
  gram = name in LOSS or "gram" in registry.METHODS[name].properties
  return ["stacked"] + (["gram"] if gram else []) + ["representation"]


def cases(fast):
  """(name, path) of the comparable methods; the FAST ones in the default run when `fast`."""
  out = []
  for name in NAMES:
    if name in RANDOM or name in NOT_COMPARABLE:
      continue
    for path in paths(name):
      marks = () if (name in FAST) == fast else (pytest.mark.slow,)
      out.append(pytest.param(name, path, marks=marks))
  return out


@functools.lru_cache(maxsize=None)
def path_step(name, k, path):
  if path == "representation":
    tx = registry.build(name, k)
    vg = mtl_optax.value_and_grad((encode, heads), tx, path=path, shared=MASK)
  else:
    tx = registry.build(name, k, shared=MASK if name not in LOSS else None)
    vg = mtl_optax.value_and_grad(task_losses, tx, path=path)
  return vg, jax.jit(lambda p, s, x, y, present: vg.update(p, s, x, y, present=present))


@pytest.mark.parametrize("name,path", cases(True))
def test_paths(name, path):
  k = num_tasks(name)
  params, x, y = model(k)
  vg, step = path_step(name, k, path)
  vg_less, step_less = path_step(name, k - 1, path)
  for j in (0, k - 1):
    keep = np.arange(k) != j
    out, state = step(params, vg.init(params, x, y), x, y, jnp.asarray(keep))
    what = f"{name} on the {path} path, task {j} absent"
    assert_finite((out.grad, state), what)
    np.testing.assert_array_equal(np.asarray(out.present), keep, err_msg=what)
    np.testing.assert_array_equal(np.asarray(out.grad["heads"])[j], 0, err_msg=what)
    less = {"trunk": params["trunk"], "heads": params["heads"][keep]}
    out_less, _ = step_less(less, vg_less.init(less, x, y[:, keep]), x, y[:, keep],
                            jnp.ones((k - 1,), bool))
    output_close(out.grad["trunk"], out_less.grad["trunk"], what)
    output_close(np.asarray(out.grad["heads"])[keep], out_less.grad["heads"], what)


# -- wrappers --

@pytest.mark.parametrize("how", ["present", "nan_row"])
def test_with_diagnostics_over_the_present_tasks(how):
  """`with_diagnostics` reports the present tasks' diagnostics (those of the method without the
  others: the absent task's entries 0), and its state stays finite."""
  k, j = 3, 1
  keep = np.arange(k) != j
  rows, losses = data(3, k)
  present = jnp.asarray(keep) if how == "present" else None
  if how == "nan_row":
    rows = jax.tree.map(lambda x: x.at[j, 0].set(jnp.nan), rows)
  tx = mtl_optax.with_diagnostics(registry.build("mgda", k), k)
  tx_less = mtl_optax.with_diagnostics(registry.build("mgda", k - 1), k - 1)
  d, state = jax.jit(lambda r, l, p: tx.update(r, tx.init(PARAMS), PARAMS, losses=l,
                                               present=p))(rows, losses, present)
  less_rows = jax.tree.map(lambda x: x[keep], rows)
  d_less, state_less = tx_less.update(less_rows, tx_less.init(PARAMS), PARAMS,
                                      losses=losses[keep])
  assert_finite((d, state), how)
  got, want = state.diagnostics, state_less.diagnostics
  for field in ("progress", "cosines", "norms", "normalized_weights"):
    x = np.asarray(getattr(got, field))
    assert x[j] == 0, field
    output_close(x[keep], getattr(want, field), field)
  for field in ("imbalance_ratio", "conflict_share", "min_pair_cosine", "effective_tasks"):
    output_close(getattr(got, field), getattr(want, field), field)
  for a, b in zip(leaves(d), leaves(d_less)):
    output_close(a, b, "update")
