"""Every command in the ```bash blocks of README.md and docs/*.md runs as written from a fresh clone after `make run`.

Here, without a server: each command's script exists, is called with the project environment
(`.venv/bin/python`, or a script that finds `.venv` itself), answers `--help`, and knows every option
the page passes; each `make` target exists. The blocks that talk to the `make run` server run against a real
TorchServe in tests/e2e/test_readme_live.py. Commands that need the Hugging Face Hub, a GPU, Docker, a cluster
or minutes (benchmarks) cannot run on this machine: for those the invocation alone is checked (tests/readme.py
says which). The memory tables are checked against plan_memory.py in tests/test_docs.py.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest

from tests.readme import REPO, bash_blocks, options, words

COMMANDS = [(f"{block.page}: {block.heading}", command) for block in bash_blocks() for command in block.commands()]
PYTHON = REPO / ".venv" / "bin" / "python"
ASSIGNMENT = re.compile(r"^[A-Z_]+=\$\((.*)\)$")


def python() -> str:
    """The README's `.venv/bin/python`: the project environment `make test` runs in."""
    return str(PYTHON) if PYTHON.exists() else sys.executable


@functools.lru_cache(maxsize=None)
def help_text(program: str) -> str:
    if program.startswith("-m "):  # a module run from the checkout: python -m benchmarks.decode
        argv = [python(), "-m", program[3:]]
    else:
        argv = [python(), program] if program.endswith(".py") else [str(REPO / program)]
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # as in a fresh shell: nothing of the project on PATH
    proc = subprocess.run([*argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{program} --help failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*):", text, flags=re.M)}


def dockerfile_args() -> set[str]:
    text = (REPO / "Dockerfile").read_text()
    return set(re.findall(r"^ARG (\w+)", text, flags=re.M))


def test_the_readme_has_commands_to_check():
    headings = {heading for heading, _ in COMMANDS}
    assert len(COMMANDS) >= 20 and len(headings) >= 5, COMMANDS
    assert {heading.split(":")[0] for heading in headings} >= {"README.md", "api.md", "security.md", "docker.md",
                                                                "kubernetes.md", "memory.md"}, headings


def test_blocks_inside_numbered_steps_are_read():
    """A block indented under a numbered step is a block too (dedented), and an unindented fence closes only
    an unindented block."""
    text = "# T\n\n1. Do:\n\n   ```bash\n   make run   # x\n   curl http://127.0.0.1:8080/ping\n   ```\n"
    [block] = bash_blocks(text, "x.md")
    assert block.commands() == ["make run   # x", "curl http://127.0.0.1:8080/ping"] and block.page == "x.md"


@pytest.mark.parametrize("heading, command", COMMANDS, ids=[f"{h[:30]}: {c[:50]}" for h, c in COMMANDS])
def test_readme_command_invocation(heading, command):
    w = words(command)
    assert w[0] not in ("python", "python3", "pip", "torchserve", "torch-model-archiver"), (
        f"{command!r} runs a tool outside the project environment: use .venv/bin/... or a script")
    inner = ASSIGNMENT.match(command)
    if inner:  # KEY=$(...): scripts/keys.py prints a key; in a container, python3 reads its key_file.json
        iw = words(inner.group(1))
        assert iw[0] in (".venv/bin/python", "docker", "kubectl"), command
        if iw[0] == ".venv/bin/python":
            assert iw[1] == "scripts/keys.py" and iw[2] == "--print", command
            assert iw[3] in ("inference", "management", "API") and "--print" in help_text("scripts/keys.py"), command
        if iw[0] == "docker":
            assert iw[1] == "exec" and "import json" in iw[-1] and "key_file.json" in iw[-1], command
        return
    assert not re.search(r"(?<![\w/])run/key_file\.json", command), (
        f"{command!r} reads a relative run/key_file.json: read the key with scripts/keys.py, from any directory")
    if w[0] == "make":
        missing = {t for t in w[1:] if "=" not in t} - makefile_targets()
        assert not missing, f"Makefile has no target {missing}"
    elif w[0] == ".venv/bin/python":
        module = w[2] if w[1] == "-m" else None
        script = module.replace(".", "/") + ".py" if module else w[1]
        assert (REPO / script).is_file(), f"{script} does not exist"
        unknown = [o for o in options(command) if o not in help_text(f"-m {module}" if module else script)]
        assert not unknown, f"{script} --help does not know {unknown}"
    elif w[0].startswith("scripts/"):
        script = REPO / w[0]
        assert script.is_file() and os.access(script, os.X_OK), f"{w[0]} is not an executable script"
        unknown = [o for o in options(command) if o not in help_text(w[0])]
        assert not unknown, f"{w[0]} --help does not know {unknown}"
    elif w[0] == "docker":  # no Docker engine here: the build arguments must be the Dockerfile's
        build_args = [w[n + 1].split("=", 1)[0] for n, x in enumerate(w) if x == "--build-arg"]
        assert set(build_args) <= dockerfile_args(), build_args
    elif w[0] == "kubectl":  # no cluster here: the manifests it applies are rendered and validated in test_k8s_manifests.py
        missing = [x for x in w[1:] if x.startswith("deploy/") and not (REPO / x).exists()]
        assert not missing, f"{command!r} names paths that do not exist: {missing}"
    elif w[0] == "curl":  # run against a real server in tests/e2e/test_readme_live.py (or need Docker)
        assert any(x.startswith("http://127.0.0.1:") for x in w), command
    elif w[0] == "helm":  # no cluster here: the values file it passes must exist
        missing = [x for x in w[1:] if x.startswith("deploy/") and not (REPO / x).exists()]
        assert not missing, f"{command!r} names paths that do not exist: {missing}"
    elif w[0] == "until":  # a wait-until-ready loop: on Docker's health status
        assert "docker inspect" in command and "healthy" in command and "sleep" in command, command
    elif w[0] == "seq":  # a load loop: its requests go to a local port
        assert "curl" in w and any(x.startswith("http://127.0.0.1:") for x in w), command
    else:
        pytest.fail(f"the README runs {w[0]!r}, which this test does not know how to check: {command}")
