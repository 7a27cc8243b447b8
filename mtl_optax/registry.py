"""Every balancer by name, built from one uniform signature, with the properties it claims.

One registry serves the tests (the property suite runs over it: a new method joins by being
added here) and the benchmarks (`benchmarks/methods.py`), and lets users pick a method from a
config string:

  >>> import mtl_optax
  >>> tx = mtl_optax.registry.build("nash_mtl", num_tasks=3)
  >>> mtl_optax.registry.METHODS["mgda"].kind
  'gradient'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax

from mtl_optax import tree as tree_lib
from mtl_optax.grad.aligned_mtl import aligned_mtl
from mtl_optax.grad.cagrad import cagrad
from mtl_optax.grad.config import config
from mtl_optax.grad.constant import constant
from mtl_optax.grad.cr_mogm import cr_mogm
from mtl_optax.grad.db_mtl import db_mtl
from mtl_optax.grad.excess_mtl import excess_mtl
from mtl_optax.grad.fairgrad import fairgrad
from mtl_optax.grad.dualproj import dualproj
from mtl_optax.grad.graddrop import graddrop
from mtl_optax.grad.gradnorm import gradnorm
from mtl_optax.grad.gradvac import gradvac
from mtl_optax.grad.imgrad import imgrad, imgrad_nash
from mtl_optax.grad.imtl import imtl, imtl_g
from mtl_optax.grad.mgda import mgda, mgda_weights
from mtl_optax.grad.moco import moco
from mtl_optax.grad.modo import modo
from mtl_optax.grad.nash_mtl import nash_mtl
from mtl_optax.grad.pcd import pcd
from mtl_optax.grad.pcgrad import pcgrad
from mtl_optax.grad.sdmgrad import sdmgrad
from mtl_optax.grad.robust import krum, trimmed_mean
from mtl_optax.grad.threshold import threshold
from mtl_optax.grad.upgrad import upgrad
from mtl_optax.loss.dwa import dwa
from mtl_optax.loss.famo import famo
from mtl_optax.loss.igb import igb_v1
from mtl_optax.loss.igb_v2 import igb_v2
from mtl_optax.loss.learned import imtl_l, uw
from mtl_optax.loss.random import rlw
from mtl_optax.loss.scale import equal_weights, gls, log_losses
from mtl_optax.loss.scalarize import cosmos, pbi
from mtl_optax.loss.stch import stch

Kind = Literal["loss", "gradient"]
# Properties a method claims, checked by the property suite:
#   "random": its update draws from a PRNG key (so outputs depend on the seed);
#   "stateful": its update depends on earlier steps (EMAs, learned weights, previous alpha);
#   "needs_losses": `update` needs the `losses` extra argument;
#   "gram": its update is sum_i w_i g_i with w from the Gram matrix (the Gram-only path);
#   "permutation_equivariant": relabelling the tasks permutes the weights the same way;
#   "homogeneous": d(a G) = a d(G) for a > 0 (positive homogeneity of degree 1);
#   "non_conflicting": g_i . d >= 0 for every task i;
#   "scale_invariant": d(S G) = d(G) for every diagonal S > 0 (row i scaled by any s_i > 0 gives
#     the same update), so a loss balancer chained before it changes nothing on the shared
#     parameters (README, "Scale invariance and fusions");
#   "scale_invariant_direction": d(S G) = c d(G) for some c > 0 (the same direction; implied by
#     "scale_invariant", which claims both).
# Both scale invariances are claimed for one step from a fresh state, as the property suite
# checks them; stateful methods keep them across steps where noted in `SCALE_INVARIANCE`.
Property = Literal["random", "stateful", "needs_losses", "gram", "permutation_equivariant",
                   "homogeneous", "non_conflicting", "scale_invariant",
                   "scale_invariant_direction"]
Builder = Callable[..., optax.GradientTransformationExtraArgs]


class Method(NamedTuple):
  """A balancer's uniform builder `(num_tasks, *, steps_per_epoch, key, shared) -> transform`
  (loss balancers ignore `shared`), whether it balances losses or gradients, its claims, and
  the fewest tasks it accepts (Krum needs 3)."""
  build: Builder
  kind: Kind
  properties: frozenset[str]
  min_tasks: int = 1


def _loss(factory: Callable[[int, int, jax.Array | int], Any], *props: str) -> Method:
  def build(num_tasks, *, steps_per_epoch=1, key=0, shared=None):
    del shared
    return factory(num_tasks, steps_per_epoch, key)
  return Method(build, "loss", frozenset(props))


def _grad(factory: Callable[[int, jax.Array | int, tree_lib.MaskOrFn], Any], *props: str,
          min_tasks: int = 1) -> Method:
  def build(num_tasks, *, steps_per_epoch=1, key=0, shared=None):
    del steps_per_epoch
    return factory(num_tasks, key, shared)
  return Method(build, "gradient", frozenset(props), min_tasks)


def _trim_number(num_tasks: int) -> int:
  """The registry's trimmed mean: a quarter of the tasks cut at each end, at least one when
  K >= 3 (K = 3: the coordinate-wise median)."""
  return min(max(num_tasks // 4, 1), (num_tasks - 1) // 2)


def _ramp(num_tasks: int) -> np.ndarray:
  """The registry's constant weights: 1, 2, ..., K, normalized to sum to 1 (not uniform, so
  that the method is not the mean)."""
  w = np.arange(1.0, num_tasks + 1.0)
  return w / w.sum()


EQUIVARIANT = "permutation_equivariant"
SCALE_FREE = ("scale_invariant", "scale_invariant_direction")
DIRECTION = "scale_invariant_direction"
# Why each scale-invariant method is, from its formula (g_i -> s_i g_i, S = diag(s)); every other
# gradient balancer changes its direction under some S (the property suite finds a witness).
SCALE_INVARIANCE = {
    "nash_mtl": "alpha_i (M alpha)_i = 1 with M -> S M S has the solution S^-1 alpha, so "
                "d = sum_i alpha_i g_i is unchanged (and its clipping, and the heads' "
                "sum_i alpha_i h_i); any state, as the fixed point is solved exactly",
    "fairgrad": "alpha = 1: Nash-MTL's fixed point (other alpha: M w = w^(-1/alpha) gives "
                "w' = S^-1 w only when alpha = 1)",
    "moco": "its tracked rows follow the rows normalized to norm L_i (LibMTL), which S leaves "
            "unchanged; any state",
    "imtl_g": "d is the vector in span(G) with equal projections on the unit rows, scaled so "
              "that its weights sum to 1: the unit rows fix the direction, the norms the length",
    "imtl": "IMTL-L's first scalings are 1, then IMTL-G (direction)",
    "config": "the direction comes from the unit rows' cosine matrix, the length is the sum of "
              "the rows' projections on it",
    "db_mtl": "d = max_i ||m_i|| sum_i m_i / ||m_i||, m_i the EMAs (g_i on a first step): "
              "direction from unit rows, length the largest norm; across steps only for "
              "constant S",
    "pcd": "unit rows on a first step (its squared-norm EMAs start from the rows), rescaled to "
           "the primary's norm; across steps only for constant S",
}
METHODS: dict[str, Method] = {
    # Loss balancers (Table "loss balancers" of README).
    "ew": _loss(lambda k, spe, key: equal_weights(k), EQUIVARIANT),
    "si": _loss(lambda k, spe, key: log_losses(k), "needs_losses", EQUIVARIANT),
    "rlw": _loss(lambda k, spe, key: rlw(k, key=key), "random"),
    "dwa": _loss(lambda k, spe, key: dwa(k, spe), "stateful", "needs_losses",
                 EQUIVARIANT),
    "uw": _loss(lambda k, spe, key: uw(k), "stateful", "needs_losses", EQUIVARIANT),
    "gls": _loss(lambda k, spe, key: gls(k), "needs_losses", EQUIVARIANT),
    "imtl_l": _loss(lambda k, spe, key: imtl_l(k), "stateful", "needs_losses",
                    EQUIVARIANT),
    "igb_v1": _loss(lambda k, spe, key: igb_v1(k, spe), "stateful", "needs_losses",
                    EQUIVARIANT),
    "igb_v2": _loss(lambda k, spe, key: igb_v2(k, spe, key=key), "random",
                    "stateful", "needs_losses"),
    "famo": _loss(lambda k, spe, key: famo(k), "stateful", "needs_losses",
                  EQUIVARIANT),
    "stch": _loss(lambda k, spe, key: stch(k, spe), "stateful", "needs_losses",
                  EQUIVARIANT),
    # torchjd's scalarizers, with a fixed uniform preference (r = w = 1).
    "cosmos": _loss(lambda k, spe, key: cosmos(k), "needs_losses", EQUIVARIANT),
    "pbi": _loss(lambda k, spe, key: pbi(k), "needs_losses", EQUIVARIANT),
    # Gradient balancers (Table "gradient balancers" of README).
    "mgda": _grad(lambda k, key, shared: mgda(k, shared=shared), "gram", EQUIVARIANT,
                  "homogeneous", "non_conflicting"),
    "pcgrad": _grad(lambda k, key, shared: pcgrad(k, key=key, shared=shared),
                    "random", "gram", "homogeneous"),
    "cagrad": _grad(lambda k, key, shared: cagrad(k, shared=shared), "gram",
                    EQUIVARIANT, "homogeneous"),
    "imtl_g": _grad(lambda k, key, shared: imtl_g(k, shared=shared), "gram",
                    EQUIVARIANT, "homogeneous", DIRECTION),
    "nash_mtl": _grad(lambda k, key, shared: nash_mtl(k, shared=shared),
                      "stateful", "gram", EQUIVARIANT, *SCALE_FREE),
    "aligned_mtl": _grad(lambda k, key, shared: aligned_mtl(k, shared=shared),
                         "gram", EQUIVARIANT, "homogeneous"),
    "upgrad": _grad(lambda k, key, shared: upgrad(k, shared=shared), "gram",
                    EQUIVARIANT, "homogeneous", "non_conflicting"),
    "graddrop": _grad(lambda k, key, shared: graddrop(k, key=key, shared=shared),
                      "random"),
    "gradvac": _grad(lambda k, key, shared: gradvac(k, key=key, shared=shared),
                     "random", "stateful", "gram"),
    "gradnorm": _grad(lambda k, key, shared: gradnorm(k, shared=shared),
                      "stateful", "needs_losses", "gram", EQUIVARIANT),
    "moco": _grad(lambda k, key, shared: moco(k, shared=shared), "stateful", "needs_losses",
                  EQUIVARIANT, *SCALE_FREE),
    "imtl": _grad(lambda k, key, shared: imtl(k, shared=shared), "stateful",
                  "needs_losses", "gram", EQUIVARIANT, DIRECTION),
    "db_mtl": _grad(lambda k, key, shared: db_mtl(k, shared=shared), "stateful",
                    "needs_losses", EQUIVARIANT, DIRECTION),
    "imgrad": _grad(lambda k, key, shared: imgrad(k, shared=shared), "gram",
                    EQUIVARIANT, "homogeneous"),
    "imgrad_nash": _grad(lambda k, key, shared: imgrad_nash(k, shared=shared),
                         "stateful", "gram", EQUIVARIANT),
    "excess_mtl": _grad(lambda k, key, shared: excess_mtl(k, shared=shared), "stateful",
                        EQUIVARIANT),
    "fairgrad": _grad(lambda k, key, shared: fairgrad(k, shared=shared), "gram", EQUIVARIANT,
                      "non_conflicting", *SCALE_FREE),
    # MoDo and SDMGrad without `sample_jacobians`: the update's own Gram matrix stands in.
    "modo": _grad(lambda k, key, shared: modo(k, shared=shared), "stateful", "gram",
                  EQUIVARIANT),
    "sdmgrad": _grad(lambda k, key, shared: sdmgrad(k, shared=shared), "stateful", "gram",
                     EQUIVARIANT, "homogeneous"),
    # torchjd's aggregators.
    "dualproj": _grad(lambda k, key, shared: dualproj(k, shared=shared), "gram",
                      EQUIVARIANT, "homogeneous", "non_conflicting"),
    "config": _grad(lambda k, key, shared: config(k, shared=shared), "gram", EQUIVARIANT,
                    "homogeneous", DIRECTION),
    # Krum: not permutation-equivariant, as ties go to the lower index (with K - f - 2 = 1
    # neighbour the two mutually closest rows always tie).
    "krum": _grad(lambda k, key, shared: krum(k, shared=shared), "gram", "homogeneous",
                  min_tasks=3),
    "trimmed_mean": _grad(lambda k, key, shared: trimmed_mean(k, _trim_number(k),
                                                              shared=shared),
                          EQUIVARIANT, "homogeneous"),
    "constant": _grad(lambda k, key, shared: constant(_ramp(k), shared=shared), "gram",
                      "homogeneous"),
    "cr_mogm": _grad(lambda k, key, shared: cr_mogm(k, mgda_weights, shared=shared),
                     "stateful", "gram", EQUIVARIANT, "homogeneous"),
    # PCD: row 0 is the primary task (not permutation-equivariant); homogeneous only where the
    # squared norms dominate eps = 1e-8; g_1 . d < 0 when a secondary opposes the primary.
    "pcd": _grad(lambda k, key, shared: pcd(k, shared=shared), "stateful", "gram", DIRECTION),
}


# IMGrad's threshold baselines (Zhou et al. 2025, Sec. 4.3, Fig. 5): `<method>@imbalance`
# runs the method when the imbalance ratio ||g_max|| / ||g_min|| of the shared rows exceeds
# THRESHOLDS["imbalance"], the plain sum otherwise; `<method>@similarity` (the paper's control)
# when the smallest pairwise cosine falls below THRESHOLDS["similarity"]. `build` also takes
# any threshold by name: "cagrad@imbalance=5", "mgda@similarity=-0.1".
THRESHOLDS = {"imbalance": 3.0, "similarity": 0.0}
THRESHOLD_METHODS = ("mgda", "pcgrad", "cagrad", "nash_mtl")


def threshold_method(name: str) -> Method:
  """The registry entry of `<inner>@<criterion>[=<value>]` (see THRESHOLDS)."""
  inner_name, _, rest = name.partition("@")
  criterion, _, value = rest.partition("=")
  if inner_name not in METHODS or METHODS[inner_name].kind != "gradient" or "@" in inner_name:
    raise ValueError(f"registry: {name!r}: {inner_name!r} is not a gradient balancer.")
  if criterion not in THRESHOLDS:
    raise ValueError(f"registry: {name!r}: the criterion must be one of {sorted(THRESHOLDS)}.")
  level = float(value) if value else THRESHOLDS[criterion]
  inner = METHODS[inner_name]

  def build(num_tasks, *, steps_per_epoch=1, key=0, shared=None):
    return threshold(inner.build(num_tasks, steps_per_epoch=steps_per_epoch, key=key,
                                 shared=shared), num_tasks, level, criterion=criterion,
                     shared=shared)
  # The plain sum on some steps: not non-conflicting; and the choice reads the rows' norms, so
  # row scalings change it (not scale-invariant). The rest holds for both branches.
  dropped = {"non_conflicting", "scale_invariant", "scale_invariant_direction"}
  return Method(build, "gradient", inner.properties - dropped, inner.min_tasks)


METHODS.update({f"{n}@imbalance": threshold_method(f"{n}@imbalance") for n in THRESHOLD_METHODS})
METHODS["mgda@similarity"] = threshold_method("mgda@similarity")


def names(kind: Kind | None = None, *, having: tuple[str, ...] = (),
          num_tasks: int | None = None) -> list[str]:
  """The registered names of `kind` (None: all) that claim every property in `having` (and
  accept `num_tasks` tasks, when given)."""
  return [n for n, m in METHODS.items()
          if (kind is None or m.kind == kind) and m.properties.issuperset(having)
          and (num_tasks is None or num_tasks >= m.min_tasks)]


def build(name: str, num_tasks: int, *, steps_per_epoch: int = 1, key: jax.Array | int = 0,
          shared: tree_lib.MaskOrFn = None) -> optax.GradientTransformationExtraArgs:
  """The balancer `name` with its defaults, for `num_tasks` tasks.

  Args:
    name: a key of `METHODS`.
    num_tasks: K.
    steps_per_epoch: used by the epoch-based loss balancers (DWA, IGBv1, IGBv2, STCH).
    key: PRNG key or int seed of the random methods.
    shared: the mask of shared parameters (gradient balancers).

  Returns:
    The `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax
    >>> tx = mtl_optax.registry.build("imtl_g", num_tasks=2)
    >>> jac = {"w": jnp.array([[1.0, 0.0], [-0.5, 2.0]])}  # K = 2 stacked gradients
    >>> d, state = tx.update(jac, tx.init({"w": jnp.zeros(2)}), losses=jnp.array([1.0, 2.0]))
    >>> print(np.asarray(d["w"]).round(3))
    [0.51  0.653]
  """
  if name not in METHODS and "@" in name:
    return threshold_method(name).build(num_tasks, steps_per_epoch=steps_per_epoch, key=key,
                                        shared=shared)
  if name not in METHODS:
    raise ValueError(f"registry: unknown method {name!r}; known: {sorted(METHODS)}.")
  return METHODS[name].build(num_tasks, steps_per_epoch=steps_per_epoch, key=key, shared=shared)
