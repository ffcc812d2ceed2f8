"""Token authorization on every API, registration only from the local model store, loopback only."""

from __future__ import annotations

import ipaddress

import psutil
import pytest
import requests

from gpt2ops.client import read_keys, read_properties
from tests.e2e.conftest import MODEL

PROMPT = {"prompt": "hi", "max_new_tokens": 2}


def keys(server) -> dict[str, str]:
    return read_keys(server.run_dir / "key_file.json")


def call(server, api: str, key: str | None):
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if api == "inference":
        return requests.post(f"{server.client.inference_url}/predictions/{MODEL}", json=PROMPT, headers=headers,
                             timeout=30)
    return requests.get(f"{server.client.management_url}/models", headers=headers, timeout=30)


@pytest.mark.parametrize("api", ["inference", "management"])
@pytest.mark.parametrize("which", ["none", "wrong", "other-api", "api-key"])
def test_refused_without_the_right_key(server, api, which):
    k = keys(server)
    other = "management" if api == "inference" else "inference"
    key = {"none": None, "wrong": "not-a-key", "other-api": k[other], "api-key": k["API"]}[which]
    r = call(server, api, key)
    assert r.status_code == 400  # TorchServe answers 400, not 401
    assert r.json()["type"] == "InvalidKeyException"


@pytest.mark.parametrize("api", ["inference", "management"])
def test_accepted_with_the_right_key(server, api):
    assert call(server, api, keys(server)[api]).status_code == 200


def test_ping_needs_the_inference_key(server):
    assert requests.get(f"{server.client.inference_url}/ping", timeout=10).status_code == 400
    r = requests.get(f"{server.client.inference_url}/ping", timeout=10,
                     headers={"Authorization": f"Bearer {keys(server)['inference']}"})
    assert r.status_code == 200 and "Healthy" in r.text


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/evil.mar",
    "https://example.com/model.mar",
    "file:///etc/passwd",
    "../../../../tmp/evil.mar",
])
def test_registration_only_from_the_model_store(server, url):
    r = requests.post(f"{server.client.management_url}/models", params={"url": url, "initial_workers": 1},
                      headers={"Authorization": f"Bearer {keys(server)['management']}"}, timeout=60)
    assert r.status_code in (400, 404), r.text
    assert any(words in r.json()["message"] for words in ("does not match any allowed URL", "Relative path"))
    registered = server.client._call("management", "GET", f"{server.client.management_url}/models").json()
    assert MODEL in [m["modelName"] for m in registered["models"]]
    assert not any("evil" in m["modelName"] or "passwd" in m["modelName"] for m in registered["models"])


def test_registration_needs_the_management_key(server):
    r = requests.post(f"{server.client.management_url}/models", params={"url": f"{MODEL}.mar"},
                      headers={"Authorization": f"Bearer {keys(server)['inference']}"}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"


def test_every_port_listens_on_loopback_only(server):
    """The three HTTP APIs and TorchServe's gRPC ports: nothing the server opens is reachable from outside."""
    props = read_properties(server.config)
    http = {int(props[k].rsplit(":", 1)[1]) for k in ("inference_address", "management_address", "metrics_address")}
    grpc = {int(props["grpc_inference_port"]), int(props["grpc_management_port"])}
    frontend = next(p for p in psutil.process_iter(["cmdline"])
                    if "org.pytorch.serve.ModelServer" in (p.info["cmdline"] or [])
                    and str(server.config) in p.info["cmdline"])
    listening = {}
    for conn in frontend.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN:
            address = ipaddress.ip_address(conn.laddr.ip)
            listening[conn.laddr.port] = getattr(address, "ipv4_mapped", None) or address
    assert http | grpc <= set(listening)
    assert all(a.is_loopback for a in listening.values()), listening  # Java shows it as ::ffff:127.0.0.1


def test_shipped_config_keeps_auth_on_and_binds_loopback():
    from gpt2ops.local_server import REPO

    props = read_properties(REPO / "config.properties")
    assert props.get("disable_token_authorization", "false") == "false"
    assert props["allowed_urls"] == "^$"
    assert props["install_py_dep_per_model"] == "false"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"


def test_key_rotation_with_the_api_key(server):
    """GET /token?type=inference with the API key replaces the inference key; the old one stops working."""
    old = keys(server)["inference"]
    new = server.client.refresh_key("inference")
    assert new != old
    assert call(server, "inference", old).status_code == 400
    assert call(server, "inference", new).status_code == 200
