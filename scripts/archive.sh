#!/usr/bin/env bash
# Build model_store/<name>.mar from a saved model folder (scripts/save_model.py) with torch-model-archiver.
#
#   scripts/archive.sh artifacts/models/tiny-gpt2 tiny-gpt2 [model_store]
#
# The archive holds the handler package (handler/), model-config.yaml, the weights,
# config, generation config and tokenizer files. Loading it needs no network and
# installs nothing. --extra-files copies a folder's *contents* to the archive root,
# so the package is staged as <stage>/handler/ and arrives as handler/ next to the
# entry file gpt2_handler.py, which imports it as `handler.*` (as the tests do).
#
# torch-model-archiver comes from the project environment (.venv, `make venv`) when it exists, else
# from PATH. MODEL_CONFIG=FILE archives another model-config.yaml.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/env.sh"
case "${1:-}" in -h|--help) usage "${BASH_SOURCE[0]}"; exit 0 ;; esac
[[ $# -ge 2 ]] || die "usage: scripts/archive.sh MODEL_DIR NAME [EXPORT_DIR]; see scripts/archive.sh --help"
MODEL_DIR="$1"
NAME="$2"
EXPORT_DIR="${3:-$REPO/model_store}"
CONFIG_FILE="${MODEL_CONFIG:-$REPO/model-config.yaml}"

[[ -f "$MODEL_DIR/config.json" ]] || die "$MODEL_DIR/config.json not found; save the model there first (scripts/save_model.py --out $MODEL_DIR)"
ls "$MODEL_DIR"/*.safetensors >/dev/null 2>&1 || die "no .safetensors in $MODEL_DIR; save it with scripts/save_model.py"
[[ -f "$CONFIG_FILE" ]] || die "no model config at $CONFIG_FILE; unset MODEL_CONFIG or point it at a model-config.yaml"
need torch-model-archiver "run make venv (it installs torch-model-archiver==0.12.0 into .venv)"

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/extra" "$STAGE/tmp" "$EXPORT_DIR"
# the handler package with its subpackages (engine/, serving/, memory/), sources only
(cd "$REPO" && find handler -name '*.py' -not -path '*/__pycache__/*' -print0 | xargs -0 cp --parents -t "$STAGE/extra")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
         vocab.json merges.txt added_tokens.json "$MODEL_DIR"/*.safetensors "$MODEL_DIR"/*.safetensors.index.json; do
  src="$f"; [[ "$f" == /* || "$f" == "$MODEL_DIR"/* ]] || src="$MODEL_DIR/$f"
  [[ -f "$src" ]] && cp "$src" "$STAGE/extra/"
done

# torch-model-archiver stages in $TMPDIR/<name> and deletes that folder first: give it its own.
TMPDIR="$STAGE/tmp" torch-model-archiver \
  --model-name "$NAME" --version 1.0 \
  --handler "$REPO/handler/gpt2_handler.py" \
  --extra-files "$STAGE/extra" \
  --config-file "$CONFIG_FILE" \
  --export-path "$EXPORT_DIR" --force
echo "archived $MODEL_DIR -> $EXPORT_DIR/$NAME.mar ($(du -h "$EXPORT_DIR/$NAME.mar" | cut -f1))"
