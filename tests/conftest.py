"""Shared test set-up: XLA's cheaper CPU code generation for the whole run.

The tests compile many small programs and run each a few times, so compilation dominates (about
three quarters of a test file's time is `backend_compile`). The same HLO is compiled with less
work: LLVM at optimization level 0 without its expensive passes, one LLVM module per program
instead of several compiled in parallel (the two pytest workers already keep both cores busy),
and, where the installed jaxlib has them, XLA's classic loop emitters for fusions instead of its
newer fusion emitters (jaxlib <= 0.10) or its FAST_COMPILE preset (jaxlib >= 0.11).

XLA aborts the whole process on a flag it does not know (jaxlib 0.12 dropped
`--xla_cpu_use_fusion_emitters`), so no flag is set blind: a child process initializes the CPU
backend and compiles one function with the candidates, and only the flags it accepts are kept
(all of them at once if that works, else each one alone; of two alternatives, the first one
accepted). The answer is cached per jaxlib
version in `.pytest_cache/`, so the probe costs a few seconds once. Set before any test
initializes JAX's backend; flags a user already set in XLA_FLAGS are kept, and the ones here
come after them. `MTL_OPTAX_TEST_XLA_FLAGS` replaces the candidates (empty: none).
"""

import importlib.metadata
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

# Each entry: alternatives, the first one the installed jaxlib accepts is kept (none: skipped).
CANDIDATES = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
              "--xla_cpu_parallel_codegen_split_count=1 "
              "--xla_cpu_use_fusion_emitters=false|--xla_cpu_opt_preset=FAST_COMPILE")
_DONE = "_MTL_OPTAX_TEST_XLA_FLAGS_SET"  # set in the controller, inherited by xdist workers
_PROBE = "import jax, jax.numpy as jnp; jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()"


def _accepted(flags, base):
  """Whether a child process with XLA_FLAGS = base + flags initializes XLA and compiles."""
  env = dict(os.environ, XLA_FLAGS=f"{base} {' '.join(flags)}".strip(), JAX_PLATFORMS="cpu")
  try:
    return subprocess.run([sys.executable, "-c", _PROBE], env=env, timeout=120,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
  except subprocess.TimeoutExpired:
    return False


def supported_flags(candidates, base=""):
  """The candidates that the installed jaxlib accepts (cached per jaxlib version); of
  alternatives `a|b`, the first accepted one."""
  candidates = [c.split("|") for c in candidates.split()]
  if not candidates:
    return []
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    version = "unknown"
  cache = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "mtl_optax_xla_flags.json"
  key = f"{version} {sys.version_info[0]}.{sys.version_info[1]} {base} | {' '.join('|'.join(c) for c in candidates)}"
  try:
    known = json.loads(cache.read_text())
  except (OSError, ValueError):
    known = {}
  if key in known:
    return known[key]
  kept = [c[0] for c in candidates]
  if not _accepted(kept, base):
    kept = [next((f for f in c if _accepted([f], base)), None) for c in candidates]
    kept = [f for f in kept if f is not None]
    if kept and not _accepted(kept, base):  # accepted one by one, not together: keep none
      kept = []
  known[key] = kept
  try:
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(known, indent=1))
  except OSError:
    pass
  return kept


if not os.environ.get(_DONE):
  _base = os.environ.get("XLA_FLAGS", "")
  _flags = supported_flags(os.environ.get("MTL_OPTAX_TEST_XLA_FLAGS", CANDIDATES), _base)
  os.environ["XLA_FLAGS"] = f"{_base} {' '.join(_flags)}".strip()
  os.environ[_DONE] = "1"


# Tests parametrized over the registry (`name` or `method` a registry name) run, by default, on
# this set, which has a method of every kind: loss balancers stateless, stateful, random and
# log-taking; gradient balancers solver-based, stateful, random, Gram-based and not.
# `pytest -m slow` runs every other method too (CI runs the default set, and of the slow ones
# the checkpoint, two-process and eight-device tests).
CORE = frozenset({"ew", "gls", "igb_v1", "famo", "rlw",
                  "mgda", "nash_mtl", "upgrad", "pcgrad", "db_mtl", "graddrop"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Marks the registry-sweep cases outside `CORE` slow (before `-m` deselects)."""
  from mtl_optax import registry
  names = set(registry.names())
  for item in items:
    callspec = getattr(item, "callspec", None)
    if callspec is not None:
      values = [v for k, v in callspec.params.items() if k in ("name", "method")]
    else:  # absltest's parameterized cases (test_chex): "test_one_step_('imgrad')__with_jit"
      values = re.findall(r"\('([^']+)'\)", item.name)
    if any(isinstance(v, str) and v in names and v not in CORE for v in values):
      item.add_marker(pytest.mark.slow)

