"""Stacked-tree helpers against NumPy on the flattened rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax import tree as tree_lib

K = 3


def stacked(k=K, seed=0):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(k, 4, 2)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(k, 5)), jnp.float32),
          "head": [jnp.asarray(rng.normal(size=(k, 3)), jnp.float32)]}


def flat_rows(tree):
  """(K, P): each row the concatenation of that row of every leaf."""
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)],
                        axis=1).astype(np.float64)


def test_num_tasks():
  assert tree_lib.num_tasks(stacked()) == K
  assert tree_lib.num_tasks(stacked(), expected=K) == K
  assert tree_lib.num_tasks(stacked(k=1)) == 1


def test_num_tasks_errors():
  with pytest.raises(ValueError, match=r"no leaves"):
    tree_lib.num_tasks({})
  with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
    tree_lib.num_tasks({"s": jnp.ones(()), "a": jnp.ones((K, 2))})
  bad = dict(stacked(), b=jnp.ones((K + 1, 5)))
  with pytest.raises(ValueError, match=r"disagree.*\['b'\] has 4"):
    tree_lib.num_tasks(bad, name="mine")
  with pytest.raises(ValueError, match=r"^mine: .*num_tasks has 2"):
    tree_lib.num_tasks(stacked(), expected=2, name="mine")


def test_gram_matches_numpy():
  tree = stacked()
  g = flat_rows(tree)
  np.testing.assert_allclose(tree_lib.gram(tree), g @ g.T, rtol=1e-5, atol=1e-5)
  m = np.asarray(tree_lib.gram(tree))
  assert m.shape == (K, K) and m.dtype == np.float32
  np.testing.assert_array_equal(m, m.T)


def test_gram_under_jit_and_vmap():
  trees = [stacked(seed=s) for s in range(2)]
  batched = jax.tree.map(lambda *x: jnp.stack(x), *trees)
  out = jax.jit(jax.vmap(tree_lib.gram))(batched)
  for i, tree in enumerate(trees):
    g = flat_rows(tree)
    np.testing.assert_allclose(out[i], g @ g.T, rtol=1e-5, atol=1e-5)


def test_row_norms_are_the_gram_diagonal():
  trees = [stacked(seed=s) for s in range(2)]
  want = [np.linalg.norm(flat_rows(t), axis=1) for t in trees]
  np.testing.assert_allclose(tree_lib.row_norms(trees[0]), want[0], rtol=1e-6)
  batched = jax.tree.map(lambda *x: jnp.stack(x), *trees)
  np.testing.assert_allclose(jax.jit(jax.vmap(tree_lib.row_norms))(batched), want, rtol=1e-6)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), trees[0])  # float32 squares
  assert tree_lib.row_norms(half).dtype == jnp.float32
  np.testing.assert_allclose(tree_lib.row_norms(half), np.linalg.norm(flat_rows(half), axis=1),
                             rtol=1e-6)


def test_combine_and_scale_rows():
  tree = stacked()
  w = np.array([0.5, -2.0, 3.0], np.float32)
  combined = tree_lib.combine(jnp.asarray(w), tree)
  np.testing.assert_allclose(flat_rows(jax.tree.map(lambda x: x[None], combined))[0],
                             w @ flat_rows(tree), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda c, x: np.testing.assert_equal(c.shape, x.shape[1:]), combined, tree)
  scaled = tree_lib.scale_rows(jnp.asarray(w), tree)
  np.testing.assert_allclose(flat_rows(scaled), w[:, None] * flat_rows(tree), rtol=1e-6)


def test_scale_rows_keeps_leaf_dtype():
  tree = {"h": jnp.ones((2, 3), jnp.bfloat16), "f": jnp.ones((2,), jnp.float32)}
  out = tree_lib.scale_rows(jnp.asarray([0.5, 2.0]), tree)
  assert out["h"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["h"], np.float32), [[0.5] * 3, [2.0] * 3])
  np.testing.assert_array_equal(out["f"], [0.5, 2.0])


def test_resolve_mask():
  params = {"body": jnp.ones(2), "head": jnp.ones(3)}
  assert tree_lib.resolve_mask(None, params) == {"body": True, "head": True}
  mask = {"body": True, "head": False}
  assert tree_lib.resolve_mask(mask, params) is mask
  by_name = lambda p: {name: name == "body" for name in p}
  assert tree_lib.resolve_mask(by_name, params) == mask


@pytest.mark.parametrize("shared", [
    {"w": True, "b": False, "head": [False]},
    lambda p: {"w": True, "b": False, "head": [False for _ in p["head"]]},
])
def test_split_merge(shared):
  tree = stacked()
  mask = tree_lib.resolve_mask(shared, tree)
  shared_part, specific_part = tree_lib.split(tree, mask)
  assert shared_part["b"] is None and shared_part["head"] == [None]
  assert specific_part["w"] is None
  np.testing.assert_array_equal(shared_part["w"], tree["w"])
  np.testing.assert_array_equal(specific_part["head"][0], tree["head"][0])
  # Only the shared rows enter the Gram matrix.
  g = np.asarray(tree["w"]).reshape(K, -1).astype(np.float64)
  np.testing.assert_allclose(tree_lib.gram(shared_part), g @ g.T, rtol=1e-5, atol=1e-5)
  merged = tree_lib.merge(shared_part, specific_part, mask)
  assert jax.tree.structure(merged) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, merged, tree)


def test_check_losses():
  np.testing.assert_array_equal(tree_lib.check_losses([1.0, 2.0], 2, "x"), [1.0, 2.0])
  with pytest.raises(ValueError, match=r"x needs the task losses"):
    tree_lib.check_losses(None, 2, "x")
  with pytest.raises(ValueError, match=r"x: losses have shape \(3,\), expected \(2,\)"):
    tree_lib.check_losses(jnp.ones(3), 2, "x")



def test_task_present():
  """Present: marked, finite and (for log-taking balancers) positive; eagerly a non-positive
  loss of a present task raises, inside jit it sits out."""
  from mtl_optax.present import task_present
  losses = jnp.asarray([1.0, 0.0, jnp.nan])
  np.testing.assert_array_equal(task_present(None, losses, 3, "x"), [True, True, False])
  np.testing.assert_array_equal(
      task_present(jnp.asarray([True, False, True]), losses, 3, "x"), [True, False, False])
  with pytest.raises(ValueError, match=r"x takes log.*tasks \[1\]"):
    task_present(None, losses, 3, "x", positive=True)
  # Marked absent, its zero loss is no error.
  np.testing.assert_array_equal(
      task_present(jnp.asarray([True, False, True]), losses, 3, "x", positive=True),
      [True, False, False])
  out = jax.jit(lambda l: task_present(None, l, 3, "x", positive=True))(losses)
  np.testing.assert_array_equal(out, [True, False, False])
  with pytest.raises(ValueError, match=r"x: present= must be a \(3,\) bool array"):
    task_present(jnp.ones(3), losses, 3, "x")
