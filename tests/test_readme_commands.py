"""Every command in the README's ```bash blocks runs as written from a fresh clone after `make run`.

Here, without a server: each command's script exists, is called with the project environment
(`.venv/bin/python`, or a script that finds `.venv` itself), answers `--help`, and knows every option
the README passes; each `make` target exists; the memory table is exactly what its commands print.
The blocks that talk to the `make run` server run against a real TorchServe in
tests/e2e/test_readme_live.py. Commands that need the Hugging Face Hub, a GPU, Docker or minutes
(benchmarks) cannot run on this machine: for those the invocation alone is checked (tests/readme.py
says which).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest

from tests.readme import REPO, README, bash_blocks, options, words

COMMANDS = [(block.heading, command) for block in bash_blocks() for command in block.commands()]
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


@pytest.mark.parametrize("heading, command", COMMANDS, ids=[f"{h[:20]}: {c[:50]}" for h, c in COMMANDS])
def test_readme_command_invocation(heading, command):
    w = words(command)
    assert w[0] not in ("python", "python3", "pip", "torchserve", "torch-model-archiver"), (
        f"{command!r} runs a tool outside the project environment: use .venv/bin/... or a script")
    inner = ASSIGNMENT.match(command)
    if inner:  # KEY=$(...): the key one-liners read key_file.json with the system python3 (json only)
        iw = words(inner.group(1))
        assert iw[0] in ("python3", "docker", "kubectl"), command
        if iw[0] == "python3":
            assert iw[1] == "-c" and "import json" in iw[2] and "key_file.json" in iw[2], command
        return
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
    else:
        pytest.fail(f"the README runs {w[0]!r}, which this test does not know how to check: {command}")


# ---- the memory table ----

TABLE_ROWS = {  # README label -> plan_memory's part
    "CUDA context": "cuda_context",
    "weights": "weights",
    "KV cache": "kv_cache",
    "context hidden states and slots": "context_hidden_and_slots",
    "activations": "activations",
    "CUDA graphs (the step's activations, capture stream's workspace)": "graphs",
    "cuBLAS workspace": "workspaces",
    "allocator slack": "allocator_slack",
    "total": "total",
}


def memory_table() -> tuple[list[str], dict[str, list[float]]]:
    """(the plan_memory commands of the block before the table, {label: [column values]})."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"```bash\n((?:\.venv/bin/python scripts/plan_memory\.py[^\n]*\n)+)```\s*\n"
                  r"(\| part \(MiB per worker\).*?)\n\n", text, flags=re.S)
    assert m, "README: no plan_memory.py block right before the memory table"
    commands = [line for line in m.group(1).splitlines() if line.strip()]
    rows = {}
    for line in m.group(2).splitlines()[2:]:
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(c.replace(",", "")) for c in cells[1:]]
    return commands, rows


def test_readme_memory_table_is_what_its_commands_print():
    commands, rows = memory_table()
    assert set(rows) == set(TABLE_ROWS), sorted(rows)
    assert all(len(values) == len(commands) for values in rows.values()), (commands, rows)
    for column, command in enumerate(commands):
        argv = words(command)
        assert argv[0] == ".venv/bin/python"
        proc = subprocess.run([python(), *argv[1:], "--json"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode in (0, 1), proc.stderr  # 1: does not fit; the table still holds
        parts = json.loads(proc.stdout)["per_worker_mib"]
        for label, part in TABLE_ROWS.items():
            assert rows[label][column] == pytest.approx(round(parts[part], 1), abs=0.05), (
                f"README's {label!r} for `{command}` is {rows[label][column]}, the command prints {parts[part]}")
