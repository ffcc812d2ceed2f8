#!/usr/bin/env bash
# Exit 0 when TorchServe answers /ping as Healthy. Under token authorization /ping needs the inference key,
# read here from the run directory's key_file.json; with `disable_token_authorization=true` in the config
# (a server bound to loopback behind an auth proxy, as in deploy/kubernetes/) TorchServe writes no key file
# and /ping is called without a key. Used by scripts/serve.sh and the Docker HEALTHCHECK.
#   scripts/healthcheck.sh [--run-dir DIR] [--config FILE]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RUN_DIR:-$REPO/run}"
CONFIG="${TS_CONFIG:-$REPO/config.properties}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
AUTH=()
if ! grep -qE '^disable_token_authorization=true[[:space:]]*$' "$CONFIG"; then
  KEY_FILE="$RUN_DIR/key_file.json"
  [[ -r "$KEY_FILE" ]] || exit 1
  KEY="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "$KEY_FILE")" || exit 1
  AUTH=(-H "Authorization: Bearer $KEY")
fi
INFERENCE="$(sed -n 's/^inference_address=//p' "$CONFIG" | tail -n1)"
curl -fsS --max-time 5 "${AUTH[@]+"${AUTH[@]}"}" "${INFERENCE:-http://127.0.0.1:8080}/ping" | grep -q Healthy
