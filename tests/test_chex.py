"""chex over the registry: every balancer's training step compiles once, jit equals eager.

Each method of `mtl_optax.registry` (loss balancers followed by `sum_tasks`) is chained with
`optax.sgd` in a step `value_and_jacrev` -> balancer -> update, wrapped in
`chex.assert_max_traces(n=1)` and jitted: a second trace over STEPS steps (a state whose dtype,
weak type or shape drifts) fails. With one step per epoch, STEPS passes the epoch thresholds of
DWA and IGBv1 (epoch 2) and IGBv2's actor (epoch 5); IGBv2's SAC updates (every 50 steps by
default) are compiled but not run. `chex.variants` runs one step jitted and eagerly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import mtl_optax
from mtl_optax import registry

K, D, H, B = 3, 4, 5, 8
STEPS = 6
SHARED = {"trunk": True, "heads": False}


@pytest.fixture(autouse=True)
def clear_trace_counter() -> None:
  chex.clear_trace_counter()


def init_params() -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {"trunk": jnp.asarray(rng.normal(size=(D, H)) / 2, jnp.float32),
          "heads": jnp.asarray(rng.normal(size=(H, K)) / 2, jnp.float32)}


def batch(step: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(step)
  return (jnp.asarray(rng.normal(size=(B, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, K)) * [1.0, 3.0, 0.3], jnp.float32))


def task_losses(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  pred = jnp.tanh(x @ params["trunk"]) @ params["heads"]
  return jnp.mean((pred - y) ** 2, axis=0) + 0.05


@functools.lru_cache(maxsize=None)
def optimizer(name: str) -> optax.GradientTransformationExtraArgs:
  """The balancer `name` (one step per epoch, shared trunk), then SGD."""
  balancer = registry.build(name, K, steps_per_epoch=1, shared=SHARED)
  reduce = [mtl_optax.sum_tasks()] if registry.METHODS[name].kind == "loss" else []
  return optax.chain(balancer, *reduce, optax.sgd(1e-2))


@functools.lru_cache(maxsize=None)
def counted_step(name: str) -> Callable[..., tuple]:
  """The training step of `name`, counting its traces: one function object per method, so
  every `jax.jit` of it (here and in the variants) shares one trace and one compilation."""
  tx = optimizer(name)

  def step(params, opt_state, x, y):
    losses, jac = mtl_optax.value_and_jacrev(task_losses)(params, x, y)
    updates, opt_state = tx.update(jac, opt_state, params, losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses
  return chex.assert_max_traces(step, n=1)


@pytest.mark.parametrize("name", registry.names())
def test_training_step_compiles_once(name):
  tx = optimizer(name)
  step = jax.jit(counted_step(name))
  params = init_params()
  opt_state = tx.init(params)
  for t in range(STEPS):
    params, opt_state, losses = step(params, opt_state, *batch(t))
  chex.assert_tree_all_finite((params, opt_state, losses))
  chex.assert_trees_all_equal_shapes_and_dtypes(opt_state, tx.init(params))


class StepVariantsTest(chex.TestCase):
  """One step of every balancer, jitted and eager: the same parameters, state and losses."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*registry.names())
  def test_one_step(self, name):
    params = init_params()
    args = (params, optimizer(name).init(params), *batch(0))
    got = self.variant(counted_step(name))(*args)
    chex.assert_tree_all_finite(got)
    chex.assert_trees_all_close(got, jax.jit(counted_step(name))(*args), rtol=1e-5, atol=1e-6)
