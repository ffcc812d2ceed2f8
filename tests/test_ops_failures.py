"""The operator tools fail fast, in one line that names the cause and the next step (no server needed).

Real subprocesses of the real scripts, real sockets on 127.0.0.1. The failures that need a running
TorchServe (busy ports, a second start, registration, stop, refused keys) are in
tests/e2e/test_ops_failures.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2ops.errors import OpsError, one_line
from gpt2ops.local_server import free_port
from gpt2ops.server_logs import startup_error, worker_error

REPO = Path(__file__).resolve().parents[1]


def run_tool(script: str, *args: str, env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return proc, time.monotonic() - start


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The tool failed with exactly one line on stderr, `error: ...`, and no traceback.

    Under make, make's own `make: *** [Makefile:N: target] Error 1` follows it and is not counted.
    """
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not re.match(r"make(\[\d+\])?: \*\*\* ", line)]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr, lines[0]
    return lines[0]


def config_for(tmp_path: Path, port: int, management_port: int | None = None) -> Path:
    """A config.properties with the inference API on `port`, the management API on `management_port`."""
    config = tmp_path / "config.properties"
    config.write_text(f"inference_address=http://127.0.0.1:{port}\n"
                      f"management_address=http://127.0.0.1:{management_port or free_port()}\n"
                      f"metrics_address=http://127.0.0.1:{free_port()}\n")
    return config


def test_one_line_collapses_a_multi_line_message():
    assert one_line(OpsError("cause\n  spread over\nlines", "next step")) == "error: cause spread over lines; next step"


@pytest.mark.parametrize("tool, args", [("query.py", ["hi"]), ("register.py", ["tiny-gpt2"])])
@pytest.mark.parametrize("key_file", ["missing", "stale"])
def test_no_server_is_one_line_naming_the_address(tmp_path, tool, args, key_file):
    """Nothing listens at the config's address: the key file of a stopped server, or none at all."""
    port, management_port = free_port(), free_port()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if key_file == "stale":
        (run_dir / "key_file.json").write_text(
            '{"inference": {"key": "a"}, "management": {"key": "b"}, "API": {"key": "c"}}')
    config = config_for(tmp_path, port, management_port)
    proc, seconds = run_tool(tool, *args, "--config", str(config), "--run-dir", str(run_dir))
    line = one_error_line(proc)
    # the API the tool calls: register.py the management API once it has a key file
    called = management_port if (tool == "register.py" and key_file == "stale") else port
    assert f"no TorchServe answers at http://127.0.0.1:{called}" in line and "make run" in line, line
    assert seconds < 20


@pytest.mark.parametrize("tool, args", [("query.py", ["hi"]), ("register.py", ["tiny-gpt2"])])
def test_missing_key_file_says_where_it_was_looked_for(tmp_path, tool, args):
    """Something answers at the address, but the run directory has no key_file.json (a wrong --run-dir)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc, _ = run_tool(tool, *args, "--config", str(config_for(tmp_path, port)), "--run-dir", str(tmp_path))
    line = one_error_line(proc)
    assert f"no key file at {tmp_path / 'key_file.json'}" in line, line
    assert "writes key_file.json" in line and "--run-dir" in line, line


def test_registering_more_than_one_worker_warns_of_the_supported_shape(tmp_path):
    """register.py --workers 2: a warning before anything is asked of the server (here none answers), naming the
    supported shape and where the stall is documented; one worker (the other tests here) prints none."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc, _ = run_tool("register.py", "tiny-gpt2", "--workers", "2", "--config", str(config_for(tmp_path, free_port())),
                       "--run-dir", str(run_dir))
    warning, *rest = [line for line in proc.stderr.splitlines() if line.strip()]
    assert warning.startswith("warning: 2 workers of one model: the supported shape is one worker per model per GPU")
    assert "stall a busy worker" in warning and "docs/engine.md, Traps" in warning, warning
    assert proc.returncode == 1 and len(rest) == 1 and rest[0].startswith("error: "), proc.stderr


def test_the_run_dir_and_config_come_from_the_environment_as_for_serve_sh(tmp_path):
    """query.py reads $RUN_DIR and $TS_CONFIG (what scripts/serve.sh uses), so README commands run as written."""
    port = free_port()
    proc, _ = run_tool("query.py", "hi", env={"RUN_DIR": str(tmp_path), "TS_CONFIG": str(config_for(tmp_path, port))})
    assert f"http://127.0.0.1:{port}" in one_error_line(proc)


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_save_model_without_the_hub_fails_fast_in_one_line(tmp_path, offline):
    """The Hub cannot be reached (a closed port stands in for no network): one line in seconds, not 27 s and 99."""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "HF_HUB_OFFLINE": "1" if offline else "0", "TRANSFORMERS_OFFLINE": "0"}
    proc, seconds = run_tool("save_model.py", "--model", "IDEA-CCNL/Wenzhong-GPT2-110M", "--out",
                             str(tmp_path / "out"), env=env, timeout=25)
    line = one_error_line(proc)
    assert seconds < 15, seconds
    assert "IDEA-CCNL/Wenzhong-GPT2-110M" in line and ("HF_HUB_OFFLINE=1" if offline else "cannot be reached") in line
    assert "copy its --out folder" in line and "--model /path/to/folder" in line, line  # the next step
    assert not (tmp_path / "out").exists()


def test_save_model_with_a_missing_local_folder(tmp_path):
    proc, _ = run_tool("save_model.py", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert f"no model folder at {tmp_path / 'nope'}" in one_error_line(proc)


def test_plan_memory_takes_the_model_folder_as_an_argument(tiny_model_dir):
    positional, _ = run_tool("plan_memory.py", str(tiny_model_dir), "--json")
    option, _ = run_tool("plan_memory.py", "--model-dir", str(tiny_model_dir), "--json")
    assert positional.returncode == 0, positional.stderr
    assert positional.stdout == option.stdout


def test_plan_memory_names_a_folder_that_does_not_exist(tmp_path):
    proc, _ = run_tool("plan_memory.py", str(tmp_path / "nope"))
    assert proc.returncode == 2 and f"no model folder or config.json at {tmp_path / 'nope'}" in one_error_line(proc)


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "torch-model-archiver").exists(), reason="needs make venv")
def test_archive_sh_finds_the_project_environment_itself(tiny_model_dir, tmp_path):
    """As the README calls it, from a shell where .venv is not on PATH (was: torch-model-archiver: command not found)."""
    proc = subprocess.run([str(REPO / "scripts" / "archive.sh"), str(tiny_model_dir), "tiny", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tiny.mar").stat().st_size > 100_000


def test_archive_sh_names_a_folder_without_a_model(tmp_path):
    proc = subprocess.run([str(REPO / "scripts" / "archive.sh"), str(tmp_path), "x", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert f"{tmp_path}/config.json not found" in one_error_line(proc)


def test_stop_gives_up_after_its_bound_and_names_what_still_runs(tmp_path):
    """A frontend that ignores SIGTERM (a stand-in with the frontend's class name on its command line)."""
    run_dir = tmp_path / "run"
    (run_dir / "tmp").mkdir(parents=True)
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(120)",
                                 "org.pytorch.serve.ModelServer"], cwd=run_dir, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
        (run_dir / "tmp" / ".model_server.pid").write_text(str(stubborn.pid))
        start = time.monotonic()
        proc = subprocess.run([str(REPO / "scripts" / "stop.sh"), "--run-dir", str(run_dir), "--timeout", "1"],
                              capture_output=True, text=True, timeout=30)
        line = one_error_line(proc)
        assert time.monotonic() - start < 10
        assert f"did not stop within 1 s: a TorchServe frontend (pid {stubborn.pid}" in line, line
        assert f"kill them with: kill -9 {stubborn.pid}" in line, line
        assert stubborn.poll() is None
    finally:
        stubborn.kill()
        stubborn.wait(10)


# ---- the lines quoted from TorchServe's logs (their text as TorchServe 0.12.0 writes it, seen here) ----

BIND_FAILURE = """\
2026-11-25T18:40:09,328 [INFO ] main org.pytorch.serve.ModelServer - Initialize Inference server with: EpollServerSocketChannel.
2026-11-25T18:40:11,383 [INFO ] main org.pytorch.serve.ModelServer - Torchserve stopped.
java.io.IOException: Failed to bind to address: http://127.0.0.1:54893
	at org.pytorch.serve.ModelServer.initializeServer(ModelServer.java:354)
	at org.pytorch.serve.ModelServer.main(ModelServer.java:105)
Caused by: io.netty.channel.unix.Errors$NativeIoException: bind(..) failed: Address already in use
"""
BAD_ADDRESS = """\
nvidia-smi not available or failed: Cannot run program "nvidia-smi": error=2, No such file or directory
2026-11-25T18:40:45,568 [INFO ] main org.pytorch.serve.ModelServer - Torchserve stopped.
Invalid configuration: Invalid binding address: http://127.0.0.1:notaport
Exception in thread "Thread-0" java.lang.NullPointerException: Cannot invoke "org.pytorch.serve.snapshot.SnapshotManager.saveShutdownSnapshot()" because the return value of "org.pytorch.serve.snapshot.SnapshotManager.getInstance()" is null
\tat org.pytorch.serve.ModelServer.stop(ModelServer.java:571)
"""
TAG = "2026-11-25T18:41:21,128 [INFO ] W-9003-broken_1.0-stdout MODEL_LOG - "
SYNTAX_ERROR = "".join(TAG + line + "\n" for line in [
    "Backend worker process died.",
    "Traceback (most recent call last):",
    '  File "/tmp/run/tmp/models/3d89/broken_handler.py", line 1',
    "    def handle(data, context)",
    "                             ^",
    "SyntaxError: expected ':'",
]) + TAG.replace("broken", "other") + "ValueError: not this model's\n"


def test_startup_error_picks_the_cause_out_of_the_console():
    assert startup_error(BIND_FAILURE) == "Failed to bind to address: http://127.0.0.1:54893 (address already in use)"
    assert startup_error(BAD_ADDRESS) == "Invalid configuration: Invalid binding address: http://127.0.0.1:notaport"
    assert startup_error("TorchServe is starting\n") is None


def test_worker_error_is_the_models_last_exception_with_its_place():
    assert worker_error(SYNTAX_ERROR, "broken") == "SyntaxError: expected ':' (broken_handler.py, line 1)"
    assert worker_error(SYNTAX_ERROR, "other") == "ValueError: not this model's"
    assert worker_error(SYNTAX_ERROR, "tiny-gpt2") is None
