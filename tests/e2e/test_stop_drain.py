"""SIGTERM to scripts/serve.sh --foreground (what `docker stop` and the pod's termination send): nothing is lost.

The server runs as the image runs it (serve.sh in the foreground, the archive registered with the management
key); streams are in flight when the signal comes. Each client gets either its whole answer or a final error
chunk (a stream) or a clean 503 (a request that arrived while draining); none is reset; serve.sh exits 0
within TS_DRAIN_SECONDS plus the bounded wait after it (scripts/serve.sh, handler/serving/drain.py).
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import requests

from gpt2ops.client import TorchServe, read_keys
from gpt2ops.local_server import script_env, write_config
from tests.drain_streams import long_stream, lost, start_streams, summary
from tests.e2e.conftest import MODEL
from gpt2ops import REPO

DRAIN_S = 3  # TS_DRAIN_SECONDS for this test (the image's default is 4, for docker stop's 10 s grace)
AFTER_DEADLINE_S = 2 + 3.5  # serve.sh's wait past the deadline (<= 2 s), then the frontend's stop (~3 s here)
STREAMS = 6


@pytest.fixture()
def foreground(tmp_path, model_store):
    config = write_config(tmp_path)
    run_dir = tmp_path / "run"
    # the output goes to a file: a pipe nobody reads fills (64 KiB) and blocks serve.sh and the frontend
    output = (tmp_path / "serve.out").open("w+")
    proc = subprocess.Popen([str(REPO / "scripts" / "serve.sh"), "--foreground", "--register", MODEL,
                             "--config", str(config), "--model-store", str(model_store), "--run-dir", str(run_dir)],
                            env={**script_env(), "TS_DRAIN_SECONDS": str(DRAIN_S)},
                            stdout=output, stderr=subprocess.STDOUT, text=True)
    client = TorchServe.from_config(config, run_dir)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "key_file.json").exists() and client.ping():
            try:
                client.generate(MODEL, "你是谁?", max_new_tokens=2)
                break
            except Exception:  # noqa: BLE001 - not registered yet
                pass
        time.sleep(0.5)
    assert proc.poll() is None, _read(output)
    yield proc, client, output
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    subprocess.run([str(REPO / "scripts" / "stop.sh"), "--run-dir", str(run_dir)], env=script_env(),
                   capture_output=True, timeout=120)
    output.close()


def _read(output) -> str:
    output.flush()
    output.seek(0)
    return output.read()


def test_sigterm_drains_streams_in_flight_and_refuses_new_requests(foreground):
    proc, client, serve_output = foreground
    key = read_keys(client.key_file)["inference"]
    url = f"{client.inference_url}/predictions/{MODEL}"
    outcomes, events, threads = start_streams(url, key, STREAMS, long_stream(client.report(MODEL)))
    assert events[0].wait(60), "no stream started"
    time.sleep(0.3)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    late = requests.post(url, json={"prompt": "你是谁?", "max_new_tokens": 4},
                         headers={"Authorization": f"Bearer {key}"}, timeout=30)
    rc = proc.wait(DRAIN_S + AFTER_DEADLINE_S + 30)
    stopped_s = time.monotonic() - start
    for thread in threads:
        thread.join(30)
    output = _read(serve_output)
    assert rc == 0, output[-3000:]
    assert not lost(outcomes), f"streams lost: {lost(outcomes)} ({summary(outcomes)})"
    assert late.status_code == 503 and "shutting down" in late.text, (late.status_code, late.text)
    assert stopped_s < DRAIN_S + AFTER_DEADLINE_S, f"stopped {stopped_s:.1f} s after SIGTERM:\n{output[-2000:]}"
    assert "stopping TorchServe" in output, output[-2000:]
