# GPU serving image: TorchServe 0.12 + this package's handler, with one model archive built in.
#
# 1. Save the model on the host (needs the network once; the build itself downloads no model):
#      python scripts/save_model.py --model IDEA-CCNL/Wenzhong-GPT2-110M --out artifacts/models/Wenzhong-GPT2-110M
# 2. Build (MODEL_DIR: the saved folder, inside the build context; MODEL_NAME: the archive and endpoint name):
#      docker build -t gpt2-contrastive-serve \
#        --build-arg MODEL_DIR=artifacts/models/Wenzhong-GPT2-110M --build-arg MODEL_NAME=Wenzhong-GPT2-110M .
# 3. Run, publishing the ports on the host's loopback only:
#      docker run -d --name gpt2 --gpus all -p 127.0.0.1:8080:8080 -p 127.0.0.1:8081:8081 gpt2-contrastive-serve
#      docker exec gpt2 cat /home/ts/app/run/key_file.json      # the inference and management keys
#
# Token authorization stays ON. Inside the container TorchServe binds to 0.0.0.0 (the container's own
# interfaces), which is what lets Docker forward the published ports to it; what keeps the server private
# is the host-side publish to 127.0.0.1. Never publish 8081 (management: register/unregister/scale)
# beyond localhost, and put a TLS proxy in front of 8080 before exposing it.
#
# Ports (all from the config file, TS_CONFIG): 8080 inference, 8081 management, 8082 metrics, and TorchServe's
# gRPC 7070 (inference) and 7071 (management), unused here and bound to the container's loopback. Two servers on
# one network namespace (--network=host) need a config of their own with other ports: mount it and point
# TS_CONFIG at it (`make image-test` does, with free loopback ports).
#
# GPU: torch 2.13.0 (the version the tests run, requirements.txt) as PyPI ships it for Linux x86-64: built for
# CUDA 13.0, its CUDA runtime in the nvidia-*/cuda-toolkit wheels. The host needs an NVIDIA driver of branch
# R580 or newer (CUDA 13.0), a GPU of compute capability 7.5 (Turing) or newer (CUDA 13 dropped Maxwell,
# Pascal and Volta), and the NVIDIA Container Toolkit for `--gpus`. TORCH_INDEX_URL selects another wheel
# source (e.g. https://download.pytorch.org/whl/cu126 for an older driver) with TORCH_CUDA its CUDA version;
# the build fails when the installed torch is not that CUDA build.

# ---------------------------------------------------------------------------------------------------------
# Stage 1: build model_store/<MODEL_NAME>.mar with the repo's own scripts/archive.sh (no torch needed).
FROM python:3.11-slim-bookworm AS archive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
# same pin as requirements-serve.txt (tests/test_dockerfile.py checks it)
RUN pip install --no-cache-dir torch-model-archiver==0.12.0

ARG MODEL_DIR=artifacts/models/Wenzhong-GPT2-110M
ARG MODEL_NAME=Wenzhong-GPT2-110M
WORKDIR /build
COPY handler/ handler/
COPY scripts/archive.sh scripts/env.sh scripts/
COPY model-config.yaml ./
COPY ${MODEL_DIR}/ model/
RUN scripts/archive.sh /build/model "${MODEL_NAME}" /build/model_store

# ---------------------------------------------------------------------------------------------------------
# Stage 2: the serving image.
FROM python:3.11-slim-bookworm AS serve
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG MODEL_NAME=Wenzhong-GPT2-110M

LABEL org.opencontainers.image.title="gpt2-contrastive-serve" \
      org.opencontainers.image.description="TorchServe 0.12 serving a Hugging Face GPT-2 with contrastive decoding on one NVIDIA GPU; token authorization on" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"

# Java 17 for TorchServe's frontend, curl for scripts/healthcheck.sh, tini as PID 1 (forwards SIGTERM
# to scripts/serve.sh, which drains and then stops TorchServe, and reaps orphaned worker processes). gcc, g++
# and libc6-dev for the compiled decode step: on a GPU Triton builds a small C launcher the first time it
# compiles a kernel (gcc; Python's headers are in the base image); on the CPU (compile: on) Inductor writes and
# builds C++ (g++). The slim base has no compiler.
# The man1 folder works around openjdk's postinst on slim images, which drop /usr/share/man.
# DL3008 (pin apt versions) is ignored on purpose: Debian's mirrors keep only the current, security-patched
# version of each package, so an exact pin such as openjdk-17-jre-headless=17.0.x+y-1~deb12u1 stops
# resolving at the next security update and breaks the build; the pinned base image tag (bookworm)
# fixes the major versions, and these packages come from Debian's stable suite only.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl tini gcc g++ libc6-dev \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && java -XX:-UsePerfData -version \
    && gcc --version \
    && g++ --version \
    && rm -rf /tmp/hsperfdata_root

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1

# torch first, from TORCH_INDEX_URL only (default PyPI, which every user reaches; its x86-64 torch==2.13.0 is the
# CUDA 13.0 build), never a CPU build: the assert fails the build when torch is not the TORCH_CUDA build. Then the
# serving pins, which find torch already satisfied. The version is requirements.txt's (tests/test_dockerfile.py).
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_CUDA=13.0
LABEL org.pytorch.version="2.13.0" \
      com.nvidia.cuda.version="${TORCH_CUDA}" \
      com.nvidia.driver.min="R580 (CUDA 13.0; 7.5+ compute capability) with the default TORCH_INDEX_URL"
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && pip install --no-cache-dir -r /tmp/requirements-serve.txt \
    && pip check \
    && python -c "import sys, torch; cuda = torch.version.cuda; sys.exit(0 if cuda and cuda.startswith(sys.argv[1]) else f'torch {torch.__version__} is not a CUDA {sys.argv[1]} build: {cuda}')" "${TORCH_CUDA}" \
    && rm /tmp/requirements-serve.txt

# Non-root user ts (uid 1000; USER below names it by number so that runAsNonRoot-style checks can
# verify it). The application files stay owned by root (read-only to the server), only the run
# directory (keys, logs, pid file, worker sockets, extracted archives) and $HOME are the user's.
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin ts
# The compile caches (Inductor's generated code and FX graphs, Triton's kernels) on a volume of their own, the
# one place under the read-only root (docker run --read-only, the pod's readOnlyRootFilesystem) where the
# compiled step can write: a worker's first start compiles the decode step (tens of seconds per shape); a
# restart that finds the cache compiles in seconds. VOLUME makes `docker run` give it an anonymous volume;
# name one to keep it across containers (-v gpt2-compile-cache:/home/ts/.cache/compile); the Kubernetes
# overlays mount an emptyDir named compile-cache there. Without a writable cache the compiled step falls back
# to eager, with a WARNING and the cause in the model's describe report and the gpt2_decode_step_info metric.
RUN mkdir -p /home/ts/.cache/compile/inductor /home/ts/.cache/compile/triton \
    && chown -R 1000:1000 /home/ts/.cache
VOLUME ["/home/ts/.cache/compile"]
WORKDIR /home/ts/app
COPY handler/ handler/
COPY gpt2ops/ gpt2ops/
COPY scripts/ scripts/
COPY config.properties model-config.yaml log4j2.xml ./
COPY --from=archive /build/model_store/${MODEL_NAME}.mar model_store/

# The container's TorchServe configuration, derived from the repo's config.properties: only the three
# *_address lines change, 127.0.0.1 -> 0.0.0.0, so that Docker's port forwarding reaches the server.
# Everything else (token authorization, enable_model_api, allowed_urls, limits, metrics) is kept as is;
# the grep fails the build if the addresses were not all rewritten.
RUN sed -E 's#^(inference|management|metrics)_address=http://127\.0\.0\.1:#\1_address=http://0.0.0.0:#' \
        config.properties > config.docker.properties \
    && test "$(grep -cE '^(inference|management|metrics)_address=http://0\.0\.0\.0:' config.docker.properties)" -eq 3 \
    && mkdir -p run \
    && chown ts:ts run \
    && chmod 700 run

# RUN_DIR, TS_CONFIG and MODEL_STORE are read by scripts/serve.sh and scripts/healthcheck.sh.
ENV MODEL_NAME=${MODEL_NAME} \
    RUN_DIR=/home/ts/app/run \
    TS_CONFIG=/home/ts/app/config.docker.properties \
    MODEL_STORE=/home/ts/app/model_store \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/home/ts/.cache/compile/inductor \
    TRITON_CACHE_DIR=/home/ts/.cache/compile/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/home/ts/app \
    TS_LOG_CONFIG=/home/ts/app/log4j2.xml \
    TS_DRAIN_SECONDS=4

USER 1000:1000

# 8080 inference, 8081 management, 8082 metrics: publish them on 127.0.0.1 only (see the top of this file).
EXPOSE 8080 8081 8082

# Healthy means ready: scripts/healthcheck.sh passes only once the model's worker answers a request
# (/ping alone is Healthy while the model is still loading). Every 5 s, so that `healthy` follows the first
# answer within seconds (Docker 20.10 has no --start-interval); the start period covers loading and warming
# up the largest model this image is meant for (3.5B parameters in fp16) and compiling the decode step.
HEALTHCHECK --interval=5s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/home/ts/app/scripts/healthcheck.sh"]

# scripts/serve.sh, as in the end-to-end tests: TorchServe in the foreground, the archive registered
# through the management API with the management key once the server is healthy. SIGTERM (docker stop)
# drains: new requests get 503, open streams finish or, TS_DRAIN_SECONDS (4) after the signal, end with a
# final error chunk; then `torchserve --stop`. Keep TS_DRAIN_SECONDS 6 s under `docker stop -t` (default 10):
# the wait past the deadline (at most 2 s) and the frontend's own stop (about 3 s measured here) follow it.
# bash -c only expands $MODEL_NAME and then execs serve.sh (tini's child).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/bin/bash", "-c", "exec /home/ts/app/scripts/serve.sh --foreground --register \"${MODEL_NAME}\""]
