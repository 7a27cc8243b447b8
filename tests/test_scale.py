"""Any finite scale through the entry point: losses multiplied by 1e-30 or 1e30 (float32) give
rows of that scale on every path, and every method's claimed homogeneity holds there: the Gram
matrix is formed again from the rows (or, on the Gram-only path, from cotangents) divided by a
power of two (`tree.SAFE_DIAGONAL`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax
from mtl_optax import registry

K = 3
QUICK = ("mgda", "nash_mtl", "upgrad", "imtl_g")
CLAIMED = [n for n in registry.names("gradient", having=("gram",))
           if {"homogeneous", "scale_invariant"} & set(registry.METHODS[n].properties)]
NAMES = [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CLAIMED]
SHARED = {"enc": True, "heads": False}


def losses(p, x, scale):
  h = jnp.tanh(x @ p["enc"])
  return scale * jnp.stack([jnp.mean((h @ p["heads"][:, i] - x[:, i]) ** 2) for i in range(K)])


def encode(p, x, scale):
  return jnp.tanh(x @ p["enc"])


def heads(p, h, x, scale):
  return scale * jnp.stack([jnp.mean((h @ p["heads"][:, i] - x[:, i]) ** 2) for i in range(K)])


@pytest.mark.parametrize("path", ["stacked", "gram", "representation"])
@pytest.mark.parametrize("name", NAMES)
def test_claimed_homogeneity_from_1e_minus_30_to_1e30(name, path):
  key = jax.random.key(0)
  params = {"enc": jax.random.normal(key, (4, 5)),
            "heads": jax.random.normal(jax.random.key(1), (5, K))}
  x = jax.random.normal(jax.random.key(2), (8, 4))
  fun = (encode, heads) if path == "representation" else losses
  vg = mtl_optax.value_and_grad(fun, registry.build(name, K), path=path,
                                shared=SHARED if path == "representation" else None)
  update = jax.jit(vg.update)
  ref, _ = update(params, vg.init(params, x, 1.0), x, 1.0)
  degree = 0.0 if "scale_invariant" in registry.METHODS[name].properties else 1.0
  for scale in (1e-30, 1e30):
    out, state = update(params, vg.init(params, x, scale), x, scale)
    for got, want in zip(jax.tree.leaves(out.grad), jax.tree.leaves(ref.grad)):
      want = np.asarray(want, np.float64) * scale**degree
      np.testing.assert_allclose(np.asarray(got, np.float64), want,
                                 rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.inexact))
