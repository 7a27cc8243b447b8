"""Child process of tests/test_devices.py: every balancer on eight devices against one device.

Needs eight devices before jax is imported, e.g. forced CPU devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/devices_child.py [--all]
Prints one JSON object per line: per (method, path, mode), the largest error of the sharded
run (final parameters, the losses of every step, the final balancer state) relative to the
single-device run, and whether all devices hold the same copies of every value; then the
communication benchmark's rows on a small model (`benchmarks/communication.py`).

Modes, on a (data, param) mesh of the shape named:
  jit-8x1, jit-2x4: the single-device program under `jax.jit`, its inputs placed with
    `NamedSharding` on automatic axes (the batch split over `data`, the parameters' last
    axis over `param`); XLA inserts the reductions;
  explicit-8x1: the same, data parallel, on explicit axes (`jax.make_mesh`'s default, where
    shardings are part of the types);
  shard_map-8x1: the per-device program under `shard_map`, which reduces explicitly: its
    losses are `pmean`ed over `data` (autodiff then all-reduces every row), and on the
    representation path the z-rows, split over the batch, reach the balancer with
    `axis_name="data"` (their Gram matrix is `psum`ed).
Without `--all`, each method runs once, on the path and in the mode `DEFAULT` gives it; with
it, on every path it supports in every mode.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from benchmarks import communication  # noqa: E402
from mtl_optax import registry  # noqa: E402
import tiny_model  # noqa: E402 (tests/)
from tiny_model import MASK, encode, heads, task_losses  # noqa: E402,F401 (tests/)

K, D, H, B, STEPS, LR = 3, 4, 8, 16, 4, 0.05
AXES = ("data", "param")
MODES = ("jit-8x1", "jit-2x4", "shard_map-8x1", "explicit-8x1")
FUSIONS = ("igb_v1+nash_mtl", "igb_v2+nash_mtl")


def model(b: int = B, h: int = H):
  """Parameters, inputs and targets: batch `b`, hidden width `h`."""
  return tiny_model.model(K, d=D, h=h, b=b)


def small_igb_v2() -> optax.GradientTransformationExtraArgs:
  # The registry's defaults would neither train nor consult the agent within STEPS steps.
  return mtl_optax.igb_v2(K, 1, key=0, train_from_epoch=1, act_from_epoch=2, update_every=2,
                          buffer_size=8, batch_size=4)


def balancer(name: str, shared) -> optax.GradientTransformationExtraArgs:
  if name == "igb_v2":
    return small_igb_v2()
  if name in FUSIONS:
    first = small_igb_v2() if name == "igb_v2+nash_mtl" else mtl_optax.igb_v1(K, 1)
    return optax.chain(first, mtl_optax.nash_mtl(K, shared=shared))
  return registry.build(name, K, steps_per_epoch=1, key=0, shared=shared)


def cases() -> list[tuple[str, str]]:
  """(method, path): loss balancers on the single-backward path ('gram'), gradient balancers
  and the IGB + Nash-MTL fusions on every path they run on."""
  out = [(n, "gram") for n in registry.names("loss")]
  for n in registry.names("gradient") + list(FUSIONS):
    gram = n in FUSIONS or "gram" in registry.METHODS[n].properties
    out += [(n, p) for p in ("stacked", "gram", "representation") if p != "gram" or gram]
  return out


def global_losses(fun: Callable, axis: str | None) -> Callable:
  """`fun` with its per-device losses averaged over the batch axis (inside shard_map)."""
  return fun if axis is None else (lambda *a: jax.lax.pmean(fun(*a), axis))


def program(name: str, path: str, axis: str | None = None):
  """`(init(params, x, y) -> state, run(params, state, x, y) -> (params, state, losses))`,
  `run` taking STEPS SGD steps; with `axis`, the per-device program of shard_map."""
  tx = balancer(name, None if path == "representation" else MASK)
  if path == "representation":
    rep = mtl_optax.value_and_representation_jacrev(encode, heads, shared=MASK)
    rep_axis = mtl_optax.value_and_representation_jacrev(
        encode, global_losses(heads, axis), shared=MASK)
    sharded = {} if axis is None else {"axis_name": axis}

    def init(params, x, y):
      return tx.init(mtl_optax.row_like(rep(params, x, y)[1]))

    def step(params, state, x, y):
      losses, rows, pullback = rep_axis(params, x, y)
      out, state = tx.update(rows, state, losses=losses, **sharded)
      return losses, pullback(out), state
  else:
    def init(params, x, y):
      del x, y
      return tx.init(params)

    if path == "gram":
      grad_fn = mtl_optax.value_and_reweighted_grad(global_losses(task_losses, axis), tx,
                                                    chunk_size=2)

      def step(params, state, x, y):
        (losses, grad), state = grad_fn(params, state, x, y)
        return losses, grad, state
    else:
      jac_fn = mtl_optax.value_and_jacrev(global_losses(task_losses, axis))

      def step(params, state, x, y):
        losses, jac = jac_fn(params, x, y)
        grad, state = tx.update(jac, state, params, losses=losses)
        return losses, grad, state

  def run(params, state, x, y):
    def body(carry, _):
      params, state = carry
      losses, grad, state = step(params, state, x, y)
      return (jax.tree.map(lambda p, g: p - LR * g, params, grad), state), losses
    (params, state), losses = jax.lax.scan(body, (params, state), None, length=STEPS)
    return params, state, losses
  return init, run


def state_specs(init: Callable, axes: tuple[str, ...]):
  """Specs of the balancer state: axes that grow with the batch are split over `data` (state
  in z-space), those that grow with the hidden width over `param` (if in `axes`)."""
  shape = lambda b, h: jax.eval_shape(init, *model(b, h))  # noqa: E731
  def spec(base, wide_b, wide_h):
    names = ["data" if s != sb else "param" if s != sh and "param" in axes else None
             for s, sb, sh in zip(base.shape, wide_b.shape, wide_h.shape)]
    return P(*names)
  return jax.tree.map(spec, shape(B, H), shape(2 * B, H), shape(B, 2 * H))


def make_mesh(shape: tuple[int, int]) -> Mesh:
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), AXES)


def placed(mesh: Mesh, tree, specs):
  return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                           is_leaf=lambda s: isinstance(s, P)))


PARAM_SPECS = {"trunk": P(None, "param"), "heads": P(None, "param")}


def sharded_run(name: str, path: str, mode: str):
  """The sharded program of `mode`, compiled and run; returns its outputs."""
  init, run = program(name, path)
  params, x, y = model()
  state = init(params, x, y)
  if mode.startswith("jit"):
    mesh = make_mesh((8, 1) if mode == "jit-8x1" else (2, 4))
    args = (placed(mesh, params, PARAM_SPECS), placed(mesh, state, state_specs(init, AXES)),
            placed(mesh, x, P("data")), placed(mesh, y, P("data")))
    return jax.jit(run)(*args)
  if mode == "explicit-8x1":
    mesh = jax.make_mesh((8, 1), AXES, axis_types=(AxisType.Explicit,) * 2)
    args = (params, placed(mesh, state, state_specs(init, ("data",))),
            placed(mesh, x, P("data")), placed(mesh, y, P("data")))
    with jax.set_mesh(mesh):
      return jax.jit(run)(*args)
  mesh = make_mesh((8, 1))
  specs = state_specs(init, ("data",))
  _, per_device = program(name, path, axis="data")
  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")),
                             out_specs=(P(), specs, P())))
  return fn(params, placed(mesh, state, specs), placed(mesh, x, P("data")),
            placed(mesh, y, P("data")))


@functools.cache
def reference(name: str, path: str):
  init, run = program(name, path)
  params, x, y = model()
  return jax.jit(run)(params, init(params, x, y), x, y)


def _plain(leaf) -> np.ndarray:
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  return np.asarray(leaf)


def relative_error(ref, out) -> float:
  """The largest |out - ref| / max|ref| over float leaves; inf if an integer leaf differs."""
  worst = 0.0
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True):
    a, b = _plain(a), _plain(b)
    if np.issubdtype(a.dtype, np.floating):
      worst = max(worst, float(np.max(np.abs(a - b), initial=0.0))
                  / max(float(np.max(np.abs(a), initial=0.0)), 1e-6))
    elif not np.array_equal(a, b):
      return float("inf")
  return worst


def consistent(out) -> bool:
  """Whether the copies of each leaf's shards on different devices are bitwise equal."""
  for leaf in jax.tree.leaves(out):
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    copies: dict[str, np.ndarray] = {}
    for shard in getattr(leaf, "addressable_shards", ()):
      data = np.asarray(shard.data)
      first = copies.setdefault(str(shard.index), data)
      if not np.array_equal(first, data):
        return False
  return True


def check(name: str, path: str, mode: str) -> dict:
  start = time.perf_counter()
  record = {"name": name, "path": path, "mode": mode}
  try:
    out = sharded_run(name, path, mode)
  except ValueError as error:
    record["raises"] = str(error)
  else:
    record["error"] = relative_error(reference(name, path), out)
    record["consistent"] = consistent(out)
  record["seconds"] = round(time.perf_counter() - start, 2)
  return record


# The default run's (path, mode) for some methods: every path and mode meets Gram-based, row-space
# and stateful methods; other methods rotate through their paths and the modes. IGBv2 alone
# (None) is left to its fusion with Nash-MTL, whose first link it is: its compilation (the SAC
# agent's training) is the slowest of all.
DEFAULT: dict[str, tuple[str, str] | None] = {
    "igb_v2": None,
    "mgda": ("gram", "jit-2x4"), "pcgrad": ("representation", "jit-2x4"),
    "cagrad": ("stacked", "shard_map-8x1"), "imtl_g": ("gram", "explicit-8x1"),
    "nash_mtl": ("representation", "shard_map-8x1"), "aligned_mtl": ("stacked", "jit-2x4"),
    "upgrad": ("gram", "shard_map-8x1"), "graddrop": ("stacked", "jit-2x4"),
    "gradvac": ("representation", "explicit-8x1"), "gradnorm": ("gram", "jit-2x4"),
    "moco": ("representation", "shard_map-8x1"), "imtl": ("stacked", "explicit-8x1"),
    "db_mtl": ("representation", "jit-8x1"), "imgrad": ("gram", "shard_map-8x1"),
    "imgrad_nash": ("stacked", "jit-8x1"), "igb_v1+nash_mtl": ("gram", "jit-2x4"),
    "igb_v2+nash_mtl": ("representation", "shard_map-8x1"),
}


def plan(everything: bool) -> list[tuple[str, str, str]]:
  """(method, path, mode) to check: every combination, or each method once (`DEFAULT`)."""
  if everything:
    return [(n, p, m) for (n, p), m in itertools.product(cases(), MODES)]
  paths: dict[str, list[str]] = {}
  for n, p in cases():
    paths.setdefault(n, []).append(p)
  chosen = {n: DEFAULT.get(n, (ps[i % len(ps)], MODES[i % len(MODES)]))
            for i, (n, ps) in enumerate(paths.items())}
  return [(n, *where) for n, where in chosen.items() if where is not None]


SMOKE_LAYOUTS = (("8 x 1", (8, 1), "shard_map"), ("2 x 4", (2, 4), "jit"))


def communication_checks() -> list[dict]:
  """The communication benchmark on a small model (K = 3) and its report; and a positive
  control for its all-gather detection: a stacked step whose rows are made replicated."""
  sizes = dict(hidden=32, depth=2, d_in=16, batch=16)
  rows = communication.measure((K,), SMOKE_LAYOUTS, **sizes)
  out = [{"communication": row} for row in rows]
  out.append({"report": communication.report(rows, "tests/devices_child.py", sizes)})

  prob = communication.problem(K, **sizes)
  mesh = make_mesh((2, 4))
  params = placed(mesh, prob.params, communication.param_specs(prob.params, 4))
  x, y = placed(mesh, prob.x, P("data")), placed(mesh, prob.y, P("data"))
  tx = mtl_optax.mgda(K)
  everywhere = NamedSharding(mesh, P())

  def gathered_rows(params, state, x, y):
    losses, jac = mtl_optax.value_and_jacrev(prob.losses)(params, x, y)
    jac = jax.lax.with_sharding_constraint(jac, jax.tree.map(lambda _: everywhere, jac))
    return tx.update(jac, state, params, losses=losses)

  hlo = jax.jit(gathered_rows).lower(params, tx.init(params), x, y).compile().as_text()
  gathers = [op.bytes for op in communication.collectives(hlo) if op.kind == "all-gather"]
  out.append({"control": {"largest_all_gather": max(gathers, default=0),
                          "largest_param": rows[0]["largest_param"]}})
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--all", action="store_true", help="every path in every mode")
  parser.add_argument("--no-communication", action="store_true")
  args = parser.parse_args()
  if jax.device_count() < 8:
    raise SystemExit(f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS="
                     "--xla_force_host_platform_device_count=8 before jax is imported.")
  for name, path, mode in plan(args.all):
    print(json.dumps(check(name, path, mode)), flush=True)
  if not args.no_communication:
    for record in communication_checks():
      print(json.dumps(record), flush=True)


if __name__ == "__main__":
  main()
