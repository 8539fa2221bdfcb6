#!/usr/bin/env bash
# Mutation testing of the privacy and security code (mutmut); not part of CI.
#   bash scripts/mutation.sh                      # every group: privacy dp_epoch membership endpoint fairness
#   bash scripts/mutation.sh privacy dp_epoch     # some groups
#   bash scripts/mutation.sh --survivors privacy  # re-run only the last survivors (after new tests)
#   bash scripts/mutation.sh --rest privacy       # ... and what a stopped run did not reach
# Installs the pinned mutmut (pyproject's `mutation` extra) if missing; writes
# bench/results/mutation.{md,json}. Work folders: build/mutation/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" bench/mutation.py "$@"
