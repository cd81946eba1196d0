#!/usr/bin/env bash
# One prepared run on a GPU machine without network (its own torch, triton, transformers, pytest, matplotlib,
# tqdm): install fastvl over what is there, `pytest -m gpu`, every benchmark suite at real shapes, then a
# one-page summary of each target beside its measured ratio. Each step has a time budget (`timeout`) inside
# a 9-minute deadline; a step that fails or runs out is recorded and the next one runs; the summary is
# always written.
#
#   bash scripts/gpu-check.sh             # on the GPU machine (PYTHON=... picks the interpreter)
#   bash scripts/gpu-check.sh --dry-run   # the same flow on a CPU: tiny shapes, no install (CI runs it)
#
# Results: with $OUT set, $OUT/summary.md, $OUT/gpu-check.log and $OUT/results.tar.gz (every JSON, plot and
# log); otherwise the results folder itself: bench/results/<gpu-name>/ (a dry run: ./fastvl-bench-results/
# gpu-check-dry-run/).
set -uo pipefail  # no -e: a failing step must not stop the others
cd "$(dirname "$0")/.."
repo=$PWD
dry=0
case "${1:-}" in
    --dry-run) dry=1 ;;
    "") ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
start=$(date +%s)
deadline=$((start + ${FASTVL_CHECK_SECONDS:-525}))  # 9 minutes, less a margin for the summary
export FASTVL_NATIVE=0  # no native (CMake) build on the GPU machine: the CUDA paths do not need it
export TRITON_DEFAULT_FP_FUSION=1
export PYTHONUNBUFFERED=1

slack=1  # a dry run proves the flow, not the speed: its budgets are 3x (a shared CI machine may be slow)
if [ $dry = 1 ]; then
    slack=3
    venv=$(bash scripts/setup.sh | tail -n 1)
    py="$(cd "$venv" && pwd)/bin/python"
else
    py=${PYTHON:-$(command -v python3 || command -v python)}
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ------------------------------------------------------------------ install
# pip over the machine's own packages; if fastvl is not importable after it (an old setuptools without
# editable installs of mapped packages), a folder of links laid out as the installed package, on PYTHONPATH,
# serves the same modules. Python runs from a scratch folder, so that ./fastvl never shadows either.
link_package() {
    mkdir -p "$work/pkg/fastvl"
    for f in "$repo"/fastvl/*; do ln -s "$f" "$work/pkg/fastvl/"; done
    ln -s "$repo/kernels" "$work/pkg/fastvl/kernels"
    ln -s "$repo/bench" "$work/pkg/fastvl/bench"
    export PYTHONPATH="$work/pkg${PYTHONPATH:+:$PYTHONPATH}"
}
if [ $dry = 1 ]; then  # the venv has fastvl already: check that pip could install it so, then use the links
    install=("$py" -m pip install --dry-run --no-deps --no-build-isolation -q -e "$repo")
else
    install=("$py" -m pip install --no-deps --no-build-isolation --no-index -q -e "$repo")
fi
where=$("$py" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' 2>/dev/null)
if [ -z "$where" ]; then
    echo "gpu-check: $py cannot import torch" >&2
    exit 2
fi
slug=$(echo "$where" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
if [ -n "${OUT:-}" ]; then
    res="$work/results"
elif [ $dry = 1 ]; then
    res="$repo/fastvl-bench-results/gpu-check-dry-run"
else
    res="$repo/bench/results/$slug"
fi
mkdir -p "$res"
rm -f "$res/steps.tsv" "$res"/*.rows.jsonl "$res/summary.md"
log="$res/gpu-check.log"
echo "gpu-check on $where ($([ $dry = 1 ] && echo 'dry run, tiny shapes' || echo 'full run')); results in ${OUT:-$res}" | tee "$log"

# step NAME BUDGET_SECONDS COMMAND...: runs under `timeout` (the budget, cut to the time left before the
# deadline), output shown and kept in <res>/NAME.log; status recorded in steps.tsv
step() {
    local name=$1 budget=$(($2 * slack))
    shift 2
    local left=$((deadline - $(date +%s)))
    local limit=$((budget < left ? budget : left))
    if [ "$limit" -le 5 ]; then
        printf '%s\t%s\t%s\t%s\n' "$name" skipped 0 "$budget" >>"$res/steps.tsv"
        echo "== $name: skipped, the deadline is reached" | tee -a "$log"
        return
    fi
    echo "== $name (budget ${limit}s): $*" | tee -a "$log"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$res/$name.log" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$budget" >>"$res/steps.tsv"
    echo "== $name: exit $rc after $(($(date +%s) - t0))s" | tee -a "$log"
}

cd "$work"
step install 45 "${install[@]}"
if [ $dry = 1 ] || ! "$py" -c "import os, sys, fastvl.bench, fastvl.kernels
sys.exit(not os.path.realpath(fastvl.__file__).startswith(os.path.realpath(sys.argv[1])))" "$repo" 2>/dev/null; then
    [ $dry = 1 ] || echo "gpu-check: fastvl from this checkout is not importable after pip: using linked files" | tee -a "$log"
    link_package
fi
step versions 30 "$py" -c 'import fastvl, fastvl.bench, fastvl.kernels, torch, triton, transformers
print("fastvl from", fastvl.__file__); print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__); print("cuda", torch.version.cuda, torch.cuda.is_available())'
if [ $dry = 0 ]; then
    nvidia-smi >"$res/nvidia-smi.log" 2>&1 || true
fi
step pytest 120 "$py" -m pytest -m gpu -q -p no:cacheprovider -c "$repo/pytest.ini" --rootdir "$repo" "$repo/tests"
# suites: the new whole-model and tower results first, the op suites (which overlap) last; attention on
# the packs its targets name. A dry run runs them in one process (tiny shapes: imports would dominate).
if [ $dry = 1 ]; then
    step suites 90 "$py" -m fastvl.cli bench --suite vit-train,train,model,attention,compression,ops --quick --out "$res"
else
    step vit-train 50 "$py" -m fastvl.cli bench --suite vit-train --out "$res"
    step train 45 "$py" -m fastvl.cli bench --suite train --out "$res"
    step model 110 "$py" -m fastvl.cli bench --suite model --out "$res"
    step attention 100 "$py" -m fastvl.cli bench --suite attention --case '16k|64x256' --out "$res"
    step compression 45 "$py" -m fastvl.cli bench --suite compression --out "$res"
    step ops 30 "$py" -m fastvl.cli bench --suite ops --out "$res"
fi
# the summary runs whatever time is left
deadline=$((deadline + 15))
step summary 15 "$py" -m fastvl.bench.summary "$res"
if [ ! -s "$res/summary.md" ]; then
    echo "# gpu-check: the summary step failed; see gpu-check.log" >"$res/summary.md"
    cat "$res/steps.tsv" >>"$res/summary.md"
fi

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$res/summary.md" "$log" "$OUT/"
    tar -czf "$OUT/results.tar.gz" -C "$res" .
    echo "wrote $OUT/summary.md, $OUT/gpu-check.log and $OUT/results.tar.gz (untar into bench/results/$slug/)"
else
    echo "wrote $res/summary.md"
fi
echo "gpu-check: $(($(date +%s) - start))s"
failed=$(awk -F'\t' '$2 != "0"' "$res/steps.tsv" | wc -l)
[ "$failed" = 0 ]
