#!/usr/bin/env bash
# Stop the TorchServe started by scripts/serve.sh from the same run directory.
#   scripts/stop.sh [--run-dir DIR]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# prefer the project environment (make venv) when it exists
[[ -x "$REPO/.venv/bin/torchserve" ]] && PATH="$REPO/.venv/bin:$PATH"
RUN_DIR="${RUN_DIR:-$REPO/run}"
[[ "${1:-}" == "--run-dir" ]] && RUN_DIR="$2"
if [[ ! -d "$RUN_DIR/tmp" ]]; then
  echo "no server was started from $RUN_DIR"
  exit 0
fi
TMPDIR="$RUN_DIR/tmp" torchserve --stop
