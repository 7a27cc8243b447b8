"""A balancer on many devices: data parallel and parameter-sharded, under jit or shard_map.

  python examples/data_parallel.py [--steps 20] [--paths stacked gram representation]

On a host without accelerators it forces eight CPU devices (`--xla_force_host_platform_
device_count`, set before jax is imported, unless XLA_FLAGS already sets a count); on GPUs and
TPUs it uses every device unchanged, and on several hosts too: `--distributed` first calls
`jax.distributed.initialize()`, and each process feeds its own slice of the batch
(`jax.make_array_from_process_local_data`). Run the same command in every process, one per
host; on a cluster that JAX detects (SLURM, Open MPI, Cloud TPU, ...) `--distributed` is
enough, elsewhere name the coordinator (process 0's host and a free port), the number of
processes and each one's id:

  python examples/data_parallel.py --distributed --coordinator 10.0.0.1:12345 \
      --num-processes 2 --process-id 0     # on host 0; --process-id 1 on host 1

CPU devices of different processes reach each other through gloo collectives (set here). Two
processes on one machine, four forced CPU devices each, form one eight-device mesh and equal
one device (`tests/test_distributed.py`). Without a reference on one device (no process sees
every batch), a distributed run prints its losses; `--save FILE.npz` writes them (process 0).
The balancer is IGBv1 + Nash-MTL, trained with
Adam on each of the three paths in four ways, and each way's losses are compared with the
same steps on one device:
  1. one device;
  2. data parallel under `jax.jit`: the batch split over a `data` axis by a `NamedSharding`,
     the parameters replicated; XLA inserts the reductions;
  3. data parallel under `shard_map`: the per-device step `pmean`s its losses over `data`
     (autodiff then all-reduces every row and gradient) and, on the representation path,
     passes `axis_name="data"` to the balancer, which `psum`s the K x K Gram matrix of its
     batch-split z-rows;
  4. data x parameter sharding under `jax.jit`: the batch over `data`, every weight matrix's
     output axis over `param` (each device holds a slice of the parameters and of every row;
     the Gram matrix is a sum of per-slice contractions).
The balancer's state is replicated: every device takes the same decision.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules and "device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import mtl_optax  # noqa: E402

K, D_IN, HIDDEN, BATCH, STEPS_PER_EPOCH = 3, 16, 64, 64, 5
SHARED = {"trunk": True, "heads": False}


def init_params(key: jax.Array) -> dict:
  k1, k2, k3 = jax.random.split(key, 3)
  glorot = jax.nn.initializers.glorot_normal()
  return {"trunk": {"w1": glorot(k1, (D_IN, HIDDEN)), "w2": glorot(k2, (HIDDEN, HIDDEN))},
          "heads": {"w": glorot(k3, (HIDDEN, K)), "b": jnp.zeros(K)}}


def encode(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  del y
  t = params["trunk"]
  return jnp.tanh(jnp.tanh(x @ t["w1"]) @ t["w2"])


def heads(params: dict, z: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  del x
  pred = z @ params["heads"]["w"] + params["heads"]["b"]
  return jnp.mean((pred - y) ** 2, axis=0)  # (K,): the mean over this (part of the) batch


def task_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return heads(params, encode(params, x, y), x, y)


def batch_mean(fun, axis: str | None):
  """Inside shard_map, the losses of the whole batch: the mean of the devices' losses."""
  return fun if axis is None else (lambda *a: jax.lax.pmean(fun(*a), axis))


def make_step(path: str, axis: str | None = None):
  """`(step, init)` for IGBv1 + Nash-MTL and Adam on `path`; with `axis`, the per-device
  step of shard_map over that batch axis."""
  shared = None if path == "representation" else SHARED  # z is the shared part there
  balancer = optax.chain(mtl_optax.igb_v1(K, STEPS_PER_EPOCH), mtl_optax.nash_mtl(K, shared=shared))
  adam = optax.adam(1e-2)
  if path == "stacked":
    jac_fn = mtl_optax.value_and_jacrev(batch_mean(task_losses, axis))

    def gradient(params, state, x, y):
      losses, jac = jac_fn(params, x, y)
      grad, state = balancer.update(jac, state, params, losses=losses)
      return losses, grad, state
    init = balancer.init
  elif path == "gram":
    grad_fn = mtl_optax.value_and_reweighted_grad(batch_mean(task_losses, axis), balancer)

    def gradient(params, state, x, y):
      (losses, grad), state = grad_fn(params, state, x, y)
      return losses, grad, state
    init = balancer.init
  else:
    rep = mtl_optax.value_and_representation_jacrev(encode, batch_mean(heads, axis),
                                                    shared=SHARED)
    sharded = {} if axis is None else {"axis_name": axis}  # z-rows split over the batch axis

    def gradient(params, state, x, y):
      losses, rows, pullback = rep(params, x, y)
      out, state = balancer.update(rows, state, losses=losses, **sharded)
      return losses, pullback(out), state

    def init(params):  # the state lives in z-space: built from one row of the whole batch
      x, y = jnp.zeros((BATCH, D_IN)), jnp.zeros((BATCH, K))
      return balancer.init(mtl_optax.row_like(
          mtl_optax.value_and_representation_jacrev(encode, heads, shared=SHARED)(
              params, x, y)[1]))

  def step(params, states, x, y):
    b_state, opt_state = states
    losses, grad, b_state = gradient(params, b_state, x, y)
    updates, opt_state = adam.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), (b_state, opt_state), losses

  return step, lambda params: (init(params), adam.init(params))


def param_specs(params: dict, size: int) -> dict:
  """The trunk's weight matrices split along their output axis over `param`."""
  split = lambda w: P(None, "param") if w.ndim == 2 and w.shape[1] % size == 0 else P()  # noqa: E731
  return {"trunk": jax.tree.map(split, params["trunk"]),
          "heads": jax.tree.map(lambda _: P(), params["heads"])}


def train(path: str, way: str, data: list, steps: int) -> np.ndarray:
  """Losses of `steps` steps on `path`, trained the `way` given (one of WAYS)."""
  params = init_params(jax.random.PRNGKey(0))
  n = jax.device_count()
  split = 2 if way == "jit, data x param" and n % 2 == 0 else 1  # devices along `param`
  mesh = Mesh(np.array(jax.devices()).reshape(n // split, split), ("data", "param"))
  on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
  step, init = make_step(path)
  if way == "one device":
    step = jax.jit(step)
    place = lambda x: jax.device_put(x, jax.devices()[0])  # noqa: E731
  elif way.startswith("jit"):
    params = jax.device_put(params, jax.tree.map(on, param_specs(params, mesh.shape["param"])))
    step = jax.jit(step)
    place = lambda x: jax.make_array_from_process_local_data(on(P("data")), x)  # noqa: E731
  else:
    per_device, _ = make_step(path, axis="data")
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                 out_specs=(P(), P(), P())))
    place = lambda x: jax.make_array_from_process_local_data(on(P("data")), x)  # noqa: E731
  states = init(params)  # replicated (Adam's moments follow the parameters' shardings)
  history = []
  for i in range(steps):
    x, y = data[i % len(data)]
    params, states, losses = step(params, states, place(x), place(y))
    history.append(np.asarray(losses))
  return np.array(history)


WAYS = ("one device", "jit, data parallel", "shard_map, data parallel", "jit, data x param")


def local_batches(num: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """This process's slices of `num` batches of BATCH examples (all of them on one host)."""
  rng = np.random.default_rng(0)
  directions = rng.normal(size=(D_IN, K)) / np.sqrt(D_IN)
  batches = []
  for _ in range(num):
    x = rng.normal(size=(BATCH, D_IN)).astype(np.float32)
    y = (np.sin(2 * x @ directions) * np.array([1.0, 10.0, 0.1])).astype(np.float32)
    rows = np.array_split(np.arange(BATCH), jax.process_count())[jax.process_index()]
    batches.append((x[rows], y[rows]))
  return batches


def main(steps: int = 20, paths: tuple[str, ...] = ("stacked", "gram", "representation"),
         ways: tuple[str, ...] = WAYS, save: str | None = None) -> dict[tuple[str, str], float]:
  """Trains every path every way; returns the largest relative difference from one device
  (one process only: the first way is the reference). With `save`, process 0 writes every
  (path, way)'s losses, step by step, to that .npz under the key "path|way"."""
  data = local_batches(STEPS_PER_EPOCH)
  print(f"{jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)", flush=True)
  one_host = jax.process_count() == 1  # else one device sees only its own host's data
  gaps, history = {}, {}
  for path in paths:
    reference = train(path, ways[0], data, steps) if one_host else None
    if one_host:
      history[f"{path}|{ways[0]}"] = reference
    for way in ways[1:]:
      losses = train(path, way, data, steps)
      history[f"{path}|{way}"] = losses
      line = f"{path:>14}, {way:<26} final losses {np.round(losses[-1], 4)}"
      if one_host:
        gaps[path, way] = float(np.max(np.abs(losses - reference) / np.abs(reference)))
        line += f", largest relative gap to one device {gaps[path, way]:.1e}"
      print(line, flush=True)
  if save is not None and jax.process_index() == 0:
    np.savez(save, **history)
  return gaps


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--paths", nargs="+", default=["stacked", "gram", "representation"])
  parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS,
                      help="'one device' is the reference (one process only)")
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first (several processes)")
  parser.add_argument("--coordinator", default=None,
                      help="host:port of process 0's coordinator (default: from the cluster's "
                           "environment: SLURM, Open MPI, ..., or JAX_COORDINATOR_ADDRESS)")
  parser.add_argument("--num-processes", type=int, default=None)
  parser.add_argument("--process-id", type=int, default=None)
  parser.add_argument("--save", default=None,
                      help="write every (path, way)'s losses to this .npz (process 0 only)")
  args = parser.parse_args()
  if args.distributed:
    # CPU devices of different processes talk through gloo over TCP (the default from jax 0.5;
    # older versions have no cross-process CPU collectives without it). GPUs and TPUs ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  main(args.steps, tuple(args.paths), ("one device", *[w for w in args.ways if w != "one device"]),
       save=args.save)
