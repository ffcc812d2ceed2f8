#!/usr/bin/env bash
# Start TorchServe with this package's configuration, token authorization on.
# The entrypoint of the Docker image and of the end-to-end tests.
#
#   scripts/serve.sh                                  # background; returns once /ping is Healthy
#   scripts/serve.sh --register tiny-gpt2             # ... and registers model_store/tiny-gpt2.mar
#   scripts/serve.sh --reuse --register tiny-gpt2     # reuse a healthy server from the run dir (make run)
#   scripts/serve.sh --foreground --register NAME     # stays in the foreground (Docker); SIGTERM drains, stops
#   scripts/serve.sh --config FILE --model-store DIR --run-dir DIR
#
# Everything the server writes lives in the run directory (default run/): key_file.json (the keys),
# frontend/ (its read-only working directory, see below), logs/ (torchserve.out, ts_log.log,
# model_log.log), and tmp/ (pid file and worker sockets), so that
# several servers can run side by side. Stop it with scripts/stop.sh --run-dir DIR.
#
# Before starting, it refuses to start a second server from the same run directory (--reuse: reuses it
# when it answers /ping; a registered model is then replaced by its archive) and checks that every port
# of the config is free, naming the program that holds a busy one. While TorchServe starts it is
# watched: when it stops, the line of its output that says why is printed at once. Waits at most
# $TS_START_TIMEOUT seconds (default 180) for /ping. Failures are one line: "error: <cause>; <next step>".
#
# --foreground: SIGTERM or SIGINT drains before it stops (handler/serving/drain.py): new requests get 503,
# open ones finish or, $TS_DRAIN_SECONDS (default 4) after the signal, end with a final error chunk; then
# `torchserve --stop`. Keep TS_DRAIN_SECONDS 6 s under the grace period (`docker stop -t`, default 10;
# the pod's terminationGracePeriodSeconds). The model drained: the first --register, else $MODEL_NAME.
# $TS_LOG_CONFIG: a log4j2.xml for TorchServe (the image's: INFO, size-based rotation; log4j2.xml).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/env.sh"
CONFIG="${TS_CONFIG:-$REPO/config.properties}"
MODEL_STORE="${MODEL_STORE:-$REPO/model_store}"
RUN_DIR="${RUN_DIR:-$REPO/run}"
FOREGROUND=0
REUSE=0
REGISTER=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --foreground) FOREGROUND=1 ;;
    --reuse) REUSE=1 ;;
    --register) REGISTER+=("$2"); shift ;;
    --config) CONFIG="$2"; shift ;;
    --model-store) MODEL_STORE="$2"; shift ;;
    --run-dir) RUN_DIR="$2"; shift ;;
    -h|--help) usage "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1; see scripts/serve.sh --help" ;;
  esac
  shift
done

[[ -f "$CONFIG" ]] || die "no TorchServe config at $CONFIG; pass --config FILE (the repo's is config.properties)"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
mkdir -p "$RUN_DIR/tmp" "$RUN_DIR/logs" "$MODEL_STORE"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"
MODEL_STORE="$(cd "$MODEL_STORE" && pwd)"

register_all() {  # $1: --replace when the server was reused
  for name in "${REGISTER[@]+"${REGISTER[@]}"}"; do
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$OPS_PYTHON" -m gpt2ops.register "$name" \
      --config "$CONFIG" --run-dir "$RUN_DIR" ${1:+"$1"} || return 1
  done
}

REUSED=0
PREFLIGHT=(preflight --config "$CONFIG" --run-dir "$RUN_DIR")
[[ "$REUSE" == 1 ]] && PREFLIGHT+=(--reuse)
ops "${PREFLIGHT[@]}" || REUSED=$?
if [[ "$REUSED" == 3 ]]; then  # a healthy server from this run directory: keep it
  register_all --replace
  exit $?
elif [[ "$REUSED" != 0 ]]; then
  exit "$REUSED"
fi

need torchserve "run make venv (it installs torchserve==0.12.0 into .venv), or install requirements-serve.txt"
need java "TorchServe's frontend needs Java 17 (e.g. apt-get install openjdk-17-jre-headless)"
# The frontend starts from <run-dir>/frontend, rebuilt read-only at each start with nothing but TorchServe
# 0.12.0's Model.class and WorkerThread.class corrected (a customized describe cannot wedge the model; a
# worker that dies between two calls no longer drops its open jobs), and key_file.json
# (a link to <run-dir>/key_file.json): Java's class path begins with the working directory
# (gpt2ops/frontend_patch.py; docs/engine.md, Traps). Refuses to start with any other TorchServe.
FRONTEND_DIR="$(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$OPS_PYTHON" -m gpt2ops.frontend_patch --run-dir "$RUN_DIR")" \
  || exit 1
cd "$FRONTEND_DIR"
# TMPDIR: TorchServe's pid file; TEMP: the JVM's java.io.tmpdir, where worker sockets live.
export TMPDIR="$RUN_DIR/tmp" TEMP="$RUN_DIR/tmp" LOG_LOCATION="$RUN_DIR/logs" METRICS_LOCATION="$RUN_DIR/logs"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ARGS=(--start --ncs --ts-config "$CONFIG" --model-store "$MODEL_STORE")
[[ -n "${TS_LOG_CONFIG:-}" ]] && ARGS+=(--log-config "$TS_LOG_CONFIG")
LOG_FROM=0  # ts_log.log grows across starts: only what this start writes counts
[[ -f "$RUN_DIR/logs/ts_log.log" ]] && LOG_FROM="$(wc -c <"$RUN_DIR/logs/ts_log.log")"
: >"$RUN_DIR/logs/torchserve.out"

if [[ "$FOREGROUND" == 1 ]]; then
  export GPT2_DRAIN_FILE="$RUN_DIR/tmp/draining"  # read by the workers (handler/serving/drain.py)
  rm -f "$GPT2_DRAIN_FILE" "$GPT2_DRAIN_FILE.idle"
  DRAIN_MODEL="${REGISTER[0]:-${MODEL_NAME:-}}"
  torchserve "${ARGS[@]}" --foreground &
  TS_PID=$!
  stop_server() {  # what `torchserve --stop` does (SIGTERM to the frontend), without its Python start-up
    local frontend
    frontend="$(cat "$RUN_DIR/tmp/.model_server.pid" 2>/dev/null || true)"
    if [[ -n "$frontend" ]] && kill -TERM "$frontend" 2>/dev/null; then :; else
      torchserve --stop >/dev/null 2>&1 || kill "$TS_PID" 2>/dev/null || true
    fi
    wait "$TS_PID" || true
  }
  # Drain (handler/serving/drain.py): the deadline goes into the drain file; the worker refuses new requests,
  # ends what is still open at the deadline and writes <drain file>.idle once it holds nothing. An idle worker
  # gets no call by itself: healthcheck.sh's report request pokes it every second. At most 2 s past the deadline.
  drain_and_stop() {
    trap '' TERM INT
    local now_us deadline_us poke_us=0
    now_us="${EPOCHREALTIME/./}"
    deadline_us=$((now_us + ${TS_DRAIN_SECONDS:-4} * 1000000))
    rm -f "$GPT2_DRAIN_FILE.idle"
    printf '%d.%06d\n' $((deadline_us / 1000000)) $((deadline_us % 1000000)) >"$GPT2_DRAIN_FILE"
    while [[ ! -e "$GPT2_DRAIN_FILE.idle" ]]; do
      now_us="${EPOCHREALTIME/./}"
      if ((now_us >= deadline_us + 2000000)); then
        echo "drain: requests still open 2 s past the deadline; stopping"
        break
      fi
      if [[ -n "$DRAIN_MODEL" ]] && ((now_us >= poke_us)); then
        "$REPO/scripts/healthcheck.sh" --run-dir "$RUN_DIR" --config "$CONFIG" --model "$DRAIN_MODEL" \
          >/dev/null 2>&1 &
        poke_us=$((now_us + 1000000))
      fi
      sleep 0.1
    done
    [[ -e "$GPT2_DRAIN_FILE.idle" ]] && echo "drained in $(( (${EPOCHREALTIME/./} - deadline_us) / 1000 + ${TS_DRAIN_SECONDS:-4} * 1000 )) ms"
    echo "stopping TorchServe"
    stop_server
    echo "TorchServe stopped $(( (${EPOCHREALTIME/./} - deadline_us) / 1000 + ${TS_DRAIN_SECONDS:-4} * 1000 )) ms after the signal"
    exit 0
  }
  trap drain_and_stop TERM INT
  # in the background, so that a signal during the start is handled at once (bash runs traps between commands)
  ops wait-up --config "$CONFIG" --run-dir "$RUN_DIR" --pid "$TS_PID" --log-from "$LOG_FROM" &
  if ! wait $! || ! register_all; then
    stop_server
    exit 1
  fi
  wait "$TS_PID"
  exit $?
fi

LAUNCH_RC=0
torchserve "${ARGS[@]}" >"$RUN_DIR/logs/torchserve.out" 2>&1 || LAUNCH_RC=$?
ops wait-up --config "$CONFIG" --run-dir "$RUN_DIR" --launch-rc "$LAUNCH_RC" --log-from "$LOG_FROM" || exit 1
register_all
