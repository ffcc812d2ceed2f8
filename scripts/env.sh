# Sourced by the shell scripts (REPO set by the caller): where the tools come from, and how a script fails.
#
# - The project environment (`make venv`: .venv) goes first on PATH when it exists, so that every README
#   command works as written from a fresh clone after `make run`; without it (the Docker image) the
#   tools on PATH are used.
# - `ops ...` runs gpt2ops.serverctl (start-up checks, start-up watch, stop) with this checkout's gpt2ops,
#   without putting the checkout on the path TorchServe's workers inherit.
# - `die MESSAGE` is the scripts' one-line failure: "error: <cause>; <next step>" on stderr, exit 1
#   (the Python tools format theirs in gpt2ops/errors.py).
if [[ -x "$REPO/.venv/bin/python" ]]; then
  PATH="$REPO/.venv/bin:$PATH"
  OPS_PYTHON="$REPO/.venv/bin/python"
else
  OPS_PYTHON="${PYTHON:-python3}"
fi

die() {
  echo "error: $*" >&2
  exit 1
}

need() {  # need COMMAND WHAT-TO-DO
  command -v "$1" >/dev/null 2>&1 || die "$1 not found on PATH; $2"
}

ops() {
  PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$OPS_PYTHON" -m gpt2ops.serverctl "$@"
}

usage() {  # usage SCRIPT: print the script's header comment (its help)
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1"
}
