"""Nash-MTL against IGBv1 + Nash-MTL (IGB4MTL's reading), which are the same method: how far apart
rounding and the solver's tolerance put them, on QM9's representation path (the main table's
settings: descriptor MLP 256 x 3, 20k molecules, batch 128, Adam 1e-3, 8 epochs).

Nash-MTL is scale-invariant (registry property "scale_invariant"): rows s_i g_i give alpha_i / s_i
and the same update, heads included, so chaining IGBv1 before it changes nothing but rounding and
the path of its damped Newton solve (warm-started from alpha in other coordinates, stopped at a
residual of 1e-4). Three measurements:

1. per step, along one Nash-MTL trajectory, the two updates computed from the same parameters
   (each with its own balancer state): their relative difference;
2. whole runs (5 seeds, the same seeds for every row): Nash-MTL, IGBv1 + Nash-MTL, and Nash-MTL
   on the training data perturbed by one ulp in one input entry; per seed test Delta_m against
   the STL row of a results table, and the runs' relative parameter distance at the end;
3. the same for IGBv1 + Nash-MTL in Algorithm 3's reading (heads from IGBv1), which is a
   different method.

  PYTHONPATH=$PWD python benchmarks/fusion_divergence.py --out benchmarks/results/qm9_fusion_divergence.md
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax
from benchmarks import data, methods, models, run


def stl_row(path: Path, k: int) -> np.ndarray:
  """The STL row's per-task means from a `benchmarks/run.py` table."""
  for line in path.read_text().splitlines():
    if line.startswith("| stl |"):
      cells = [c.strip() for c in line.strip("|").split("|")][1:1 + k]
      return np.array([float(re.split(r"\s*±\s*", c)[0]) for c in cells])
  raise SystemExit(f"no STL row in {path}")


def per_step(ds, model, steps: int, batch_size: int, lr: float) -> np.ndarray:
  """Relative difference of the two methods' full-gradient updates along Nash-MTL's path."""
  k = len(ds.task_names)
  x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
  spe = len(x) // batch_size
  task = run.task_losses(ds.kind)
  encode, heads = models.representation_split(model)
  rep = mtl_optax.value_and_representation_jacrev(
      lambda p, xb, yb: encode(p, xb), lambda p, z, xb, yb: task(heads(p, z), yb),
      shared=models.shared_mask)
  reg = methods.registry("qm9")
  key = jax.random.PRNGKey(0)
  a = methods.chain(reg["nash_mtl_rep"](k, spe, key))
  b = methods.chain(reg["igb_v1+nash_mtl_rep"](k, spe, key))
  params = model.init(jax.random.PRNGKey(1), x[:1])
  like = mtl_optax.row_like(rep(params, x[:batch_size], y[:batch_size])[1])
  sa, sb, adam = a.init(like), b.init(like), optax.adam(lr)
  opt = adam.init(params)

  @jax.jit
  def step(params, sa, sb, opt, idx):
    losses, rows, pullback = rep(params, x[idx], y[idx])
    da, sa = a.update(rows, sa, losses=losses)
    db, sb = b.update(rows, sb, losses=losses)
    ga, gb = pullback(da), pullback(db)
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, ga, gb)) / optax.tree.norm(ga)
    updates, opt = adam.update(ga, opt, params)
    return optax.apply_updates(params, updates), sa, sb, opt, diff

  order = np.random.default_rng(0).permutation(len(x))
  out = []
  for t in range(steps):
    idx = order[(t % spe) * batch_size:(t % spe + 1) * batch_size]
    params, sa, sb, opt, diff = step(params, sa, sb, opt, jnp.asarray(idx))
    out.append(float(diff))
  return np.array(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--max-train", type=int, default=20000)
  parser.add_argument("--steps", type=int, default=3 * 156, help="default: 3 epochs")
  parser.add_argument("--stl-table", type=Path,
                      default=run.RESULTS / "qm9_fusion.md")
  parser.add_argument("--out", type=Path, default=None)
  parser.add_argument("--no-alg3", action="store_true",
                      help="skip the run of Algorithm 3's reading (measurement 3)")
  args = parser.parse_args(argv)
  command = "python benchmarks/fusion_divergence.py " + shlex.join(sys.argv[1:] if argv is None
                                                                   else argv)
  cfg = run.DEFAULTS["qm9"]
  ds = data.load_qm9(max_train=args.max_train)
  k = len(ds.task_names)
  model = models.build("mlp", k, ds.num_outputs, cfg["hidden"], cfg["depth"])
  baseline = stl_row(args.stl_table, k)
  train = dict(seeds=args.seeds, epochs=args.epochs, batch_size=cfg["batch_size"], lr=1e-3,
               progress=False)

  start = time.perf_counter()
  diffs = per_step(ds, model, args.steps, cfg["batch_size"], 1e-3)
  x = ds.train.x.copy()
  x[0, 0] = np.nextafter(x[0, 0], np.float32(np.inf))
  perturbed = ds._replace(train=ds.train._replace(x=x))
  reg = methods.registry("qm9")
  runs = {"nash_mtl_rep": (ds, "nash_mtl_rep"),
          "igb_v1+nash_mtl_rep": (ds, "igb_v1+nash_mtl_rep"),
          "nash_mtl_rep, x + 1 ulp": (perturbed, "nash_mtl_rep"),
          "igb_v1+nash_mtl@alg3_rep": (ds, "igb_v1+nash_mtl@alg3_rep")}
  if args.no_alg3:
    del runs["igb_v1+nash_mtl@alg3_rep"]
  flags = np.zeros(k, bool)
  results, final = {}, {}
  for label, (dset, name) in runs.items():
    params, _ = run.train(dset, model, reg[name], **train)
    metrics = run.evaluate(ds, model, params, "test")
    results[label] = mtl_optax.delta_m(metrics, baseline, flags)
    final[label] = params
  seconds = time.perf_counter() - start
  act = 2 * (len(ds.train.x) // cfg["batch_size"])  # IGBv1's weights act from epoch 3

  def distance(p, q):
    leaves = lambda t: np.concatenate([np.ravel(v) for v in jax.tree.leaves(t)])  # noqa: E731
    a, b = leaves(p), leaves(q)
    return np.linalg.norm(a - b) / np.linalg.norm(a)

  ref = results["nash_mtl_rep"]
  lines = [f"# QM9: Nash-MTL and IGBv1 + Nash-MTL, step by step and run by run\n",
           f"Command: `{command}`\n",
           f"Settings: mlp {cfg['hidden']} x {cfg['depth']}, {len(ds.train.x)} training "
           f"molecules, batch {cfg['batch_size']}, Adam 1e-3, {args.epochs} epochs, seeds "
           f"{args.seeds} (the same for every row), representation path; Delta_m against the "
           f"STL row of `{args.stl_table.name}`. jax {jax.__version__} on "
           f"{jax.devices()[0].platform}; {seconds / 60:.1f} min.\n",
           f"**Per step** (along Nash-MTL's trajectory, {args.steps} steps, the two methods' "
           "full updates from the same parameters): relative difference median "
           f"{np.median(diffs):.1e}, 90th percentile {np.quantile(diffs, 0.9):.1e}, max "
           f"{diffs.max():.1e} (IGBv1's weights act from step {act + 1}: median before "
           f"{np.median(diffs[:act]):.1e}"
           + (f", after {np.median(diffs[act:]):.1e}" if len(diffs) > act else "")
           + ").\n",
           "**Whole runs**: test Delta_m (%) per seed; the last columns: mean, and the mean "
           "absolute difference per seed from Nash-MTL's run and the relative distance of the "
           "final parameters (mean over seeds).\n",
           "| run | " + " | ".join(f"seed {s}" for s in range(args.seeds))
           + " | mean | mean abs. diff. from nash_mtl_rep | param. distance |",
           "|---" * (args.seeds + 4) + "|"]
  for label, dm in results.items():
    dist = np.mean([distance(jax.tree.map(lambda v: v[s], final["nash_mtl_rep"]),
                             jax.tree.map(lambda v: v[s], final[label]))
                    for s in range(args.seeds)])
    lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in dm)
                 + f" | {dm.mean():.2f} | {np.abs(dm - ref).mean():.2f} | {dist:.2e} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out is not None:
    args.out.write_text(text)


if __name__ == "__main__":
  main()
