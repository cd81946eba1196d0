#!/usr/bin/env bash
# The whole test suite from a fresh machine: virtualenv + install, the kernel compile gate
# (sm_80/sm_90, no GPU needed), then pytest (Triton kernels through the interpreter on CPU).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh | tail -n 1)
export TRITON_DEFAULT_FP_FUSION=1
# The gate again with triton 3.6, the GPU images' version, so that an API difference shows without a GPU: a
# second environment (FASTVL_TRITON36_VENV, default .venv-triton36, kept between runs) holds triton 3.6 alone
# and reads torch, numpy and fastvl from the first one. It compiles for sm_90 only (the GPU images are Hopper),
# beside the first gate (each is one process), and fails on a compile error only: register spills with triton
# 3.6 are shown, not failed (a performance matter of that compiler; the newest triton's gate fails on them).
old=${FASTVL_TRITON36_VENV:-.venv-triton36}
if [ "$("$old/bin/python" -c 'import triton; print(triton.__version__)' 2>/dev/null)" != 3.6.0 ]; then
    rm -rf "$old"
    python3 -m venv "$old"
    "$old/bin/python" -m pip install -q --disable-pip-version-check triton==3.6.0
fi
site() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
echo "import site; site.addsitedir('$(cd "$(site "$venv")" && pwd)')" >"$(site "$old")/fastvl-base.pth"
log36=$(mktemp)
"$old/bin/python" -c 'import sys; from fastvl.cli import main; sys.exit(main(["gate", "--arch", "90"]))' >"$log36" 2>&1 &
gate36=$!
"$venv/bin/fastvl" gate --perf
wait $gate36 || true
echo "compile gate with triton 3.6 (sm_90): $(tail -n 1 "$log36")"
grep -v ' ok$' "$log36" | grep -v '^kernel ' || true
if grep -q ' ERROR ' "$log36" || ! grep -q ' compilations, ' "$log36"; then
    echo "compile gate: kernels do not compile with triton 3.6 (see above)" >&2
    exit 1
fi
# The GPU check's flow on this CPU (tiny shapes, CUDA-only steps skipped)
bash scripts/gpu-check.sh --dry-run
"$venv/bin/python" -m pytest -n "${FASTVL_TEST_WORKERS:-2}" -q "$@"
