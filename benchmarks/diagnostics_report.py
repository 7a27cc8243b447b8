"""Tables and plots of the training diagnostics `benchmarks/run.py --diagnostics/--plots` keeps.

Each method's history (`run.record`, per run and step): training losses, normalized task
weights, Pareto failure, imbalance ratio, cosines, conflicting pairs, solver convergence and,
for the threshold baselines, whether the inner balancer ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _rate(values: np.ndarray) -> str:
  """Mean ± std over runs of a per-run percentage."""
  per_run = 100.0 * values[~np.isnan(values)]
  if not len(per_run):
    return "-"
  return (f"{per_run.mean():.1f} ± {per_run.std():.1f}" if len(per_run) > 1
          else f"{per_run.mean():.1f}")


def summary(history: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-run statistics of one method's history."""
  pareto = history["pareto"].astype(float)              # (runs, steps)
  ratio = history["ratio"]
  finite = np.where(np.isfinite(ratio), ratio, np.nan)
  high = finite >= np.nanpercentile(finite, 75)          # the most imbalanced quarter of steps
  low = finite <= np.nanpercentile(finite, 25)
  masked = lambda m: np.array([p[q].mean() if q.any() else np.nan  # noqa: E731
                               for p, q in zip(pareto, m)])
  return dict(pareto=pareto.mean(1), pareto_high=masked(high), pareto_low=masked(low),
              ratio_median=np.nanmedian(finite), ratio_p90=np.nanpercentile(finite, 90),
              ratio_inf=float(np.mean(~np.isfinite(ratio))),
              min_cos=history["min_cos"].mean(),
              min_pair_q=np.percentile(history["min_pair"], [10, 50, 90]),
              conflict=history["conflict"].mean(),
              effective=history["effective"].mean(),
              fallbacks=(~history["converged"].astype(bool)).sum(1).mean(),
              applied=history["applied"].astype(float).mean())


def table(results: dict[str, Any], num_tasks: int) -> str:
  """Markdown: one row per method with a history."""
  lines = [
      "| Method | Pareto failure (% of steps) | in the 25% most imbalanced steps | in the 25% "
      "least | imbalance ratio: median | 90th pct | min_i cos(g_i, d): mean | conflicting "
      f"pairs (%) | min_{{i<j}} cos(g_i, g_j): 10th / 50th / 90th pct | effective tasks (of "
      f"{num_tasks}) | solver fallbacks / run | inner applied (%) |", "|---" * 12 + "|"]
  for name, res in results.items():
    if res.history is None:
      continue
    s = summary(res.history)
    lines.append(
        f"| {name} | {_rate(s['pareto'])} | {_rate(s['pareto_high'])} | "
        f"{_rate(s['pareto_low'])} | {s['ratio_median']:.3g} | {s['ratio_p90']:.3g} | "
        f"{s['min_cos']:.3f} | {100 * s['conflict']:.1f} | "
        f"{' / '.join(f'{q:.2f}' for q in s['min_pair_q'])} | {s['effective']:.2f} | "
        f"{s['fallbacks']:.1f} | {100 * s['applied']:.0f} |")
  return "\n".join(lines) + "\n"


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
  """Moving average along the last axis (same length, shorter windows at the start)."""
  if window <= 1:
    return x
  c = np.cumsum(np.concatenate([np.zeros(x.shape[:-1] + (1,)), x], -1), -1)
  idx = np.arange(1, x.shape[-1] + 1)
  lo = np.maximum(idx - window, 0)
  return (c[..., idx] - c[..., lo]) / (idx - lo)


def plot_method(name: str, history: dict[str, np.ndarray], task_names: list[str],
                path: Path, title: str) -> Path:
  """One PNG: per-task training loss and task weights, Pareto-failure rate, imbalance ratio,
  minimum cosine to d and smallest pairwise cosine, over training (mean over runs)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  steps = history["losses"].shape[1]
  window = max(1, steps // 40)
  t = np.arange(1, steps + 1)
  fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
  colors = plt.cm.tab20(np.linspace(0, 1, max(len(task_names), 2)))
  ax = axes[0, 0]
  for i, task in enumerate(task_names):
    ax.plot(t, _smooth(history["losses"][..., i].mean(0), window), color=colors[i], lw=1,
            label=task)
  ax.set(yscale="log", title="training loss per task", xlabel="step")
  ax.legend(fontsize=6, ncol=2)
  ax = axes[0, 1]
  for i, task in enumerate(task_names):
    ax.plot(t, _smooth(history["weights"][..., i].mean(0), window), color=colors[i], lw=1)
  ax.set(title="normalized task weight w_i / sum |w|", xlabel="step")
  ax = axes[0, 2]
  ax.plot(t, _smooth(history["effective"].mean(0), window), color="k", lw=1)
  ax.set(title="effective number of tasks exp(H(w))", xlabel="step",
         ylim=(0, len(task_names) + 0.5))
  ax = axes[1, 0]
  ax.plot(t, 100 * _smooth(history["pareto"].astype(float).mean(0), window), color="C3", lw=1,
          label="Pareto failure")
  ax.plot(t, 100 * _smooth(history["conflict"].mean(0), window), color="C0", lw=1,
          label="conflicting pairs")
  if not np.all(history["applied"]):
    ax.plot(t, 100 * _smooth(history["applied"].astype(float).mean(0), window), color="C2",
            lw=1, label="inner balancer applied")
  ax.set(title=f"% of steps / pairs (moving mean, {window} steps)", xlabel="step",
         ylim=(-2, 102))
  ax.legend(fontsize=7)
  ax = axes[1, 1]
  ratio = np.where(np.isfinite(history["ratio"]), history["ratio"], np.nan)
  ax.plot(t, np.nanmedian(ratio, 0), color="C4", lw=0.5, alpha=0.4)
  ax.plot(t, _smooth(np.nan_to_num(np.nanmedian(ratio, 0), nan=1.0), window), color="C4", lw=1.2)
  ax.set(yscale="log", title="imbalance ratio ||g_max|| / ||g_min||", xlabel="step")
  ax = axes[1, 2]
  ax.plot(t, _smooth(history["min_cos"].mean(0), window), color="C1", lw=1,
          label="min_i cos(g_i, d)")
  ax.plot(t, _smooth(history["min_pair"].mean(0), window), color="C5", lw=1,
          label="min_{i<j} cos(g_i, g_j)")
  ax.axhline(0, color="grey", lw=0.5)
  ax.set(title="cosines", xlabel="step", ylim=(-1.05, 1.05))
  ax.legend(fontsize=7)
  fig.suptitle(f"{title}: {name}")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def plot_failures(results: dict[str, Any], path: Path, title: str, bins: int = 8) -> Path:
  """One PNG over methods: Pareto-failure rate against the step's imbalance ratio (quantile
  bins of all methods' steps), and the failure rate over training (IMGrad's Fig. 4 question)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  hist = {n: r.history for n, r in results.items() if r.history is not None}
  ratios = np.concatenate([h["ratio"].ravel() for h in hist.values()])
  ratios = ratios[np.isfinite(ratios)]
  edges = np.unique(np.quantile(ratios, np.linspace(0, 1, bins + 1)))
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  for j, (name, h) in enumerate(hist.items()):
    style = dict(color=plt.cm.tab10(j % 10), lw=1.2, marker="o", ms=3, label=name)
    r, p = h["ratio"].ravel(), h["pareto"].ravel().astype(float)
    which = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, len(edges) - 2)
    centers = np.sqrt(edges[:-1] * edges[1:])
    rate = [100 * p[which == b].mean() if np.any(which == b) else np.nan
            for b in range(len(centers))]
    axes[0].plot(centers, rate, **style)
    steps = h["pareto"].shape[1]
    window = max(1, steps // 20)
    axes[1].plot(np.arange(1, steps + 1),
                 100 * _smooth(h["pareto"].astype(float).mean(0), window), color=style["color"],
                 lw=1, label=name)
  axes[0].set(xscale="log", xlabel="imbalance ratio of the step (quantile bins)",
              ylabel="Pareto failure (% of steps)", title="Pareto failure vs imbalance")
  axes[1].set(xlabel="step", ylabel="Pareto failure (% of steps, moving mean)",
              title="Pareto failure over training")
  axes[0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def write(results: dict[str, Any], task_names: list[str], dataset: str, out: Path | None,
          plots: Path | None, header: str) -> str:
  """The diagnostics table (to `out`) and, with `plots`, one PNG per method and a comparison
  PNG, named `<dataset>_<method>.png` and `<dataset>_pareto.png` in that folder."""
  text = header + "\n\n" + table(results, len(task_names))
  if out is not None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
  if plots is not None:
    for name, res in results.items():
      if res.history is not None:
        safe = name.replace("@", "_at_").replace("=", "").replace("+", "_")
        plot_method(name, res.history, task_names, plots / f"{dataset}_{safe}.png", dataset)
    if any(r.history is not None for r in results.values()):
      plot_failures(results, plots / f"{dataset}_pareto.png", dataset)
  return text
