#!/usr/bin/env bash
# Creates the virtualenv (once; FASTVL_VENV, default .venv) and installs fastvl editable with its
# test, benchmark and Hugging Face extras. torch is pinned to the CPU build through constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${FASTVL_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# pip runs only when what the install depends on changed: a stamp in the venv of the install command, this
# checkout's path and the hashes of setup.py and constraints.txt (an editable install follows the sources).
install=(-m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,bench,hf]")
stamp=$( (echo "${install[*]}" "$PWD"; cat setup.py constraints.txt) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.fastvl-install" 2>/dev/null)" != "$stamp" ]; then
    "$venv/bin/python" "${install[@]}"
    echo "$stamp" >"$venv/.fastvl-install"
fi
echo "$venv"
