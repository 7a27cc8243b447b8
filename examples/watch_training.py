"""Watching training: the quickstart's model trained with two balancers, their task weights and
conflict / imbalance diagnostics recorded at every step (`mtl_optax.with_diagnostics`), plotted.

The balancer is wrapped once; its update is unchanged, and the state carries the last step's
`Diagnostics` (per-task progress g_i . d and cosine to d, IMGrad's imbalance ratio, Pareto
failure, conflicting pairs, normalized weights and their effective number, solver
convergence) and a count of solver fallbacks. A `lax.scan` over the steps collects them.

  python examples/watch_training.py [--steps 600] [--out watch_training.png]
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax
import quickstart

BALANCERS = {
    "MGDA": lambda: mtl_optax.mgda(quickstart.NUM_TASKS, shared=quickstart.SHARED),
    "Nash-MTL": lambda: mtl_optax.nash_mtl(quickstart.NUM_TASKS, shared=quickstart.SHARED),
}


def train(balancer: optax.GradientTransformation, steps: int, batch: int = 64):
  """`steps` Adam steps on the stacked Jacobian; returns the per-step losses and diagnostics."""
  k = quickstart.NUM_TASKS
  watched = mtl_optax.with_diagnostics(balancer, k, shared=quickstart.SHARED)
  tx = optax.chain(watched, optax.adam(3e-3))
  params = quickstart.init_params(jax.random.PRNGKey(0))
  x, y = quickstart.make_data(1, steps * batch)
  value_and_jac = mtl_optax.value_and_jacrev(quickstart.task_losses)

  def step(carry, i):
    params, state = carry
    xb = jax.lax.dynamic_slice_in_dim(x, i * batch, batch)
    yb = jax.lax.dynamic_slice_in_dim(y, i * batch, batch)
    losses, jac = value_and_jac(params, xb, yb)
    updates, state = tx.update(jac, state, params, losses=losses)
    return (optax.apply_updates(params, updates), state), (losses, state[0].diagnostics)

  (_, state), (losses, diags) = jax.jit(
      lambda c: jax.lax.scan(step, c, jnp.arange(steps)))((params, tx.init(params)))
  return np.asarray(losses), jax.tree.map(np.asarray, diags), int(state[0].fallbacks)


def smooth(x: np.ndarray, window: int = 15) -> np.ndarray:
  kernel = np.ones(window) / window
  pad = np.concatenate([np.repeat(x[:1], window - 1, 0), x])
  return np.apply_along_axis(lambda c: np.convolve(c, kernel, "valid"), 0, pad)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--out", type=pathlib.Path,
                      default=pathlib.Path(__file__).with_name("watch_training.png"))
  args = parser.parse_args()

  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(len(BALANCERS), 4, figsize=(17, 3.8 * len(BALANCERS)), squeeze=False)
  tasks = [f"task {i} (x{s:g})" for i, s in enumerate(np.asarray(quickstart.SCALES))]
  for row, (name, make) in zip(axes, BALANCERS.items()):
    losses, diag, fallbacks = train(make(), args.steps)
    t = np.arange(1, args.steps + 1)
    for i, task in enumerate(tasks):
      row[0].plot(t, smooth(losses[:, i]), lw=1, label=task)
      row[1].plot(t, smooth(diag.normalized_weights[:, i]), lw=1, label=task)
      row[2].plot(t, smooth(diag.cosines[:, i]), lw=1, label=task)
    row[0].set(yscale="log", title=f"{name}: training loss", xlabel="step")
    row[1].set(title=f"{name}: normalized weight w_i / sum |w|", xlabel="step")
    row[2].set(title=f"{name}: cos(g_i, d)", xlabel="step", ylim=(-1.05, 1.05))
    row[2].axhline(0, color="grey", lw=0.5)
    row[3].plot(t, diag.imbalance_ratio, color="C4", lw=0.6, label="imbalance ratio")
    row[3].set(yscale="log", xlabel="step")
    row[3].set_title(f"{name}: imbalance ratio, conflicts\nPareto failures "
                     f"{int(diag.pareto_failure.sum())}/{args.steps}, fallbacks {fallbacks}",
                     fontsize=9)
    twin = row[3].twinx()
    twin.plot(t, 100 * smooth(diag.conflict_share.astype(float)), color="C0", lw=1,
              label="conflicting pairs (%)")
    twin.set_ylim(-2, 102)
    row[0].legend(fontsize=7)
    row[3].legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    print(f"{name}: final losses {losses[-20:].mean(0).round(4)}, Pareto failures "
          f"{int(diag.pareto_failure.sum())}/{args.steps}, median imbalance ratio "
          f"{np.median(diag.imbalance_ratio):.3g}, fallbacks {fallbacks}")
  fig.tight_layout()
  fig.savefig(args.out, dpi=80)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
