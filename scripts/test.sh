#!/usr/bin/env bash
# The whole test suite from a fresh machine: virtualenv + install, the kernel compile gate
# (sm_80/sm_90, no GPU needed), then pytest (Triton kernels through the interpreter on CPU).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -n 1)
export TRITON_DEFAULT_FP_FUSION=1
"$venv/bin/fastvl" gate --perf
"$venv/bin/python" -m pytest -n "${FASTVL_TEST_WORKERS:-2}" -q "$@"
