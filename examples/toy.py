"""The two-task toy problem of CAGrad and Nash-MTL: trajectories of the main balancers.

  PYTHONPATH=. python examples/toy.py [--steps 35000] [--out examples/toy.png]

Each method starts from the five points of Nash-MTL and takes Adam steps (lr 1e-3) on the
stacked per-task gradients; the figure shows the contours of the mean loss, the Pareto set and
the paths. Log-based balancers need positive losses, so every method sees f_i + 21 (the same
gradients; f_i > -20.5 everywhere). IGBv1 counts 1,000 steps as an epoch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax
from mtl_optax.toy import TOY_STARTS, toy_losses

SHIFT = 21.0  # f_i + SHIFT > 0, so the log-based methods see positive losses
STEPS_PER_EPOCH = 1_000
K = 2
METHODS = {
    "ew": lambda key: mtl_optax.sum_tasks(),
    "si": lambda key: optax.chain(mtl_optax.log_losses(), mtl_optax.sum_tasks()),
    "igb_v1": lambda key: optax.chain(mtl_optax.igb_v1(K, STEPS_PER_EPOCH), mtl_optax.sum_tasks()),
    "mgda": lambda key: mtl_optax.mgda(2),
    "pcgrad": lambda key: mtl_optax.pcgrad(2, key=key),
    "cagrad": lambda key: mtl_optax.cagrad(2),
    "nash_mtl": lambda key: mtl_optax.nash_mtl(K),
    "imgrad": lambda key: mtl_optax.imgrad(2),
    "db_mtl": lambda key: mtl_optax.db_mtl(K),
}


def trajectories(name: str, steps: int) -> np.ndarray:
  """`(starts, steps + 1, 2)` paths of Adam (lr 1e-3) driven by the method."""
  transform = optax.chain(METHODS[name](jax.random.PRNGKey(0)), optax.adam(1e-3))
  grad_fn = mtl_optax.value_and_jacrev(lambda x: toy_losses(x) + SHIFT)

  def run(x0):
    def step(carry, _):
      x, state = carry
      losses, jac = grad_fn(x)
      updates, state = transform.update(jac, state, x, losses=losses)
      x = optax.apply_updates(x, updates)
      return (x, state), x
    _, path = jax.lax.scan(step, (x0, transform.init(x0)), None, length=steps)
    return jnp.concatenate([x0[None], path])

  return np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(TOY_STARTS)))


def pareto_set(num: int = 101) -> np.ndarray:
  """Minimizers of a f1 + (1 - a) f2 for a in [0, 1], on a fine grid of the lower half-plane
  (where both objectives have their minima)."""
  x1, x2 = np.meshgrid(np.linspace(-8, 8, 641), np.linspace(-10, -6, 161))
  f = np.asarray(jax.vmap(toy_losses, in_axes=1)(jnp.stack([x1.ravel(), x2.ravel()])))
  a = np.linspace(0, 1, num)[:, None]
  best = np.argmin(a * f[:, 0] + (1 - a) * f[:, 1], axis=1)
  return np.stack([x1.ravel()[best], x2.ravel()[best]], 1)


def plot(paths: dict[str, np.ndarray], out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  g1, g2 = np.meshgrid(np.linspace(-10, 10, 201), np.linspace(-10, 10, 201))
  grid = jnp.stack([g1.ravel(), g2.ravel()])
  mean = np.asarray(jax.vmap(toy_losses, in_axes=1)(grid)).mean(1).reshape(g1.shape)
  front = pareto_set()
  cols = min(3, len(paths))
  rows = -(-len(paths) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
  for ax in axes.ravel()[len(paths):]:
    ax.axis("off")
  for ax, (name, path) in zip(axes.ravel(), paths.items()):
    ax.contour(g1, g2, mean, levels=20, cmap="Greys", linewidths=0.6)
    ax.plot(front[:, 0], front[:, 1], color="tab:gray", lw=4, alpha=0.6, label="Pareto set")
    for p in path:
      ax.plot(p[:, 0], p[:, 1], lw=1.5)
      ax.scatter(p[0, 0], p[0, 1], color="k", s=12, zorder=3)
      ax.scatter(p[-1, 0], p[-1, 1], marker="*", color="tab:red", s=60, zorder=3)
    ax.set(title=name, xlim=(-10, 10), ylim=(-10, 10), aspect="equal")
  axes[0, 0].legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=35_000)
  parser.add_argument("--out", type=Path, default=Path(__file__).with_name("toy.png"))
  args = parser.parse_args(argv)
  paths = {}
  for name in METHODS:
    paths[name] = trajectories(name, args.steps)
    ends = ", ".join(f"({a:.2f}, {b:.2f})" for a, b in paths[name][:, -1])
    print(f"{name:>8}: ends at {ends}", file=sys.stderr)
  plot(paths, args.out)
  print(f"wrote {args.out}")
  return paths


if __name__ == "__main__":
  main()
