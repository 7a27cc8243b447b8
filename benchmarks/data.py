"""Real multi-task benchmark data, read from files that package registries install.

- QM9 (PyPI `qm9pack`): 130,831 molecules, 11 regression targets, a fixed 110k/10k/10k split.
- MultiFashion (Debian `dataset-fashion-mnist`): two overlaid Fashion-MNIST images, 2 tasks.
- Yeast (PyPI `river`): 2,417 genes, 103 features, 14 binary labels.

Nothing is downloaded at run time; a missing package raises `MissingDatasetError` that says what
to install. QM9 and Yeast features are standardized with training statistics; MultiFashion
pixels lie in [0, 1].
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

SPLIT_SEED = 0  # the fixed permutation behind every split


class MissingDatasetError(RuntimeError):
  """A benchmark's data package is not installed."""


class Split(NamedTuple):
  x: np.ndarray  # (N, ...) float32 inputs
  y: np.ndarray  # (N, K) targets: float32 (regression) or int32 labels


class Dataset(NamedTuple):
  name: str
  train: Split
  val: Split
  test: Split
  task_names: tuple[str, ...]
  kind: str                 # "regression", "multiclass" or "binary"
  num_outputs: int          # outputs per task head
  metric: str               # what `benchmarks.run.evaluate` reports per task
  higher_is_better: bool    # for that metric
  target_scale: np.ndarray  # (K,) std of regression targets (standardized units -> original)
  source: str               # where the data came from


# ---------------------------------------------------------------------------------------------
# helpers


def cache_dir() -> Path:
  """`$MTL_OPTAX_CACHE`, else ~/.cache/mtl_optax."""
  return Path(os.environ.get("MTL_OPTAX_CACHE", Path.home() / ".cache" / "mtl_optax"))


def _package_dir(package: str, install: str) -> Path:
  """The installed package's folder, found without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingDatasetError(f"The `{package}` package is not installed: {install}")
  return Path(next(iter(spec.submodule_search_locations)))


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  mean, std = train.mean(0), train.std(0)
  std = np.where(std > 0, std, 1.0)
  return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def _first(split: Split, count: int | None) -> Split:
  """The first `count` examples (all with None); splits are already shuffled."""
  return split if count is None else Split(split.x[:count], split.y[:count])


# ---------------------------------------------------------------------------------------------
# QM9

QM9_INSTALL = "pip install qm9pack==1.0.3 pandas"
HARTREE_TO_EV = 27.211386246
# (name, CSV column, factor to the units of the seed papers' tables, as in PyTorch Geometric)
QM9_TARGETS = (
    ("mu", "Dipole_debye", 1.0),               # D
    ("alpha", "Polarizability_bohr3", 1.0),    # a0^3
    ("homo", "HOMO_au", HARTREE_TO_EV),        # eV
    ("lumo", "LUMO_au", HARTREE_TO_EV),        # eV
    ("r2", "R2_bohr2", 1.0),                   # a0^2
    ("zpve", "ZPVE_au", HARTREE_TO_EV),        # eV
    ("u0", "InternalEnergy_0K_au", HARTREE_TO_EV),
    ("u298", "InternalEnergy_298K_au", HARTREE_TO_EV),
    ("h298", "Enthalphy_298K_au", HARTREE_TO_EV),
    ("g298", "GibbsFreeEnergy_298K_au", HARTREE_TO_EV),
    ("cv", "Heatcapacity_Cv_cal_mol_K", 1.0),  # cal / (mol K)
)
QM9_ELEMENTS = ("H", "C", "N", "O", "F")
QM9_CHARGES = np.array([1.0, 6.0, 7.0, 8.0, 9.0])
QM9_MAX_ATOMS = 29
QM9_BINS = np.linspace(0.8, 4.8, 16)  # Angstrom, centers of the pair-distance histograms
QM9_BIN_WIDTH = 0.25
BOHR_PER_ANGSTROM = 1.0 / 0.52917721
DESCRIPTOR_VERSION = 1
# Energies of the free atoms H, C, N, O, F (Hartree; U0, U298, H298, G298), from QM9's atomref
# table (Ramakrishnan et al. 2014): subtracted, they turn totals into atomization energies, the
# targets 12-15 of PyTorch Geometric's QM9 that the seed papers train on.
QM9_ATOMREF = np.array([
    [-0.500273, -0.498857, -0.497912, -0.510927],
    [-37.846772, -37.845355, -37.844411, -37.861317],
    [-54.583861, -54.582445, -54.581501, -54.598897],
    [-75.064579, -75.063163, -75.062219, -75.079532],
    [-99.718730, -99.717314, -99.716370, -99.733544],
])
QM9_ENERGY_TARGETS = slice(6, 10)  # u0, u298, h298, g298 in QM9_TARGETS


def _parse_qm9_csvs(data_dir: Path, limit: int | None) -> tuple[np.ndarray, ...]:
  """Atom counts, element indices and coordinates (padded) and raw targets from the CSVs."""
  try:
    import pandas as pd
  except ImportError as e:
    raise MissingDatasetError(f"Reading QM9 needs pandas: {QM9_INSTALL}") from e
  columns = ["N_atoms", "Elements", "XYZ_Ang"] + [c for _, c, _ in QM9_TARGETS]
  frames, rows = [], 0
  for part in sorted(data_dir.glob("qm9_part*.csv")):
    frames.append(pd.read_csv(part, usecols=columns, nrows=None if limit is None else limit - rows))
    rows += len(frames[-1])
    if limit is not None and rows >= limit:
      break
  if not frames:
    raise MissingDatasetError(f"No qm9_part*.csv under {data_dir}: {QM9_INSTALL}")
  df = pd.concat(frames, ignore_index=True)
  n_atoms = df["N_atoms"].to_numpy(np.int64)
  # One C-level parse of all strings at once: "[[x,y,z],...]" and "['C','H',...]".
  strip = str.maketrans("", "", "[]' ")
  coords = np.array(",".join(df["XYZ_Ang"]).translate(strip).split(","), np.float64)
  symbols = np.array(",".join(df["Elements"]).translate(strip).split(","))
  names = np.array(QM9_ELEMENTS)
  order = np.argsort(names)
  element = order[np.minimum(np.searchsorted(names[order], symbols), len(names) - 1)]
  if coords.size != 3 * n_atoms.sum() or element.size != n_atoms.sum():
    raise ValueError("QM9 CSV: coordinates or elements disagree with N_atoms.")
  if np.any(names[element] != symbols):
    raise ValueError(f"QM9 CSV: unexpected elements {set(symbols) - set(QM9_ELEMENTS)}.")
  n = len(df)
  slot = np.arange(n_atoms.sum()) - np.repeat(np.cumsum(n_atoms) - n_atoms, n_atoms)
  mol = np.repeat(np.arange(n), n_atoms)
  xyz = np.zeros((n, QM9_MAX_ATOMS, 3))
  xyz[mol, slot] = coords.reshape(-1, 3)
  elem = np.full((n, QM9_MAX_ATOMS), -1)
  elem[mol, slot] = element
  targets = np.stack([df[c].to_numpy(np.float64) * f for _, c, f in QM9_TARGETS], axis=1)
  return elem, xyz, targets


def qm9_descriptors(elem: np.ndarray, xyz: np.ndarray, chunk: int = 2048) -> np.ndarray:
  """Per molecule: atom counts (5), the sorted Coulomb-matrix spectrum (29) and Gaussian
  histograms of the distances of each element pair (15 x 16).

  Coulomb matrix: Rupp et al. 2012, PRL 108, 058301 (C_ii = Z_i^2.4 / 2, C_ij = Z_i Z_j / r_ij
  in bohr), its eigenvalues sorted by decreasing magnitude as the permutation-invariant spectrum.

  Args:
    elem: `(N, 29)` element indices into `QM9_ELEMENTS`, -1 for padding.
    xyz: `(N, 29, 3)` coordinates in Angstrom.
  """
  num_el = len(QM9_ELEMENTS)
  pair = np.full((num_el, num_el), -1)
  iu = np.triu_indices(num_el)
  pair[iu] = np.arange(len(iu[0]))
  pair = np.maximum(pair, pair.T)
  num_pairs = len(iu[0])
  out = []
  for start in range(0, len(elem), chunk):
    e, r = elem[start:start + chunk], xyz[start:start + chunk]
    real = e >= 0
    counts = np.stack([(e == i).sum(1) for i in range(num_el)], 1).astype(np.float64)
    z = np.where(real, QM9_CHARGES[np.maximum(e, 0)], 0.0)
    dist = np.linalg.norm(r[:, :, None] - r[:, None], axis=-1)
    off = ~np.eye(QM9_MAX_ATOMS, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
      cm = np.where(off, z[:, :, None] * z[:, None] / (dist * BOHR_PER_ANGSTROM), 0.0)
    cm = np.nan_to_num(cm, posinf=0.0) + np.einsum("ni,ij->nij", 0.5 * z ** 2.4,
                                                   np.eye(QM9_MAX_ATOMS))
    eig = np.linalg.eigvalsh(cm)
    spectrum = np.take_along_axis(eig, np.argsort(-np.abs(eig), axis=1), axis=1)
    valid = real[:, :, None] & real[:, None] & np.triu(off)[None]
    kind = pair[np.maximum(e, 0)[:, :, None], np.maximum(e, 0)[:, None]]
    onehot = (kind[..., None] == np.arange(num_pairs)) & valid[..., None]
    gauss = np.exp(-0.5 * ((dist[..., None] - QM9_BINS) / QM9_BIN_WIDTH) ** 2)
    hist = np.einsum("nijb,nijp->npb", gauss, onehot.astype(np.float64))
    out.append(np.concatenate([counts, spectrum, hist.reshape(len(e), -1)], 1))
  return np.concatenate(out).astype(np.float32)


def qm9_graphs(elem: np.ndarray, xyz: np.ndarray) -> np.ndarray:
  """Per molecule `(29, 4)`: the nuclear charge Z (0 on padding) and the coordinates
  (Angstrom) of each atom slot, the input of `benchmarks.models.GNN`."""
  z = np.where(elem >= 0, QM9_CHARGES[np.maximum(elem, 0)], 0.0)
  return np.concatenate([z[..., None], np.where(elem[..., None] >= 0, xyz, 0.0)],
                        -1).astype(np.float32)


def _qm9_arrays(limit: int | None,
                graphs: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """Inputs (descriptors, or graphs), targets and element counts of the first `limit` molecules
  (all: cached on disk)."""
  data_dir = _package_dir("qm9pack", QM9_INSTALL) / "data"
  version = importlib.metadata.version("qm9pack")
  source = f"qm9pack {version}"
  featurize = qm9_graphs if graphs else qm9_descriptors
  counts = lambda e: np.stack([(e == i).sum(1) for i in range(len(QM9_ELEMENTS))], 1)  # noqa: E731
  if limit is not None:
    elem, xyz, targets = _parse_qm9_csvs(data_dir, limit)
    return featurize(elem, xyz), targets, counts(elem), source
  kind = "graphs" if graphs else "descriptors"
  key = hashlib.sha1(f"{version}-{DESCRIPTOR_VERSION}".encode()).hexdigest()[:10]
  path = cache_dir() / f"qm9_{kind}_{key}.npz"
  if path.exists():
    with np.load(path) as f:
      if "counts" in f:
        return f["x"], f["y"], f["counts"], source
  elem, xyz, targets = _parse_qm9_csvs(data_dir, None)
  x, n = featurize(elem, xyz), counts(elem)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, x=x, y=targets, counts=n)
  tmp.replace(path)
  return x, targets, n, source


def load_qm9(max_train: int | None = None, max_eval: int | None = None,
             limit: int | None = None, graphs: bool = False,
             atomization: bool = False) -> Dataset:
  """QM9 with the 11 targets of the seed papers, split 110k/10k/10k by a fixed permutation.

  `max_train` and `max_eval` keep the first examples of the (shuffled) training split and of
  the validation and test splits. `limit` reads only
  the first molecules of the package and splits them in the same proportions (for tests).
  `graphs`: inputs are `qm9_graphs` (Z and coordinates per atom slot) instead of the
  standardized descriptors. `atomization`: U0, U, H and G minus the free atoms' energies
  (`QM9_ATOMREF`), as in the seed papers, instead of the totals.
  """
  x, y, counts, source = _qm9_arrays(limit, graphs)
  if atomization:
    y = y.copy()
    y[:, QM9_ENERGY_TARGETS] -= counts @ QM9_ATOMREF * HARTREE_TO_EV
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  n_eval = 10_000 if limit is None else max(1, len(x) // 13)
  n_train = 110_000 if limit is None else len(x) - 2 * n_eval
  tr, va, te = np.split(perm[:n_train + 2 * n_eval], [n_train, n_train + n_eval])
  if graphs:
    x_tr, x_va, x_te = x[tr], x[va], x[te]
  else:
    x_tr, x_va, x_te = _standardize(x[tr], x[va], x[te])
  mean, std = y[tr].mean(0), y[tr].std(0)
  scale = lambda t: ((t - mean) / std).astype(np.float32)  # noqa: E731
  return Dataset(
      name="qm9",
      train=_first(Split(x_tr, scale(y[tr])), max_train),
      val=_first(Split(x_va, scale(y[va])), max_eval),
      test=_first(Split(x_te, scale(y[te])), max_eval),
      task_names=tuple(name for name, _, _ in QM9_TARGETS),
      kind="regression", num_outputs=1, metric="MAE", higher_is_better=False,
      target_scale=std.astype(np.float32), source=source)


# ---------------------------------------------------------------------------------------------
# MultiFashion

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist (Debian; IDX files in " \
                  f"{FASHION_DIR})"
CANVAS, SHIFT, SIDE = 36, 8, 28


def _read_idx(path: Path) -> np.ndarray:
  """An IDX file (gzipped): big-endian header of 4-byte dimensions, then uint8 data."""
  if not path.exists():
    raise MissingDatasetError(f"{path} is missing: {FASHION_INSTALL}")
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = np.frombuffer(raw[4:4 + 4 * ndim], ">u4").astype(int)
  return np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(shape)


def _resize_matrix(src: int, dst: int) -> np.ndarray:
  """`(dst, src)` linear-interpolation matrix (pixel centers aligned)."""
  pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, src - 1)
  m = np.zeros((dst, src))
  np.add.at(m, (np.arange(dst), lo), 1 - (pos - lo))
  np.add.at(m, (np.arange(dst), hi), pos - lo)
  return m


def partners(n: int, rng: np.random.Generator) -> np.ndarray:
  """Image i's partner: one random cycle through all n images, so none is paired with itself."""
  order = rng.permutation(n)
  partner = np.empty_like(order)
  partner[order] = np.roll(order, -1)
  return partner


def overlay_pairs(images: np.ndarray, labels: np.ndarray, partner: np.ndarray,
                  index: np.ndarray) -> Split:
  """MultiMNIST-style pairs (Sabour et al. 2017; Sener & Koltun 2018; Lin et al. 2019) for the
  images `index`: image i at the top left and `partner[i]` at the bottom right of a 36 x 36
  canvas (overlap by pixel-wise max), resized to 28 x 28, pixels in [0, 1]. Labels (left,
  right)."""
  canvas = np.zeros((len(index), CANVAS, CANVAS), np.float32)
  canvas[:, :SIDE, :SIDE] = images[index] / 255.0
  canvas[:, SHIFT:, SHIFT:] = np.maximum(canvas[:, SHIFT:, SHIFT:], images[partner[index]] / 255.0)
  r = _resize_matrix(CANVAS, SIDE).astype(np.float32)
  pairs = np.clip(r @ canvas @ r.T, 0.0, 1.0)
  pair_labels = np.stack([labels[index], labels[partner[index]]], 1).astype(np.int32)
  return Split(pairs[..., None], pair_labels)


def load_multifashion(max_train: int | None = None, max_eval: int | None = None,
                      num_val: int = 6_000) -> Dataset:
  """MultiFashion: 60k training pairs (the last `num_val` held out) and 10k test pairs;
  `max_train`, `max_eval` as in `load_qm9` (only the kept pairs are built)."""
  x_all, y_all = (_read_idx(FASHION_DIR / f"train-{k}-idx{d}-ubyte.gz")
                  for k, d in (("images", 3), ("labels", 1)))
  x_test, y_test = (_read_idx(FASHION_DIR / f"t10k-{k}-idx{d}-ubyte.gz")
                    for k, d in (("images", 3), ("labels", 1)))
  rng = np.random.default_rng(SPLIT_SEED)
  p_all, p_test = partners(len(x_all), rng), partners(len(x_test), rng)
  n_train = len(x_all) - num_val
  index = np.arange(len(x_all))
  return Dataset(
      name="multifashion",
      train=overlay_pairs(x_all, y_all, p_all, index[:n_train][:max_train]),
      val=overlay_pairs(x_all, y_all, p_all, index[n_train:][:max_eval]),
      test=overlay_pairs(x_test, y_test, p_test, np.arange(len(x_test))[:max_eval]),
      task_names=("left", "right"),
      kind="multiclass", num_outputs=10, metric="accuracy", higher_is_better=True,
      target_scale=np.ones(2, np.float32), source="Debian dataset-fashion-mnist")


# ---------------------------------------------------------------------------------------------
# Yeast

YEAST_INSTALL = "pip install river==0.26.1 (the data ship inside the package)"


def load_yeast(max_train: int | None = None, max_eval: int | None = None) -> Dataset:
  """Yeast (Elisseeff & Weston 2002, MULAN): 14 binary labels; 1,300 train, 200 val and
  917 test genes (MULAN's 1,500/917 sizes) by a fixed permutation; `max_train`, `max_eval`
  as in `load_qm9`."""
  path = _package_dir("river", YEAST_INSTALL) / "datasets" / "yeast.csv.gz"
  if not path.exists():
    raise MissingDatasetError(f"{path} is missing: {YEAST_INSTALL}")
  table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
  x, y = table[:, :103], table[:, 103:].astype(np.int32)
  perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
  tr, va, te = np.split(perm, [1300, 1500])
  x_tr, x_va, x_te = _standardize(x[tr], x[va], x[te])
  return Dataset(
      name="yeast",
      train=_first(Split(x_tr, y[tr]), max_train),
      val=_first(Split(x_va, y[va]), max_eval),
      test=_first(Split(x_te, y[te]), max_eval),
      task_names=tuple(f"c{i}" for i in range(1, 15)),
      kind="binary", num_outputs=1, metric="accuracy", higher_is_better=True,
      target_scale=np.ones(14, np.float32),
      source=f"river {importlib.metadata.version('river')} (Yeast)")


LOADERS = {"qm9": load_qm9, "multifashion": load_multifashion, "yeast": load_yeast}
