"""README's usage runs verbatim, and its quickstart command works.

README is the front door; what moved from it to the docs site (the representation path, the
checkpoint and the data-parallel recipes) runs in `tests/test_docs.py`, with the same code-block
convention (`tests/docblocks.py`)."""

import os
import subprocess
import sys

import jax.numpy as jnp

from docblocks import ROOT, python_blocks


def _python_blocks() -> list[str]:
  return python_blocks(ROOT / "README.md")


def test_readme_usage_runs_verbatim():
  blocks = _python_blocks()
  assert blocks, "README has no python usage block"
  namespace: dict = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)
  losses = namespace["losses"]
  assert losses.shape == (namespace["K"],) and bool(jnp.all(jnp.isfinite(losses)))
  # The step updated the model: parameters moved and stay finite.
  assert bool(jnp.all(jnp.isfinite(namespace["params"]["trunk"])))
  assert not bool(jnp.allclose(namespace["params"]["trunk"], 0.1))


def test_quickstart_command_runs():
  out = subprocess.run([sys.executable, "examples/quickstart.py", "--steps", "20"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert out.returncode == 0, out.stderr
  rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
  assert len(rows) >= 9  # header + EW + 7 loss balancers
  assert "| IGBv1 |" in out.stdout
