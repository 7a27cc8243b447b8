"""The Flax recipes of examples/: an NNX `nnx.Optimizer` step and a Linen `TrainState` step,
each with `losses=` reaching the balancer."""

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import mtl_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["flax_nnx", "flax_linen"])
def test_flax_recipe_trains(name):
  first, last = np.asarray(load(name).main(steps=30))
  assert np.isfinite(last).all() and np.all(last < first)


def test_linen_train_state_needs_the_forwarding_subclass():
  """Flax's own TrainState.apply_gradients drops `losses`: a balancer that needs them raises
  a clear error; the example's MTLTrainState forwards them."""
  linen = load("flax_linen")
  params = {"w": jnp.ones((2,))}
  tx = optax.chain(mtl_optax.igb_v1(2, 1), mtl_optax.sum_tasks(), optax.sgd(0.1))
  jac = {"w": jnp.eye(2)}
  plain = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  with pytest.raises(ValueError, match="losses"):
    plain.apply_gradients(grads=jac)
  state = linen.MTLTrainState.create(apply_fn=None, params=params, tx=tx)
  state = state.apply_gradients(grads=jac, losses=jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(state.params["w"], 1.0 - 0.1 * np.array([1.0, 0.5]), rtol=1e-6)
  assert int(state.step) == 1
