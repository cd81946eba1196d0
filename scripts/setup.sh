#!/usr/bin/env bash
# Creates the virtualenv (once; FASTVL_VENV, default .venv) and installs fastvl editable with its
# test, benchmark, Hugging Face and training (DeepSpeed) extras. torch is pinned to the CPU build through
# constraints.txt, which also holds for DeepSpeed's dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTVL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench,hf,train]"
echo "$venv"
