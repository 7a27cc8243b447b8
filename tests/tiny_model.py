"""The tiny shared-trunk model the entry-point and path tests train: a tanh trunk, one linear
head per task, squared-error task losses (+0.05, so log-taking balancers see positive losses)."""

import jax.numpy as jnp
import numpy as np

MASK = {"trunk": True, "heads": False}  # the trunk's parameters are shared


def model(k, seed=0, *, d=4, h=6, b=8, spread=True):
  """`(params, x, y)` for K = k tasks: inputs of size d, a trunk of width h, a batch of b;
  with `spread`, targets of scales 0.1..10 across the tasks."""
  rng = np.random.default_rng(seed)
  params = {"trunk": jnp.asarray(rng.normal(size=(d, h)) * 0.7, jnp.float32),
            "heads": jnp.asarray(rng.normal(size=(k, h)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  scale = np.logspace(-1, 1, k) if spread else 1.0
  y = jnp.asarray(rng.normal(size=(b, k)) * scale, jnp.float32)
  return params, x, y


def encode(params, x, y):
  del y
  return jnp.tanh(x @ params["trunk"])


def heads(params, z, x, y):
  del x
  return jnp.mean((z @ params["heads"].T - y) ** 2, axis=0) + 0.05


def task_losses(params, x, y):
  return heads(params, encode(params, x, y), x, y)
