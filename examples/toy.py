"""The two-task toy problem of CAGrad, Nash-MTL and IMGrad: trajectories of the balancers.

  PYTHONPATH=. python examples/toy.py                                  # every balancer: toy.png
  PYTHONPATH=. python examples/toy.py --figure cagrad nash_mtl imgrad  # the papers' figures

`--figure` picks rows of `FIGURES`, one per paper figure, each with that paper's settings: the
starts, the number of Adam steps (lr 1e-3), the weights on the two objectives, the methods and
CAGrad's (and IMGrad's) c and rescaling. Each figure is drawn to examples/toy_<figure>.png
(`all`: toy.png), and the end points of every run go to examples/toy_results.md: distance to
the Pareto set and to the optimum of w1 f1 + w2 f2 (the point CAGrad and IMGrad converge to).
Log-based balancers need positive losses, so every method sees w_i f_i + 21 (the same
gradients; w_i f_i > -20.5 everywhere). IGBv1 counts 1,000 steps as an epoch.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax
from mtl_optax.grad.imgrad import imbalance_cos
from mtl_optax.toy import TOY_STARTS, toy_losses

HERE = Path(__file__).resolve().parent
SHIFT = 21.0  # w_i f_i + SHIFT > 0, so the log-based methods see positive losses
STEPS_PER_EPOCH = 1_000
K = 2
CAGRAD_STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))  # Cranial-XIX/CAGrad toy.py
NASH_STEPS = 35_000  # Nash-MTL's run length, also reported for the longer figures


class Figure(NamedTuple):
  """One paper figure: what it runs, from where, for how long, on which weighting."""
  title: str
  steps: int
  starts: tuple[tuple[float, float], ...]
  weights: tuple[float, float]  # (w1, w2): the methods see w1 f1 and w2 f2
  methods: tuple[str, ...]
  c: float                      # CAGrad's and IMGrad's c
  rescale: str                  # their rescaling of d (`mtl_optax.cagrad`)


def reference_two_task(c: float, imbalance: bool) -> optax.GradientTransformationExtraArgs:
  """CAGrad's toy.py solver (Cranial-XIX/CAGrad) as weights: x = argmin over [0, 1] of
  g_x.g0 + c||g0|| sqrt(||g_x||^2 + 1e-4), g_x = x g1 + (1 - x) g2, ||g0|| with 1e-4 inside
  its root, d = (g0 + c||g0|| g_x / (||g_x||_1e-4 + 1e-4)) / (1 + c), no x K. `imbalance`:
  IMGrad's objective on that solver, (1.5 - cos) g_x.g0 + cos c||g0|| ||g_x||_1e-4 with cos =
  cos(g0, g_m) (zzpustc/IMGrad's `imgrad`; it released no toy code). Golden-section search
  (60 steps) replaces scipy's bounded Brent."""
  def weights(m, state, losses):
    del losses
    g11, g12, g22 = m[0, 0], m[0, 1], m[1, 1]
    coef = c * 0.5 * jnp.sqrt(g11 + g22 + 2 * g12 + 1e-4)
    gw_sq = lambda x: x**2 * g11 + (1 - x) ** 2 * g22 + 2 * x * (1 - x) * g12  # noqa: E731
    gw_g0 = lambda x: 0.5 * (x * g11 + g12 + (1 - x) * g22)  # noqa: E731
    cos = imbalance_cos(m) if imbalance else 1.0
    lin = 1.5 - cos if imbalance else 1.0
    obj = lambda x: lin * gw_g0(x) + cos * coef * jnp.sqrt(gw_sq(x) + 1e-4)  # noqa: E731

    def golden(_, ab):
      a, b = ab
      r = 0.5 * (np.sqrt(5.0) - 1.0)
      x1, x2 = b - r * (b - a), a + r * (b - a)
      return jnp.where(obj(x1) < obj(x2), jnp.stack([a, x2]), jnp.stack([x1, b]))
    a, b = jax.lax.fori_loop(0, 60, golden, jnp.array([0.0, 1.0], m.dtype))
    x = 0.5 * (a + b)
    lam = coef / (jnp.sqrt(gw_sq(x) + 1e-4) + 1e-4)
    return (jnp.stack([0.5 + lam * x, 0.5 + lam * (1 - x)]) / (1 + c), None, state)

  name = "imgrad_ref" if imbalance else "cagrad_ref"
  return mtl_optax.gram_aggregator(name, K, lambda params: optax.EmptyState(), weights)


Builder = Callable[[jax.Array, Figure], optax.GradientTransformationExtraArgs]
METHODS: dict[str, Builder] = {
    "ew": lambda key, fig: mtl_optax.sum_tasks(),
    "si": lambda key, fig: optax.chain(mtl_optax.log_losses(K), mtl_optax.sum_tasks()),
    "igb_v1": lambda key, fig: optax.chain(mtl_optax.igb_v1(K, STEPS_PER_EPOCH),
                                           mtl_optax.sum_tasks()),
    "mgda": lambda key, fig: mtl_optax.mgda(K),
    "pcgrad": lambda key, fig: mtl_optax.pcgrad(K, key=key),
    "cagrad": lambda key, fig: mtl_optax.cagrad(K, fig.c, rescale=fig.rescale,
                                                scale_by_num_tasks=False),
    "nash_mtl": lambda key, fig: mtl_optax.nash_mtl(K),
    "imgrad": lambda key, fig: mtl_optax.imgrad(K, fig.c, rescale=fig.rescale,
                                                scale_by_num_tasks=False),
    "imgrad_nash": lambda key, fig: mtl_optax.imgrad_nash(K),
    "db_mtl": lambda key, fig: mtl_optax.db_mtl(K),
    "cagrad_ref": lambda key, fig: reference_two_task(fig.c, imbalance=False),
    "imgrad_ref": lambda key, fig: reference_two_task(fig.c, imbalance=True),
}
PAPER_METHODS = ("ew", "mgda", "pcgrad", "cagrad")
FIGURES: dict[str, Figure] = {
    "all": Figure("Every balancer, Nash-MTL's starts, 100k steps", 100_000, TOY_STARTS,
                  (1.0, 1.0), ("ew", "si", "igb_v1", "mgda", "pcgrad", "cagrad", "nash_mtl",
                               "imgrad", "db_mtl"), 0.5, "1+c"),
    # Cranial-XIX/CAGrad toy.py: 100k steps, c = 0.5, d / (1 + c).
    "cagrad": Figure("CAGrad (Liu et al. 2021), Fig. 1: toy.py, 100k steps, c = 0.5", 100_000,
                     CAGRAD_STARTS, (1.0, 1.0), PAPER_METHODS, 0.5, "1+c"),
    # AvivNavon/nash-mtl experiments/toy: 35k steps, f1 x 0.1, CAGrad c = 0.4 (its default).
    "nash_mtl": Figure("Nash-MTL (Navon et al. 2022), Fig. 1: 35k steps, f1 x 0.1, c = 0.4",
                       35_000, TOY_STARTS, (0.1, 1.0), (*PAPER_METHODS, "nash_mtl"), 0.4,
                       "1+c^2"),
    # IMGrad extends CAGrad's toy.py (its Appendix 1.1): 100k steps, c = 0.5, 0.9 f1 + 0.1 f2.
    "imgrad": Figure("IMGrad (Zhou et al. 2025), Fig. 2: CAGrad's toy.py, weighted objectives",
                     100_000, CAGRAD_STARTS, (0.9, 0.1),
                     (*PAPER_METHODS, "nash_mtl", "imgrad", "cagrad_ref", "imgrad_ref"), 0.5,
                     "1+c"),
}


def trajectories(name: str, fig: Figure, steps: int) -> np.ndarray:
  """`(starts, steps + 1, 2)` paths of Adam (lr 1e-3) driven by the method."""
  transform = optax.chain(METHODS[name](jax.random.PRNGKey(0), fig), optax.adam(1e-3))
  weights = jnp.asarray(fig.weights)
  grad_fn = mtl_optax.value_and_jacrev(lambda x: weights * toy_losses(x) + SHIFT)

  def run(x0):
    def step(carry, _):
      x, state = carry
      losses, jac = grad_fn(x)
      updates, state = transform.update(jac, state, x, losses=losses)
      x = optax.apply_updates(x, updates)
      return (x, state), x
    _, path = jax.lax.scan(step, (x0, transform.init(x0)), None, length=steps)
    return jnp.concatenate([x0[None], path])

  return np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(fig.starts)))


@functools.lru_cache(maxsize=None)
def pareto_set(num: int = 2001) -> np.ndarray:
  """`(num, 2)` points of the Pareto set, ordered by a in [0, 1]: the minimizers of
  a f1 + (1 - a) f2. Below x2 = 0 each f_i is tanh(-x2 / 2) q_i, so x1 = 7 (2a - 1) exactly and
  x2 minimizes tanh(-x2 / 2) (19.6 a (1 - a) + 0.01 (x2 + 8)^2 - 20): on a 1e-3 grid, then
  the vertex of the parabola through the best point and its neighbours."""
  a = np.linspace(0.0, 1.0, num)[:, None]
  h = 1e-3
  grid = np.arange(-10.0, -6.0, h)
  f = lambda x2: np.tanh(-x2 / 2) * (19.6 * a * (1 - a) + 0.01 * (x2 + 8) ** 2 - 20)  # noqa: E731
  x2 = grid[np.argmin(f(grid[None]), 1)][:, None]
  lo, mid, hi = f(x2 - h)[:, 0], f(x2)[:, 0], f(x2 + h)[:, 0]
  x2 = x2[:, 0] - 0.5 * h * (hi - lo) / (hi - 2 * mid + lo)
  return np.stack([7.0 * (2 * a[:, 0] - 1), x2], 1)


def optimum(weights: tuple[float, float]) -> np.ndarray:
  """The minimizer of w1 f1 + w2 f2: the Pareto point at a = w1 / (w1 + w2)."""
  front = pareto_set()
  return front[round(weights[0] / sum(weights) * (len(front) - 1))]


def distance_to_set(points: np.ndarray, curve: np.ndarray) -> np.ndarray:
  """Euclidean distance of each point `(n, 2)` to the polyline `curve` `(m, 2)`."""
  a, b = curve[:-1], curve[1:]
  ab = b - a
  t = np.clip(np.einsum("nmd,md->nm", points[:, None] - a, ab) / (ab**2).sum(1), 0.0, 1.0)
  nearest = a + t[..., None] * ab
  return np.linalg.norm(points[:, None] - nearest, axis=-1).min(1)


def plot(paths: dict[str, np.ndarray], fig_spec: Figure, out: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  g1, g2 = np.meshgrid(np.linspace(-10, 10, 201), np.linspace(-10, 10, 201))
  grid = jnp.stack([g1.ravel(), g2.ravel()])
  f = np.asarray(jax.vmap(toy_losses, in_axes=1)(grid)) * np.asarray(fig_spec.weights)
  mean = f.mean(1).reshape(g1.shape)
  front, best = pareto_set(), optimum(fig_spec.weights)
  cols = min(3, len(paths))
  rows = -(-len(paths) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows + 0.4), squeeze=False)
  for ax in axes.ravel()[len(paths):]:
    ax.axis("off")
  for ax, (name, path) in zip(axes.ravel(), paths.items()):
    ax.contour(g1, g2, mean, levels=20, cmap="Greys", linewidths=0.6)
    ax.plot(front[:, 0], front[:, 1], color="tab:gray", lw=4, alpha=0.6, label="Pareto set")
    ax.scatter(*best, marker="*", color="k", s=90, zorder=4, label="optimum of w1 f1 + w2 f2")
    for p in path:
      ax.plot(p[:, 0], p[:, 1], lw=1.5)
      ax.scatter(p[0, 0], p[0, 1], color="k", s=12, zorder=3)
      ax.scatter(p[-1, 0], p[-1, 1], marker="*", color="tab:red", s=60, zorder=5)
    ax.set(title=name, xlim=(-10, 10), ylim=(-10, 10), aspect="equal")
  axes[0, 0].legend(loc="upper right", fontsize=7)
  fig.suptitle(f"{fig_spec.title} (weights {fig_spec.weights})", fontsize=10)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def results_table(paths: dict[str, np.ndarray], fig: Figure, steps: int) -> str:
  """Markdown: per method and start, the end point and its distances to the Pareto set and to
  the optimum of the weighted objective, and that distance at Nash-MTL's 35k steps."""
  front, best = pareto_set(), optimum(fig.weights)
  early = min(NASH_STEPS, steps)
  lines = [f"## {fig.title}", "",
           f"{steps} Adam steps (lr 1e-3) on ({fig.weights[0]} f1, {fig.weights[1]} f2); "
           f"c = {fig.c}, rescale '{fig.rescale}'. Optimum of w1 f1 + w2 f2: "
           f"({best[0]:.2f}, {best[1]:.4f}).", "",
           "| method | start | end | dist. to Pareto set | dist. to optimum | "
           f"dist. to optimum at step {early} |",
           "|---|---|---|---|---|---|"]
  for name, path in paths.items():
    ends = path[:, -1]
    for x0, end, d_set, d_opt, d_early in zip(
        path[:, 0], ends, distance_to_set(ends, front), np.linalg.norm(ends - best, axis=1),
        np.linalg.norm(path[:, early] - best, axis=1)):
      lines.append(f"| {name} | ({x0[0]:g}, {x0[1]:g}) | ({end[0]:.3f}, {end[1]:.3f}) | "
                   f"{d_set:.3f} | {d_opt:.3f} | {d_early:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--figure", nargs="+", default=["all"], choices=list(FIGURES))
  parser.add_argument("--steps", type=int, help="Adam steps (default: each figure's own)")
  parser.add_argument("--c", type=float, help="CAGrad's and IMGrad's c (default: the figure's)")
  parser.add_argument("--weights", type=float, nargs=2, help="w1 w2 (default: the figure's)")
  parser.add_argument("--out", type=Path, help="the PNG (one figure only; default "
                      "examples/toy_<figure>.png, `all`: examples/toy.png)")
  parser.add_argument("--results", type=Path, help="the Markdown table of end points "
                      "(default examples/toy_results.md for the paper figures, else none)")
  args = parser.parse_args(argv)
  if args.out is not None and len(args.figure) > 1:
    parser.error("--out names one PNG: give one --figure")
  sections, paths = [], {}
  for key in args.figure:
    fig = FIGURES[key]
    if args.c is not None:
      fig = fig._replace(c=args.c)
    if args.weights is not None:
      fig = fig._replace(weights=tuple(args.weights))
    steps = fig.steps if args.steps is None else args.steps
    paths = {}
    for name in fig.methods:
      paths[name] = trajectories(name, fig, steps)
      ends = ", ".join(f"({a:.2f}, {b:.2f})" for a, b in paths[name][:, -1])
      print(f"{key} {name:>11}: ends at {ends}", file=sys.stderr)
    out = args.out or HERE / ("toy.png" if key == "all" else f"toy_{key}.png")
    plot(paths, fig, out)
    sections.append(results_table(paths, fig, steps))
    print(f"wrote {out}")
  results = args.results
  default_run = args.steps is None and args.c is None and args.weights is None
  if results is None and default_run and "all" not in args.figure:
    results = HERE / "toy_results.md"
  if results is not None:
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = f"# Toy problem: end points\n\nWritten by `python examples/toy.py {command}`.\n\n"
    results.write_text(header + "\n".join(sections))
    print(f"wrote {results}")
  return paths


if __name__ == "__main__":
  main()
