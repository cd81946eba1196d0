#!/usr/bin/env bash
# Creates the virtualenv (once; FASTVL_VENV, default .venv) and installs fastvl editable with its
# test, benchmark and Hugging Face extras. torch is pinned to the CPU build through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTVL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
# The native CPU backend (fastvl._C, CMake) builds against the torch installed here: torch first, then
# fastvl without an isolated build environment (which would fetch another torch). FASTVL_NATIVE=0 skips it.
"${pip[@]}" torch "setuptools>=70.1"
if ! command -v cmake >/dev/null; then
    "${pip[@]}" cmake ninja
fi
"${pip[@]}" --no-build-isolation -e ".[dev,bench,hf]"
echo "$venv"
