"""Checkpoint and resume: a Flax NNX model, a balancer and an optimizer, saved with orbax.

  PYTHONPATH=. python examples/checkpoint.py [--steps 200] [--save-at 100] [--dir /tmp/ckpt]

The training state is four things, all pytrees of arrays, saved together with
`orbax.checkpoint.StandardCheckpointer`:
  params     `nnx.state` of the model's parameters (an `nnx.State`);
  balancer   the balancer's state (here IGBv1 + Nash-MTL on the representation path: IGBv1's
             base losses and counter, Nash-MTL's previous weights);
  optimizer  Adam's state;
  step       the step counter (it also places the data pipeline: `batch(step)` here).
What is not saved is rebuilt from code: the model's graph (`graphdef`), the transformation
objects (`optax.chain(...)`, `optax.adam(...)`, their hyperparameters), and the compiled step.
To restore, build the same objects, take the shapes and dtypes of a state built by their
`init` (`jax.eval_shape`, nothing is computed) as orbax's target, and restore into it: the
restored tree has the target's structure (NamedTuples, `nnx.State`), and training continues
bit for bit as if it had never stopped. (`flax.serialization.to_bytes` cannot serialize an
`nnx.State`; orbax can, or convert with `nnx.to_pure_dict` first.)

`main` trains `steps` steps without stopping, saving at `save_at`; then, as a new process
would, rebuilds everything, restores the checkpoint and trains the remaining steps; the two
runs' losses agree exactly.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import mtl_optax

K, D_IN, HIDDEN, BATCH, STEPS_PER_EPOCH = 3, 8, 32, 32, 10


class Net(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
    self.heads = nnx.Linear(HIDDEN, K, rngs=rngs)  # one output per task


def batch(step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The data pipeline: the batch of a step, so the step counter is its whole position."""
  kx = jax.random.fold_in(jax.random.PRNGKey(0), step)
  x = jax.random.normal(kx, (BATCH, D_IN))
  directions = jax.random.normal(jax.random.PRNGKey(1), (D_IN, K))
  return x, jnp.tanh(x @ directions) * jnp.array([1.0, 3.0, 10.0])


def build(model: Net):
  """Everything that is code, not state: `(init, step)` for `model`'s graph, the balancer
  (IGBv1 + Nash-MTL on the representation path) and Adam."""
  graphdef, _ = nnx.split(model, nnx.Param)
  balancer = optax.chain(mtl_optax.igb_v1(K, STEPS_PER_EPOCH), mtl_optax.nash_mtl(K))
  adam = optax.adam(1e-2)

  def encode(params, x, y):
    del y
    return nnx.relu(nnx.merge(graphdef, params).trunk(x))

  def heads(params, z, x, y):
    del x
    return jnp.mean((nnx.merge(graphdef, params).heads(z) - y) ** 2, axis=0) + 1e-3

  shared = lambda params: jax.tree.map_with_path(  # noqa: E731
      lambda path, _: path[0].key == "trunk", params)
  rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=shared)

  def init(params: nnx.State) -> dict:
    rows = jax.eval_shape(lambda p: rep(p, *batch(0))[1], params)  # z-space: one row's shape
    return {"params": params, "balancer": balancer.init(mtl_optax.row_like(rows)),
            "optimizer": adam.init(params), "step": jnp.zeros((), jnp.int32)}

  @jax.jit
  def step(state: dict) -> tuple[dict, jax.Array]:
    params = state["params"]
    losses, rows, pullback = rep(params, *batch(state["step"]))
    out, b_state = balancer.update(rows, state["balancer"], losses=losses)
    updates, opt_state = adam.update(pullback(out), state["optimizer"], params)
    return {"params": optax.apply_updates(params, updates), "balancer": b_state,
            "optimizer": opt_state, "step": state["step"] + 1}, losses

  return init, step


def save(checkpointer: ocp.StandardCheckpointer, directory: pathlib.Path, state: dict) -> None:
  checkpointer.save(directory / f"step_{int(state['step'])}", state)
  checkpointer.wait_until_finished()  # saving is asynchronous; wait before exiting


def restore(checkpointer: ocp.StandardCheckpointer, path: pathlib.Path):
  """What a fresh process does: rebuild the code, restore the state into its shapes."""
  abstract_model = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))  # no parameters computed
  init, step = build(abstract_model)
  target = jax.eval_shape(init, nnx.state(abstract_model, nnx.Param))
  return checkpointer.restore(path, target), step


def main(steps: int = 200, save_at: int = 100, directory: str | pathlib.Path | None = None):
  """Losses of steps `save_at`..`steps` after a restore, and without stopping."""
  tmp = None
  if directory is None:
    tmp = tempfile.TemporaryDirectory()
    directory = tmp.name
  directory = pathlib.Path(directory).resolve()
  with ocp.StandardCheckpointer() as checkpointer:
    model = Net(nnx.Rngs(0))
    init, step = build(model)
    state = init(nnx.state(model, nnx.Param))
    uninterrupted = []
    for t in range(steps):
      if t == save_at:
        save(checkpointer, directory, state)
      state, losses = step(state)
      if t >= save_at:
        uninterrupted.append(np.asarray(losses))

    state, step = restore(checkpointer, directory / f"step_{save_at}")
    resumed = []
    while int(state["step"]) < steps:
      state, losses = step(state)
      resumed.append(np.asarray(losses))
  if tmp is not None:
    tmp.cleanup()
  resumed, uninterrupted = np.array(resumed), np.array(uninterrupted)
  print(f"losses at step {steps}: {uninterrupted[-1]}; resumed from step {save_at}: "
        f"largest difference {np.max(np.abs(resumed - uninterrupted)):.1e}")
  return resumed, uninterrupted


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--save-at", type=int, default=100)
  parser.add_argument("--dir", default=None, help="checkpoint folder (default: a temporary one)")
  args = parser.parse_args()
  main(args.steps, args.save_at, args.dir)
