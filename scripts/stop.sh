#!/usr/bin/env bash
# Stop the TorchServe started by scripts/serve.sh from a run directory, and return once its frontend
# and workers are gone (at most --timeout seconds, default 60; then it says which processes still run).
#   scripts/stop.sh [--run-dir DIR] [--timeout SECONDS]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/env.sh"
RUN_DIR="${RUN_DIR:-$REPO/run}"
TIMEOUT=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    -h|--help) usage "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1; see scripts/stop.sh --help" ;;
  esac
  shift
done
if [[ ! -d "$RUN_DIR" ]]; then
  echo "no TorchServe was started from $RUN_DIR"
  exit 0
fi
ops stop --run-dir "$RUN_DIR" --timeout "$TIMEOUT"
