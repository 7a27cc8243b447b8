"""What crosses devices in one training step on each path, read from the compiled HLO.

On forced CPU devices a scaling table would time two shared cores, so this benchmark compiles
one training step (gradients, MGDA, Adam, apply) per path, K and mesh, and reads the
collectives XLA put in it (`jax.jit(step).lower(...).compile().as_text()`): all-reduce,
all-gather, reduce-scatter, collective-permute and all-to-all, each counted as many times as
it runs (the trip counts of the loops around it multiplied in). Nothing is run, so the numbers
do not depend on the machine's load.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/communication.py \
      [--tasks 3 11 40] [--out benchmarks/results/communication.md]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from mtl_optax import tree as tree_lib  # noqa: E402
from benchmarks import models  # noqa: E402

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (.+?) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                     r"=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class Collective(NamedTuple):
  kind: str       # one of KINDS
  elements: int   # elements of its result on one device (all arrays of a tuple result)
  bytes: int      # bytes of its result on one device
  count: int      # times it runs per call of the compiled program
  exact: bool     # False if a loop around it has no known trip count


def collectives(hlo: str) -> list[Collective]:
  """Every collective of a compiled HLO module's text, reached from its entry computation.

  The result size is the reduced array for all-reduce, the gathered array for all-gather and
  the shard for reduce-scatter. Loop bodies count trip-count times. A conditional counts its
  branch with the fewest bytes: the library's conditionals skip work on the usual step (rows of
  a Gram matrix formed again at an extreme scale, a gradient formed row by row when a task's
  row is not finite), so the cheapest branch is the step's; the others run only then.
  """
  bodies: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo.splitlines():
    if (match := _COMPUTATION.match(line)) is not None:
      current = match.group(1)
      bodies[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None and line.strip() != "}":
      bodies[current].append(line)
  if entry is None:
    raise ValueError("collectives: no ENTRY computation in this HLO text.")

  def visit(name: str, count: int, exact: bool, stack: tuple[str, ...],
            found: list[Collective]) -> None:
    for line in bodies.get(name, ()):
      match = _INSTRUCTION.match(line)
      if match is None:
        continue
      shape, op = match.groups()
      kind = op.removesuffix("-start")
      if kind in KINDS:
        arrays = [(dtype, [int(d) for d in dims.split(",") if d])
                  for dtype, dims in _ARRAY.findall(shape) if dtype in _BYTES]
        elements = sum(int(np.prod(dims)) for _, dims in arrays)
        size = sum(_BYTES[dtype] * int(np.prod(dims)) for dtype, dims in arrays)
        found.append(Collective(kind, elements, size, count, exact))
        continue
      if op in ("async-update", "async-done"):  # their computation counts at async-start
        continue
      trips = _TRIP_COUNT.search(line)
      branches = [callee for role, callee in _CALLED.findall(line)
                  if role.endswith("_computation")]
      for role, callee in _CALLED.findall(line):
        if (callee in stack or role.endswith("_computation")
            or (role == "to_apply" and op != "call")):  # reducers: no collectives
          continue
        loop = role in ("body", "condition")
        times = int(trips.group(1)) if loop and trips else 1
        visit(callee, count * times, exact and (not loop or trips is not None),
              stack + (callee,), found)
      for listed in _BRANCHES.findall(line):
        branches += re.findall(r"%([\w.-]+)", listed)
      options = []
      for callee in branches:
        if callee not in stack:
          options.append([])
          visit(callee, count, exact, stack + (callee,), options[-1])
      if options:
        found.extend(min(options, key=lambda ops: sum(op.bytes * op.count for op in ops)))

  found: list[Collective] = []
  visit(entry, 1, True, (entry,), found)
  return found


def bytes_by_kind(ops: list[Collective]) -> dict[str, int]:
  """Bytes per kind of collective, each collective counted as many times as it runs."""
  out: dict[str, int] = collections.Counter()
  for op in ops:
    out[op.kind] += op.bytes * op.count
  return dict(out)


# -- the benchmark ------------------------------------------------------------------------------

HIDDEN, DEPTH, D_IN, BATCH, CHUNK = 512, 6, 512, 64, 4
AXES = ("data", "param")


def param_specs(params, size: int):
  """Each leaf's largest axis divisible by `size` split over `param` (the last such if tied);
  leaves with none replicated."""
  def spec(leaf):
    dims = [i for i, n in enumerate(leaf.shape) if n % size == 0 and n >= size]
    if size == 1 or not dims:
      return P()
    best = max(dims, key=lambda i: (leaf.shape[i], i))
    return P(*[("param" if i == best else None) for i in range(leaf.ndim)])
  return jax.tree.map(spec, params)


class Problem(NamedTuple):
  """A model split into trunk and heads, with its data."""
  params: optax.Params
  x: jax.Array
  y: jax.Array
  losses: Callable       # (params, x, y) -> (K,)
  encode: Callable       # (params, x, y) -> z
  heads: Callable        # (params, z, x, y) -> (K,)


def problem(num_tasks: int, hidden: int = HIDDEN, depth: int = DEPTH, d_in: int = D_IN,
            batch: int = BATCH) -> Problem:
  """The benchmark MLP (`benchmarks.models`) with K linear heads, on random regression data."""
  model = models.build("mlp", num_tasks, 1, hidden, depth)
  kx, ky, kp = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (batch, d_in))
  y = jax.random.normal(ky, (batch, num_tasks))
  params = model.init(kp, x[:1])
  trunk, head = models.representation_split(model)

  def encode(params, x, y):
    del y
    return trunk(params, x)

  def heads(params, z, x, y):
    del x
    return jnp.mean((head(params, z)[..., 0] - y.T) ** 2, axis=1)

  return Problem(params, x, y, lambda p, x, y: heads(p, encode(p, x, y), x, y), encode, heads)


def _mean_over(fun: Callable, axis: str | None) -> Callable:
  """`fun` with its per-device losses averaged over the batch axis (inside shard_map)."""
  return fun if axis is None else (lambda *a: jax.lax.pmean(fun(*a), axis))


def train_step(prob: Problem, path: str, axis: str | None = None, rows=None):
  """`(step(params, states, x, y) -> (params, states), init(params) -> states)` with MGDA
  and Adam on `path`; with `axis`, the per-device step of shard_map over that batch axis.
  `rows`: shardings the stacked Jacobian is constrained to (under jit)."""
  k = prob.y.shape[1]
  opt = optax.adam(1e-3)
  mask = models.shared_mask
  tx = mtl_optax.mgda(k, shared=None if path == "representation" else mask)
  losses_fn = _mean_over(prob.losses, axis)
  if path == "ew":
    grad_fn = jax.grad(lambda p, x, y: losses_fn(p, x, y).sum())
    fn = lambda p, s, x, y: (grad_fn(p, x, y), s)  # noqa: E731
    init = lambda p: None  # noqa: E731
  elif path == "stacked":
    jac_fn = mtl_optax.value_and_jacrev(losses_fn)

    def fn(p, s, x, y):
      losses, jac = jac_fn(p, x, y)
      if rows is not None:
        jac = jax.lax.with_sharding_constraint(jac, rows)
      return tx.update(jac, s, p, losses=losses)
    init = tx.init
  elif path == "gram":
    grad_fn = mtl_optax.value_and_reweighted_grad(losses_fn, tx, chunk_size=CHUNK)

    def fn(p, s, x, y):
      (_, grad), s = grad_fn(p, s, x, y)
      return grad, s
    init = tx.init
  else:
    rep = mtl_optax.value_and_representation_jacrev(prob.encode, _mean_over(prob.heads, axis),
                                                    shared=mask)
    sharded = {} if axis is None else {"axis_name": axis}

    def fn(p, s, x, y):
      losses, rows, pullback = rep(p, x, y)
      out, s = tx.update(rows, s, losses=losses, **sharded)
      return pullback(out), s
    init = lambda p: tx.init(mtl_optax.row_like(  # noqa: E731
        mtl_optax.value_and_representation_jacrev(prob.encode, prob.heads, shared=mask)(
            p, prob.x, prob.y)[1]))

  def step(params, states, x, y):
    b_state, opt_state = states
    grad, b_state = fn(params, b_state, x, y)
    updates, opt_state = opt.update(grad, opt_state, params)
    return optax.apply_updates(params, updates), (b_state, opt_state)

  return step, lambda params: (init(params), opt.init(params))


def compiled_hlo(prob: Problem, path: str, shape: tuple[int, int], engine: str = "jit") -> str:
  """The compiled step's HLO text on a (data, param) mesh of `shape` (first devices)."""
  mesh = Mesh(np.array(jax.devices()[:shape[0] * shape[1]]).reshape(shape), AXES)
  put = lambda tree, specs: jax.device_put(  # noqa: E731
      tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                         is_leaf=lambda s: isinstance(s, P)))
  batch = P("data")
  x, y = put(prob.x, batch), put(prob.y, batch)
  if engine == "jit":
    specs = param_specs(prob.params, shape[1])
    # The stacked rows laid out like the parameters (else XLA may reshard them for Adam).
    rows = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s)), specs,
                        is_leaf=lambda s: isinstance(s, P))
    step, init = train_step(prob, path, rows=rows)
    params = put(prob.params, specs)
    replicated = NamedSharding(mesh, P())
    states = (jax.device_put(init(prob.params)[0], replicated),  # the balancer's state
              init(params)[1])  # Adam's moments, sharded like the parameters
    return jax.jit(step).lower(params, states, x, y).compile().as_text()
  if shape[1] != 1:
    raise ValueError("compiled_hlo: shard_map here is data parallel only (param axis of 1).")
  step, init = train_step(prob, path, axis="data")
  fn = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), batch, batch), out_specs=(P(), P()))
  states = init(prob.params)
  return jax.jit(fn).lower(prob.params, states, x, y).compile().as_text()


LAYOUTS = (("8 x 1", (8, 1), "jit"), ("8 x 1", (8, 1), "shard_map"), ("2 x 4", (2, 4), "jit"))
PATHS = ("ew", "stacked", "gram", "representation")
PATH_NAMES = {"ew": "EW (grad of sum)", "stacked": "stacked", "gram": "Gram-only",
              "representation": "representation"}


def _mib(n: int) -> str:
  return f"{n / 2**20:.3f}"


def measure(tasks=(3, 11, 40), layouts=LAYOUTS, paths=PATHS, **sizes) -> list[dict]:
  """One row per K, layout and path: bytes by kind of collective, their total, the largest
  collective and all-gather, the model's sizes. `sizes` go to `problem`."""
  rows = []
  for k in tasks:
    prob = problem(k, **sizes)
    params = sum(x.size for x in jax.tree.leaves(prob.params))
    shared, _ = tree_lib.split(prob.params, models.shared_mask(prob.params))
    shared = sum(x.size for x in jax.tree.leaves(shared))
    largest_param = max(x.nbytes for x in jax.tree.leaves(prob.params))
    for layout, shape, engine in layouts:
      for path in paths:
        ops = collectives(compiled_hlo(prob, path, shape, engine))
        by_kind = bytes_by_kind(ops)
        rows.append({"K": k, "params": params, "shared": shared, "mesh": layout,
                     "engine": engine, "path": path, "bytes": by_kind,
                     "total": sum(by_kind.values()),
                     "largest": max((op.bytes for op in ops), default=0),
                     "largest_all_gather": max((op.bytes for op in ops
                                                if op.kind == "all-gather"), default=0),
                     "largest_param": largest_param, "exact": all(op.exact for op in ops)})
  return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(rows: list[dict], command: str, sizes: dict[str, int]) -> str:
  """The Markdown report of `measure`'s rows, for a model of `sizes` (`problem`'s arguments)."""
  kinds = [kind for kind in KINDS if any(kind in r["bytes"] for r in rows)]
  table = []
  for r in rows:
    ew = next(e["total"] for e in rows if (e["K"], e["mesh"], e["engine"], e["path"])
              == (r["K"], r["mesh"], r["engine"], "ew"))
    table.append([str(r["K"]), r["mesh"], r["engine"], PATH_NAMES[r["path"]]]
                 + [_mib(r["bytes"].get(kind, 0)) for kind in kinds]
                 + [_mib(r["total"]) + ("" if r["exact"] else " (upper bound)"),
                    f"{r['total'] / max(ew, 1):.2f}", _mib(r["largest"]),
                    _mib(r["largest_all_gather"])])
  params = {r["K"]: (r["params"], r["shared"]) for r in rows}
  counts = "; ".join(f"K = {k}: {n:,} parameters ({_mib(4 * n)} MiB), {s:,} shared"
                     for k, (n, s) in params.items())
  sizes = {**dict(hidden=HIDDEN, depth=DEPTH, d_in=D_IN, batch=BATCH), **sizes}
  return "\n\n".join([
      f"# Bytes put into collectives per training step (jax {jax.__version__}, optax "
      f"{optax.__version__}, {jax.device_count()} forced CPU devices)",
      f"Model: an MLP trunk of {sizes['depth']} layers {sizes['hidden']} wide (input "
      f"{sizes['d_in']}), shared, and K linear heads; batch {sizes['batch']}, float32; "
      f"{counts}. One training step: gradients, MGDA (`shared` = the trunk; on the "
      f"representation path z), Adam, apply.",
      "Meshes (data x param): 8 x 1 splits the batch over eight devices and replicates the "
      "parameters; 2 x 4 splits the batch over two and every parameter's largest axis "
      "divisible by four over four (the stacked path's rows are constrained to the same "
      "layout, `jax.lax.with_sharding_constraint`). Engines: `jit` is `jax.jit` with `NamedSharding` inputs "
      "(XLA inserts the collectives); `shard_map` is the per-device step, which `pmean`s the "
      "losses (autodiff then all-reduces the rows and gradients) and `psum`s the z-rows' Gram "
      f"matrix (`axis_name`). Gram-only path: `chunk_size` {CHUNK}.",
      "Columns: MiB that one device puts into collectives per step, by kind (the reduced array "
      "for all-reduce, the gathered one for all-gather; link traffic is about twice an "
      "all-reduce's size on a ring), their total, the total against EW (the gradient of "
      "sum_i L_i) in the same layout, the largest single collective and the largest "
      "all-gather (a stacked K x P tree would be at least K times a parameter leaf).",
      _table(["K", "mesh", "engine", "path", *kinds, "total", "vs EW", "largest",
              "largest all-gather"], table),
      f"Command: `{command}`",
  ])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 11, 40])
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args()
  if jax.device_count() < 8:
    raise SystemExit("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rows = measure(tuple(args.tasks))
  command = ("XLA_FLAGS=--xla_force_host_platform_device_count=8 python "
             "benchmarks/communication.py " + " ".join(sys.argv[1:]))
  text = report(rows, command, {})
  print(text)
  if args.out:
    args.out.write_text(text + "\n")


if __name__ == "__main__":
  main()
