"""Smoke tests of the benchmark harness (tiny data, one epoch) and of the example scripts."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax
from benchmarks import data, methods, models, run

ROOT = Path(__file__).resolve().parents[1]
HAVE = {
    "qm9": importlib.util.find_spec("qm9pack") is not None,
    "multifashion": (data.FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    "yeast": importlib.util.find_spec("river") is not None,
}
WHY = {"qm9": data.QM9_INSTALL, "multifashion": data.FASHION_INSTALL, "yeast": data.YEAST_INSTALL}


def needs(name):
  return pytest.mark.skipif(not HAVE[name], reason=f"{name} data not installed: {WHY[name]}")


def load_example(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def rows(text):
  """Method name -> the cells of its row in a Markdown table."""
  out = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if line.startswith("| ") and cells[0] not in ("Method",):
      out[cells[0]] = cells[1:]
  return out


def mean_of(cell):
  return float(cell.split("±")[0])


# -- harness ------------------------------------------------------------------------------------


def test_registry_has_every_balancer_of_mtl_optax_registry():
  reg = methods.registry()
  for name in ("ew", "si", "rlw", "dwa", "uw", "gls", "imtl_l", "igb_v1", "stch", "famo",
               "igb_v2"):
    assert reg[name](3, 10, jax.random.PRNGKey(0)).aggregator is None  # single-backward path
  for name in mtl_optax.registry.names("gradient"):
    assert reg[name](3, 10, jax.random.PRNGKey(0)).aggregator is not None
  assert list(methods.select("si, rlw")) == ["si", "rlw"]
  with pytest.raises(ValueError, match="Unknown or unavailable"):
    methods.select("si,not_a_method")


def test_shared_mask_marks_the_trunk_only():
  model = models.build("mlp", 3, 1, hidden=8, depth=2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 5)))
  mask = models.shared_mask(params)["params"]
  assert all(jax.tree.leaves(mask["trunk"]))
  assert mask["head_kernel"] is False and mask["head_bias"] is False


def synthetic(n=64, k=3):
  """A small regression data set in the `Dataset` shape."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  y = (x @ rng.normal(size=(5, k))).astype(np.float32)
  split = data.Split(x, y)
  return data.Dataset("synthetic", split, split, split, tuple("abc"[:k]), "regression", 1, "MAE",
                      False, np.ones(k, np.float32), "test")


def test_single_backward_and_jacobian_paths_train_alike():
  ds, model = synthetic(), models.build("mlp", 3, 1, hidden=8, depth=1)
  args = dict(seeds=2, epochs=2, batch_size=16, lr=1e-2, progress=False)
  single, _ = run.train(ds, model, methods.registry()["si"], **args)
  jac = lambda k, spe, key: methods.Links(mtl_optax.log_losses(k), mtl_optax.sum_tasks())
  stacked, _ = run.train(ds, model, jac, **args)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(stacked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_famo_gets_the_losses_after_each_step():
  """The harness passes FAMO the last batch's losses re-evaluated after the parameter step;
  without them (the current losses standing in) training differs."""
  ds, model = synthetic(), models.build("mlp", 3, 1, hidden=8, depth=1)
  args = dict(seeds=1, epochs=2, batch_size=16, lr=1e-2, progress=False)
  with_post, _ = run.train(ds, model, methods.registry()["famo"], **args)
  without = lambda k, spe, key: methods.Links(mtl_optax.famo(k), None)
  plain, _ = run.train(ds, model, without, **args)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(with_post))
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(with_post),
                                                    jax.tree.leaves(plain)))


def test_gradient_balancers_see_only_the_trunk():
  ds, model = synthetic(), models.build("mlp", 3, 1, hidden=8, depth=2)
  seen = []

  def aggregate(shared_rows, state, losses, params):
    seen.append(jax.tree.map(lambda r: r is not None, shared_rows["params"],
                             is_leaf=lambda r: r is None))
    return jax.tree.map(lambda r: r.mean(0), shared_rows), jnp.full(3, 1 / 3), None, state

  def factory(k, spe, key):
    agg = mtl_optax.aggregator("mean_trunk", k, lambda p: optax.EmptyState(), aggregate,
                               shared=models.shared_mask)
    return methods.Links(None, agg)

  params, _ = run.train(ds, model, factory, seeds=2, epochs=1, batch_size=16, lr=1e-2,
                        progress=False)
  assert seen and all(jax.tree.leaves(seen[0]["trunk"]))
  assert not seen[0]["head_kernel"] and not seen[0]["head_bias"]
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_stl_is_trained_on_one_task_per_run():
  ds, model = synthetic(), models.build("mlp", 3, 1, hidden=8, depth=1)
  params, _ = run.train(ds, model, methods.registry()["ew"], seeds=1, epochs=1, batch_size=16,
                        lr=1e-2, task_weights=np.eye(3, dtype=np.float32), progress=False)
  heads = np.asarray(params["params"]["head_kernel"])  # (run, task, hidden, 1), same init
  for task in range(3):
    others = [heads[r, task] for r in range(3) if r != task]
    np.testing.assert_array_equal(others[0], others[1])  # untouched outside run `task`
    assert not np.allclose(heads[task, task], others[0])  # trained in run `task`


def test_runs_in_sequence_train_as_the_vmapped_runs():
  """`vmap_runs=False` (the GNN's setting) trains each run alone through the same compiled
  epoch: the same parameters as all runs vmapped, seed by seed and STL run by STL run."""
  ds, model = synthetic(), models.build("mlp", 3, 1, hidden=8, depth=1)
  args = dict(seeds=2, epochs=2, batch_size=16, lr=1e-2, progress=False,
              task_weights=np.eye(3, dtype=np.float32))
  together, _ = run.train(ds, model, methods.registry()["rlw"], **args)
  apart, _ = run.train(ds, model, methods.registry()["rlw"], vmap_runs=False, **args)
  assert jax.tree.leaves(apart)[0].shape[0] == 6  # 2 seeds x 3 STL runs
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
  jax.tree.map(close, together, apart)


def test_beta_grid_and_tuned_points():
  """The grid is DB-MTL's paper's (beta in {0.1, 0.5, 0.9}, constant or / sqrt(k)); each
  dataset's tuned point is one of it and `<method>_tuned` is exactly that point."""
  assert sorted(methods.BETA_GRID.values()) == sorted(
      (b, s) for b in (0.1, 0.5, 0.9) for s in (0.0, 0.5))
  assert not any(n.endswith("_tuned") for n in methods.registry())
  grads = {"params": {"trunk": jnp.array([[3.0, 0.0], [0.0, 1.0]])}}
  like = {"params": {"trunk": jnp.zeros(2)}}
  for method, points in methods.TUNED.items():
    for dataset, point in points.items():
      beta, sigma = methods.BETA_GRID[point]
      tuned = methods.select(f"{method}_tuned", dataset)[f"{method}_tuned"](2, 10, None)
      direct = methods.TUNABLE[method](2, beta, sigma, shared=models.shared_mask)
      state_t, state_d = tuned.aggregator.init(like), direct.init(like)
      for _ in range(3):  # several steps, so that the beta_k schedule enters
        out_t, state_t = tuned.aggregator.update(grads, state_t, losses=jnp.array([2.0, 0.5]))
        out_d, state_d = direct.update(grads, state_d, losses=jnp.array([2.0, 0.5]))
      np.testing.assert_allclose(out_t["params"]["trunk"], out_d["params"]["trunk"],
                                 rtol=1e-6)
  assert set(methods.select("db_mtl_0.1,moco_0.5_decay")) == {"db_mtl_0.1", "moco_0.5_decay"}


def test_paper_stl_needs_the_seeds_recipe():
  with pytest.raises(SystemExit, match="--recipe seeds"):
    run.main(["--dataset", "yeast", "--stl", "paper", "--methods", "ew"])


# -- data ---------------------------------------------------------------------------------------


def test_descriptors_of_a_hydrogen_molecule():
  r = 0.74  # Angstrom
  elem = np.full((1, data.QM9_MAX_ATOMS), -1)
  elem[0, :2] = 0
  xyz = np.zeros((1, data.QM9_MAX_ATOMS, 3))
  xyz[0, 1, 0] = r
  d = data.qm9_descriptors(elem, xyz)[0]
  np.testing.assert_allclose(d[:5], [2, 0, 0, 0, 0])
  off = 1.0 / (r / 0.52917721)  # Z_i Z_j / r in bohr
  np.testing.assert_allclose(d[5:7], [0.5 + off, 0.5 - off], rtol=1e-5)
  np.testing.assert_allclose(d[7:34], 0.0)
  hh = d[34:34 + 16]  # the first pair is (H, H)
  np.testing.assert_allclose(hh, np.exp(-0.5 * ((r - data.QM9_BINS) / 0.25) ** 2), rtol=1e-5,
                             atol=1e-12)
  np.testing.assert_allclose(d[34 + 16:], 0.0)


def test_missing_data_says_what_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(data, "FASHION_DIR", tmp_path)
  with pytest.raises(data.MissingDatasetError, match="dataset-fashion-mnist"):
    data.load_multifashion()
  with pytest.raises(data.MissingDatasetError, match="pip install qm9pack"):
    data._package_dir("no_such_package_xyz", data.QM9_INSTALL)


def test_overlay_places_the_pair_top_left_and_bottom_right():
  images = np.zeros((2, 28, 28), np.uint8)
  images[0, 0, 0] = 255     # a dot in the top-left corner of image 0
  images[1, 27, 27] = 255   # and in the bottom-right corner of image 1
  partner = data.partners(2, np.random.default_rng(0))
  np.testing.assert_array_equal(partner, [1, 0])
  x, y = data.overlay_pairs(images, np.array([3, 5]), partner, np.arange(2))
  assert x.shape == (2, 28, 28, 1) and y.tolist() == [[3, 5], [5, 3]]
  assert x[0, 0, 0, 0] > 0.5 and x[0, -1, -1, 0] > 0.5  # image 0 top left, image 1 bottom right
  assert x[1, 0, 0, 0] == 0 and x[1, -1, -1, 0] == 0    # image 1 top left: dot lands mid-canvas
  assert (data.partners(1000, np.random.default_rng(1)) != np.arange(1000)).all()


@needs("qm9")
def test_qm9_subset_is_standardized():
  ds = data.load_qm9(limit=300)
  assert ds.train.x.shape[1] == 274 and ds.train.y.shape[1] == 11 == len(ds.task_names)
  np.testing.assert_allclose(ds.train.y.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(ds.train.y.std(0), 1.0, atol=1e-3)
  assert (ds.target_scale > 0).all() and len(ds.val.x) == len(ds.test.x) == 300 // 13


@needs("yeast")
def test_yeast_split():
  ds = data.load_yeast()
  assert (len(ds.train.x), len(ds.val.x), len(ds.test.x)) == (1300, 200, 917)
  assert ds.train.x.shape[1] == 103 and set(np.unique(ds.train.y)) == {0, 1}


# -- benchmark smoke runs -----------------------------------------------------------------------


# QM9 in the default run; MultiFashion and Yeast (the same runner) under -m slow.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[needs(n)] + ([] if n == "qm9" else [pytest.mark.slow]))
    for n in data.LOADERS])
def test_benchmark_smoke(name, tmp_path):
  out = tmp_path / f"{name}.md"
  results = run.main(["--dataset", name, "--methods", "si", "--smoke", "--seeds", "2",
                      "--no-progress", "--out", str(out)])[name]
  assert list(results) == ["stl", "ew", "si"]
  for res in results.values():
    assert res.metrics.shape == (2, len(rows(out.read_text())["ew"]) - 2)
    assert np.isfinite(res.metrics).all() and res.seconds > 0
  text = out.read_text()
  assert "Command: `python benchmarks/run.py --dataset" in text
  table = rows(text)
  assert set(table) == {"stl", "ew", "si"}
  assert abs(mean_of(table["stl"][-2])) < 1e-6  # Delta_m of the baseline itself
  assert float(table["ew"][-1]) == 1.0          # T is relative to EW



@needs("qm9")
def test_resume_runs_only_the_unfinished_methods(tmp_path, monkeypatch):
  """A run cut short during `uw` keeps EW and SI (and `--stl ew`'s baseline) in
  `<out>.resume.json` and a partial table; `--resume` trains only `uw`, reuses the others'
  metrics, and removes the file; another command or other code is refused."""
  out = tmp_path / "qm9.md"
  argv = ["--dataset", "qm9", "--methods", "si,uw", "--smoke", "--seeds", "2", "--no-progress",
          "--stl", "ew", "--out", str(out)]
  real_train, trained = run.train, []

  def cut_at_uw(*args, desc="", **kwargs):
    if desc == "uw":
      raise KeyboardInterrupt
    return real_train(*args, desc=desc, **kwargs)
  monkeypatch.setattr(run, "train", cut_at_uw)
  with pytest.raises(KeyboardInterrupt):
    run.main(argv)
  sidecar = out.with_suffix(".resume.json")
  assert "Partial: 1 more method(s)" in out.read_text()
  first = run.load_finished(sidecar, run.fingerprint([*argv, "--resume", "qm9"]))
  assert set(first) == {"stl", "ew", "si"}
  with pytest.raises(SystemExit, match="another command or other code"):
    run.main([*argv[:6], "3", *argv[7:], "--resume"])  # three seeds: another command

  def counted(*args, desc="", **kwargs):
    trained.append(desc)
    return real_train(*args, desc=desc, **kwargs)
  monkeypatch.setattr(run, "train", counted)
  results = run.main([*argv, "--resume"])["qm9"]
  assert trained == ["uw"] and list(results) == ["stl", "ew", "si", "uw"]
  np.testing.assert_array_equal(results["si"].metrics, first["si"].metrics)
  assert not sidecar.exists() and "Partial" not in out.read_text()
  assert "--resume" not in out.read_text()  # the table's command is the run's own

# -- examples -----------------------------------------------------------------------------------


@pytest.mark.slow  # benchmark-style; run with -m slow
def test_toy_example_draws(tmp_path):
  paths = load_example("toy").main(["--steps", "20", "--out", str(tmp_path / "toy.png")])
  assert {"ew", "si", "igb_v1"} <= set(paths)
  assert all(p.shape == (5, 21, 2) and np.isfinite(p).all() for p in paths.values())
  assert (tmp_path / "toy.png").stat().st_size > 10_000


def test_toy_objective_minima():
  toy = load_example("toy")
  f = np.asarray(toy.toy_losses(jnp.array([7.0, -8.3552])))
  g = np.asarray(toy.toy_losses(jnp.array([-7.0, -8.3552])))
  assert f[0] < g[0] and g[1] < f[1]  # task 1's minimum near (7, .), task 2's near (-7, .)


@pytest.mark.parametrize("name,kwargs", [
    ("single_backward", dict(epochs=3)),
    ("masked_gradient_balancer", dict(steps=20)),
    ("igb_nash_fusion", dict(epochs=3)),
    ("vmap_seeds", dict(seeds=2, steps=10)),
])
def test_examples_run(name, kwargs):
  out = np.asarray(load_example(name).main(**kwargs))
  assert np.isfinite(out).all()


def test_vmapped_seeds_differ():
  final = np.asarray(load_example("vmap_seeds").main(seeds=2, steps=10))
  assert final.shape == (2, 2) and not np.allclose(final[0], final[1])


def test_step_time_floor_is_the_sum_of_unit_rows():
  """The representation table's floor row: a Gram-based balancer with w_i = 1 / ||g_i||."""
  from benchmarks import step_time
  g = np.random.default_rng(0).normal(size=(3, 5)) * np.array([[1.0], [10.0], [0.1]])
  tx = step_time.unit_rows(3)
  d, state = jax.jit(tx.update)({"w": jnp.asarray(g, jnp.float32)}, tx.init({"w": jnp.zeros(5)}))
  norms = np.linalg.norm(g, axis=1)
  np.testing.assert_allclose(d["w"], (g / norms[:, None]).sum(0), rtol=1e-5)
  np.testing.assert_allclose(optax.tree.get(state, "weights"), 1.0 / norms, rtol=1e-5)


@pytest.mark.slow
def test_nnx_heads_smoke(tmp_path):
  """benchmarks/nnx_heads.py at tiny sizes, one round: every method timed on both heads."""
  from benchmarks import nnx_heads
  out = tmp_path / "nnx_heads.md"
  text = nnx_heads.main(["--rounds", "1", "--steps", "1", "--tasks", "3", "--input", "5",
                         "--hidden", "8", "--depth", "1", "--batch", "4", "--out", str(out)])
  assert out.read_text() == text + "\n"
  assert text.startswith("Command: `python benchmarks/nnx_heads.py --rounds 1")
  table = rows(text)
  assert set(nnx_heads.METHODS) <= set(table)
  assert table[nnx_heads.BASELINE][1] == table[nnx_heads.BASELINE][3] == "1.00"
  assert all(float(c) > 0 for m in nnx_heads.METHODS for c in table[m])


def test_collectives_count_the_cheapest_branch_of_a_conditional():
  """A conditional counts the branch with the fewest bytes (the usual step's: the library's
  conditionals skip work then); loops count their trip count."""
  from benchmarks.communication import collectives
  hlo = "\n".join([
      "%cheap (p: f32[4]) -> f32[4] {",
      "  ROOT %a = f32[4]{0} all-reduce(f32[4]{0} %p), to_apply=%add",
      "}",
      "%rare (p: f32[4]) -> f32[4] {",
      "  %b = f32[64]{0} all-gather(f32[4]{0} %p), dimensions={0}",
      "  ROOT %c = f32[4]{0} all-reduce(f32[4]{0} %p), to_apply=%add",
      "}",
      "ENTRY %main (x: f32[4], q: pred[]) -> f32[4] {",
      "  %d = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add",
      "  ROOT %e = f32[4]{0} conditional(pred[] %q, f32[4]{0} %x, f32[4]{0} %x), "
      "true_computation=%cheap, false_computation=%rare",
      "}",
  ])
  ops = collectives(hlo)
  assert [(op.kind, op.elements, op.exact) for op in ops] == [
      ("all-reduce", 8, True), ("all-reduce", 4, True)]


def test_claims_table_ranks_and_correlation(tmp_path):
  """Ours equal to the IGB paper's Delta_m on its methods: rank correlation 1 there; a partial
  table or a missing method is refused."""
  from benchmarks import claims
  names = list(dict.fromkeys([*claims.IGB_TABLE2, *claims.DB_MTL_TABLE3, "db_mtl_tuned"]))
  dm = {n: claims.IGB_TABLE2[n][0] if n in claims.IGB_TABLE2 else 500.0 + i
        for i, n in enumerate(names)}
  rows = "".join(f"| {n} | 1.0 ± 0.1 | {dm[n]:.2f} ± 1.5 | 2.00 |\n" for n in names)
  text = ("# qm9\n\nCommand: `python benchmarks/run.py --dataset qm9`\n\n"
          "| Method | mu ↓ | Δm% ↓ | T |\n|---|---|---|---|\n" + rows)
  path = tmp_path / "qm9.md"
  path.write_text(text)
  ours, command = claims.read_table(path)
  assert command == "python benchmarks/run.py --dataset qm9" and ours["ew"] == (177.6, 1.5, 2.0)
  markdown, sentence = claims.table(ours)
  assert "IGB Table 2 1.00 over 11 methods" in sentence
  assert "| db_mtl_tuned | tuned beta |" in markdown
  assert markdown.index("| nash_mtl |") < markdown.index("| igb_v2 |")  # sorted by our Delta_m
  path.write_text(text + "\nPartial: 3 more method(s) still running.\n")
  with pytest.raises(SystemExit, match="partial"):
    claims.read_table(path)
  with pytest.raises(SystemExit, match="no rows"):
    claims.table({n: v for n, v in ours.items() if n != "mgda"})


def test_threshold_summary_picks_the_level_on_validation(tmp_path):
  from benchmarks import threshold_summary

  def table(dms):
    rows = "".join(f"| {n} | 1.0 ± 0.1 | {dm:.2f} ± 0.5 | 1.00 |\n" for n, dm in dms.items())
    return ("# x\n\nCommand: `python benchmarks/run.py --split val`\n\n"
            "| Method | a ↓ | Δm% ↓ | T |\n|---|---|---|---|\n| stl | 1.0 ± 0.1 | 0.00 ± 0.5 | - |\n"
            + rows)
  val = {"ew": 0.0, "mgda": 5.0, "mgda@imbalance=2": 4.0, "mgda@imbalance=3": 6.0,
         "mgda@similarity=-0.1": 7.0, "mgda@similarity=0": 3.0}
  test = {**val, "mgda": 5.5, "mgda@imbalance=2": 6.0, "mgda@similarity=0": 1.0}
  (tmp_path / "val.md").write_text(table(val))
  (tmp_path / "test.md").write_text(table(test))
  read = threshold_summary.read_table
  text = threshold_summary.summary(read(tmp_path / "val.md")[0], read(tmp_path / "test.md")[0])
  assert ("| mgda | 5.00 ± 0.5 | 5.50 ± 0.5 | 2: 4.00, 3: 6.00 | 2 | 6.00 ± 0.5 | no | "
          "-0.1: 7.00, 0: 3.00 | 0 | 1.00 ± 0.5 | yes |") in text
