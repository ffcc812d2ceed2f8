#!/usr/bin/env bash
# Start TorchServe with this package's configuration, token authorization on.
# The entrypoint of the Docker image and of the end-to-end tests.
#
#   scripts/serve.sh                                  # background; returns once /ping is Healthy
#   scripts/serve.sh --register tiny-gpt2             # ... and registers model_store/tiny-gpt2.mar
#   scripts/serve.sh --foreground --register NAME     # stays in the foreground (Docker); SIGTERM stops it
#   scripts/serve.sh --config FILE --model-store DIR --run-dir DIR
#
# Everything the server writes lives in the run directory: key_file.json (the
# keys), logs/, and tmp/ (pid file and worker sockets), so that several servers
# can run side by side. Stop it with scripts/stop.sh --run-dir DIR.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# prefer the project environment (make venv) when it exists
[[ -x "$REPO/.venv/bin/torchserve" ]] && PATH="$REPO/.venv/bin:$PATH"
CONFIG="${TS_CONFIG:-$REPO/config.properties}"
MODEL_STORE="${MODEL_STORE:-$REPO/model_store}"
RUN_DIR="${RUN_DIR:-$REPO/run}"
FOREGROUND=0
REGISTER=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --foreground) FOREGROUND=1 ;;
    --register) REGISTER+=("$2"); shift ;;
    --config) CONFIG="$2"; shift ;;
    --model-store) MODEL_STORE="$2"; shift ;;
    --run-dir) RUN_DIR="$2"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
mkdir -p "$RUN_DIR/tmp" "$RUN_DIR/logs" "$MODEL_STORE"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
MODEL_STORE="$(cd "$MODEL_STORE" && pwd)"
cd "$RUN_DIR"
# TMPDIR: TorchServe's pid file; TEMP: the JVM's java.io.tmpdir, where worker sockets live.
export TMPDIR="$RUN_DIR/tmp" TEMP="$RUN_DIR/tmp" LOG_LOCATION="$RUN_DIR/logs" METRICS_LOCATION="$RUN_DIR/logs"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARGS=(--start --ncs --ts-config "$CONFIG" --model-store "$MODEL_STORE")
ADDRESS="$(sed -n 's/^inference_address=//p' "$CONFIG" | tail -n1)"

wait_healthy() {  # $1: pid to watch (foreground mode) or empty
  for _ in $(seq 1 360); do
    if "$REPO/scripts/healthcheck.sh" --run-dir "$RUN_DIR" --config "$CONFIG" 2>/dev/null; then
      echo "TorchServe is up: ${ADDRESS:-http://127.0.0.1:8080} (keys: $RUN_DIR/key_file.json, logs: $RUN_DIR/logs)"
      return 0
    fi
    if [[ -n "${1:-}" ]] && ! kill -0 "$1" 2>/dev/null; then break; fi
    sleep 0.5
  done
  echo "error: TorchServe did not come up; see $RUN_DIR/logs/ts_log.log" >&2
  return 1
}

register_all() {
  for name in "${REGISTER[@]+"${REGISTER[@]}"}"; do
    "${PYTHON:-python3}" "$REPO/scripts/register.py" "$name" --config "$CONFIG" --run-dir "$RUN_DIR" || return 1
  done
}

if [[ "$FOREGROUND" == 1 ]]; then
  if [[ ${#REGISTER[@]} -eq 0 ]]; then
    exec torchserve "${ARGS[@]}" --foreground
  fi
  torchserve "${ARGS[@]}" --foreground &
  TS_PID=$!
  trap 'torchserve --stop >/dev/null 2>&1 || kill "$TS_PID" 2>/dev/null; wait "$TS_PID"; exit 0' TERM INT
  if ! wait_healthy "$TS_PID" || ! register_all; then
    torchserve --stop >/dev/null 2>&1 || kill "$TS_PID" 2>/dev/null || true
    exit 1
  fi
  wait "$TS_PID"
  exit $?
fi

torchserve "${ARGS[@]}" >"$RUN_DIR/logs/torchserve.out" 2>&1
wait_healthy "" || exit 1
register_all
