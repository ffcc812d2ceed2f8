"""The serving image, built and run for real (`make image-test`; `make test` leaves these out: marker `image`).

Session fixtures: the Docker engine (tests/image/docker_engine.py), the base image (pulled, or a stand-in built
with debootstrap when no registry answers: scripts/standin_base.sh), the image built from this checkout with the
tiny model, and a way to run containers as the Kubernetes pod runs them (uid 1000, read-only root, tmpfs
volumes only where the pod has volumes, all capabilities dropped, no GPU, --network=host with a mounted
TS_CONFIG whose ports are free loopback ports). The figures measured (build time, image size, cold start to
the first answer, stop time) are printed at the end of the run.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid

import pytest

from gpt2ops.client import parse_properties
from tests.image import docker_engine
from tests.image.harness import (BASE, CA_BUNDLE, CONFIG_MOUNT, FIGURES, IMAGE, MODEL, MODEL_DIR, PORT_KEYS, REPO,
                                 RUN_DIR, Container, free_ports, say)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "image test figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")



@pytest.fixture(scope="session")
def engine():
    try:
        engine = docker_engine.start_engine()
    except docker_engine.EngineUnavailable as err:
        pytest.fail(f"no Docker engine: {err}", pytrace=False)
    FIGURES["docker engine"] = (f"{engine.docker('version', '--format', '{{.Server.Version}}').stdout.strip()} "
                                f"({'private dockerd started for this run' if engine.process else engine.host})")
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def base(engine) -> str:
    """The Dockerfile's base image: pulled, or a stand-in (said in one line)."""
    pulled = engine.docker("pull", BASE, check=False, timeout=120)
    if pulled.returncode == 0:
        FIGURES["base"] = f"{BASE} pulled"
        return BASE
    reason = (pulled.stderr or pulled.stdout).strip().splitlines()[-1:] or ["no answer"]
    present = engine.docker("image", "inspect", "--format", "{{.Comment}}", BASE, check=False)
    if present.returncode == 0 and "stand-in" in present.stdout:
        line = f"{BASE} cannot be pulled ({reason[0][:120]}); using the stand-in built earlier with debootstrap"
    else:
        args = ["--tag", BASE] + (["--ca-bundle", str(CA_BUNDLE)] if CA_BUNDLE.is_file() else [])
        built = subprocess.run([str(REPO / "scripts" / "standin_base.sh"), *args], env=engine.env,
                               capture_output=True, text=True, timeout=1200)
        assert built.returncode == 0, f"the stand-in base failed: {built.stderr[-2000:]}"
        line = f"{BASE} cannot be pulled ({reason[0][:120]}); built a stand-in with debootstrap + docker import"
    say(line)
    FIGURES["base"] = line
    return BASE


@pytest.fixture(scope="session")
def image(engine, base) -> str:
    if not (REPO / MODEL_DIR / "config.json").is_file():
        pytest.fail(f"no tiny model at {MODEL_DIR}: run `make model` first (make image-test does)", pytrace=False)
    start = time.monotonic()
    engine.docker("build", "--network=host", "-t", IMAGE, "--build-arg", f"MODEL_DIR={MODEL_DIR}",
                  "--build-arg", f"MODEL_NAME={MODEL}", str(REPO), timeout=3600)
    FIGURES["build time"] = f"{time.monotonic() - start:.0f} s (layers cached from an earlier build are reused)"
    size = int(engine.docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    FIGURES["image size"] = f"{size / 1e9:.2f} GB"
    return IMAGE


@pytest.fixture(scope="session")
def run_container(engine, image, tmp_path_factory):
    """run_container(env=..., volumes=[...], compile_cache=True) -> Container, run as the pod runs it."""
    made: list[str] = []

    def run(env: dict | None = None, volumes: tuple[str, ...] = (), compile_cache: str | None = "tmpfs",
            pod_start: str | None = None) -> Container:
        """pod_start=NAME: started as the pod starts it (serve.sh --foreground, NAME.mar loaded at start by
        load_models, no registration call, whose client gives up after 300 s); else the image's command."""
        ports = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
        config_dir = tmp_path_factory.mktemp("ts-config")
        props = (REPO / "config.properties").read_text()
        lines = []
        for line in props.splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key}={PORT_KEYS[key].format(ports[key])}" if key in PORT_KEYS else line)
        if pod_start:
            lines.append(f"load_models={pod_start}.mar")
        (config_dir / "config.properties").write_text("\n".join(lines) + "\n")
        assert set(PORT_KEYS) <= set(parse_properties((config_dir / "config.properties").read_text()))
        config_dir.chmod(0o755)
        (config_dir / "config.properties").chmod(0o644)
        name = f"gpt2-image-test-{uuid.uuid4().hex[:8]}"
        args = ["run", "-d", "--name", name, "--network=host", "--user", "1000:1000", "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                # the pod's emptyDirs: the run directory and /tmp (and the compile cache, Deliver 3)
                "--tmpfs", f"{RUN_DIR}:rw,exec,uid=1000,gid=1000,mode=0700",
                "--tmpfs", "/tmp:rw,exec,mode=1777",
                "-v", f"{config_dir}:{CONFIG_MOUNT}:ro", "-e", f"TS_CONFIG={CONFIG_MOUNT}/config.properties"]
        if compile_cache == "tmpfs":
            args += ["--tmpfs", "/home/ts/.cache/compile:rw,exec,uid=1000,gid=1000,mode=0755"]
        elif compile_cache is not None:
            args += ["-v", f"{compile_cache}:/home/ts/.cache/compile:ro"]
        for key, value in (env or {}).items():
            args += ["-e", f"{key}={value}"]
        for volume in volumes:
            args += ["-v", volume]
        started = time.monotonic()
        command = ["/home/ts/app/scripts/serve.sh", "--foreground"] if pod_start else []
        engine.docker(*args, image, *command, timeout=120)
        made.append(name)
        return Container(engine, name, ports, started)

    yield run
    for name in made:
        engine.docker("rm", "-f", "-v", name, check=False, timeout=120)


@pytest.fixture(scope="session")
def curl() -> str:
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is needed for the README's curl", pytrace=False)
    return path
