#!/usr/bin/env bash
# The device check: one H100 or H200, about 9 minutes in all. NOT RUN YET: it was written in a
# session without a GPU (README, "Benchmarks"). It needs an environment with CUDA jax and the
# benchmark extras (`pip install -e ".[bench]" "jax[cuda12]"`; QM9 from PyPI `qm9pack`), as the
# device machine has no network.
#
#   bash benchmarks/gpu_check.sh            # tables under $OUT (default: benchmarks/results/gpu)
#
# 1. The step-time table, small rounds (K = 3 and 11; loss, gradient, representation sections).
# 2. A few epochs of the seeds' GNN (`--recipe seeds`: Nash-MTL's QM9 network, batch 120) on
#    6,000 molecules for EW, IGBv1, IGBv2 and Nash-MTL on the representation path, with T
#    (Delta_m against the seeds' own STL, `--stl paper`: so far from convergence it measures cost
#    and early training, not the papers' ranking).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import jax; print(jax.__version__, jax.devices())"
python -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" \
  || { echo "gpu_check: jax sees no GPU; install jax[cuda12]"; exit 1; }

timeout 200 python benchmarks/step_time.py --rounds 3 --tasks 3 11 \
  --sections loss grad rep --out "$OUT/step_time_gpu.md" || echo "step_time: stopped ($?)"
echo "step_time done after $(( $(date +%s) - start )) s"

timeout 300 python benchmarks/run.py --dataset qm9 --recipe seeds --stl paper --seeds 1 \
  --max-train 6000 --max-eval 2000 --epochs 6 --no-progress \
  --methods igb_v1,igb_v2,nash_mtl_rep --out "$OUT/qm9_gnn_gpu.md" || echo "run.py: stopped ($?)"
echo "gpu_check done after $(( $(date +%s) - start )) s"
