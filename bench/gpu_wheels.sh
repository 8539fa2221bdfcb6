#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks (its torch, transformers, peft, accelerate, pyarrow,
# pandas, scikit-learn are used as they are), downloaded here into .whl/ (git-ignored through
# .git/info/exclude) so that `bench/gpu_check.sh` can install them there without a network:
#
#     bash bench/gpu_wheels.sh                      # here, once (~8 MB)
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# The versions are this checkout's (.venv); the machine runs Python 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
py=${PYTHON:-.venv/bin/python}
pkgs=(opacus pydantic pydantic_core annotated-types typing-inspection typing_extensions dill
    faker tzdata datasets fairlearn multiprocess)
pins=()
for p in "${pkgs[@]}"; do
    v=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p")
    pins+=("$p==$v")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls .whl
