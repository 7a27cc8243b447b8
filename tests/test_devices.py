"""Many devices: every balancer on eight devices takes the steps it takes on one, and what
crosses devices is small (K losses, K x K Gram matrices, one gradient; never stacked rows on
the Gram-only path of a parameter-sharded mesh).

The checks run in a child process (`tests/devices_child.py`), since the device count must be
set before jax is imported: XLA_FLAGS=--xla_force_host_platform_device_count=8 gives eight
CPU devices. The default run checks each balancer once (one path, one mode) and the
communication benchmark on a small model; `-m slow` checks every path in every mode.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

import mtl_optax
from mtl_optax import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "devices_child.py"
# Eight CPU devices, added to XLA_FLAGS as they stand (with conftest.py's cheaper compilation,
# which speeds up the child's ~60 compilations; single-device and sharded programs alike).
FLAGS = "--xla_force_host_platform_device_count=8"
TOLERANCE = 1e-4  # largest |sharded - single| / max |single| over every leaf (float32)
MODES = ("jit-8x1", "jit-2x4", "shard_map-8x1", "explicit-8x1")
FUSIONS = ("igb_v1+nash_mtl", "igb_v2+nash_mtl")


def eight_devices() -> dict[str, str]:
  """The environment of a child process on eight CPU devices that imports this checkout."""
  return {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}".strip(),
          "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_child(*args: str) -> list[dict]:
  done = subprocess.run([sys.executable, str(CHILD), *args], cwd=ROOT, env=eight_devices(),
                        capture_output=True, text=True, timeout=3600)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def failures(records: list[dict]) -> list[dict]:
  """Checks that are not equal to the single-device run, or not the same on every device.
  GradDrop refuses rows split over devices (shard_map's representation path): expected."""
  bad = []
  for r in records:
    if "raises" in r:
      if (r["name"], r["path"], r["mode"]) != ("graddrop", "representation", "shard_map-8x1"):
        bad.append(r)
    elif not (r["error"] <= TOLERANCE and r["consistent"]):
      bad.append(r)
  return bad


@pytest.fixture(scope="module")
def default_run() -> list[dict]:
  return run_child()


@pytest.mark.slow  # 75 s of set-up (a child process compiling every method on 8 devices): CI
def test_every_balancer_on_eight_devices_equals_one_device(default_run):
  checks = [r for r in default_run if "name" in r]
  assert not failures(checks), failures(checks)
  names = {r["name"] for r in checks}
  # IGBv2 alone is left to its fusion in the default run (see DEFAULT in the child).
  assert names == (set(registry.names()) - {"igb_v2"}) | set(FUSIONS)
  assert {r["path"] for r in checks} == {"stacked", "gram", "representation"}
  assert {r["mode"] for r in checks} == set(MODES)
  assert {r["mode"] for r in checks if r["path"] == "representation"} == set(MODES)


@pytest.mark.slow  # shares that set-up; CI runs both
def test_communication_per_step(default_run):
  rows = {(r["mesh"], r["engine"], r["path"]): r
          for r in (x["communication"] for x in default_run if "communication" in x)}
  assert set(rows) == {(m, e, p) for m, e in (("8 x 1", "shard_map"), ("2 x 4", "jit"))
                       for p in ("ew", "stacked", "gram", "representation")}
  for (mesh, engine, path), row in rows.items():
    assert row["exact"], row
    assert row["total"] > 0
    # Never a stacked K x P tree gathered: no all-gather larger than one parameter leaf.
    assert row["largest_all_gather"] <= row["largest_param"], (mesh, engine, path, row)
  # Data parallel under shard_map, in 4-byte numbers: EW reduces one gradient (P numbers);
  # the stacked path K rows; the Gram-only path the K rows of the shared leaves (inside the
  # Gram matrix's computation), K x K Gram entries and one gradient; the representation path
  # the K x K Gram matrix of z-rows, the heads' K rows and the trunk's gradient. The balanced
  # paths also reduce the K losses (read to find which tasks take part), and the representation
  # path, whose rows are split over the devices, K flags: is each task's row finite everywhere.
  k, p, shared = (rows[("8 x 1", "shard_map", "ew")][n] for n in ("K", "params", "shared"))
  numbers = {path: rows[("8 x 1", "shard_map", path)]["total"] // 4 for path in
             ("ew", "stacked", "gram", "representation")}
  assert numbers == {"ew": p, "stacked": k * p + k, "gram": k * shared + k * k + p + k,
                     "representation": shared + k * (p - shared) + k * k + 2 * k}
  # The detector sees a gathered stacked tree when there is one.
  control = next(x["control"] for x in default_run if "control" in x)
  assert control["largest_all_gather"] > 2 * control["largest_param"], control
  report = next(x["report"] for x in default_run if "report" in x)
  assert "| K | mesh | engine | path | all-reduce |" in report and "Gram-only" in report


def test_graddrop_refuses_rows_split_over_devices():
  tx = mtl_optax.graddrop(3, key=0)
  with pytest.raises(ValueError, match="cannot run on rows split over devices"):
    tx.update({"w": jnp.ones((3, 4))}, tx.init({"w": jnp.ones(4)}), axis_name="data")


@pytest.mark.slow
def test_every_path_in_every_mode_equals_one_device():
  checks = [r for r in run_child("--all", "--no-communication") if "name" in r]
  assert not failures(checks), failures(checks)
  assert len(checks) == len(MODES) * (len(registry.names("loss"))
                             + 3 * len(registry.names("gradient", having=("gram",)))
                             + 2 * (len(registry.names("gradient"))
                                    - len(registry.names("gradient", having=("gram",))))
                             + 3 * len(FUSIONS))


@pytest.mark.slow
def test_data_parallel_example_matches_one_device():
  done = subprocess.run([sys.executable, "examples/data_parallel.py", "--steps", "6"], cwd=ROOT,
                        env=eight_devices(), capture_output=True, text=True, timeout=3600)
  assert done.returncode == 0, done.stderr[-4000:]
  gaps = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines()
          if "gap to one device" in line]
  assert len(gaps) == 9 and max(gaps) < TOLERANCE, done.stdout
