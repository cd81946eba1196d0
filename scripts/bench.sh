#!/usr/bin/env bash
# The main job: `fastvl bench` on its embedded default shapes (no downloads). Arguments go to it
# (e.g. --quick, --suite model,vit-train, --out DIR; `--list` shows the suites).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -n 1)
export TRITON_DEFAULT_FP_FUSION=1
"$venv/bin/fastvl" bench "$@"
