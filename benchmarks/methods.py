"""The benchmark's method registry: a name -> `(num_tasks, steps_per_epoch, key) -> Links`.

A method is a chain of two links, a reweighter (loss balancer, stacked -> stacked) and an
aggregator (gradient balancer, stacked -> one gradient), and the path it runs on. Methods
without an aggregator reduce by the plain sum and run on the single-backward path
(`mtl_optax.value_and_reweighted_grad`); the others run on the stacked Jacobian
(`mtl_optax.value_and_jacrev`), their aggregator getting the `shared` mask of
`benchmarks.models.shared_mask` (trunk shared, heads task-specific), or, named `<method>_rep`,
on the representation path (`mtl_optax.value_and_representation_jacrev`: rows are the
gradients with respect to the trunk's output). Every balancer is built by
`mtl_optax.registry`, the one registry of the tests and the benchmarks.
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


Factory = Callable[[int, int, jax.Array], Links]


def chain(links: Links) -> Transform:
  """The method as one transformation of the stacked Jacobian: reweighter, then aggregator."""
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
    **{n: _reweighter(n) for n in ("si", "rlw", "dwa", "uw", "gls", "imtl_l", "igb_v1", "stch")},
    "famo": lambda k, spe, key: Links(balancers.build("famo", k), None, post_step_losses=True),
}
GRADIENT_BALANCERS = tuple(balancers.names("gradient"))
# IGB Alg. 3: IGBv2's rows aggregated by a gradient balancer (the fusions its paper reports).
IGB_V2_FUSIONS = ("mgda", "pcgrad", "nash_mtl")
# Also in the registry on the representation path, as `<name>_rep`.
REPRESENTATION = ("mgda", "cagrad", "nash_mtl", "imgrad", "db_mtl", "igb_v1+nash_mtl")


def _igb_v2(k: int, spe: int, key: jax.Array) -> Transform:
  return balancers.build("igb_v2", k, steps_per_epoch=spe, key=key)


def _gradient(name: str, path: str) -> Factory:
  return lambda k, spe, key: Links(None, _aggregator(name, k, spe, key, path), path)


def _db_mtl_decay(path: str) -> Factory:
  # DB-MTL with beta_k = 0.9 / sqrt(k), from its paper's grid (beta_sigma in {0, 0.5}); the
  # default (LibMTL's constant beta = 0.9) trains badly on our benchmarks (see README).
  return lambda k, spe, key: Links(
      None, mtl_optax.db_mtl(k, beta_sigma=0.5, shared=_shared(path)), path)


def _igb_v1_fusion(name: str, path: str) -> Factory:
  return lambda k, spe, key: Links(mtl_optax.igb_v1(k, spe),
                                   _aggregator(name, k, spe, key, path), path)


def _igb_v2_fusion(name: str, path: str) -> Factory:
  def make(k, spe, key):
    k1, k2 = jax.random.split(key)
    return Links(_igb_v2(k, spe, k1), _aggregator(name, k, spe, k2, path), path)
  return make


def gradient_methods(path: str = "stacked") -> dict[str, Factory]:
  """Every method with a gradient balancer, built for `path` ('stacked' or 'representation')."""
  out = {n: _gradient(n, path) for n in GRADIENT_BALANCERS}
  out["db_mtl_decay"] = _db_mtl_decay(path)
  out.update({f"igb_v2+{n}": _igb_v2_fusion(n, path) for n in IGB_V2_FUSIONS})
  out["igb_v1+nash_mtl"] = _igb_v1_fusion("nash_mtl", path)
  return out


def registry() -> dict[str, Factory]:
  """Every method that this `mtl_optax` provides, in the order of the result tables."""
  methods = dict(LOSS_BALANCERS)
  methods["igb_v2"] = lambda k, spe, key: Links(_igb_v2(k, spe, key), None)
  methods.update(gradient_methods())
  representation = gradient_methods("representation")
  methods.update({f"{n}_rep": representation[n] for n in REPRESENTATION})
  return methods


def accepts(name: str, num_tasks: int) -> bool:
  """Whether the method `name` runs with `num_tasks` tasks (Krum needs 3)."""
  method = balancers.METHODS.get(name.removesuffix("_rep"))
  return method is None or num_tasks >= method.min_tasks


def select(names: str) -> dict[str, Factory]:
  """`"all"` or a comma-separated list of registry names."""
  methods = registry()
  if names == "all":
    return methods
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in methods]
  if unknown:
    raise ValueError(f"Unknown or unavailable methods {unknown}; available: {list(methods)}.")
  return {n: methods[n] for n in chosen}

