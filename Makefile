# make run   save the tiny model, archive it, start TorchServe, register, ask "你是谁?" (server keeps running).
#            A second `make run` reuses the server already running from $(RUN_DIR) when it answers /ping
#            (same keys, other registered models stay) and replaces $(MODEL_NAME) with the archive just built.
# make stop  stop that server; returns once its processes are gone
# make keys  print that server's keys and when they expire; make renew-keys: new inference and management keys
# make test  the whole test suite (what CI runs); its fuzz tests replay tests/fuzz-examples/ and a fixed seed;
#            installs transformers 4.55.4 into .hf455/ first (the contrastive-search parity test's baseline)
# make fuzz  fresh fuzz inputs for FUZZ_MINUTES (default 10); failures saved in tests/fuzz-examples/ (commit them)
# make mutants  the mutation check (scripts/mutants.py): killed/survived per committed mutant; not part of CI
# make gpu-wheels  (a machine with network) the wheels a GPU machine lacks, into .whl/: TorchServe's `ts`, and
#            transformers 4.55.4 for the contrastive-search baseline; carry .whl/ with the tree
# make gpu-report  (a machine with an NVIDIA GPU, PyTorch and transformers; no TorchServe, no network) installs
#            .whl/ into throwaway folders, runs the GPU tests, memory, speed and the self-check, and writes
#            gpu-report.md and gpu-report.json within 8 minutes; exit 1 when a check fails, 2 without CUDA
# make image  builds the serving image as users build it (docker build; the Docker engine on DOCKER_HOST);
#            IMAGE_MODEL_DIR / IMAGE_MODEL_NAME: the saved model built in (default: the tiny model)
# make image-test  builds the image and runs it for real (tests/image): a private dockerd is started when none
#            answers (and stopped after), a stand-in base is made with debootstrap when the real one cannot be
#            pulled; prints build time, image size, cold start to the first answer and the stop time. Needs root
#            (Debian's docker.io and debootstrap are installed when missing) and ~15 GB of disk; not part of make test
# make quality  repetition and diversity of each decoding mode on the tiny model (benchmarks/quality.py)
# make dashboard  the Grafana dashboard's picture (docs/images/dashboard.png) drawn from its own queries against a
#            real Prometheus scraping a fresh server under a minute of load, and the figures behind the alerts
#            (scripts/dashboard_preview.py; docs/metrics.md)
# make eval  lm-evaluation-harness (eval/tasks/: a loglikelihood and a generate_until task) against `make run`'s
#            server, or a fresh one when none answers; its loglikelihoods checked against transformers (float32)
# make soak  20,000 mixed requests (hang-ups and bad ones included) against a fresh server, the worker's memory
#            and open files sampled (benchmarks/soak.py; CI runs 3,000 in tests/e2e/test_soak.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_NAME ?= tiny-gpt2
MODEL_DIR ?= artifacts/models/$(MODEL_NAME)
RUN_DIR ?= run
TS_CONFIG ?= config.properties
MODEL_STORE ?= model_store
PROMPT ?= 你是谁?
HF455 := .hf455

export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: dashboard eval keys renew-keys image image-test image-packages image-check mutants fuzz run stop test venv model archive serve register query bench bench-hf quality soak clean system-packages gpu-wheels gpu-report

$(BIN)/.installed: requirements.txt requirements-k8s-test.txt requirements-eval.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-k8s-test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-eval.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Debian's nginx and envsubst, for the end-to-end test of the Kubernetes pod's auth proxy
# (tests/e2e/test_k8s_auth_proxy.py), and Debian's prometheus (2.42), which the metrics test runs on loopback
# (tests/e2e/test_prometheus.py; the package's own service is not needed and, without systemd, not started).
# Installed only when missing; as root here and on CI, else with sudo.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-packages:
	@if [ -x /usr/sbin/nginx ] && command -v envsubst >/dev/null && [ -x /usr/bin/prometheus ]; then :; else \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx gettext-base \
	    prometheus; \
	fi

venv: $(BIN)/.installed system-packages

# the tiny model is trained on the corpus (about 25 s): again when the corpus or the training code changes
$(MODEL_DIR)/model.safetensors: data/corpus.txt gpt2ops/tiny_model.py | venv
	$(BIN)/python scripts/save_model.py --tiny --out $(MODEL_DIR)

model: $(MODEL_DIR)/model.safetensors

archive: model
	scripts/archive.sh $(MODEL_DIR) $(MODEL_NAME) $(MODEL_STORE)

# --reuse: a healthy server from $(RUN_DIR) is kept (and says so); a busy port or a dead start fails in one line
serve: venv
	scripts/serve.sh --reuse --run-dir $(RUN_DIR) --config $(TS_CONFIG) --model-store $(MODEL_STORE)

# --replace: a model registered already is replaced by the archive just built (and says so)
register: venv
	$(BIN)/python scripts/register.py $(MODEL_NAME) --replace --run-dir $(RUN_DIR) --config $(TS_CONFIG)

query: venv
	$(BIN)/python scripts/query.py "$(PROMPT)" --model $(MODEL_NAME) --run-dir $(RUN_DIR) --config $(TS_CONFIG) --json

run: archive serve register query
	@echo
	@echo "TorchServe keeps running (stop it with: make stop). Query it yourself:"
	@echo "  KEY=\$$($(BIN)/python scripts/keys.py --print inference)   # keys live 60 min: make renew-keys"
	@echo "  curl -X POST http://127.0.0.1:8080/predictions/$(MODEL_NAME) -H \"Authorization: Bearer \$$KEY\" \\"
	@echo "       -H 'Content-Type: application/json' --data '{\"prompt\": \"你是谁?\"}'"

stop:
	@scripts/stop.sh --run-dir $(RUN_DIR)

# the running server's keys (key file, each key, when it expires); renew-keys: new inference and management keys
keys: venv
	@$(BIN)/python scripts/keys.py --run-dir $(RUN_DIR) --config $(TS_CONFIG)

renew-keys: venv
	@$(BIN)/python scripts/keys.py --renew --run-dir $(RUN_DIR) --config $(TS_CONFIG)

test: venv $(HF455)/.installed
	$(BIN)/python -m pytest -q --durations=25 tests

# transformers 4.55.4 (the last with contrastive search) beside the venv's transformers 5, for the parity test
# (tests/engine/test_hf455_parity.py runs it in a subprocess with PYTHONPATH=.hf455; torch is the venv's)
$(HF455)/.installed: | venv
	rm -rf $(HF455)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --target $(HF455) $(HF_BASELINE_PINS)
	touch $@

# Debian's Docker engine (dockerd, run as root on a private socket by the image test) and debootstrap (the
# stand-in base where no registry answers). Installed only when missing, as `system-packages` does.
image-packages:
	@if command -v dockerd >/dev/null && command -v docker >/dev/null && command -v debootstrap >/dev/null; then :; else \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap; \
	fi

IMAGE_TAG ?= gpt2-contrastive-serve
IMAGE_MODEL_DIR ?= $(MODEL_DIR)
IMAGE_MODEL_NAME ?= $(MODEL_NAME)
image: model
	docker build -t $(IMAGE_TAG) --build-arg MODEL_DIR=$(IMAGE_MODEL_DIR) --build-arg MODEL_NAME=$(IMAGE_MODEL_NAME) .

# exit 0 when the image test can run here, else one line saying why (.ci/run)
image-check: venv
	@$(MAKE) -s image-packages >/dev/null 2>&1 || { echo "cannot install docker.io and debootstrap (apt-get as root)"; exit 1; }
	@$(BIN)/python -m tests.image.docker_engine

image-test: venv model image-packages
	$(BIN)/python -m pytest -q -m image tests/image

bench: venv
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.load

quality: model
	$(BIN)/python -m benchmarks.quality --model-dir $(MODEL_DIR)

eval: venv model
	$(BIN)/python -m gpt2ops.lm_eval_run --model $(MODEL_NAME) --model-dir $(MODEL_DIR) --run-dir $(RUN_DIR) --config $(TS_CONFIG)

soak: venv
	$(BIN)/python -m benchmarks.soak

dashboard: venv model
	$(BIN)/python scripts/dashboard_preview.py --out docs/images/dashboard.png

# transformers 4.55.4, the last release with contrastive search in its core, as the baseline
.venv-hf/bin/.installed:
	$(PYTHON) -m venv .venv-hf
	.venv-hf/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 transformers==4.55.4
	touch $@

bench-hf: .venv-hf/bin/.installed
	.venv-hf/bin/python -m benchmarks.hf_contrastive

# The GPU report. GPU_PYTHON: the GPU machine's Python, the one with CUDA PyTorch (not this project's .venv).
GPU_PYTHON ?= python3
GPU_REPORT_ARGS ?=
TS_PIN := $(shell sed -n 's/^torchserve==//p' requirements-serve.txt)
HF_BASELINE_PINS := transformers==4.55.4 tokenizers==0.21.4 huggingface-hub==0.34.4

gpu-wheels:
	rm -rf .whl/serve .whl/hf
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl/serve torchserve==$(TS_PIN)
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d .whl/hf $(HF_BASELINE_PINS)
	@ls -l .whl/serve .whl/hf

gpu-report:
	$(GPU_PYTHON) -m gpt2ops.gpu_report $(GPU_REPORT_ARGS)

clean: stop
	rm -rf artifacts model_store/*.mar $(RUN_DIR)

# make mutants  the mutation check (scripts/mutants.py): each committed mutant applied to a temporary copy of the
#            tree, its tests run, killed/survived printed; the tree is left as it was. Not part of `make test`.
mutants: venv
	$(BIN)/python scripts/mutants.py $(MUTANTS)

# make fuzz  fresh fuzz inputs (in-process and against a live TorchServe) for FUZZ_MINUTES (default 10); every
#            failure is saved in tests/fuzz-examples/ (commit it: CI replays it, tests/fuzz_profile.py)
FUZZ_MINUTES ?= 10
fuzz: venv
	$(BIN)/python scripts/fuzz.py --minutes $(FUZZ_MINUTES)
