#!/usr/bin/env bash
# Creates the virtualenv (once; FASTVL_VENV, default .venv) and installs fastvl editable with its
# test, benchmark and Hugging Face extras. torch is pinned to the CPU build through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTVL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench,hf]"
echo "$venv"
