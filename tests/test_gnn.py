"""The QM9 GNN of the seed papers (`benchmarks.models.GNN`): invariant to the order of the atoms
and to padding, and trainable end to end by `benchmarks/run.py --model gnn`."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import data, models, run

K = 3


def molecules(seed: int = 0, batch: int = 4, slots: int = 9) -> np.ndarray:
  """Random padded molecules `(batch, slots, 4)`: 3..slots atoms of H, C, N, O, F ~1.2 A apart."""
  rng = np.random.default_rng(seed)
  x = np.zeros((batch, slots, 4), np.float32)
  for b in range(batch):
    n = rng.integers(3, slots + 1)
    x[b, :n, 0] = rng.choice(data.QM9_CHARGES, n)
    x[b, :n, 1:] = np.cumsum(rng.normal(0.0, 0.7, (n, 3)), 0)
  return x


@pytest.fixture(scope="module")
def net():
  model = models.build("gnn", K, 1, hidden=16, depth=2)
  x = molecules()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(x))
  return jax.jit(model.apply), params, x


def test_permuting_atoms_leaves_predictions_unchanged(net):
  apply, params, x = net
  rng = np.random.default_rng(1)
  shuffled = np.stack([m[rng.permutation(len(m))] for m in x])  # padding slots move too
  np.testing.assert_allclose(apply(params, shuffled), apply(params, x), atol=2e-5)


def test_padding_leaves_predictions_unchanged(net):
  apply, params, x = net
  wider = np.concatenate([x, np.zeros((len(x), 7, 4), np.float32)], 1)
  np.testing.assert_allclose(apply(params, wider), apply(params, x), atol=2e-5)
  # A molecule's prediction does not depend on the others in its batch either.
  alone = apply(params, x[:1])
  np.testing.assert_allclose(alone, apply(params, x)[:, :1], atol=2e-5)


def test_features_of_methane():
  """CH4: C bonded to four H (degree 4, four H), each H bonded to C only."""
  xyz = np.array([[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
                  [0.63, -0.63, -0.63]], np.float32)
  x = np.concatenate([np.array([[6.0], [1.0], [1.0], [1.0], [1.0]], np.float32), xyz], 1)
  nodes, edges, node_mask, edge_mask = models.molecule_graph(jnp.asarray(x)[None])
  np.testing.assert_array_equal(nodes[0, 0], [0, 1, 0, 0, 0, 6, 0, 0, 0, 1, 4])
  np.testing.assert_array_equal(nodes[0, 1], [1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0])
  assert edges[0, 0, 1, 0] == 1 and edges[0, 1, 2, 0] == 0 and edges[0, 0, 0, 1] == 0
  assert node_mask.all() and edge_mask.sum() == 20


@pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason=data.QM9_INSTALL)
@pytest.mark.slow  # benchmark-style; run with -m slow
def test_gnn_trains_on_qm9_graphs_with_the_plateau_schedule():
  """The seeds recipe's pieces: molecules as graphs, atomization energies, the GNN, Adam whose
  learning rate follows the validation plateau (two runs: MTL and one STL row), the runs
  vmapped or one after another (the GNN's default) alike."""
  ds = data.load_qm9(max_train=48, max_eval=24, limit=200, graphs=True, atomization=True)
  assert ds.train.x.shape[1:] == (data.QM9_MAX_ATOMS, 4)
  model = models.build("gnn", len(ds.task_names), 1, hidden=8, depth=1)
  weights = np.stack([np.ones(11), np.eye(11)[2]]).astype(np.float32)
  plateau = run.Plateau(run.seeds_score(ds, model), patience=0)
  args = dict(seeds=1, epochs=2, batch_size=24, lr=1e-3, task_weights=weights, plateau=plateau,
              progress=False)
  params, _ = run.train(ds, model, run.methods.registry()["ew"], **args)
  mae = run.evaluate(ds, model, params, "test")
  assert mae.shape == (2, 11) and np.isfinite(mae).all()
  apart, _ = run.train(ds, model, run.methods.registry()["ew"], vmap_runs=False, **args)
  np.testing.assert_allclose(run.evaluate(ds, model, apart, "test"), mae, rtol=1e-4)


def test_seeds_recipe_settings():
  args = run.parse_args(["--dataset", "qm9", "--recipe", "seeds"])
  assert args.recipe == "seeds" and run.RECIPES["seeds"] == dict(
      model="gnn", batch_size=120, epochs=300, lr=1e-3, plateau=True)
