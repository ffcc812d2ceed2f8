"""A Docker engine for `make image-test`: the one that answers, or a private dockerd started for the test.

- DOCKER_HOST (or /var/run/docker.sock) answers: that engine is used and left running.
- Otherwise, as root, Debian's dockerd (`make image-packages` installs docker.io) is started with
  --storage-driver=overlay2 --iptables=false --ip6tables=false --bridge=none on a private socket
  (containers then use --network=host), its data root under IMAGE_TEST_DATA_ROOT (default
  /var/lib/gpt2-image-test: kept, so that the next run finds the pip layer cached), and stopped afterwards.

`docker` is the CLI on PATH, pointed at the engine with DOCKER_HOST.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SOCKET = "unix:///var/run/docker.sock"
PRIVATE_DIR = Path("/run/gpt2-image-test")
DATA_ROOT = Path(os.environ.get("IMAGE_TEST_DATA_ROOT", "/var/lib/gpt2-image-test"))
START_TIMEOUT_S = 60


class EngineUnavailable(RuntimeError):
    """No Docker engine answers and none can be started here (the message says why, in one line)."""


@dataclass
class Engine:
    host: str
    process: subprocess.Popen | None = None  # the private dockerd, when this test started it
    log: Path | None = None
    env: dict = field(default_factory=dict)

    def docker(self, *args: str, timeout: float = 600, check: bool = True, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                **kw)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args[:3])} ... failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        return result

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def _env(host: str) -> dict:
    return {**os.environ, "DOCKER_HOST": host}


def answers(host: str) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], env=_env(host),
                                capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def why_not_startable() -> str | None:
    """None when a private dockerd can be started here, else the reason in a few words."""
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (make image-packages installs Debian's docker.io)"
    if shutil.which("dockerd") is None:
        return "no dockerd on PATH (make image-packages installs Debian's docker.io)"
    if os.geteuid() != 0:
        return "dockerd must be started as root and no Docker engine answers"
    return None


def start_engine() -> Engine:
    for host in filter(None, (os.environ.get("DOCKER_HOST"), DEFAULT_SOCKET)):
        if answers(host):
            return Engine(host, env=_env(host))
    reason = why_not_startable()
    if reason:
        raise EngineUnavailable(reason)
    PRIVATE_DIR.mkdir(parents=True, exist_ok=True)
    host = f"unix://{PRIVATE_DIR}/docker.sock"
    if answers(host):  # a private engine left by an earlier run
        return Engine(host, env=_env(host))
    log = PRIVATE_DIR / "dockerd.log"
    process = subprocess.Popen(
        ["dockerd", "--storage-driver=overlay2", "--iptables=false", "--ip6tables=false", "--bridge=none",
         "-H", host, "--data-root", str(DATA_ROOT), "--exec-root", str(PRIVATE_DIR / "exec"),
         "--pidfile", str(PRIVATE_DIR / "docker.pid")],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(host, process, log, _env(host))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineUnavailable(f"dockerd exited ({process.returncode}): "
                                    f"{log.read_text(errors='replace').strip().splitlines()[-1:]}")
        if answers(host):
            return engine
        time.sleep(0.5)
    engine.stop()
    raise EngineUnavailable(f"dockerd did not answer on {host} within {START_TIMEOUT_S} s; see {log}")


def free_disk_gib(path: Path) -> float:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 2**30


NEEDED_DISK_GIB = 15  # the image (~6 GB), its build layers and the base, on the engine's data root


def why_image_test_cannot_run() -> str | None:
    """None when `make image-test` can run here; else one line saying why (.ci/run prints it)."""
    for host in filter(None, (os.environ.get("DOCKER_HOST"), DEFAULT_SOCKET)):
        if answers(host):
            root = subprocess.run(["docker", "info", "--format", "{{.DockerRootDir}}"], env=_env(host),
                                  capture_output=True, text=True, timeout=20).stdout.strip() or "/var/lib/docker"
            break
    else:
        reason = why_not_startable()
        if reason:
            return reason
        root = str(DATA_ROOT)
    free = free_disk_gib(Path(root))
    if free < NEEDED_DISK_GIB:
        return f"only {free:.1f} GiB free for Docker's data root {root} (the image test needs {NEEDED_DISK_GIB} GiB)"
    return None


if __name__ == "__main__":  # python -m tests.image.docker_engine: exit 0 when the image test can run here
    import sys

    why = why_image_test_cannot_run()
    if why:
        print(why)
    sys.exit(1 if why else 0)
