"""The customized describe on the real TorchServe 0.12.0: it answers once and never wedges the model.

`scripts/serve.sh` starts the frontend from <run-dir>/frontend, holding 0.12.0's Model.class corrected so
that the describe job is sent once (gpt2ops/frontend_patch.py). Without it (today's `main`) each test here
fails: after `GET /models/<m>?customized=true` (or gRPC DescribeModel with customized) no prediction is
answered at all. The run directory itself is not on the frontend's class path: this module's server
starts with a broken `ModelServer.class` and 0.12.0's original (wedging) `Model.class` planted in it.
"""

from __future__ import annotations

import json
import stat
import time
import zipfile

import grpc
import pytest
import requests

from gpt2ops.client import read_keys, read_properties
from gpt2ops.frontend_patch import CLASS_ENTRY, CORRECTIONS, FRONTEND_DIR, KEY_FILE, installed_jar
from gpt2ops.local_server import start_server
from gpt2ops.serverctl import frontend
from tests.e2e.conftest import MODEL

ANSWER_WITHIN_S = 2.0
DESCRIBE_RPC = "/org.pytorch.serve.grpc.management.ManagementAPIsService/DescribeModel"


def describe_request(model: str, customized: bool) -> bytes:
    """DescribeModelRequest of the jar's proto/management.proto (model_name = 1, customized = 3), encoded."""
    name = model.encode()
    return bytes([0x0A, len(name)]) + name + (bytes([0x18, 1]) if customized else b"")


def management_response_msg(data: bytes) -> str:
    """ManagementResponse.msg (field 1, a string) of a reply (length as a protobuf varint)."""
    assert data[0] == 0x0A, data[:8]
    length, shift, at = 0, 0, 1
    while True:
        byte = data[at]
        length |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return data[at:at + length].decode()
        shift += 7


@pytest.fixture(scope="module")
def planted(tmp_path_factory, model_store):
    """A TorchServe whose run directory holds class files planted before it started."""
    root = tmp_path_factory.mktemp("planted")
    run_dir = root / "run"
    server_class = run_dir / "org" / "pytorch" / "serve" / "ModelServer.class"
    server_class.parent.mkdir(parents=True)
    server_class.write_bytes(b"not a class: the frontend cannot start if it loads this")
    with zipfile.ZipFile(installed_jar()) as jar:  # the original: it wedges, if it is ever loaded
        (run_dir / CLASS_ENTRY).parent.mkdir(parents=True)
        (run_dir / CLASS_ENTRY).write_bytes(jar.read(CLASS_ENTRY))
    srv = start_server(root, model_store)
    try:
        srv.client.register(f"{MODEL}.mar", MODEL, workers=1)
        yield srv
    finally:
        srv.stop()


def predict_within(client, seconds: float = ANSWER_WITHIN_S) -> dict:
    start = time.monotonic()
    r = requests.post(f"{client.inference_url}/predictions/{MODEL}", json={"prompt": "你是谁?", "max_new_tokens": 4},
                      headers={"Authorization": f"Bearer {client.key('inference')}"}, timeout=seconds)
    assert r.status_code == 200, r.text
    assert time.monotonic() - start < seconds
    return r.json()


@pytest.mark.parametrize("query", ["customized=true", "customized=TRUE", "customized=%74rue"])
def test_rest_customized_describe_answers_the_report_and_the_model_still_serves(planted, query):
    client = planted.client
    r = requests.get(f"{client.management_url}/models/{MODEL}?{query}",
                     headers={"Authorization": f"Bearer {client.key('management')}"}, timeout=ANSWER_WITHIN_S)
    assert r.status_code == 200, r.text
    [description] = r.json()
    report = description["customizedMetadata"]
    assert "memory" in report and report["scheduling"] == "continuous", report
    assert predict_within(client)["completion_tokens"] >= 1


def test_grpc_customized_describe_answers_the_report_and_the_model_still_serves(planted):
    client = planted.client
    port = read_properties(planted.config)["grpc_management_port"]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(DESCRIBE_RPC, request_serializer=None, response_deserializer=None)
        reply = call(describe_request(MODEL, customized=True), timeout=ANSWER_WITHIN_S,
                     metadata=[("authorization", f"Bearer {client.key('management')}")])
    [description] = json.loads(management_response_msg(reply))
    assert "memory" in description["customizedMetadata"], description
    assert predict_within(client)["completion_tokens"] >= 1


def test_the_package_client_never_asks_for_the_customized_describe_by_default(planted):
    [description] = planted.client.describe(MODEL)
    assert "customizedMetadata" not in description
    assert predict_within(planted.client)["completion_tokens"] >= 1


def test_the_frontend_starts_from_a_read_only_folder_holding_only_the_corrected_classes(planted):
    proc = frontend(planted.run_dir)
    assert proc is not None
    cwd = planted.run_dir / FRONTEND_DIR
    assert proc.cwd() == str(cwd)
    files = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if not p.is_dir())
    assert files == sorted([*(fix.entry for fix in CORRECTIONS), KEY_FILE]), files
    assert (cwd / KEY_FILE).resolve() == planted.run_dir / KEY_FILE
    for path in [cwd, *cwd.rglob("*")]:
        if not path.is_symlink():
            assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path
    # the keys still live where every client reads them
    assert set(read_keys(planted.run_dir / KEY_FILE)) >= {"inference", "management", "API"}
