# make run   save the tiny model, archive it, start TorchServe, register, ask "你是谁?" (server keeps running)
# make stop  stop that server
# make test  the whole test suite (what CI runs)
# make quality  repetition and diversity of each decoding mode on the tiny model (benchmarks/quality.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_NAME ?= tiny-gpt2
MODEL_DIR ?= artifacts/models/$(MODEL_NAME)
RUN_DIR ?= run
PROMPT ?= 你是谁?

export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: run stop test venv model archive serve register query bench bench-hf quality clean

$(BIN)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

venv: $(BIN)/.installed

# the tiny model is trained on the corpus (about 25 s): again when the corpus or the training code changes
$(MODEL_DIR)/model.safetensors: data/corpus.txt gpt2ops/tiny_model.py | venv
	$(BIN)/python scripts/save_model.py --tiny --out $(MODEL_DIR)

model: $(MODEL_DIR)/model.safetensors

archive: model
	scripts/archive.sh $(MODEL_DIR) $(MODEL_NAME)

serve: venv
	@scripts/stop.sh --run-dir $(RUN_DIR) >/dev/null 2>&1 || true
	scripts/serve.sh --run-dir $(RUN_DIR)

register: venv
	$(BIN)/python scripts/register.py $(MODEL_NAME) --run-dir $(RUN_DIR)

query: venv
	$(BIN)/python scripts/query.py "$(PROMPT)" --model $(MODEL_NAME) --run-dir $(RUN_DIR) --json

run: archive serve register query
	@echo
	@echo "TorchServe keeps running (stop it with: make stop). Query it yourself:"
	@echo "  KEY=\$$(python3 -c 'import json; print(json.load(open(\"$(RUN_DIR)/key_file.json\"))[\"inference\"][\"key\"])')"
	@echo "  curl -X POST http://127.0.0.1:8080/predictions/$(MODEL_NAME) -H \"Authorization: Bearer \$$KEY\" \\"
	@echo "       -H 'Content-Type: application/json' --data '{\"prompt\": \"你是谁?\"}'"

stop:
	@scripts/stop.sh --run-dir $(RUN_DIR)

test: venv
	$(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.load

quality: model
	$(BIN)/python -m benchmarks.quality --model-dir $(MODEL_DIR)

# transformers 4.55.4, the last release with contrastive search in its core, as the baseline
.venv-hf/bin/.installed:
	$(PYTHON) -m venv .venv-hf
	.venv-hf/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 transformers==4.55.4
	touch $@

bench-hf: .venv-hf/bin/.installed
	.venv-hf/bin/python -m benchmarks.hf_contrastive

clean: stop
	rm -rf artifacts model_store/*.mar $(RUN_DIR)
