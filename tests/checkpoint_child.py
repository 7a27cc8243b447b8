"""Child process of tests/test_checkpoint.py: save mid-run, resume in a fresh process.

  python tests/checkpoint_child.py save DIR [--all | CASE ...]   # CASE: method@path
  python tests/checkpoint_child.py resume DIR [--all | CASE ...]

Without arguments, the default run's cases (`plan`); `--all`: every method of the registry
and the two IGB + Nash-MTL fusions on every path it runs on.

`save` trains each case (a balancer from the registry, or a fusion, on one path, with Adam) for
HALF steps, saves the whole training state with orbax-checkpoint's `StandardCheckpointer`
(parameters, balancer state, Adam state, step) under DIR/<case>/mid, trains HALF more steps in
the same process (the uninterrupted run) and saves where it ends, with that half's losses,
under DIR/<case>/end. `resume`, run in a fresh process, builds the state from `init` alone,
restores DIR/<case>/mid into it (orbax needs the target's shapes and dtypes), trains the same
HALF steps and compares every leaf of its state and losses with DIR/<case>/end bit for bit.
Each mode prints one JSON object per case.

The checkpoints hold the states as they are: nested NamedTuples (optax's and the balancers'),
Flax's SAC parameters and optimizer states, the replay buffer, raw uint32 PRNG keys, int32
counters. Nothing is converted before saving.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from mtl_optax import registry  # noqa: E402
from tiny_model import MASK, encode, heads, task_losses  # noqa: E402,F401 (tests/)

K, D, H, B, HALF, LR = 3, 4, 8, 8, 4, 0.05
FUSIONS = ("igb_v1+nash_mtl", "igb_v2+nash_mtl")
PATHS = ("stacked", "gram", "representation")


def small_igb_v2() -> optax.GradientTransformationExtraArgs:
  """IGBv2 whose replay buffer fills, whose agent trains (step 2) and acts (steps 2, 3) within
  the first HALF = 4 steps: epochs of one step, a buffer of 8, batches of 4."""
  return mtl_optax.igb_v2(K, 1, key=0, train_from_epoch=1, act_from_epoch=2, update_every=2,
                          buffer_size=8, batch_size=4)


def balancer(name: str, path: str) -> optax.GradientTransformationExtraArgs:
  """The balancer of a case; a loss balancer ends in `sum_tasks()` except on the Gram-only
  (single-backward) path, which sums the reweighted rows itself."""
  shared = None if path == "representation" else MASK
  if name in FUSIONS:
    first = small_igb_v2() if name.startswith("igb_v2") else mtl_optax.igb_v1(K, 1)
    return optax.chain(first, mtl_optax.nash_mtl(K, shared=shared))
  tx = small_igb_v2() if name == "igb_v2" else registry.build(name, K, key=0, shared=shared)
  if registry.METHODS[name].kind == "loss" and path != "gram":
    tx = optax.chain(tx, mtl_optax.sum_tasks())
  return tx


def cases() -> list[tuple[str, str]]:
  """(method, path): every method on the stacked and representation paths, and on the
  Gram-only path where it runs there (loss balancers: single-backward; Gram-based gradient
  balancers; the fusions)."""
  out = []
  for name in registry.names() + list(FUSIONS):
    gram = (name in FUSIONS or registry.METHODS[name].kind == "loss"
            or "gram" in registry.METHODS[name].properties)
    out += [(name, p) for p in PATHS if p != "gram" or gram]
  return out


# The default run's cases: IGBv1 + Nash-MTL on every path, IGBv2 + Nash-MTL on the
# representation path, and one method per kind of state on each path: PRNG keys (RLW,
# GradVac), EMAs and learned weights (DWA, UW), tracked rows in z-space (MoCo), epoch counters
# and a previous step's weights (PCD).
DEFAULT = (("igb_v1+nash_mtl", "stacked"), ("igb_v1+nash_mtl", "gram"),
           ("igb_v1+nash_mtl", "representation"), ("igb_v2+nash_mtl", "representation"),
           ("rlw", "gram"), ("dwa", "stacked"), ("uw", "representation"),
           ("gradvac", "gram"), ("moco", "representation"), ("pcd", "stacked"))


def plan(everything: bool) -> list[tuple[str, str]]:
  """Every case (`cases`), or the default run's (`DEFAULT`)."""
  return cases() if everything else list(DEFAULT)


def data():
  """Initial parameters and 2 HALF batches (a different batch every step)."""
  rng = np.random.default_rng(0)
  params = {"trunk": jnp.asarray(rng.normal(size=(D, H)) * 0.7, jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(K, H)), jnp.float32)}
  xs = rng.normal(size=(2 * HALF, B, D)).astype(np.float32)
  ys = (rng.normal(size=(2 * HALF, B, K)) * np.logspace(-1, 1, K)).astype(np.float32)
  return params, jnp.asarray(xs), jnp.asarray(ys)


def program(name: str, path: str):
  """`(init(params) -> state, run(state, xs, ys) -> (state, losses))`: the training state is
  a dict of the parameters, the balancer's state, Adam's state and the step; `run` takes one
  step per batch of `xs`, `ys` (a `lax.scan`)."""
  tx, adam = balancer(name, path), optax.adam(LR)
  rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=MASK)
  x0, y0 = jnp.zeros((B, D)), jnp.zeros((B, K))

  def init(params):
    if path == "representation":  # the state lives in z-space: built from one row's shape
      rows = jax.eval_shape(lambda p: rep(p, x0, y0)[1], params)
      b_init = tx.init(mtl_optax.row_like(rows))
    else:
      b_init = tx.init(params)
    return {"params": params, "balancer": b_init, "optimizer": adam.init(params),
            "step": jnp.zeros((), jnp.int32)}

  if path == "representation":
    def gradient(params, b_state, x, y):
      losses, rows, pullback = rep(params, x, y)
      out, b_state = tx.update(rows, b_state, losses=losses)
      return losses, pullback(out), b_state
  elif path == "gram":
    grad_fn = mtl_optax.value_and_reweighted_grad(task_losses, tx, chunk_size=2)

    def gradient(params, b_state, x, y):
      (losses, grad), b_state = grad_fn(params, b_state, x, y)
      return losses, grad, b_state
  else:
    jac_fn = mtl_optax.value_and_jacrev(task_losses)

    def gradient(params, b_state, x, y):
      losses, jac = jac_fn(params, x, y)
      grad, b_state = tx.update(jac, b_state, params, losses=losses)
      return losses, grad, b_state

  def body(state, batch):
    losses, grad, b_state = gradient(state["params"], state["balancer"], *batch)
    updates, opt_state = adam.update(grad, state["optimizer"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "balancer": b_state,
            "optimizer": opt_state, "step": state["step"] + 1}, losses

  @jax.jit
  def run(state, xs, ys):
    return jax.lax.scan(body, state, (xs, ys))
  return init, run


def leaves(tree) -> list[tuple[str, np.ndarray]]:
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def bitwise_differences(a, b) -> list[str]:
  """Paths of the leaves whose dtype, shape or bytes differ (NaNs compare by their bits)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return ["<tree structure>"]
  return [pa for (pa, x), (_, y) in zip(leaves(a), leaves(b))
          if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()]


def find(tree, cls) -> list:
  """The nodes of type `cls` in `tree` (wherever a wrapper or a chain put them)."""
  return [n for n in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, cls))
          if isinstance(n, cls)]


def target(tree):
  """What orbax restores into: the shapes and dtypes of `tree`."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def key(name: str, path: str) -> str:
  return f"{name}@{path}"


def save(directory: pathlib.Path, todo: list[tuple[str, str]]) -> None:
  params, xs, ys = data()
  with ocp.StandardCheckpointer() as ckpt:
    for name, path in todo:
      start = time.perf_counter()
      init, run = program(name, path)
      fresh = init(params)
      mid, first = run(fresh, xs[:HALF], ys[:HALF])
      ckpt.save(directory / key(name, path) / "mid", mid)
      end, losses = run(mid, xs[HALF:], ys[HALF:])
      ckpt.save(directory / key(name, path) / "end", {"state": end, "losses": losses})
      # What the checkpoint holds beyond a fresh start: the balancer's state has moved (for a
      # stateful or random method), and IGBv2's agent has stored transitions and trained.
      record = {"name": name, "path": path, "finite": bool(np.isfinite(first).all()),
                "balancer_moved": bool(bitwise_differences(fresh["balancer"], mid["balancer"])),
                "seconds": round(time.perf_counter() - start, 2)}
      if name.startswith("igb_v2"):
        (before,), (after,) = find(fresh, mtl_optax.IGBv2State), find(mid, mtl_optax.IGBv2State)
        record["buffer_rows"] = int(after.agent.buffer.fill)
        record["agent_trained"] = bool(bitwise_differences(before.agent.actor, after.agent.actor))
      ckpt.wait_until_finished()
      print(json.dumps(record), flush=True)


def resume(directory: pathlib.Path, todo: list[tuple[str, str]]) -> None:
  params, xs, ys = data()
  with ocp.StandardCheckpointer() as ckpt:
    for name, path in todo:
      start = time.perf_counter()
      init, run = program(name, path)
      fresh = init(params)  # a new process knows only how to build the state
      mid = ckpt.restore(directory / key(name, path) / "mid", target(fresh))
      end, losses = run(mid, xs[HALF:], ys[HALF:])
      ref = ckpt.restore(directory / key(name, path) / "end",
                         target({"state": end, "losses": losses}))
      diff = bitwise_differences(ref, {"state": end, "losses": losses})
      print(json.dumps({"name": name, "path": path, "leaves": len(leaves(ref)),
                        "bitwise_equal": not diff, "differing": diff[:5],
                        "seconds": round(time.perf_counter() - start, 2)}), flush=True)


def main() -> None:
  mode, directory, *names = sys.argv[1:]
  if names == ["--all"] or not names:
    todo = plan(everything=bool(names))
  else:
    todo = [tuple(c.split("@")) for c in names]
  (save if mode == "save" else resume)(pathlib.Path(directory).resolve(), todo)


if __name__ == "__main__":
  main()
