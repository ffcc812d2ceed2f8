"""Operator failures against a real TorchServe: each fails fast, in one line naming the cause and the next step.

Busy ports and start-up deaths (scripts/serve.sh, `make serve`), a second start from the same run
directory, `make run` a second time, registrations whose worker cannot start (register.py and
`serve.sh --register`), keys that are not the server's, and `make stop` returning only once the
processes are gone. The session server (tests/e2e/conftest.py) serves every test that leaves it as it
was; `make stop` gets a server of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpt2ops.client import read_keys
from gpt2ops.local_server import REPO, build_archive, free_port, model_config, script_env, start_server
from gpt2ops.serverctl import frontend
from tests.e2e.conftest import MODEL
from tests.test_ops_failures import one_error_line


def run(argv: list[str], timeout: float = 60, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**script_env(), **(env or {})})
    return proc, time.monotonic() - start


def make(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    return run(["make", "--no-print-directory", *args], timeout=timeout)


def server_vars(server, store: Path) -> list[str]:
    """make's variables for the session server (as `make run` has them for run/ and config.properties)."""
    return [f"RUN_DIR={server.run_dir}", f"TS_CONFIG={server.config}", f"MODEL_STORE={store}"]


def config_with(tmp_path: Path, **values) -> Path:
    """The repo's config.properties on free loopback ports, with `values` replacing keys."""
    text = (REPO / "config.properties").read_text()
    ports = {"inference_address": f"http://127.0.0.1:{free_port()}",
             "management_address": f"http://127.0.0.1:{free_port()}",
             "metrics_address": f"http://127.0.0.1:{free_port()}",
             "grpc_inference_port": free_port(), "grpc_management_port": free_port()}
    for key, value in {**ports, **values}.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
    config = tmp_path / "config.properties"
    config.write_text(text)
    return config


@pytest.fixture()
def stop_afterwards():
    """Run directories to stop at the end, whatever happened (a test must not leave a TorchServe behind)."""
    run_dirs: list[Path] = []
    yield run_dirs
    for run_dir in run_dirs:
        subprocess.run([str(REPO / "scripts" / "stop.sh"), "--run-dir", str(run_dir)], capture_output=True,
                       timeout=120, env=script_env())


# ---- starting ----

def test_busy_port_fails_before_starting_and_names_the_holder(tmp_path, model_store, stop_afterwards):
    """make serve while another program holds the inference port: was a silent 3 min 17 s, then a log without the cause."""
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        config = config_with(tmp_path, inference_address=f"http://127.0.0.1:{port}")
        run_dir = tmp_path / "run"
        stop_afterwards.append(run_dir)
        proc, seconds = make("serve", f"RUN_DIR={run_dir}", f"TS_CONFIG={config}", f"MODEL_STORE={model_store}")
    finally:
        holder.terminate()
        holder.wait(10)
    line = one_error_line(proc)
    assert seconds < 20, seconds
    assert f"port {port} on 127.0.0.1 (inference_address in {config})" in line, line
    assert f"pid {holder.pid} (" in line and "http.server" in line, line  # who holds it
    assert "stop that program, or give inference_address another port" in line, line
    assert frontend(run_dir) is None  # nothing was started


def test_port_held_by_another_torchserve_names_its_run_dir(server, tmp_path, model_store, stop_afterwards):
    """Another checkout's `make run` holds the port: say which server it is and how to stop it."""
    config = config_with(tmp_path, management_address=server.client.management_url)
    run_dir = tmp_path / "run"
    stop_afterwards.append(run_dir)
    proc, seconds = run([str(REPO / "scripts" / "serve.sh"), "--config", str(config), "--run-dir", str(run_dir),
                         "--model-store", str(model_store)])
    line = one_error_line(proc)
    port = server.client.management_url.rsplit(":", 1)[1]
    assert f"port {port} on 127.0.0.1 (management_address in {config})" in line, line
    assert f"a TorchServe frontend (pid {frontend(server.run_dir).pid}, started from {server.run_dir})" in line, line
    assert f"stop it with scripts/stop.sh --run-dir {server.run_dir}" in line, line
    assert seconds < 10 and server.client.ping()


def test_torchserve_dying_at_start_is_reported_at_once_with_its_reason(tmp_path, model_store, stop_afterwards):
    """A config TorchServe refuses: its own line from torchserve.out, as soon as it exits (was: 180 s, then 'see ts_log.log')."""
    config = config_with(tmp_path, inference_address="http://127.0.0.1:notaport")
    run_dir = tmp_path / "run"
    stop_afterwards.append(run_dir)
    proc, seconds = run([str(REPO / "scripts" / "serve.sh"), "--config", str(config), "--run-dir", str(run_dir),
                         "--model-store", str(model_store)], timeout=90)
    line = one_error_line(proc)
    assert seconds < 30, seconds
    assert "TorchServe stopped while starting: Invalid configuration: Invalid binding address" in line, line
    assert str(run_dir / "logs" / "torchserve.out") in line, line


def test_second_start_from_the_same_run_dir_says_what_runs_and_how_to_stop_it(server):
    """scripts/serve.sh while its server runs: was exit 1 with no output."""
    keys = read_keys(server.run_dir / "key_file.json")
    proc, seconds = run([str(REPO / "scripts" / "serve.sh"), "--config", str(server.config),
                         "--run-dir", str(server.run_dir)])
    line = one_error_line(proc)
    pid = frontend(server.run_dir).pid
    assert f"TorchServe is already running from {server.run_dir} (pid {pid}, {server.client.inference_url})" in line
    assert f"scripts/stop.sh --run-dir {server.run_dir}" in line, line
    assert seconds < 10
    assert read_keys(server.run_dir / "key_file.json") == keys and server.client.ping()  # left alone


def test_make_run_again_reuses_the_server_and_replaces_the_model(server, model_store):
    """`make run` a second time: was a silent restart (new keys, other models gone); now it says it reuses it.

    On the session server, with a copy of the archive under another name, so that the other tests' model stays.
    """
    name = "tiny-again"
    shutil.copy(model_store / f"{MODEL}.mar", model_store / f"{name}.mar")
    # the steps of `make run` that meet the running server (archive only rebuilds the .mar; query asks it)
    steps = ["serve", "register", f"MODEL_NAME={name}", *server_vars(server, model_store)]
    first, _ = make(*steps)
    try:
        assert first.returncode == 0, first.stderr
        keys, pid = read_keys(server.run_dir / "key_file.json"), frontend(server.run_dir).pid
        worker = server.workers(name)[0]["pid"]
        again, seconds = make(*steps)
        assert again.returncode == 0, again.stderr
        output = again.stdout + again.stderr
        assert f"TorchServe is already running from {server.run_dir} (pid {pid}" in output and "reusing it" in output
        assert f"{name} was registered already: replaced it with {name}.mar" in output, output
        assert read_keys(server.run_dir / "key_file.json") == keys and frontend(server.run_dir).pid == pid
        assert server.workers(name)[0]["pid"] != worker  # the archive just built is the one served
        assert server.client.is_registered(MODEL)  # the other models stay
        assert server.client.generate(name, "hi", max_new_tokens=2)["completion_tokens"] == 2
    finally:
        server.client.unregister(name)


# ---- registration ----

@pytest.fixture(scope="module")
def broken_archives(tiny_model_dir, model_store, tmp_path_factory):
    """Archives whose worker cannot start: a handler key typo, batchSize 0, a handler with a syntax error."""
    typo = model_config(stop_check_intervall=4)
    zero = model_config()
    zero["batchSize"] = 0
    build_archive(tiny_model_dir, "tiny-typo", model_store, typo)
    build_archive(tiny_model_dir, "tiny-batch0", model_store, zero)
    src = tmp_path_factory.mktemp("broken")
    (src / "broken_handler.py").write_text("def handle(data, context)\n    return data\n")
    subprocess.run([str(Path(sys.executable).parent / "torch-model-archiver"), "--model-name", "tiny-syntax",
                    "--version", "1.0", "--handler", str(src / "broken_handler.py"), "--export-path",
                    str(model_store), "--force"], check=True, capture_output=True, timeout=120)
    return model_store


# what the worker's message must name (the handler's own wording is the handler's business)
WORKER_ERRORS = {
    "tiny-typo": ("ValueError", "stop_check_intervall"),
    "tiny-batch0": ("ValueError", "batchSize"),
    "tiny-syntax": ("SyntaxError", "(broken_handler.py, line 1)"),
}


@pytest.mark.parametrize("name", sorted(WORKER_ERRORS))
def test_registration_says_why_the_worker_did_not_start(server, broken_archives, name):
    """Was a bare 500 "Failed to start workers"; the worker's own message was only in model_log.log."""
    proc, seconds = run([sys.executable, str(REPO / "scripts" / "register.py"), name, "--config", str(server.config),
                         "--run-dir", str(server.run_dir)])
    line = one_error_line(proc)
    exception, words = WORKER_ERRORS[name]
    assert "Failed to start workers" in line and f"the worker said: {exception}: " in line and words in line, line
    assert f"full log: {server.run_dir / 'logs' / 'model_log.log'}" in line, line
    assert seconds < 30
    assert not server.client.is_registered(name)


def test_serve_sh_register_says_why_the_worker_did_not_start(server, broken_archives):
    proc, _ = run([str(REPO / "scripts" / "serve.sh"), "--reuse", "--register", "tiny-typo", "--config",
                   str(server.config), "--run-dir", str(server.run_dir), "--model-store", str(broken_archives)])
    assert proc.returncode == 1 and "reusing it" in proc.stdout
    line = one_error_line(proc)
    assert "the worker said: ValueError: " in line and "stop_check_intervall" in line, line


# ---- keys ----

def test_keys_of_another_server_say_which_header_and_file(server, tmp_path):
    """A key file the server does not know (wrong --run-dir): one line with the header and where the key is."""
    (tmp_path / "key_file.json").write_text(json.dumps({k: {"key": f"not-{k}"} for k in ("inference", "management",
                                                                                         "API")}))
    proc, _ = run([sys.executable, str(REPO / "scripts" / "query.py"), "hi", "--config", str(server.config),
                   "--run-dir", str(tmp_path)])
    line = one_error_line(proc)
    assert "InvalidKeyException" in line and "renewing it with the API key" in line, line
    assert "Authorization: Bearer <key>" in line and f"in {tmp_path / 'key_file.json'}" in line, line
    assert "--run-dir" in line, line


def test_client_error_for_a_refused_key_names_header_and_key_file(server):
    import requests

    r = requests.post(f"{server.client.inference_url}/predictions/{MODEL}", json={"prompt": "hi"}, timeout=30)
    message = str(server.client.error(r, "generation"))
    assert r.status_code == 400 and "InvalidKeyException" in message
    assert "`Authorization: Bearer <key>` with the inference key" in message
    assert str(server.run_dir / "key_file.json") in message


# ---- stopping ----

def test_make_stop_returns_once_the_processes_are_gone(tmp_path, model_store, stop_afterwards):
    """Was "TorchServe has stopped." while the frontend and its worker ran on for seconds."""
    srv = start_server(tmp_path, model_store)
    stop_afterwards.append(srv.run_dir)
    srv.client.register(f"{MODEL}.mar", MODEL)
    front = frontend(srv.run_dir)
    processes = [front, *front.children(recursive=True)]
    assert len(processes) >= 2  # the frontend and the worker
    proc, seconds = make("stop", f"RUN_DIR={srv.run_dir}")
    assert proc.returncode == 0, proc.stderr
    still = [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not still, f"make stop returned while {still} still run"
    assert f"stopped TorchServe from {srv.run_dir}" in proc.stdout
    assert not (srv.run_dir / "key_file.json").exists()  # the keys of a stopped server are gone with it
    again, _ = make("stop", f"RUN_DIR={srv.run_dir}")
    assert again.returncode == 0 and f"no TorchServe is running from {srv.run_dir}" in again.stdout
