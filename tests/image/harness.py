"""What the image test's fixtures and checks share: names, the figures printed at the end, a container."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tests.image import docker_engine

REPO = Path(__file__).resolve().parents[2]
BASE = "python:3.11-slim-bookworm"
IMAGE = "gpt2-contrastive-serve:image-test"
MODEL_DIR = "artifacts/models/tiny-gpt2"  # `make model`; inside the build context
MODEL = "tiny-gpt2"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RUN_DIR = "/home/ts/app/run"
CONFIG_MOUNT = "/etc/gpt2-image-test"
FIGURES: dict[str, str] = {}
PORT_KEYS = {"inference_address": "http://127.0.0.1:{}", "management_address": "http://127.0.0.1:{}",
             "metrics_address": "http://127.0.0.1:{}", "grpc_inference_port": "{}", "grpc_management_port": "{}"}


def say(line: str) -> None:
    print(line, flush=True)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Container:
    engine: docker_engine.Engine
    name: str
    ports: dict[str, int]
    started_at: float  # time.monotonic() just before `docker run`

    @property
    def inference(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference_address']}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics_address']}"

    def key(self, kind: str = "inference") -> str | None:
        out = self.engine.docker("exec", self.name, "cat", f"{RUN_DIR}/key_file.json", check=False, timeout=30)
        if out.returncode != 0:
            return None
        try:
            return json.loads(out.stdout)[kind]["key"]
        except (ValueError, KeyError):
            return None

    def inspect(self, template: str) -> str:
        return self.engine.docker("inspect", "--format", template, self.name, timeout=30).stdout.strip()

    def health(self) -> str:
        return self.inspect("{{if .State.Health}}{{.State.Health.Status}}{{end}}")

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        out = self.engine.docker("logs", self.name, check=False, timeout=60)
        return out.stdout + out.stderr


def wait_for(predicate, timeout: float, every: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s")
