"""A real TorchServe on free loopback ports, for the end-to-end tests and the load benchmark.

Archives are built with `scripts/archive.sh` (the real torch-model-archiver) and the
server is started with `scripts/serve.sh`, exactly as `make run` and the Docker image do;
each server lives in its own run directory (keys, logs, pid file, worker sockets).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from gpt2ops.client import TorchServe
from gpt2ops.errors import OpsError

from gpt2ops import REPO


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env() -> dict[str, str]:
    """The test's Python environment first on PATH, so that the scripts find torchserve and friends."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    return env


def model_config(**handler_overrides) -> dict:
    """The repo's model-config.yaml with top-level keys or `handler` keys replaced."""
    config = yaml.safe_load((REPO / "model-config.yaml").read_text())
    for key, value in handler_overrides.items():
        if key in config and key != "handler":
            config[key] = value
        elif isinstance(value, dict) and isinstance(config["handler"].get(key), dict):
            config["handler"][key] = {**config["handler"][key], **value}
        else:
            config["handler"][key] = value
    return config


def build_archive(model_dir: Path, name: str, store: Path, config: dict | None = None) -> Path:
    env = script_env()
    if config is not None:
        config_file = store.parent / f"{name}.model-config.yaml"
        config_file.write_text(yaml.safe_dump(config, allow_unicode=True))
        env["MODEL_CONFIG"] = str(config_file)
    proc = subprocess.run([str(REPO / "scripts" / "archive.sh"), str(model_dir), name, str(store)], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise OpsError(f"scripts/archive.sh failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return store / f"{name}.mar"


@dataclass
class Server:
    client: TorchServe
    run_dir: Path
    config: Path

    def log(self, name: str = "model_log.log") -> str:
        path = self.run_dir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def batch_sizes(self) -> list[int]:
        """Sizes of the batches the handler received, from its log lines."""
        return [int(n) for n in re.findall(r"batch of (\d+) request", self.log())]

    def workers(self, model: str) -> list[dict]:
        """The model's workers as the management API describes them (id, pid, startTime, status)."""
        return self.client.describe(model, customized=False)[0]["workers"]

    def stop(self) -> None:
        subprocess.run([str(REPO / "scripts" / "stop.sh"), "--run-dir", str(self.run_dir)], env=script_env(),
                       capture_output=True, timeout=120)


def write_config(root: Path, **properties) -> Path:
    """root/config.properties: the repo's, on free loopback ports (gRPC too), with `properties` set."""
    text = (REPO / "config.properties").read_text()
    addresses = {
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": free_port(),
        "grpc_management_port": free_port(),
    }
    for key, value in {**addresses, **{k: str(v) for k, v in properties.items()}}.items():
        text, n = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        if n == 0:
            text += f"\n{key}={value}\n"
    config = root / "config.properties"
    config.write_text(text)
    return config


def start_server(root: Path, store: Path, **properties) -> Server:
    """A TorchServe on free loopback ports with the repo's config.properties (+ `properties`)."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = write_config(root, **properties)
    proc = subprocess.run([str(REPO / "scripts" / "serve.sh"), "--config", str(config), "--model-store", str(store),
                           "--run-dir", str(run_dir)], env=script_env(), capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:  # serve.sh's one line: the cause and the next step
        raise OpsError(f"scripts/serve.sh failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    server = Server(TorchServe.from_config(config, run_dir), run_dir, config)
    server.client.timeout = 120
    return server


def java_available() -> bool:
    return shutil.which("java") is not None
