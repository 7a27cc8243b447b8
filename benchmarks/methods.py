"""The benchmark's method registry: a name -> `(num_tasks, steps_per_epoch, key) -> Links`.

A method is a chain of two links, a reweighter (loss balancer, stacked -> stacked) and an
aggregator (gradient balancer, stacked -> one gradient), and the path it runs on. Methods
without an aggregator reduce by the plain sum and run on the single-backward path
(`mtl_optax.value_and_reweighted_grad`); the others run on the stacked Jacobian
(`mtl_optax.value_and_jacrev`), their aggregator getting the `shared` mask of
`benchmarks.models.shared_mask` (trunk shared, heads task-specific), or, named `<method>_rep`,
on the representation path (`mtl_optax.value_and_representation_jacrev`: rows are the
gradients with respect to the trunk's output). Every balancer is built by
`mtl_optax.registry`, the one registry of the tests and the benchmarks. The IGBv2 fusions train
their agent at 1e-4 (the IGB paper's setting for them); DB-MTL and MoCo run at every point of
DB-MTL's paper grid by name (`beta_grid`), and `<method>_tuned` at each dataset's point chosen
on validation (`TUNED`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import optax

import mtl_optax
from mtl_optax import registry as balancers
from benchmarks.models import shared_mask

Transform = optax.GradientTransformationExtraArgs


class Links(NamedTuple):
  reweighter: Transform | None  # None: no reweighting
  aggregator: Transform | None  # None: the sum of rows, on the single-backward path
  path: str = "stacked"         # or "representation" (aggregators only)
  post_step_losses: bool = False  # the reweighter takes the last batch's losses after the step
  reading: str = "reference"    # IGB's fusion: "reference" (a chain) or "algorithm3"


Factory = Callable[[int, int, jax.Array], Links]


def chain(links: Links) -> Transform:
  """The method as one transformation of the stacked Jacobian: reweighter, then aggregator
  (`mtl_optax.fusion` in the links' reading when there are both)."""
  if links.reweighter is not None and links.aggregator is not None:
    return mtl_optax.fusion(links.reweighter, links.aggregator, reading=links.reading,
                            shared=_shared(links.path))
  parts = [links.reweighter, links.aggregator or mtl_optax.sum_tasks()]
  return optax.chain(*[p for p in parts if p is not None])


def _shared(path: str):
  """The aggregators' mask: trunk shared on the stacked path; z shared (None) on the other."""
  return shared_mask if path == "stacked" else None


def _aggregator(name: str, k: int, spe: int, key: jax.Array, path: str) -> Transform:
  return balancers.build(name, k, steps_per_epoch=spe, key=key, shared=_shared(path))


def _reweighter(name: str) -> Factory:
  return lambda k, spe, key: Links(balancers.build(name, k, steps_per_epoch=spe, key=key), None)


# Loss balancers in the tables. FAMO's update takes the previous batch's losses re-evaluated
# after the parameter step (`post_step_losses`), which `benchmarks/run.py` computes.
LOSS_BALANCERS: dict[str, Factory] = {
    "ew": lambda k, spe, key: Links(None, None),
    **{n: _reweighter(n) for n in ("si", "rlw", "dwa", "uw", "gls", "imtl_l", "igb_v1", "stch",
                                        "cosmos", "pbi")},
    "famo": lambda k, spe, key: Links(balancers.build("famo", k), None, post_step_losses=True),
}
GRADIENT_BALANCERS = tuple(balancers.names("gradient"))
# IGB Alg. 3: IGBv2's rows aggregated by a gradient balancer (the fusions its paper reports).
IGB_V2_FUSIONS = ("mgda", "pcgrad", "nash_mtl")
# IGBv1's fusions. Every fusion `igb_vN+<name>` follows IGB4MTL's code (`mtl_optax.fusion`'s
# reading "reference": the gradient balancer weights the heads too); `igb_vN+<name>@alg3` is the
# paper's Algorithm 3 as written (heads get the loss-balanced sum). The two differ only where the
# gradient balancer weights the heads (Nash-MTL), so only those have an `@alg3` name.
IGB_V1_FUSIONS = ("mgda", "nash_mtl")
ALGORITHM3 = ("nash_mtl",)
# Also in the registry on the representation path, as `<name>_rep`.
REPRESENTATION = ("mgda", "cagrad", "nash_mtl", "imgrad", "db_mtl", "igb_v1+nash_mtl",
                  "igb_v1+nash_mtl@alg3", "igb_v2+nash_mtl", "igb_v2+nash_mtl@alg3",
                  "igb_v1+mgda", "igb_v2+mgda")


# The IGB paper trains the agent of its fusions (IGBv2 + a gradient balancer) at 1e-4, of IGBv2
# alone at the reference's default 3e-4 (the registry's `igb_v2`).
IGB_V2_FUSION_AGENT_LR = 1e-4


def _gradient(name: str, path: str) -> Factory:
  return lambda k, spe, key: Links(None, _aggregator(name, k, spe, key, path), path)


# The beta grid of DB-MTL's paper (Lin et al. 2023, experimental setup, after MoCo's): beta in
# {0.1, 0.5, 0.9}, constant or beta / sqrt(k), as (beta, beta_sigma). DB-MTL and MoCo run at
# every point by name (`db_mtl_0.5_decay`, `moco_0.1`, ...), outside "all"; `db_mtl` and `moco`
# themselves are LibMTL's defaults (0.9 constant; 0.5 / sqrt(k)).
BETA_GRID = {f"{b}{'_decay' if s else ''}": (b, s) for s in (0.0, 0.5) for b in (0.1, 0.5, 0.9)}
TUNABLE = {"db_mtl": mtl_optax.db_mtl, "moco": mtl_optax.moco}
# Per method and dataset, the grid point with the best validation Delta_m (`--split val` runs of
# the grid, benchmarks/results/<dataset>_<method>_tuning.md): `<method>_tuned` (and
# `<method>_tuned_rep`) in `registry(dataset)`.
TUNED = {"db_mtl": {"qm9": "0.5_decay", "multifashion": "0.5_decay", "yeast": "0.5"},
         "moco": {"qm9": "0.9", "multifashion": "0.9", "yeast": "0.1"}}


def _beta_point(method: str, beta: float, beta_sigma: float, path: str = "stacked") -> Factory:
  return lambda k, spe, key: Links(
      None, TUNABLE[method](k, beta, beta_sigma, shared=_shared(path)), path)


def beta_grid() -> dict[str, Factory]:
  """Every tunable method at every point of `BETA_GRID`, e.g. `db_mtl_0.5_decay`."""
  return {f"{m}_{point}": _beta_point(m, *BETA_GRID[point]) for m in TUNABLE for point in BETA_GRID}


def _igb_v1_fusion(name: str, path: str, reading: str = "reference") -> Factory:
  return lambda k, spe, key: Links(mtl_optax.igb_v1(k, spe),
                                   _aggregator(name, k, spe, key, path), path, reading=reading)


def _igb_v2_fusion(name: str, path: str, reading: str = "reference") -> Factory:
  def make(k, spe, key):
    k1, k2 = jax.random.split(key)
    igb = mtl_optax.igb_v2(k, spe, key=k1, agent_learning_rate=IGB_V2_FUSION_AGENT_LR)
    return Links(igb, _aggregator(name, k, spe, k2, path), path, reading=reading)
  return make


def gradient_methods(path: str = "stacked") -> dict[str, Factory]:
  """Every method with a gradient balancer, built for `path` ('stacked' or 'representation')."""
  out = {n: _gradient(n, path) for n in GRADIENT_BALANCERS}
  out["db_mtl_decay"] = _beta_point("db_mtl", 0.9, 0.5, path)  # the grid's 0.9 / sqrt(k)
  out.update({f"igb_v2+{n}": _igb_v2_fusion(n, path) for n in IGB_V2_FUSIONS})
  out.update({f"igb_v1+{n}": _igb_v1_fusion(n, path) for n in IGB_V1_FUSIONS})
  out.update({f"igb_v1+{n}@alg3": _igb_v1_fusion(n, path, "algorithm3") for n in ALGORITHM3})
  out.update({f"igb_v2+{n}@alg3": _igb_v2_fusion(n, path, "algorithm3") for n in ALGORITHM3})
  return out


def registry(dataset: str | None = None) -> dict[str, Factory]:
  """Every method that this `mtl_optax` provides, in the order of the result tables; with a
  `dataset`, also `<method>_tuned` and `<method>_tuned_rep`, its `TUNED` grid point there."""
  methods = dict(LOSS_BALANCERS)
  methods["igb_v2"] = _reweighter("igb_v2")
  methods.update(gradient_methods())
  representation = gradient_methods("representation")
  methods.update({f"{n}_rep": representation[n] for n in REPRESENTATION})
  for method, points in TUNED.items():
    if dataset in points:
      beta, beta_sigma = BETA_GRID[points[dataset]]
      methods[f"{method}_tuned"] = _beta_point(method, beta, beta_sigma)
      methods[f"{method}_tuned_rep"] = _beta_point(method, beta, beta_sigma, "representation")
  return methods


def accepts(name: str, num_tasks: int) -> bool:
  """Whether the method `name` runs with `num_tasks` tasks (Krum needs 3)."""
  base = name.removesuffix("_rep")
  method = balancers.METHODS.get(base.split("=")[0] if "@" in base else base)
  return method is None or num_tasks >= method.min_tasks


def select(names: str, dataset: str | None = None) -> dict[str, Factory]:
  """`"all"` or a comma-separated list of names of `registry(dataset)` or of `beta_grid()`."""
  methods = registry(dataset)
  if names == "all":
    return methods
  methods.update(beta_grid())
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  for n in chosen:  # any threshold by name: "cagrad@imbalance=5", "mgda@similarity=-0.1"
    if n not in methods and "@" in n:
      balancers.threshold_method(n.removesuffix("_rep"))  # raises for a bad name
      methods[n] = _gradient(n.removesuffix("_rep"),
                             "representation" if n.endswith("_rep") else "stacked")
  unknown = [n for n in chosen if n not in methods]
  if unknown:
    raise ValueError(f"Unknown or unavailable methods {unknown}; available: {list(methods)}.")
  return {n: methods[n] for n in chosen}

