#!/usr/bin/env bash
# The main job: `fastvl bench` on its embedded default shapes (no downloads). Arguments go to it
# (e.g. --quick, --out bench/results/run.json).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -n 1)
export TRITON_DEFAULT_FP_FUSION=1
"$venv/bin/fastvl" bench "$@"
