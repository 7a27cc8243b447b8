"""Checkpoint and resume: a training state saved mid-run with orbax-checkpoint and restored in a
fresh process continues bit for bit as the uninterrupted run.

For each case (a balancer on one path, trained with Adam), `tests/checkpoint_child.py save`
trains HALF steps, saves the whole state (parameters, balancer state, Adam state, step), trains
HALF more steps and saves where it ends; `tests/checkpoint_child.py resume`, a second process,
restores the mid-run checkpoint into a state built from `init`, trains the same HALF steps and
compares every leaf (and every step's losses) with the uninterrupted run's, bytes for bytes.
Under `-m slow` (which `.ci/run` runs on its Python 3.11 stack, to keep the default run short):
the fusions (IGBv1 / IGBv2 + Nash-MTL; IGBv2 with a filled replay buffer and an agent that has
trained and acted) and every stateful or random method once, and every method of the registry
on every path it runs on. The examples' recipe (`examples/checkpoint.py`, Flax NNX) runs by
default.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "checkpoint_child.py"
pytest.importorskip("orbax.checkpoint")
sys.path.insert(0, str(ROOT / "tests"))
import checkpoint_child  # noqa: E402


def child(*args: str) -> list[dict]:
  env = {**os.environ,
         "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  done = subprocess.run([sys.executable, str(CHILD), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def save_and_resume(directory: pathlib.Path, *selection: str):
  saved = child("save", str(directory), *selection)
  resumed = child("resume", str(directory), *selection)
  return saved, resumed


def check(saved: list[dict], resumed: list[dict], expected: list[tuple[str, str]]) -> None:
  assert [(r["name"], r["path"]) for r in saved] == expected
  assert [(r["name"], r["path"]) for r in resumed] == expected
  assert all(r["finite"] for r in saved), saved
  unequal = [r for r in resumed if not r["bitwise_equal"]]
  assert not unequal, unequal
  for r in saved:
    if r["name"].startswith("igb_v2"):  # the checkpoint holds a trained agent and its buffer
      assert r["buffer_rows"] > 0 and r["agent_trained"], r


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bitwise_the_uninterrupted_run(tmp_path):
  saved, resumed = save_and_resume(tmp_path)
  expected = checkpoint_child.plan(everything=False)
  check(saved, resumed, expected)
  # Every default case is a method whose state moves: a restore that lost it would show.
  stuck = [r for r in saved if not r["balancer_moved"]]
  assert not stuck, stuck
  assert {p for _, p in expected} == set(checkpoint_child.PATHS)


@pytest.mark.slow
def test_every_method_on_every_path_resumes_bitwise(tmp_path):
  saved, resumed = save_and_resume(tmp_path, "--all")
  check(saved, resumed, checkpoint_child.plan(everything=True))


def test_checkpoint_example_resumes_exactly(tmp_path):
  spec = importlib.util.spec_from_file_location("checkpoint", ROOT / "examples" / "checkpoint.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  resumed, uninterrupted = example.main(steps=6, save_at=3, directory=tmp_path)
  for a, b in zip(resumed, uninterrupted, strict=True):
    np.testing.assert_array_equal(a, b)
