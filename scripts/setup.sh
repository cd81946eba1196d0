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
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)
install=(--no-build-isolation -e ".[dev,bench,hf,train]")
# pip runs only when what the install depends on changed: a stamp in the venv of the install command, this
# checkout's path, FASTVL_NATIVE and the hashes of setup.py, constraints.txt and the native sources (an
# editable install follows the Python sources by itself; the native extension is rebuilt by pip).
stamp=$( (echo "${install[*]}" "$PWD" "${FASTVL_NATIVE:-1}"; cat setup.py constraints.txt CMakeLists.txt csrc/*) \
    | sha256sum | cut -d' ' -f1)
if [ "$(cat "$venv/.fastvl-install" 2>/dev/null)" != "$stamp" ]; then
    # The native CPU backend (fastvl._C, CMake) builds against the torch installed here: torch first, then
    # fastvl without an isolated build environment (which would fetch another torch). FASTVL_NATIVE=0 skips it.
    "${pip[@]}" torch "setuptools>=70.1"
    if ! command -v cmake >/dev/null; then
        "${pip[@]}" cmake ninja
    fi
    "${pip[@]}" "${install[@]}"
    echo "$stamp" >"$venv/.fastvl-install"
fi
echo "$venv"
