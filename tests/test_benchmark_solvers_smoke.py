"""Smoke test of benchmarks/solvers.py: one family, K = 3, one repeat, the MGDA problem."""

import pytest

from benchmarks import solvers as bench


@pytest.mark.slow  # benchmark-style; run with -m slow
def test_solver_benchmark_runs(tmp_path):
  out = tmp_path / "solvers.md"
  report = bench.main(["--repeats", "1", "--families", "iid", "--tasks", "3", "--problems",
                       "mgda", "--out", str(out)])
  assert out.read_text() == report + "\n"
  rows = [line.split("|")[1:-1] for line in report.splitlines() if line.startswith("| mgda")]
  assert [r[3].strip() for r in rows] == ["ours", "BoxOSQP", "OSQP", "ProjectedGradient",
                                          "BoxCDQP", "LBFGSB"]
  assert float(rows[0][4]) >= 0.9999 and float(rows[0][6]) == 1.0
  assert "Command: `python benchmarks/solvers.py --repeats 1" in report
  assert "jaxopt " in report and "/" not in report.split("Command:")[0].replace("1e-2..1e2", "")
