"""Accuracy and time per solve of `mtl_optax.solvers` beside jaxopt's candidates.

Problems (float32, on the Gram matrix M of K rows of dimension 2K + 32):
  mgda:   argmin_{w in simplex} w^T M w (MGDA's min-norm point), direction d = sum_i w_i g_i;
  cagrad: argmin_{w in simplex} w^T M 1/K + r sqrt(w^T M w + 1e-8) on M / (trace/K), r = 0.4
          sqrt(mean M) (CAGrad's dual, Liu et al. 2021, Eq. 9), direction of g0 + r g_w/||g_w||;
  nash:   alpha > 0 with alpha_i (M alpha)_i = 1 (Nash-MTL, Navon et al. 2022, Eq. 5), d = G^T alpha.
Families: i.i.d. rows, correlated rows, rank K/4, row norms over 1e-2..1e2, nearly
opposite rows (g_1 = -g_0 + 1% noise); K = 3, 11, 40. Accuracy is the cosine of d to a float64
SciPy reference (SLSQP + exact polish on the support; SLSQP; float64 Newton). Time per solve:
one problem, and vmapped over 8 problems (8 seeds), jit compiled (compile excluded), median of
`--repeats` interleaved repeats; the ratio column is the candidate's time over ours, measured in
the same run.

How each problem is posed for jaxopt (0.8.5):
  mgda, BoxOSQP: min 1/2 w^T M w s.t. 1 <= 1^T w <= 1, 0 <= w <= 1 (A = [1^T; I]).
  mgda, OSQP: the same with params_eq (1^T, 1) and params_ineq (-I, 0).
  mgda, ProjectedGradient: w^T M w / max diag M with `projection_simplex`.
  mgda, BoxCDQP and LBFGSB: z = argmin_{z >= 0} 1/2 z^T A z - 1^T z, A = M / max diag M, w = z /
    sum z (the same KKT system; the box is [0, inf)).
  cagrad, ProjectedGradient: the dual objective with `projection_simplex` (the only candidate for a
    non-quadratic objective on the simplex).
  nash, LBFGSB and ProjectedGradient: min 1/2 b^T C b - sum log b on the unit-diagonal C = N^-1 M
    N^-1 (alpha = b / ||g_i||) with b >= 1e-6 (bounds / `projection_box`).
Iteration caps: BoxOSQP/OSQP 4000 (tol 1e-6), the others 1000 (tol 1e-7); ours as the balancers'
defaults. jaxopt's ProjectedGradient on the CAGrad dual is not timed under vmap: compiling it
(jax 0.10.2) did not finish within 5 minutes.

  python benchmarks/solvers.py [--repeats 5] [--families ...] [--tasks 3 11 40]
      [--out benchmarks/results/solvers.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import pathlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl_optax import solvers  # noqa: E402

with warnings.catch_warnings():
  warnings.simplefilter("ignore")
  import jaxopt  # noqa: E402

FAMILIES = ("iid", "correlated", "rank", "norms", "opposite")
BATCH = 8
NO_VMAP = {("cagrad", "ProjectedGradient")}  # its vmapped compile does not finish (docstring)


def family(name: str, k: int, seed: int = 0) -> np.ndarray:
  """K rows of dimension 2K + 32 of the named family (as tests/test_solver_families.py)."""
  rng = np.random.default_rng([seed, k, FAMILIES.index(name)])
  n = 2 * k + 32
  g = rng.normal(size=(k, n))
  if name == "correlated":
    g = rng.normal(size=(1, n)) + 0.5 * g
  elif name == "rank":
    a = rng.normal(size=(k, max(1, k // 4)))
    a[:, 0] += 2.0
    g = a @ rng.normal(size=(a.shape[1], n))
  elif name == "norms":
    g *= 10.0 ** rng.uniform(-2, 2, size=(k, 1))
  elif name == "opposite":
    g[1] = -g[0] + 0.01 * rng.normal(size=n)
  return np.asarray(np.float32(g), np.float64)


# -- float64 references ------------------------------------------------------------------------


def _slsqp_simplex(fun: Callable, k: int) -> np.ndarray:
  cons = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(k)}
  return optimize.minimize(fun, np.full(k, 1.0 / k), bounds=[(0, 1)] * k, constraints=cons,
                           method="SLSQP", options={"ftol": 1e-16, "maxiter": 5000}).x


def ref_mgda(m: np.ndarray) -> np.ndarray:
  """SLSQP in the rows' cosines, then the exact equality QP on the support if no worse."""
  k = len(m)
  n = np.sqrt(np.diag(m))
  c = m / np.outer(n, n)
  cons = {"type": "eq", "fun": lambda b: b @ (1 / n) - 1.0, "jac": lambda b: 1 / n}
  b = optimize.minimize(lambda b: b @ c @ b, n / k, jac=lambda b: 2 * c @ b,
                        bounds=[(0, None)] * k, constraints=cons, method="SLSQP",
                        options={"ftol": 1e-16, "maxiter": 5000}).x
  w = np.maximum(b / n, 0.0)
  w /= w.sum()
  s = w > 1e-9 * w.max()
  kkt = np.block([[m[np.ix_(s, s)], np.ones((s.sum(), 1))], [np.ones((1, s.sum())), 0.0]])
  sol = np.linalg.lstsq(kkt, np.r_[np.zeros(s.sum()), 1.0], rcond=1e-14)[0]
  exact = np.zeros(k)
  exact[s] = sol[:-1]
  return exact if np.all(exact >= 0) and exact @ m @ exact <= w @ m @ w * (1 + 1e-9) else w


def cagrad_direction_weights(m: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Weights of d = g0 + r g_w / ||g_w|| from the dual solution w (M unit_gram'd)."""
  k = len(m)
  mu = m / (np.trace(m) / k)
  radius = 0.4 * np.sqrt(max(mu.mean(), 0.0) + 1e-8) + 1e-8
  return 1.0 / k + radius / (np.sqrt(max(w @ mu @ w, 0.0)) + 1e-8) * w


def ref_cagrad(m: np.ndarray) -> np.ndarray:
  k = len(m)
  mu = m / (np.trace(m) / k)
  radius = 0.4 * np.sqrt(max(mu.mean(), 0.0) + 1e-8) + 1e-8
  return _slsqp_simplex(lambda w: w @ mu.mean(1) + radius * np.sqrt(max(w @ mu @ w, 0) + 1e-8), k)


def ref_nash(m: np.ndarray) -> np.ndarray:
  n = np.sqrt(np.diag(m))
  c = m / np.outer(n, n)
  b = np.full(len(m), np.sqrt(len(m) / max(c.sum(), 1e-3)))
  for _ in range(200):
    r = c @ b - 1 / b
    step = -np.linalg.solve(c + np.diag(1 / b**2), r)
    dec = np.sqrt(max(-r @ step, 0.0))
    b = b + (1.0 if dec < 0.5 else 1.0 / (1.0 + dec)) * step
  return b / n


# -- the problems in jax: ours and jaxopt's -----------------------------------------------------


def _unit(m):
  return m / jnp.maximum(jnp.max(jnp.diag(m)), 1e-30)


def _from_z(z):
  return z / jnp.maximum(jnp.sum(z), 1e-30)


def _cagrad_fun(m):
  k = m.shape[0]
  mu = m / jnp.maximum(jnp.trace(m) / k, 1e-30)
  radius = 0.4 * jnp.sqrt(jnp.maximum(jnp.mean(mu), 0.0) + 1e-8) + 1e-8
  return lambda w: w @ jnp.mean(mu, 1) + radius * jnp.sqrt(jnp.maximum(w @ mu @ w, 0.0) + 1e-8)


def _nash_c(m):
  n = jnp.sqrt(jnp.maximum(jnp.diag(m), 1e-30))
  return m / jnp.outer(n, n), n


def mgda_solvers() -> dict[str, Callable]:
  def box_osqp(m):
    k = m.shape[0]
    a = jnp.concatenate([jnp.ones((1, k)), jnp.eye(k)])
    lo = jnp.concatenate([jnp.ones(1), jnp.zeros(k)])
    hi = jnp.ones(k + 1)
    sol = jaxopt.BoxOSQP(tol=1e-6, maxiter=4000).run(
        params_obj=(_unit(m), jnp.zeros(k)), params_eq=a, params_ineq=(lo, hi))
    return sol.params.primal[0]

  def osqp(m):
    k = m.shape[0]
    sol = jaxopt.OSQP(tol=1e-6, maxiter=4000).run(
        params_obj=(_unit(m), jnp.zeros(k)), params_eq=(jnp.ones((1, k)), jnp.ones(1)),
        params_ineq=(-jnp.eye(k), jnp.zeros(k)))
    return sol.params.primal

  def pg(m):
    k = m.shape[0]
    a = _unit(m)
    solver = jaxopt.ProjectedGradient(lambda w: w @ a @ w, jaxopt.projection.projection_simplex,
                                      maxiter=1000, tol=1e-7)
    return solver.run(jnp.full((k,), 1.0 / k)).params

  def box_cd(m):
    k = m.shape[0]
    box = (jnp.zeros(k), jnp.full((k,), jnp.inf))
    z = jaxopt.BoxCDQP(maxiter=1000, tol=1e-7).run(
        jnp.zeros(k), params_obj=(_unit(m), -jnp.ones(k)), params_ineq=box).params
    return _from_z(z)

  def lbfgsb(m):
    k = m.shape[0]
    a = _unit(m)
    box = (jnp.zeros(k), jnp.full((k,), jnp.inf))
    z = jaxopt.LBFGSB(lambda z: 0.5 * z @ a @ z - jnp.sum(z), maxiter=1000, tol=1e-7).run(
        jnp.full((k,), 1.0 / k), bounds=box).params
    return _from_z(z)

  return {"ours": solvers.min_norm_weights, "BoxOSQP": box_osqp, "OSQP": osqp,
          "ProjectedGradient": pg, "BoxCDQP": box_cd, "LBFGSB": lbfgsb}


def cagrad_solvers() -> dict[str, Callable]:
  def ours(m):
    k = m.shape[0]
    return solvers.simplex_minimize(_cagrad_fun(m), jnp.full((k,), 1.0 / k), max_iter=500,
                                    tol=1e-7)

  def pg(m):
    k = m.shape[0]
    solver = jaxopt.ProjectedGradient(_cagrad_fun(m), jaxopt.projection.projection_simplex,
                                      maxiter=1000, tol=1e-7)
    return solver.run(jnp.full((k,), 1.0 / k)).params

  return {"ours": ours, "ProjectedGradient": pg}


def nash_solvers() -> dict[str, Callable]:
  def objective(c):
    return lambda b: 0.5 * b @ c @ b - jnp.sum(jnp.log(jnp.maximum(b, 1e-30)))

  def lbfgsb(m):
    c, n = _nash_c(m)
    k = m.shape[0]
    box = (jnp.full((k,), 1e-6), jnp.full((k,), jnp.inf))
    b = jaxopt.LBFGSB(objective(c), maxiter=1000, tol=1e-7).run(jnp.ones(k), bounds=box).params
    return b / n

  def pg(m):
    c, n = _nash_c(m)
    k = m.shape[0]
    box = (jnp.full((k,), 1e-6), jnp.full((k,), jnp.inf))
    solver = jaxopt.ProjectedGradient(objective(c), jaxopt.projection.projection_box,
                                      maxiter=1000, tol=1e-7)
    return solver.run(jnp.ones(k), hyperparams_proj=box).params / n

  return {"ours": lambda m: solvers.nash_weights(m)[0], "LBFGSB": lbfgsb,
          "ProjectedGradient": pg}


PROBLEMS = {
    "mgda": (mgda_solvers, ref_mgda, lambda m, w: w),
    "cagrad": (cagrad_solvers, ref_cagrad, cagrad_direction_weights),
    "nash": (nash_solvers, ref_nash, lambda m, w: w),
}


# -- measurement --------------------------------------------------------------------------------


def _gram(g: np.ndarray) -> jax.Array:
  g32 = jnp.asarray(g, jnp.float32)
  return jnp.einsum("...kn,...jn->...kj", g32, g32, precision=jax.lax.Precision.HIGHEST)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _timer(fn: Callable, arg: jax.Array) -> Callable[[], float]:
  compiled = jax.jit(fn).lower(arg).compile()
  jax.block_until_ready(compiled(arg))

  def run() -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(arg))
    return time.perf_counter() - start
  return run


def measure(problem: str, fam: str, k: int, repeats: int, compiled: dict) -> list[list[str]]:
  """Rows (solver, cosine, single us, vmapped us, ratios vs ours) for one problem, family, K."""
  make, reference, direction = PROBLEMS[problem]
  g = family(fam, k)
  m64 = g @ g.T
  d_ref = direction(m64, reference(m64)) @ g
  m = _gram(g)
  ms = _gram(np.stack([family(fam, k, seed) for seed in range(BATCH)]))
  timers, cosines = {}, {}
  for name, fn in make().items():
    # jit caches by shape: one compile per (problem, solver, K), reused across families.
    key = (problem, name, k)
    if key not in compiled:
      compiled[key] = (jax.jit(fn), jax.jit(jax.vmap(fn)))
    single, batched = compiled[key]
    w = np.asarray(single(m), np.float64)
    cosines[name] = _cosine(direction(m64, w) @ g, d_ref) if np.all(np.isfinite(w)) else np.nan
    vmapped = None if (problem, name) in NO_VMAP else _timer(batched, ms)
    timers[name] = (_timer(single, m), vmapped)
  samples = {name: ([], []) for name in timers}
  for _ in range(repeats):
    for name, (single, batched) in timers.items():
      samples[name][0].append(single())
      samples[name][1].append(batched() if batched else np.nan)
  med = {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in samples.items()}
  rows = []
  for name in timers:
    t1, t8 = med[name]
    vmap_cells = (["n/a", "n/a"] if np.isnan(t8) else
                  [f"{1e6 * t8:.0f}", f"{t8 / med['ours'][1]:.2f}"])
    rows.append([problem, fam, str(k), name, f"{cosines[name]:.6f}", f"{1e6 * t1:.0f}",
                 f"{t1 / med['ours'][0]:.2f}"] + vmap_cells)
  return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
  parser.add_argument("--tasks", type=int, nargs="+", default=[3, 11, 40])
  parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
  parser.add_argument("--out", type=pathlib.Path, default=None)
  args = parser.parse_args(argv)
  compiled: dict = {}
  rows = []
  for problem in args.problems:
    for k in args.tasks:
      for fam in args.families:
        rows += measure(problem, fam, k, args.repeats, compiled)
  versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                       for p in ("jax", "jaxlib", "jaxopt", "optax", "scipy", "numpy"))
  report = "\n\n".join([
      "### Solvers: accuracy and time per solve, ours vs jaxopt",
      f"Device: {jax.devices()[0].device_kind}; {versions}. float32; cosine of the direction to "
      f"the float64 SciPy reference; time per solve in microseconds, jit compiled (compile "
      f"excluded), median of {args.repeats} interleaved repeats, for one problem and vmapped "
      f"over {BATCH}; 'x ours' is the candidate's time over ours in the same run.",
      _table(["problem", "family", "K", "solver", "cosine", "single us", "x ours",
              f"vmap {BATCH} us", "x ours (vmap)"], rows),
      "Command: `python benchmarks/solvers.py " + " ".join(sys.argv[1:] if argv is None else argv)
      + "`",
  ])
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report + "\n")
  return report


if __name__ == "__main__":
  print(main())
