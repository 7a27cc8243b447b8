"""Trains every balancer and the single-task baselines on a real benchmark; writes a table.

  python benchmarks/run.py --dataset qm9 --methods all --epochs 20 --seeds 3 [--max-train N]
  python benchmarks/run.py --dataset qm9 --recipe seeds --methods all --seeds 3  # GNN, 300 ep.
  python benchmarks/run.py --dataset yeast --methods db_mtl_0.1,db_mtl_0.5_decay --split val

Seeds run together under `jax.vmap`; an epoch is one jitted `jax.lax.scan` over the batches of
a fresh permutation. STL = the same architecture trained on the losses times e_k, one run per
task, all vmapped (task k's metric from run k). Delta_m is against the STL mean over seeds, T is the
training time (compilation excluded) relative to EW, measured in the same run. `--recipe seeds`
is the seed papers' QM9 setting (Navon et al. 2022, experiments/quantum_chemistry; LibMTL's
examples/qm9): the `GNN`, atomization energies, batch 120, 300 epochs, Adam lr 1e-3 reduced
x0.7 after 5 epochs without a better validation Delta_m (PyTorch's ReduceLROnPlateau, min lr
1e-5). The GNN's runs go one after another (`--runs sequential`, see `train`); `--stl paper`
takes Navon et al.'s STL test MAE as the Delta_m baseline instead of training STL.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `mtl_optax` importable
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import mtl_optax
from benchmarks import data, diagnostics_report, methods, models

RESULTS = Path(__file__).resolve().parent / "results"
# Per dataset: model, width, depth, batch size, epochs.
DEFAULTS = {
    "qm9": dict(model="mlp", hidden=256, depth=3, batch_size=128, epochs=20),
    "multifashion": dict(model="mlp", hidden=256, depth=2, batch_size=256, epochs=10),
    "yeast": dict(model="mlp", hidden=128, depth=2, batch_size=64, epochs=50),
}
SMOKE = dict(limit=400, max_train=256, max_eval=256, hidden=32, depth=2, batch_size=32,
             epochs=1)
# width, message-passing rounds; the GNN's runs go one after another (see `train`)
MODEL_DEFAULTS = {"gnn": dict(hidden=64, depth=3, runs="sequential")}
RECIPES = {"seeds": dict(model="gnn", batch_size=120, epochs=300, lr=1e-3, plateau=True)}
# Navon et al. 2022 (experiments/quantum_chemistry/utils.py, BASE): their STL test MAE per task
# (meV for the energies), the reference of the validation Delta_m their plateau schedule reads.
QM9_REFERENCE_STL = np.array([0.0671, 0.1814, 60.576, 53.915, 0.5027, 4.539, 58.838, 64.244,
                              63.852, 66.223, 0.07212])
QM9_MEV = np.array([1, 1, 1000, 1000, 1, 1000, 1000, 1000, 1000, 1000, 1])  # eV -> meV


class Plateau(NamedTuple):
  """PyTorch's ReduceLROnPlateau(factor, patience, min_lr), mode 'min', relative threshold
  1e-4, read once per epoch: `optax.contrib.reduce_on_plateau` with patience + 1 (it cuts
  after `patience` bad epochs, PyTorch after more than `patience`)."""
  score: Callable[[optax.Params, jax.Array], np.ndarray]  # (params, task weights) -> (runs,)
  factor: float = 0.7
  patience: int = 5
  min_lr: float = 1e-5


class RunState(NamedTuple):
  params: optax.Params
  balancer: optax.OptState
  adam: optax.OptState
  method_key: jax.Array    # the balancer's key (RLW, PCGrad, IGBv2 ...)
  data_key: jax.Array      # the batch order
  task_weights: jax.Array  # (K,) fixed factors on the losses: ones, or e_k for STL
  post_losses: jax.Array   # (K,) the last batch's losses after the last step (FAMO)


class Result(NamedTuple):
  metrics: np.ndarray  # (seeds, K) test metric per task
  seconds: float       # training time of all seeds together, compilation excluded
  history: dict[str, np.ndarray] | None = None  # with diagnostics: per run and step (`record`)
  test: np.ndarray | None = None  # (seeds, K) on test too, for a `--split val --also-test` run


def _flag(state: Any, name: str) -> jax.Array:
  """The field `name` of a (nested) state, e.g. a threshold's `applied`; True if absent."""
  flags = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
           if path and getattr(path[-1], "name", None) == name]
  return jnp.all(jnp.array([jnp.all(f) for f in flags])) if flags else jnp.array(True)


def record(balancer_state: mtl_optax.DiagnosticsState, losses: jax.Array) -> dict[str, jax.Array]:
  """One step's training losses and diagnostics (`mtl_optax.with_diagnostics`), as plotted."""
  diag = balancer_state.diagnostics
  return dict(losses=losses, weights=diag.normalized_weights, pareto=diag.pareto_failure,
              ratio=diag.imbalance_ratio, min_cos=jnp.min(diag.cosines),
              min_pair=diag.min_pair_cosine, conflict=diag.conflict_share,
              effective=diag.effective_tasks, converged=diag.converged,
              applied=_flag(balancer_state.inner, "applied"))


def task_losses(kind: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`(outputs (K, B, out), targets (B, K)) -> losses (K,)`: MSE, cross-entropy or BCE."""
  def losses(out, y):
    if kind == "regression":
      per = (out[..., 0] - y.T) ** 2
    elif kind == "multiclass":
      per = optax.softmax_cross_entropy_with_integer_labels(out, y.T)
    else:
      per = optax.sigmoid_binary_cross_entropy(out[..., 0], y.T.astype(out.dtype))
    return per.mean(axis=1)
  return losses


def metric_sums(kind: str, out: jax.Array, y: jax.Array, scale: jax.Array) -> jax.Array:
  """Per task, the batch sum of the absolute error in original units or of correct answers."""
  if kind == "regression":
    return jnp.abs(out[..., 0] - y.T).sum(axis=1) * scale
  pred = jnp.argmax(out, -1) if kind == "multiclass" else (out[..., 0] > 0).astype(y.dtype)
  return (pred == y.T).sum(axis=1).astype(jnp.float32)


def train(ds: data.Dataset, model: models.MultiHead, factory: methods.Factory, *, seeds: int,
          epochs: int, batch_size: int, lr: float, task_weights: np.ndarray | None = None,
          plateau: Plateau | None = None, desc: str = "", progress: bool = True,
          vmap_runs: bool = True, diagnostics: bool = False) -> tuple[optax.Params, float]:
  """Trains all runs at once under `jax.vmap`: `seeds` of them, or with `task_weights` (R, K)
  R x `seeds` of them, run r's losses multiplied by `task_weights[r]` (rows e_k: STL).
  `plateau`: after each epoch, each run's learning rate follows its own validation score.
  `vmap_runs=False`: the runs go one after another through the same compiled epoch (the GNN:
  vmapped over runs, XLA's CPU backend ran it 1.4x slower per run and hung at 11 runs).

  `diagnostics`: each balancer runs under `mtl_optax.with_diagnostics` (on the shared trunk;
  z-rows on the representation path; EW and the loss balancers on the Gram-only path, which
  then computes the Gram matrix, so T is not that of a plain run) and every step's `record`
  is kept.

  Returns the parameters stacked over the runs (seed-major) and the training time; with
  `diagnostics`, also the history: `record`'s fields, each `(runs, steps, ...)`.
  """
  x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
  n, k = len(x), len(ds.task_names)
  batch_size = min(batch_size, n)
  spe = n // batch_size
  task = task_losses(ds.kind)
  loss_fn = lambda p, w, xb, yb: w * task(model.apply(p, xb), yb)  # noqa: E731
  encode, heads = models.representation_split(model)
  rep_fn = mtl_optax.value_and_representation_jacrev(
      lambda p, w, xb, yb: encode(p, xb),
      lambda p, z, w, xb, yb: w * task(heads(p, z), yb), shared=models.shared_mask)
  adam = optax.inject_hyperparams(optax.adam)(learning_rate=lr)

  def balancer(links):
    if links.aggregator is None:
      tx = links.reweighter or mtl_optax.equal_weights(k)
    else:
      tx = methods.chain(links)
    if diagnostics:
      tx = mtl_optax.with_diagnostics(
          tx, k, shared=None if links.path == "representation" else models.shared_mask)
    return tx

  def init(key, weights):
    k_init, k_method, k_data = jax.random.split(key, 3)
    params = model.init(k_init, x[:1])
    links = factory(k, spe, k_method)
    like = params
    if links.path == "representation":  # the balancer's state lives in z-space
      rows = jax.eval_shape(lambda: rep_fn(params, weights, x[:batch_size], y[:batch_size])[1])
      like = jax.tree.map(lambda r: jnp.zeros(r.shape[1:], r.dtype), rows)
    return RunState(params, balancer(links).init(like), adam.init(params), k_method, k_data,
                    weights, jnp.ones((k,), jnp.float32))

  def step(state, idx, x, y):
    links = factory(k, spe, state.method_key)
    xb, yb = x[idx], y[idx]
    extra = {"post_step_losses": state.post_losses} if links.post_step_losses else {}
    if links.aggregator is None:
      grad_fn = mtl_optax.value_and_reweighted_grad(loss_fn, balancer(links))
      (losses, grad), bal = grad_fn(state.params, state.balancer, state.task_weights, xb, yb,
                                    **extra)
    elif links.path == "representation":
      losses, rows, pullback = rep_fn(state.params, state.task_weights, xb, yb)
      out, bal = balancer(links).update(rows, state.balancer, losses=losses)
      grad = pullback(out)
    else:
      losses, jac = mtl_optax.value_and_jacrev(loss_fn)(state.params, state.task_weights, xb, yb)
      grad, bal = balancer(links).update(jac, state.balancer, state.params, losses=losses)
      # A method that stays stacked (a reweighter needing the Jacobian) is summed here.
      grad = jax.tree.map(lambda g, p: g.sum(0) if g.shape != p.shape else g, grad, state.params)
    updates, adam_state = adam.update(grad, state.adam, state.params)
    params = optax.apply_updates(state.params, updates)
    post = (loss_fn(params, state.task_weights, xb, yb) if links.post_step_losses
            else state.post_losses)  # one more forward pass, as FAMO's reference code
    new = state._replace(params=params, balancer=bal, adam=adam_state, post_losses=post)
    return new, (record(bal, losses) if diagnostics else losses)

  def epoch(state, index, x, y):
    key = jax.random.fold_in(state.data_key, index)
    batches = jax.random.permutation(key, n)[:spe * batch_size].reshape(spe, batch_size)
    state, out = jax.lax.scan(lambda s, i: step(s, i, x, y), state, batches)
    if diagnostics:
      return state, (out["losses"].mean(0), out)
    return state, out.mean(0)

  weights = np.ones((1, k), np.float32) if task_weights is None else task_weights
  keys = jax.random.split(jax.random.PRNGKey(0), seeds)
  keys, weights = (jnp.repeat(keys, len(weights), 0), jnp.tile(jnp.asarray(weights), (seeds, 1)))
  groups = [slice(None)] if vmap_runs else [slice(r, r + 1) for r in range(len(weights))]
  init_runs, index = jax.jit(jax.vmap(init)), jnp.zeros([], jnp.int32)
  run_epoch = jax.jit(jax.vmap(epoch, in_axes=(0, None, None, None))).lower(
      jax.eval_shape(init_runs, keys[groups[0]], weights[groups[0]]), index, x, y).compile()
  if plateau is not None:
    schedule = optax.contrib.reduce_on_plateau(plateau.factor, plateau.patience + 1,
                                               min_scale=plateau.min_lr / lr)
    reduce = jax.jit(jax.vmap(lambda s, v: schedule.update(jnp.zeros(()), s, value=v)[1]))
  seconds, params, history = 0.0, [], []
  for group in groups:
    state = init_runs(keys[group], weights[group])
    if plateau is not None:
      on_plateau = jax.vmap(schedule.init)(jnp.zeros(len(weights[group])))
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    for e in bar:
      start = time.perf_counter()
      state, losses = run_epoch(state, index + e, x, y)
      losses = jax.block_until_ready(losses)
      if diagnostics:
        losses, steps = losses
        history.append((len(params), jax.tree.map(np.asarray, steps)))
      seconds += time.perf_counter() - start
      bar.set_postfix(loss=f"{float(losses.mean()):.4g}")
      if plateau is not None:
        on_plateau = reduce(on_plateau, jnp.asarray(plateau.score(state.params,
                                                                  weights[group])))
        hyper = dict(state.adam.hyperparams, learning_rate=lr * on_plateau.scale)
        state = state._replace(adam=state.adam._replace(hyperparams=hyper))
    params.append(state.params)
  params = jax.tree.map(lambda *p: jnp.concatenate(p), *params)
  if not diagnostics:
    return params, seconds
  per_group = [[h for g, h in history if g == i] for i in range(len(groups))]
  per_group = [{f: np.concatenate([h[f] for h in hs], axis=1) for f in hs[0]} for hs in per_group]
  return params, seconds, {f: np.concatenate([h[f] for h in per_group]) for f in per_group[0]}


@functools.lru_cache(maxsize=None)
def _metric_sums_fn(kind: str, model: models.MultiHead) -> Callable:
  """The jitted `(params (seeds, ...), x, y, scale) -> (seeds, K)` of `metric_sums`, built once
  per model (the plateau schedule evaluates every epoch)."""
  return jax.jit(jax.vmap(lambda p, xb, yb, scale: metric_sums(kind, model.apply(p, xb), yb,
                                                               scale),
                          in_axes=(0, None, None, None)))


def evaluate(ds: data.Dataset, model: models.MultiHead, params: optax.Params, split: str = "test",
             chunk: int = 2048) -> np.ndarray:
  """`(seeds, K)`: per task MAE (original units) or accuracy on `split`, for each seed."""
  x, y = getattr(ds, split)
  scale = jnp.asarray(ds.target_scale)
  sums_fn = _metric_sums_fn(ds.kind, model)
  total = sum(np.asarray(sums_fn(params, x[i:i + chunk], y[i:i + chunk], scale))
              for i in range(0, len(x), chunk))
  return total / len(x)


def seeds_score(ds: data.Dataset, model: models.MultiHead) -> Callable:
  """`(params, task weights (R, K)) -> (R,)`: each run's validation Delta_m (%) against
  `QM9_REFERENCE_STL` over the tasks it trains (one for STL), as Navon et al. schedule on."""
  def score(params, weights):
    mae = evaluate(ds, model, params, "val") * QM9_MEV
    w = np.asarray(weights) > 0
    return 100.0 * ((mae - QM9_REFERENCE_STL) / QM9_REFERENCE_STL * w).sum(1) / w.sum(1)
  return score


def benchmark(ds: data.Dataset, model: models.MultiHead, chosen: dict[str, methods.Factory],
              split: str = "test", progress: bool = True, plateau: bool = False,
              stl: str = "train", diagnostics: bool = False, also_test: bool = False,
              on_result: Callable[[dict[str, Result], int], None] | None = None,
              done: dict[str, Result] | None = None, **train_args: Any) -> dict[str, Result]:
  """STL, EW and every chosen method, each over the seeds; results keyed by method name.
  `plateau`: the seeds recipe's learning-rate schedule (`Plateau` on `seeds_score`).
  `stl="paper"`: no STL runs; the baseline is Navon et al.'s STL test MAE (`QM9_REFERENCE_STL`,
  QM9 with atomization energies only). `on_result(results, remaining)`: called after each
  method with the results so far (a partial table survives a run cut short). `done`: results
  of an earlier run of the same code and settings (`--resume`), not run again."""
  schedule = Plateau(seeds_score(ds, model)) if plateau else None
  run = lambda factory, desc, **kw: train(ds, model, factory, desc=desc,  # noqa: E731
                                          progress=progress, plateau=schedule,
                                          **train_args, **kw)
  k, ew = len(ds.task_names), methods.registry()["ew"]
  done = done or {}
  if stl == "paper":
    results = {"stl": Result((QM9_REFERENCE_STL / QM9_MEV)[None], float("nan"))}
  elif stl == "ew":  # no STL runs: Delta_m against this run's EW (filled in below)
    results = {}
  elif "stl" in done:
    results = {"stl": done["stl"]}
  else:
    params, seconds = run(ew, "stl", task_weights=np.eye(k, dtype=np.float32))
    per_run = evaluate(ds, model, params, split).reshape(-1, k, k)  # (seeds, run k, task)
    results = {"stl": Result(np.diagonal(per_run, axis1=1, axis2=2), seconds)}
  todo = {n: f for n, f in {"ew": ew, **chosen}.items() if methods.accepts(n, k)}
  for name in tqdm(todo, desc=f"{ds.name} methods", disable=not progress):
    if name in done:
      results[name] = done[name]
      continue
    params, seconds, *history = run(todo[name], name, diagnostics=diagnostics)
    results[name] = Result(evaluate(ds, model, params, split), seconds,
                           history[0] if history else None,
                           evaluate(ds, model, params, "test") if also_test else None)
    if on_result is not None:
      on_result(results, len(todo) - list(todo).index(name) - 1)
  if stl == "ew":
    results = {"stl": Result(results["ew"].metrics.mean(0, keepdims=True), float("nan"),
                             test=(results["ew"].test.mean(0, keepdims=True) if also_test
                                   else None)), **results}
  return results


def _fmt(values: np.ndarray, percent: bool) -> str:
  values = values * (100.0 if percent else 1.0)
  mean, std = float(np.mean(values)), float(np.std(values))
  text = f"{mean:.2f}" if percent else f"{mean:.4g}"
  return f"{text} ± {std:.2g}" if len(values) > 1 else text


def table(ds: data.Dataset, results: dict[str, Result], split: str = "test") -> str:
  """Markdown: per-task metric (mean ± std over seeds), Delta_m vs STL and T vs EW."""
  percent = ds.metric == "accuracy"
  arrow = "↑" if ds.higher_is_better else "↓"
  unit = " (%)" if percent else ""
  head = [f"{t} {arrow}" for t in ds.task_names]
  lines = [f"| Method | {' | '.join(head)} | Δm% ↓ | T |",
           "|---" * (len(head) + 3) + "|"]
  baseline = results["stl"].metrics.mean(0)
  flags = np.full(len(ds.task_names), ds.higher_is_better)
  for name, res in results.items():
    cells = [_fmt(res.metrics[:, t], percent) for t in range(len(ds.task_names))]
    dm = mtl_optax.delta_m(res.metrics, baseline, flags)
    rel = res.seconds / results["ew"].seconds
    rel = "-" if np.isnan(rel) else f"{rel:.2f}"  # STL from the paper: not timed here
    lines.append(f"| {name} | {' | '.join(cells)} | {_fmt(dm / 100.0, True)} | {rel} |")
  caption = (f"{split.capitalize()} {ds.metric}{unit} per task ({arrow}), mean ± std over seeds; "
             "Δm% against STL (lower is better); T: training time relative to EW.")
  return caption + "\n\n" + "\n".join(lines) + "\n"


def report(ds: data.Dataset, results: dict[str, Result], args: argparse.Namespace,
           command: str) -> str:
  schedule = " on a validation plateau (x0.7, patience 5)" if args.plateau else ""
  stl = {"paper": ", STL: Navon et al. 2022's test MAE (not trained here)",
         "ew": ", no STL: Delta_m against this run's EW (the 'stl' row is EW's mean over seeds)"
         }.get(args.stl, "")
  settings = (f"model {args.model}, epochs {args.epochs}, seeds {args.seeds}, batch "
              f"{args.batch_size}, Adam lr {args.lr}{schedule}, {len(ds.train.x)} training "
              f"examples, evaluated on {args.split} ({len(getattr(ds, args.split).x)}), "
              f"runs {args.runs}{stl}")
  return (f"# {ds.name}\n\nCommand: `{command}`\n\n"
          f"Data: {ds.source}. Settings: {settings}. jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, {datetime.date.today().isoformat()}.\n\n"
          + table(ds, results, args.split))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset", required=True, choices=[*data.LOADERS, "all"])
  p.add_argument("--methods", default="all", help="'all' or a comma-separated list")
  p.add_argument("--epochs", type=int)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--max-train", type=int, help="keep only this many training examples")
  p.add_argument("--max-eval", type=int, help="keep only this many val/test examples")
  p.add_argument("--batch-size", type=int)
  p.add_argument("--lr", type=float)
  p.add_argument("--model", choices=["mlp", "lenet", "gnn"])
  p.add_argument("--recipe", choices=list(RECIPES),
                 help="'seeds': the seed papers' QM9 model, optimizer and schedule")
  p.add_argument("--hidden", type=int)
  p.add_argument("--depth", type=int)
  p.add_argument("--split", default="test", choices=["val", "test"])
  p.add_argument("--stl", default="train", choices=["train", "paper", "ew"],
                 help="'paper': Delta_m against Navon et al.'s STL (QM9, --recipe seeds); "
                 "'ew': no STL runs, Delta_m against EW's mean over seeds")
  p.add_argument("--runs", choices=["vmap", "sequential"],
                 help="seeds and STL runs vmapped (default) or one after another (GNN)")
  p.add_argument("--smoke", action="store_true",
                 help="tiny data and model, 1 epoch; prints the table, writes only to --out")
  p.add_argument("--out", type=Path, help="the Markdown file (default results/<dataset>.md)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--resume", action="store_true",
                 help="continue a run cut short: the methods an earlier run of the same command "
                      "on the same code finished (kept in <out>.resume.json) are not run again")
  p.add_argument("--also-test", action="store_true",
                 help="with --split val and --stl ew: also evaluate on test, a second table "
                 "<out>_test.md (pick on val, read the pick on test, one training run)")
  p.add_argument("--diagnostics", type=Path, nargs="?", const=True,
                 help="record every step's conflict and imbalance diagnostics "
                 "(mtl_optax.with_diagnostics) and write their table here (default "
                 "results/diagnostics_<dataset>.md)")
  p.add_argument("--plots", type=Path, nargs="?", const=RESULTS / "plots",
                 help="with the diagnostics, write per-method PNGs of training losses, weights "
                 "and diagnostics to this folder (default results/plots)")
  return p.parse_args(argv)


def fingerprint(argv: list[str]) -> str:
  """A hash of the command (without `--resume`), the library's and the benchmarks' sources and
  the jax version: a resumed run continues only the same run of the same code."""
  root = Path(__file__).resolve().parents[1]
  h = hashlib.sha256(shlex.join(a for a in argv if a != "--resume").encode())
  h.update(f"jax {jax.__version__} {jax.devices()[0].platform}".encode())
  for path in sorted([*(root / "mtl_optax").rglob("*.py"), *(root / "benchmarks").glob("*.py")]):
    h.update(str(path.relative_to(root)).encode() + path.read_bytes())
  return h.hexdigest()


def save_finished(path: Path, key: str, results: dict[str, Result]) -> None:
  """The finished methods' metrics and times, for `--resume` (diagnostics are not kept)."""
  finished = {n: {"metrics": r.metrics.tolist(), "seconds": r.seconds,
                  "test": None if r.test is None else r.test.tolist()}
              for n, r in results.items()}
  path.write_text(json.dumps({"fingerprint": key, "results": finished}))


def load_finished(path: Path, key: str) -> dict[str, Result]:
  """The methods an earlier run of the same command on the same code finished."""
  if not path.exists():
    return {}
  saved = json.loads(path.read_text())
  if saved["fingerprint"] != key:
    raise SystemExit(f"--resume: {path.name} was written by another command or other code; "
                     "delete it to start again")
  return {n: Result(np.asarray(r["metrics"]), r["seconds"],
                    test=None if r["test"] is None else np.asarray(r["test"]))
          for n, r in saved["results"].items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Result]]:
  args = parse_args(argv)
  argv = sys.argv[1:] if argv is None else argv
  command = "python benchmarks/run.py " + shlex.join(a for a in argv if a != "--resume")
  names = list(data.LOADERS) if args.dataset == "all" else [args.dataset]
  everything = {}
  for name in names:
    chosen = methods.select(args.methods, name)
    run_args = argparse.Namespace(**vars(args), plateau=None)
    recipe = RECIPES.get(args.recipe, {})
    model_name = args.model or recipe.get("model") or DEFAULTS[name]["model"]
    # Explicit flags first, then the smoke sizes, the recipe, the model's and the dataset's.
    for key, value in {"lr": 1e-3, "plateau": False, "runs": "vmap", **DEFAULTS[name],
                       **MODEL_DEFAULTS.get(model_name, {}), **recipe,
                       **(SMOKE if args.smoke else {}), "model": model_name}.items():
      if getattr(run_args, key, None) is None:
        setattr(run_args, key, value)
    loader_args = {"max_train": run_args.max_train, "max_eval": run_args.max_eval}
    if run_args.model == "gnn":
      if name != "qm9":
        raise SystemExit("--model gnn reads molecules: use it with --dataset qm9")
      loader_args.update(graphs=True, atomization=args.recipe == "seeds")
    if args.stl == "paper" and not (name == "qm9" and args.recipe == "seeds"):
      raise SystemExit("--stl paper is Navon et al.'s QM9 STL: use it with --recipe seeds")
    if args.smoke and name == "qm9":
      loader_args["limit"] = run_args.limit
    ds = data.LOADERS[name](**loader_args)
    model = models.build(run_args.model, len(ds.task_names), ds.num_outputs, run_args.hidden,
                         run_args.depth)
    watch = bool(args.diagnostics) or args.plots is not None
    out = args.out if args.out is not None else None if args.smoke else RESULTS / f"{name}.md"
    if out is not None:
      out = out.with_name(f"{out.stem}_{name}{out.suffix}") if len(names) > 1 else out
      out.parent.mkdir(parents=True, exist_ok=True)

    if args.resume and (out is None or watch):
      raise SystemExit("--resume needs an output file and keeps no diagnostics (no "
                       "--diagnostics or --plots)")
    sidecar = None if out is None else out.with_suffix(".resume.json")
    key = fingerprint([*argv, name])
    done = load_finished(sidecar, key) if args.resume else {}

    def partial(results, remaining, out=out, ds=ds, run_args=run_args, sidecar=sidecar, key=key):
      if out is not None and remaining:  # the finished methods' table while the run goes on
        if "stl" not in results:  # `--stl ew`: Delta_m against EW, as at the end
          results = {"stl": Result(results["ew"].metrics.mean(0, keepdims=True), float("nan")),
                     **results}
        out.write_text(report(ds, results, run_args, command)
                       + f"\nPartial: {remaining} more method(s) still running.\n")
        if not watch:
          save_finished(sidecar, key, results)
    results = benchmark(ds, model, chosen, split=run_args.split, plateau=run_args.plateau,
                        stl=args.stl, on_result=partial, done=done,
                        vmap_runs=run_args.runs == "vmap",
                        diagnostics=watch, also_test=args.also_test,
                        progress=not args.no_progress, seeds=run_args.seeds,
                        epochs=run_args.epochs, batch_size=run_args.batch_size, lr=run_args.lr)
    text = report(ds, results, run_args, command)
    print(text)
    if out is not None:
      out.write_text(text)
      if sidecar.exists():
        sidecar.unlink()
      if args.also_test:
        if args.stl == "train":
          raise SystemExit("--also-test needs --stl ew (STL is evaluated on one split)")
        tests = {n: r._replace(metrics=r.test) for n, r in results.items()}
        test_args = argparse.Namespace(**{**vars(run_args), "split": "test"})
        out.with_name(f"{out.stem}_test{out.suffix}").write_text(
            report(ds, tests, test_args, command))
    if watch:
      diag_out = (RESULTS / f"diagnostics_{name}.md" if args.diagnostics in (None, True)
                  else args.diagnostics)
      if args.smoke and args.diagnostics in (None, True):
        diag_out = None
      header = (f"# Diagnostics: {ds.name}\n\nCommand: `{command}`\n\nSettings as "
                f"`{out.name if out else 'the table above'}` ({run_args.epochs} epochs, "
                f"{run_args.seeds} seeds, {len(ds.train.x)} training examples); every step of "
                "every seed, on the shared trunk's rows (z-rows for `_rep`). T in the main "
                "table includes the diagnostics.")
      print(diagnostics_report.write(results, list(ds.task_names), name, diag_out, args.plots,
                                     header))
    everything[name] = results
  return everything


if __name__ == "__main__":
  main()
