#!/usr/bin/env bash
# Exit 0 when the model answers a request: healthy means ready. The Docker HEALTHCHECK.
#
# /ping alone is not enough: TorchServe answers Healthy as soon as its frontend is up, while the model's
# worker is still loading (seconds for the tiny model, minutes for a large one or a compiled step), and
# predictions get 404 or wait meanwhile. So this asks the model itself for its report
# (GET /predictions/<model>/1.0/describe): a request the worker answers without taking a slot of the engine
# or touching its metrics; it passes once the worker has loaded, warmed up and answers.
#
# Under token authorization the inference key is read from the run directory's key_file.json; with
# `disable_token_authorization=true` in the config (a server bound to loopback behind an auth proxy, as in
# deploy/kubernetes/) TorchServe writes no key file and the call goes without a key.
#   scripts/healthcheck.sh [--run-dir DIR] [--config FILE] [--model NAME]   (defaults: $RUN_DIR, $TS_CONFIG,
#                                                                            $MODEL_NAME)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RUN_DIR:-$REPO/run}"
CONFIG="${TS_CONFIG:-$REPO/config.properties}"
MODEL="${MODEL_NAME:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR="$2"; shift ;;
    --config) CONFIG="$2"; shift ;;
    --model) MODEL="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$MODEL" ]] || { echo "no model to ask: set MODEL_NAME or pass --model" >&2; exit 2; }
AUTH=()
if ! grep -qE '^disable_token_authorization=true[[:space:]]*$' "$CONFIG"; then
  KEY_FILE="$RUN_DIR/key_file.json"
  [[ -r "$KEY_FILE" ]] || { echo "no key file yet at $KEY_FILE" >&2; exit 1; }
  KEY="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "$KEY_FILE")" || exit 1
  AUTH=(-H "Authorization: Bearer $KEY")
fi
INFERENCE="$(sed -n 's/^inference_address=//p' "$CONFIG" | tail -n1)"
INFERENCE="${INFERENCE:-http://127.0.0.1:8080}"
INFERENCE="${INFERENCE/\/\/0.0.0.0:/\/\/127.0.0.1:}"  # bound to all interfaces: ask on loopback
curl -fsS --max-time 4 "${AUTH[@]+"${AUTH[@]}"}" "$INFERENCE/predictions/$MODEL/1.0/describe" | grep -q '"decode_step"'
