"""The Kubernetes pod's auth proxy, for real: Debian's nginx with the very files the manifests mount, in front
of a real TorchServe configured as in the pod (token auth off, loopback only), all on loopback ports.

What the pod does is repeated here with the same scripts: `proxy.sh start` renders
deploy/kubernetes/base/proxy/nginx.conf.template and the Secret's key files and execs nginx, as uid 1000
(the pod is non-root); `probe.sh` is the torchserve container's probes and pre-stop; `proxy.sh drain` is the
proxy's pre-stop. Only the listen addresses and ports differ (free loopback ports instead of the pod's).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from gpt2ops.client import read_properties
from gpt2ops.local_server import free_port, start_server
from tests.e2e.conftest import MODEL
from tests.test_k8s_manifests import COMPILE_CACHE_VARIABLES, image_env

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes" / "base"
PROXY_FILES = BASE / "proxy"
PROBE = BASE / "torchserve" / "probe.sh"
NGINX = shutil.which("nginx", path=f"/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}")
ENVSUBST = shutil.which("envsubst")
POD_UID = 1000  # the pod's runAsUser (deployment.yaml)
# Addresses start_server replaces with free loopback ports; every other setting comes from the pod's file.
ADDRESSES = {"inference_address", "management_address", "metrics_address", "grpc_inference_port",
             "grpc_management_port"}

if NGINX is None or ENVSUBST is None:
    pytest.fail("the auth proxy test needs Debian's nginx and envsubst: run `make venv` "
                "(it installs nginx-light and gettext-base with apt-get)", pytrace=False)


def pod_properties() -> dict[str, str]:
    """The settings of the pod's config.properties that differ from the repo's, addresses left out."""
    pod = read_properties(BASE / "torchserve" / "config.properties")
    repo = read_properties(REPO / "config.properties")
    return {k: v for k, v in pod.items() if k not in ADDRESSES and repo.get(k) != v}


@contextlib.contextmanager
def pod_torchserve(root: Path, model_store: Path):
    """TorchServe as in the pod: the pod's settings, the one archive loaded at start (load_models=all); ready
    (probe.sh ready passes) when entered, stopped after."""
    store = root / "store"  # the image's model store holds one archive; the session store has variants too
    store.mkdir()
    os.symlink(model_store / f"{MODEL}.mar", store / f"{MODEL}.mar")
    props = pod_properties()
    assert props.get("disable_token_authorization") == "true" and props.get("load_models") == "all"
    srv = start_server(root, store, **props)
    try:
        text = srv.config.read_text()
        for key in ("inference_address", "management_address", "metrics_address"):
            assert re.search(rf"^{key}=http://127\.0\.0\.1:\d+$", text, re.M), f"{key} is not on loopback"
        env = probe_env(srv)
        deadline = time.monotonic() + 180
        while run_probe("ready", env).returncode != 0:  # the worker loads the model after /ping is Healthy
            assert time.monotonic() < deadline, srv.log("ts_log.log")[-3000:]
            time.sleep(0.5)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ts(tmp_path_factory, model_store):
    with pod_torchserve(tmp_path_factory.mktemp("k8s-ts"), model_store) as srv:
        yield srv


def host_port(url: str) -> str:
    return url.split("://", 1)[1]


def probe_env(srv, **extra) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "TS_INFERENCE": host_port(srv.client.inference_url),
            "TS_MANAGEMENT": host_port(srv.client.management_url), "MODEL_NAME": MODEL, **extra}


def run_probe(action: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["/bin/sh", str(PROBE), action], env=env, capture_output=True, text=True,
                          timeout=timeout)


@dataclass
class Proxy:
    port: int
    probe_port: int
    keys: dict[str, str]
    prefix: Path
    process: subprocess.Popen
    log: Path
    root: Path = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def key(self) -> str:
        return self.keys["current"]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def as_pod_user():
    return {"user": POD_UID, "group": POD_UID, "extra_groups": []}


def proxy_root(keys: dict[str, str]) -> Path:
    """A folder the pod's user owns: conf/ (the ConfigMap's files, copied), keys/ (the Secret), nginx/ (prefix)."""
    root = Path(tempfile.mkdtemp(prefix="k8s-proxy-"))
    shutil.copytree(PROXY_FILES, root / "conf")
    (root / "keys").mkdir()
    for name, value in keys.items():
        (root / "keys" / name).write_text(value + "\n")  # a trailing newline, as `echo KEY > file` leaves
    for path in [root, *root.rglob("*")]:
        os.chown(path, POD_UID, POD_UID)
    return root


def proxy_env(root: Path, ts_inference: str, port: int, probe_port: int, **extra) -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PROXY_LISTEN": f"127.0.0.1:{port}",
            "PROBE_LISTEN": f"127.0.0.1:{probe_port}", "TS_INFERENCE": ts_inference,
            "API_KEY_DIR": str(root / "keys"), "NGINX_PREFIX": str(root / "nginx"), **extra}


def new_keys() -> dict[str, str]:
    # 64 and 128 characters; the second holds the regex metacharacters a key may have (. and +)
    return {"current": secrets.token_hex(32), "previous": secrets.token_urlsafe(90) + "a.b+c=="}


@contextlib.contextmanager
def running_proxy(ts_inference: str, keys: dict[str, str] | None = None):
    """`proxy.sh start` as the pod runs it, on free loopback ports; stopped (and its files removed) after.
    `keys`: the Secret's files (replicas share one Secret); new random ones by default."""
    keys = keys or new_keys()
    root = proxy_root(keys)
    port, probe_port = free_port(), free_port()
    log = root / "proxy.log"
    log.touch()
    os.chown(log, POD_UID, POD_UID)  # nginx reopens /dev/stdout as the pod's user (runc hands a container its stdio)
    with log.open("wb") as out:
        process = subprocess.Popen(["/bin/sh", str(root / "conf" / "proxy.sh"), "start"],
                                   env=proxy_env(root, ts_inference, port, probe_port), stdout=out,
                                   stderr=subprocess.STDOUT, **as_pod_user())
    proxy = Proxy(port, probe_port, keys, root / "nginx", process, log, root)
    try:
        deadline = time.monotonic() + 20
        while not port_open(port):
            assert process.poll() is None, f"nginx exited: {proxy.output()}"
            assert time.monotonic() < deadline, f"nginx did not listen: {proxy.output()}"
            time.sleep(0.05)
        yield proxy
    finally:
        if process.poll() is None:
            process.terminate()  # nginx's fast stop
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def proxy(ts):
    with running_proxy(host_port(ts.client.inference_url)) as p:
        yield p


def post(proxy: Proxy, payload: dict, headers: dict | None = None, path: str = f"/predictions/{MODEL}"):
    return requests.post(f"{proxy.url}{path}", data=json.dumps(payload), timeout=120,
                         headers={"Content-Type": "application/json", **(headers or {})})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def access_log_lines(ts) -> int:
    """Requests TorchServe's frontend has seen (its access log)."""
    return len(ts.log("access_log.log").splitlines())


# ---------------------------------------------------------------------------------------------------------


def test_the_secrets_keys_pass(proxy):
    for name in ("current", "previous"):  # both files of the Secret: rotation without downtime
        r = post(proxy, {"prompt": "你是谁?", "max_new_tokens": 5, "decoding": "greedy"}, bearer(proxy.keys[name]))
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["full_text"].startswith("你是谁?") and answer["completion_tokens"] == 5
    r = requests.get(f"{proxy.url}/ping", headers=bearer(proxy.key()), timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "Healthy"


@pytest.mark.parametrize("prefix", ["bearer ", "BEARER ", "Bearer  "])
def test_the_scheme_is_case_insensitive_the_key_is_not(proxy, prefix):
    """RFC 7235: the scheme is case-insensitive, and RFC 6750 allows several spaces after it."""
    r = post(proxy, {"prompt": "hi", "max_new_tokens": 2}, {"Authorization": prefix + proxy.keys["previous"]})
    assert r.status_code == 200, r.text


def wrong_authorization(kind: str, keys: dict[str, str]) -> dict[str, str]:
    key, other = keys["current"], keys["previous"]
    return {
        "none": {},
        "empty": {"Authorization": ""},
        "scheme-only": {"Authorization": "Bearer"},
        "scheme-and-space": {"Authorization": "Bearer "},
        "wrong-key": bearer(secrets.token_hex(32)),
        "key-less-one-character": bearer(key[:-1]),
        "key-plus-one-character": bearer(key + "0"),
        "key-upper-cased": bearer(key.upper()),
        # the other key holds "a.b+c": as an unescaped regex, "." would match any character and "b+" "bb"
        "dot-taken-as-any-character": bearer(other.replace("a.b", "axb")),
        "plus-taken-as-repetition": bearer(other.replace("b+c", "bbc")),
        "key-twice": bearer(key + key),
        "key-without-scheme": {"Authorization": key},
        "basic-scheme": {"Authorization": f"Basic {key}"},
        "key-in-another-header": {"X-Api-Key": key},
    }[kind]


@pytest.mark.parametrize("kind", ["none", "empty", "scheme-only", "scheme-and-space", "wrong-key",
                                  "key-less-one-character", "key-plus-one-character", "key-upper-cased",
                                  "dot-taken-as-any-character", "plus-taken-as-repetition", "key-twice", "key-without-scheme",
                                  "basic-scheme", "key-in-another-header"])
def test_a_missing_or_wrong_key_is_refused_before_torchserve(proxy, ts, kind):
    key = proxy.key()
    assert key != key.upper()  # hex with letters: upper-casing makes another key
    headers = wrong_authorization(kind, proxy.keys)
    seen = access_log_lines(ts)
    for method, path in [("POST", f"/predictions/{MODEL}"), ("GET", "/ping"), ("GET", "/models"),
                         ("GET", "/no/such/path")]:
        r = requests.request(method, f"{proxy.url}{path}", headers={"Content-Type": "application/json", **headers},
                             data=json.dumps({"prompt": "hi", "max_new_tokens": 2}), timeout=30)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["code"] == 401
    assert access_log_lines(ts) == seen, "a request without the right key reached TorchServe"


@pytest.mark.parametrize("method,path", [
    ("GET", "/models"),
    ("GET", f"/models/{MODEL}"),
    ("POST", f"/models?url={MODEL}.mar&model_name=other"),
    ("PUT", f"/models/{MODEL}?min_worker=0&synchronous=true"),
    ("DELETE", f"/models/{MODEL}"),
    ("GET", "/token?type=inference"),
    ("GET", "/metrics"),
    ("GET", f"/predictions/../models/{MODEL}"),
    ("GET", f"/predictions/%2e%2e/models/{MODEL}"),
    ("DELETE", f"/predictions/{MODEL}"),
    ("GET", f"/v1/models/{MODEL}"),
    ("OPTIONS", "/"),
])
def test_the_management_api_cannot_be_reached_through_the_proxy(proxy, ts, method, path):
    """With the key, every management call (and any other route) is answered by nginx, not by TorchServe."""
    seen = access_log_lines(ts)
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:  # http.client sends the path byte for byte (no client-side normalisation of ../)
        conn.request(method, path, headers=bearer(proxy.key()))
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    assert r.status in (403, 404), (r.status, body)
    assert access_log_lines(ts) == seen, f"{method} {path} reached TorchServe"
    # and the model is still there with its worker, unchanged
    description = requests.get(f"{ts.client.management_url}/models/{MODEL}", timeout=30).json()[0]
    assert [w["status"] for w in description["workers"]] == ["READY"]


def test_the_key_never_reaches_torchserve_or_the_logs(proxy, ts):
    r = post(proxy, {"prompt": "hi", "max_new_tokens": 2}, bearer(proxy.key()))
    assert r.status_code == 200
    logs = proxy.output() + "".join(p.read_text(errors="replace") for p in (ts.run_dir / "logs").glob("*.log"))
    assert proxy.key() not in logs


def read_stream(port: int, key: str, payload: dict) -> tuple[int, list[tuple[float, bytes]]]:
    """POST through the proxy and return (status, [(arrival time, bytes)]) for each read from the socket."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        # Accept-Encoding as curl --compressed, browsers and requests send it: a proxy that compressed the
        # stream would hold it back until a compression block filled.
        conn.request("POST", f"/predictions/{MODEL}", body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json", "Accept-Encoding": "gzip, deflate", **bearer(key)})
        r = conn.getresponse()
        assert r.getheader("Content-Encoding") is None
        reads = []
        while data := r.read1(65536):  # whatever has arrived, without waiting for more
            reads.append((time.monotonic(), data))
        return r.status, reads
    finally:
        conn.close()


def lines_with_arrival(reads: list[tuple[float, bytes]]) -> list[tuple[float, dict]]:
    """Each JSON line of a stream with the time its last byte arrived."""
    out, buffer = [], b""
    for when, data in reads:
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                out.append((when, json.loads(line)))
    assert not buffer.strip(), buffer
    return out


def test_a_streamed_answer_arrives_in_pieces(proxy):
    status, reads = read_stream(proxy.port, proxy.key(),
                                {"prompt": "你是谁?", "stream": True, "max_new_tokens": 240, "decoding": "greedy",
                                 "ignore_eos": True})
    assert status == 200
    lines = lines_with_arrival(reads)
    final = lines[-1][1]
    assert final["finish_reason"] == "length" and "generated_text" in final
    assert "".join(line["text"] for _, line in lines) == final["generated_text"]
    # Unbuffered: the first line reaches the client while the engine is still generating, in a read of
    # its own, not together with the end of the answer.
    arrivals = sorted({when for when, _ in lines})
    assert len(arrivals) >= 3, f"the stream came in {len(arrivals)} piece(s): {reads}"
    assert b"finish_reason" not in reads[0][1], "the first read already held the end of the answer"
    assert lines[-1][0] - lines[0][0] > 0.005, "every line arrived at the same moment"


def frontend_queue_microseconds(ts) -> tuple[float, str]:
    """The sum of TorchServe's ts_queue_latency_microseconds series for the model, and the metrics page."""
    page = requests.get(f"{ts.client.metrics_url}/metrics", timeout=30).text
    values = re.findall(rf'^ts_queue_latency_microseconds\{{[^}}]*model_name="{MODEL}"[^}}]*\}} (\S+)$', page, re.M)
    return sum(float(v) for v in values), page


def test_the_frontend_queue_counter_the_hpa_reads_is_served(proxy, ts):
    """prometheus-adapter's waiting rule (deploy/kubernetes/prometheus-adapter/values.yaml) reads
    ts_queue_latency_microseconds: the pod's TorchServe serves it on its metrics port, per model, as a counter
    that grows as requests are answered through the proxy."""
    before, _ = frontend_queue_microseconds(ts)
    for _ in range(3):
        r = post(proxy, {"prompt": "hi", "max_new_tokens": 2}, bearer(proxy.key()))
        assert r.status_code == 200, r.text
    after, page = frontend_queue_microseconds(ts)
    assert re.search(r"^# TYPE ts_queue_latency_microseconds counter$", page, re.M), page[:2000]
    assert after > before >= 0


def test_probes(proxy, ts):
    env = probe_env(ts)
    assert run_probe("live", env).returncode == 0
    assert run_probe("ready", env).returncode == 0
    assert run_probe("ready", {**env, "MODEL_NAME": "no-such-model"}).returncode != 0
    dead = {**env, "TS_INFERENCE": f"127.0.0.1:{free_port()}", "TS_MANAGEMENT": f"127.0.0.1:{free_port()}"}
    assert run_probe("live", dead).returncode != 0 and run_probe("ready", dead).returncode != 0
    # the proxy's own probe port: answered by nginx without a key, and no way in to TorchServe
    r = requests.get(f"http://127.0.0.1:{proxy.probe_port}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = requests.post(f"http://127.0.0.1:{proxy.probe_port}/predictions/{MODEL}", json={"prompt": "hi"},
                      headers=bearer(proxy.key()), timeout=10)
    assert r.status_code == 404


def test_torchserve_pre_stop_waits_for_open_connections(proxy, ts):
    """probe.sh drain returns only once no client is connected to the proxy and no request to TorchServe."""
    ts_port = host_port(ts.client.inference_url).rsplit(":", 1)[1]
    env = probe_env(ts, DRAIN_PORTS=f"{proxy.port} {ts_port}", DRAIN_DELAY_SECONDS="0")
    client = socket.create_connection(("127.0.0.1", proxy.port))  # a client with a connection open
    drain = subprocess.Popen(["/bin/sh", str(PROBE), "drain"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        assert drain.poll() is None, "the pre-stop returned while a client was connected"
        client.close()
        assert drain.wait(timeout=15) == 0
    finally:
        client.close()
        if drain.poll() is None:
            drain.kill()
            drain.wait()


def test_proxy_pre_stop_lets_a_request_in_flight_finish(ts):
    """proxy.sh drain (the pre-stop) makes nginx stop accepting at once, yet a request it had already accepted is
    still answered in full, streamed. The request is held in flight by its body: half of it is sent before
    the pre-stop, the rest after nginx has closed its listening socket, so the timing does not depend on how
    fast the model generates."""
    with running_proxy(host_port(ts.client.inference_url)) as proxy:
        body = json.dumps({"prompt": "你是谁?", "stream": True, "max_new_tokens": 40, "decoding": "greedy"}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=120)
        drain = None
        try:
            conn.putrequest("POST", f"/predictions/{MODEL}")
            for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)),
                                **bearer(proxy.key())}.items():
                conn.putheader(name, value)
            conn.endheaders(message_body=body[:10])
            time.sleep(0.2)  # nginx has accepted the connection and is reading the body
            drain = subprocess.Popen(["/bin/sh", str(proxy.root / "conf" / "proxy.sh"), "drain"],
                                     env=proxy_env(proxy.root, "unused", proxy.port, proxy.probe_port,
                                                   DRAIN_DELAY_SECONDS="0"),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **as_pod_user())
            deadline = time.monotonic() + 10
            while port_open(proxy.port):  # graceful stop: the listening socket closes first
                assert time.monotonic() < deadline, "nginx kept accepting after the pre-stop's SIGQUIT"
                time.sleep(0.01)
            assert drain.poll() is None, "the pre-stop returned with a request in flight"
            conn.send(body[10:])
            r = conn.getresponse()
            assert r.status == 200, r.read()
            reads = []
            while data := r.read1(65536):
                reads.append((time.monotonic(), data))
            lines = lines_with_arrival(reads)
            final = lines[-1][1]
            assert final["finish_reason"] in ("length", "eos"), final
            assert len(lines) > 1 and "".join(line["text"] for _, line in lines) == final["generated_text"]
            assert proxy.process.wait(timeout=30) == 0  # nginx exited by itself once the answer was done
            # (reaped first: the hook waits for the pid to vanish, and here an unreaped nginx stays a zombie;
            # in the pod nginx is the container's PID 1 and the container ends with it)
            assert drain.wait(timeout=10) == 0, drain.stdout.read()
        finally:
            conn.close()
            if drain is not None and drain.poll() is None:
                drain.kill()
                drain.wait()


@pytest.mark.parametrize("key,message", [
    ("short", "at least 32"),
    ("a" * 129, "at most 128"),
    ('"' + "a" * 40, "may hold only"),
    ("a" * 40 + ";", "may hold only"),
    ("a" * 20 + " " + "a" * 20, "may hold only"),
    ("a" * 40 + "\n" + "b" * 40, "may hold only"),
    ("a" * 40 + "$host", "may hold only"),
    (None, "no key in"),
])
def test_proxy_refuses_to_start_with_a_bad_key(key, message):
    root = proxy_root({} if key is None else {"current": key})
    try:
        out = subprocess.run(["/bin/sh", str(root / "conf" / "proxy.sh"), "start"],
                             env=proxy_env(root, "127.0.0.1:1", free_port(), free_port()), capture_output=True,
                             text=True, timeout=30, **as_pod_user())
        assert out.returncode != 0 and message in out.stderr, out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mount_namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not mount_namespaces_work(), reason="needs `unshare --mount` (root) to make / read-only")
def test_torchserve_runs_on_a_read_only_root_filesystem(model_store):
    """The pod's readOnlyRootFilesystem: TorchServe, started as the pod starts it (scripts/serve.sh --foreground,
    the pod's config, HOME=TMPDIR=/tmp), loads and serves the model when only its run directory, /tmp and the
    compile caches' folder (the pod's emptyDirs) are writable; the compile caches the image names
    (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) can be written there. In a private mount namespace, / is
    remounted read-only (and /home, where the cache folder is made, too)."""
    base = Path(tempfile.mkdtemp(prefix="k8s-rofs-", dir="/var/tmp"))  # not under /tmp: /tmp is replaced below
    run, tmp, store, cache = base / "run", base / "tmp", base / "store", base / "compile-cache"
    for d in (run, tmp, store, cache):
        d.mkdir()
    shutil.copy(model_store / f"{MODEL}.mar", store)
    ports = {key: free_port() for key in ("inference", "management", "metrics")}
    config = (BASE / "torchserve" / "config.properties").read_text()
    for key, port in ports.items():
        config, n = re.subn(rf"^{key}_address=http://[0-9.]+:\d+$", f"{key}_address=http://127.0.0.1:{port}", config,
                            flags=re.M)
        assert n == 1, key
    for key in ("grpc_inference_port", "grpc_management_port"):
        config = re.sub(rf"^{key}=\d+$", f"{key}={free_port()}", config, flags=re.M)
    (base / "config.properties").write_text(config)
    # the torchserve container's own environment (HOME, TMPDIR, OMP_NUM_THREADS, ...), less the probes' addresses,
    # over the image's compile cache folders (the Dockerfile's ENV)
    deployment = yaml.safe_load((BASE / "deployment.yaml").read_text())
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "torchserve"]
    pod_env = {e["name"]: e["value"] for e in container["env"] if e["name"] not in ("TS_INFERENCE", "TS_MANAGEMENT")}
    assert pod_env["HOME"] == pod_env["TMPDIR"] == "/tmp"
    caches = {key: pod_env.get(key, image_env()[key]) for key in COMPILE_CACHE_VARIABLES}
    [cache_mount] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "compile-cache"]
    assert cache_mount.startswith("/home/")
    write_caches = " && ".join(f'mkdir -p "${key}" && touch "${key}/.rofs-check"' for key in sorted(caches))
    # a checkout (and its .venv) under /tmp or /home would be hidden by the mounts over them: it is bound aside
    # first and bound back, read-only, where it was (as the image's app folder is part of its read-only root)
    hidden = [p for p in (REPO, Path(sys.prefix).resolve()) if any(p.is_relative_to(top) for top in ("/tmp", "/home"))]
    hidden = [p for p in dict.fromkeys(hidden) if not any(p != q and p.is_relative_to(q) for q in hidden)]
    stash = [base / f"hidden-{n}" for n in range(len(hidden))]
    for d in stash:
        d.mkdir()
    set_aside = "".join(f"mount --bind {p} {d}; " for p, d in zip(hidden, stash))
    bind_back = "".join(f"mkdir -p {p}; mount --bind {d} {p}; mount -o remount,bind,ro {p}; "
                        for p, d in zip(hidden, stash))
    setup = (f"set -e; mount --make-rprivate /; mount --bind {run} {run}; {set_aside}mount --bind {tmp} /tmp; "
             f"mount -t tmpfs -o size=1m tmpfs /home; mkdir -p {cache_mount}; mount --bind {cache} {cache_mount}; "
             f"{bind_back}mount -o remount,ro /home; mount -o remount,bind,ro /; "
             "if touch /var/tmp/.rofs-check 2>/dev/null; then echo '/ is writable' >&2; exit 1; fi; "
             "if touch /home/.rofs-check 2>/dev/null; then echo '/home is writable' >&2; exit 1; fi; "
             f"{write_caches}; "
             f"exec {REPO}/scripts/serve.sh --foreground --config {base}/config.properties --model-store {store} "
             f"--run-dir {run}")
    environment = {**os.environ, **caches, **pod_env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    environment.pop("TS_CONFIG")  # serve.sh gets the rewritten copy with --config
    log = (base / "serve.log").open("wb")
    server = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", setup],
                              env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    probe = {"PATH": os.environ["PATH"], "TS_INFERENCE": f"127.0.0.1:{ports['inference']}",
             "TS_MANAGEMENT": f"127.0.0.1:{ports['management']}", "MODEL_NAME": MODEL}
    try:
        deadline = time.monotonic() + 180
        while run_probe("ready", probe).returncode != 0:
            assert server.poll() is None, (base / "serve.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, (run / "logs" / "ts_log.log").read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        r = requests.post(f"http://127.0.0.1:{ports['inference']}/predictions/{MODEL}",
                          json={"prompt": "你是谁?", "max_new_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["completion_tokens"] == 5, r.text
        assert (run / "logs" / "ts_log.log").exists()  # what it wrote went to the writable run directory
        for key, path in caches.items():  # the caches' files landed on the compile-cache volume
            assert (cache / Path(path).relative_to(cache_mount) / ".rofs-check").is_file(), key
    finally:
        subprocess.run([str(REPO / "scripts" / "stop.sh"), "--run-dir", str(run)], capture_output=True, timeout=120,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


# ---- form bodies: refused by the proxy, never passed to TorchServe's form decoder (issue 25) ----------------

# bodies TorchServe's front end answers with 500 before the handler (ErrorDataDecoderException), and a good one
FORM_BODIES = [b"=x&&=", b"prompt=hi&&", b"a=%", b"%zz=1", b"prompt=hi&max_new_tokens=2"]
FORM_TYPES = ["application/x-www-form-urlencoded", "Application/X-WWW-Form-Urlencoded; charset=utf-8",
              "application/x-www-form-urlencoded ;x", "multipart/form-data; boundary=xx", "MULTIPART/FORM-DATA"]
PREDICTION_PATHS = [f"/predictions/{MODEL}", f"/predictions/{MODEL}/1.0/v1/completions"]


@pytest.mark.parametrize("content_type", FORM_TYPES)
def test_form_bodies_to_the_predictions_are_415_naming_the_content_type(proxy, ts, content_type):
    seen = access_log_lines(ts)
    for path in PREDICTION_PATHS:
        for body in FORM_BODIES:
            r = requests.post(f"{proxy.url}{path}", data=body, timeout=30,
                              headers={"Content-Type": content_type, **bearer(proxy.key())})
            assert r.status_code == 415, (path, body, r.status_code, r.text)
            error = r.json()
            assert error["code"] == 415 and error["field"] == "Content-Type", error
            assert content_type.split(";")[0].strip().lower() in error["message"]
            assert "Content-Type: application/json" in error["message"]
    assert access_log_lines(ts) == seen, "a form body reached TorchServe"


@pytest.mark.parametrize("content_type,status", [
    ("application/json", 200),  # the API's type
    ("text/plain", 200),  # the body is the prompt
    ("application/x-www-form-urlencodedx", 200),  # not a form type for TorchServe either: the body is the prompt
])
def test_other_bodies_still_reach_torchserve(proxy, content_type, status):
    body = json.dumps({"prompt": "hi", "max_new_tokens": 2}) if content_type == "application/json" else "=x&&="
    r = requests.post(f"{proxy.url}/predictions/{MODEL}", data=body.encode(), timeout=120,
                      headers={"Content-Type": content_type, **bearer(proxy.key())})
    assert r.status_code == status, r.text


def test_a_form_body_without_a_key_is_still_401(proxy, ts):
    r = requests.post(f"{proxy.url}/predictions/{MODEL}", data=b"=x&&=", timeout=30,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 401
