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
# GPU: torch 2.11.0 built for CUDA 12.8 (its CUDA runtime comes in the nvidia-* wheels). The host needs an
# NVIDIA driver of branch R570 or newer (CUDA 12.8; R525+ runs it through CUDA minor-version compatibility)
# and the NVIDIA Container Toolkit for `--gpus`.

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
# to scripts/serve.sh, which stops TorchServe cleanly, and reaps orphaned worker processes). gcc and
# libc6-dev for the compiled decode step (handler.compile: auto): Triton builds a small C launcher the first
# time it compiles a kernel, and the slim base has no C compiler (Python's headers are in the base image).
# The man1 folder works around openjdk's postinst on slim images, which drop /usr/share/man.
# DL3008 (pin apt versions) is ignored on purpose: Debian's mirrors keep only the current, security-patched
# version of each package, so an exact pin such as openjdk-17-jre-headless=17.0.x+y-1~deb12u1 stops
# resolving at the next security update and breaks the build; the pinned base image tag (bookworm)
# fixes the major versions, and these packages come from Debian's stable suite only.
# hadolint ignore=DL3008
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl tini gcc libc6-dev \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && java -version \
    && gcc --version

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1

# torch first, from the PyTorch CUDA 12.8 wheel index only (never a CPU wheel from PyPI; the assert fails the
# build otherwise), then the serving pins, which find torch already satisfied.
COPY requirements-serve.txt /tmp/requirements-serve.txt
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu128 torch==2.11.0 \
    && pip install --no-cache-dir -r /tmp/requirements-serve.txt \
    && pip check \
    && python -c "import torch; assert torch.version.cuda and torch.version.cuda.startswith('12.8'), torch.version.cuda" \
    && rm /tmp/requirements-serve.txt

# Non-root user ts (uid 1000; USER below names it by number so that runAsNonRoot-style checks can
# verify it). The application files stay owned by root (read-only to the server), only the run
# directory (keys, logs, pid file, worker sockets, extracted archives) and $HOME are the user's.
RUN useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin ts
# The compile caches (Inductor's generated code and FX graphs, Triton's kernels) where user ts can write:
# a worker's first start compiles the decode step (tens of seconds per shape); a restart that finds the
# cache compiles in seconds. Mount a volume there to keep it across containers:
#   docker run ... -v gpt2-compile-cache:/home/ts/.cache/compile gpt2-contrastive-serve
RUN mkdir -p /home/ts/.cache/compile/inductor /home/ts/.cache/compile/triton \
    && chown -R 1000:1000 /home/ts/.cache
WORKDIR /home/ts/app
COPY handler/ handler/
COPY gpt2ops/ gpt2ops/
COPY scripts/ scripts/
COPY config.properties model-config.yaml ./
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
    PYTHONPATH=/home/ts/app

USER 1000:1000

# 8080 inference, 8081 management, 8082 metrics: publish them on 127.0.0.1 only (see the top of this file).
EXPOSE 8080 8081 8082

# /ping with the inference key read from $RUN_DIR/key_file.json. The start period covers loading and
# warming up the largest model this image is meant for (3.5B parameters in fp16).
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["/home/ts/app/scripts/healthcheck.sh"]

# scripts/serve.sh, as in the end-to-end tests: TorchServe in the foreground, the archive registered
# through the management API with the management key once the server is healthy; SIGTERM (docker stop)
# runs `torchserve --stop`. bash -c only expands $MODEL_NAME and then execs serve.sh (tini's child).
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["/bin/bash", "-c", "exec /home/ts/app/scripts/serve.sh --foreground --register \"${MODEL_NAME}\""]
