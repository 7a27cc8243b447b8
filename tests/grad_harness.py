"""Shared helpers for the closed-form and row-based gradient balancer tests: stacked trees <->
NumPy rows, random Jacobians of several kinds, a cached jitted runner, and Adam in NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax

SHAPES = {"w": (4, 3), "b": (5,), "v": (2, 2, 2)}
P = sum(int(np.prod(s)) for s in SHAPES.values())
KINDS = ("random", "rank_deficient", "zero_row", "scales")
CASES = [(k, kind) for k in (2, 3, 7) for kind in KINDS]
F32_EPS = float(np.finfo(np.float32).eps)


def to_tree(rows):
  """(K, P) NumPy rows -> stacked float32 tree shaped like SHAPES."""
  out, start = {}, 0
  for name, shape in SHAPES.items():
    size = int(np.prod(shape))
    out[name] = jnp.asarray(rows[:, start:start + size].reshape((-1,) + shape), jnp.float32)
    start += size
  return out


def to_vec(tree):
  """Unstacked tree -> (P,) float64, in the order of SHAPES."""
  return np.concatenate([np.asarray(tree[name], np.float64).ravel() for name in SHAPES])


def jacobian(k, kind, seed=0):
  """(K, P) float64 rows that are exactly representable in float32."""
  rng = np.random.default_rng(seed)
  if kind == "rank_deficient":
    r = 1 if k == 2 else min(k - 1, 3)
    rows = rng.normal(size=(k, r)) @ rng.normal(size=(r, P))
  else:
    rows = rng.normal(size=(k, P))
  if kind == "zero_row":
    rows[k // 2] = 0.0
  if kind == "scales":
    rows *= np.logspace(-2, 2, k)[:, None]
  return rows.astype(np.float32).astype(np.float64)


def params_like():
  return {name: jnp.zeros(shape, jnp.float32) for name, shape in SHAPES.items()}


@functools.cache
def make(name, *args, **kwargs):
  """mtl_optax.<name>(*args, **kwargs) and its jitted update, built once per test session."""
  transform = getattr(mtl_optax, name)(*args, **kwargs)
  return transform, jax.jit(transform.update)


def run(made, rows_seq, losses_seq=None, key=None):
  """Applies a `make(...)` pair to a sequence of (K, P) Jacobians; returns the outputs (P,).

  `key` replaces the PRNG key of a keyed balancer's initial state.
  """
  transform, update = made
  state = transform.init(params_like())
  if key is not None and hasattr(state, "inner"):
    state = state._replace(inner=state.inner._replace(key=jax.random.PRNGKey(key)))
  elif key is not None:
    state = state._replace(key=jax.random.PRNGKey(key))
  outs = []
  for t, rows in enumerate(rows_seq):
    extra = {} if losses_seq is None else {"losses": jnp.asarray(losses_seq[t], jnp.float32)}
    out, state = update(to_tree(rows), state, params_like(), **extra)
    outs.append(to_vec(out))
  return outs


def assert_close(out, ref, rows, rtol=2e-4):
  scale = max(np.abs(rows).max(), 1e-30) * rows.shape[0]
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * scale)


def step_keys(seed, steps):
  """The per-step subkeys a keyed balancer draws from `seed` (key, sub = split(key))."""
  key, subs = jax.random.PRNGKey(seed), []
  for _ in range(steps):
    key, sub = jax.random.split(key)
    subs.append(sub)
  return subs


def adam_ref(lr, b1=0.9, b2=0.999, eps=1e-8):
  """optax.adam written out (Kingma & Ba 2015, Alg. 1): returns step(grad) -> update."""
  m = v = 0.0
  t = 0

  def step(grad):
    nonlocal m, v, t
    t += 1
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad**2
    return -lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return step
