"""The Flax recipes of examples/: an NNX model trained through `mtl_optax.value_and_grad` on
the three paths with `nnx.Optimizer`, and a Linen `TrainState` step with `losses=` reaching the
balancer."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import mtl_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_linen_recipe_trains():
  first, last = np.asarray(load("flax_linen").main(steps=30))
  assert np.isfinite(last).all() and np.all(last < first)


@pytest.mark.parametrize("path", mtl_optax.balanced.PATHS)
def test_nnx_recipe_trains_on_every_path(path):
  losses = np.asarray(load("flax_nnx").main(steps=30, path=path))
  assert losses.shape == (30, 3) and np.isfinite(losses).all()
  assert np.all(losses[-1] < 0.5 * losses[0])  # every task's loss falls


def test_nnx_stacked_and_gram_paths_make_the_same_update():
  """The same `nnx.Module`, split with `nnx.split`: Nash-MTL's first balanced gradient (trunk
  balanced, heads weighted) on the Gram-only path equals the stacked path's; the representation
  path balances the z-rows instead, so its trunk gradient differs."""
  nnx_example = load("flax_nnx")
  graphdef, params = nnx.split(nnx_example.Net(nnx.Rngs(0)), nnx.Param)
  x, y = nnx_example.make_data()
  out = {}
  for path in mtl_optax.balanced.PATHS:
    vg = nnx_example.balanced_value_and_grad(graphdef, path)
    out[path], _ = jax.jit(vg.update)(params, vg.init(params, x, y), x, y)
  stacked, gram = jax.tree.leaves(out["stacked"].grad), jax.tree.leaves(out["gram"].grad)
  assert len(stacked) == 4  # the trunk's and the heads' kernels and biases
  for a, b in zip(stacked, gram):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
  np.testing.assert_allclose(out["gram"].weights, out["stacked"].weights, rtol=1e-5)
  np.testing.assert_allclose(out["representation"].losses, out["stacked"].losses, rtol=1e-6)
  rep_trunk = jax.tree.leaves(out["representation"].grad["trunk"])
  assert not np.allclose(rep_trunk[-1], jax.tree.leaves(out["stacked"].grad["trunk"])[-1],
                         rtol=1e-2)


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
