"""The key commands of the README against a real TorchServe: `scripts/keys.py` (`make keys`) prints the running
server's keys, `--renew` (`make renew-keys`) renews them, and both find the key file by the server's run directory
whatever directory they are run from."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import requests

from gpt2ops import REPO
from gpt2ops.client import read_keys
from gpt2ops.local_server import script_env
from tests.e2e.conftest import MODEL

KEYS = REPO / "scripts" / "keys.py"


def keys_py(server, *args, cwd, run_dir=True):
    env = script_env()
    env.pop("RUN_DIR", None)
    env.pop("TS_CONFIG", None)
    if run_dir:
        env.update(RUN_DIR=str(server.run_dir), TS_CONFIG=str(server.config))
    return subprocess.run([sys.executable, str(KEYS), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def predict(server, key: str) -> requests.Response:
    return requests.post(f"{server.client.inference_url}/predictions/{MODEL}", json={"prompt": "hi", "max_new_tokens": 2},
                         headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_keys_prints_the_running_servers_keys_from_any_directory(server, tmp_path):
    proc = keys_py(server, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    keys = read_keys(server.run_dir / "key_file.json")
    assert f"key file: {server.run_dir / 'key_file.json'}" in proc.stdout
    for kind, key in keys.items():
        [line] = [line for line in proc.stdout.splitlines() if line.startswith(kind + " ")]
        assert key in line and "expires: " in line, line
    written = json.loads((server.run_dir / "key_file.json").read_text())
    assert written["inference"]["expiration time"] in proc.stdout  # TorchServe's own expiry, as it wrote it
    printed = keys_py(server, "--print", "inference", cwd=tmp_path)
    assert printed.returncode == 0 and printed.stdout == keys["inference"] + "\n", printed
    assert predict(server, printed.stdout.strip()).status_code == 200


def test_renew_replaces_the_keys_and_the_old_one_stops_working(server, tmp_path):
    before = read_keys(server.run_dir / "key_file.json")
    proc = keys_py(server, "--renew", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = read_keys(server.run_dir / "key_file.json")
    assert after["inference"] != before["inference"] and after["management"] != before["management"]
    assert after["API"] == before["API"]
    assert after["inference"] in proc.stdout and after["management"] in proc.stdout
    old = predict(server, before["inference"])
    assert old.status_code == 400 and old.json()["type"] == "InvalidKeyException"
    assert predict(server, after["inference"]).status_code == 200
    r = requests.get(f"{server.client.management_url}/models", headers={"Authorization": f"Bearer {after['management']}"},
                     timeout=30)
    assert r.status_code == 200


def test_without_run_dir_the_key_file_is_the_checkouts_run_folder(server, tmp_path):
    """Run from elsewhere with no $RUN_DIR: the file `make run`'s server writes, by its absolute path."""
    proc = keys_py(server, "--print", "inference", cwd=tmp_path, run_dir=False)
    key_file = REPO / "run" / "key_file.json"
    if key_file.exists():  # a `make run` server of this checkout is up
        assert proc.returncode == 0 and proc.stdout.strip() == read_keys(key_file)["inference"]
    else:
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and str(key_file) in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
