"""A small client of TorchServe's HTTP APIs with token authorization: keys, registration, predictions.

Used by `register.py`, `query.py`, the end-to-end tests and `benchmarks/load.py`.
TorchServe 0.12.0 writes `key_file.json` in the directory it was started from:
an `inference` and a `management` key (expire after `token_expiration_min`,
default 60) and an `API` key (never expires) whose only use is
`GET <management>/token?type=inference|management`, which replaces that key in
the file. A missing, wrong or expired key gets 400 `InvalidKeyException`.

Every failure is an `OpsError` (gpt2ops.errors) that names the cause and the next step:
no server at the address, no key file where it was looked for, a key the server refuses and
the API key cannot renew, a registration whose worker could not start (with the worker's own
message from model_log.log).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import requests

from gpt2ops import REPO, server_logs
from gpt2ops.errors import OpsError

# what the operator does when the server is not there or the keys are not its own
START_HINT = "start it with `make run` (or scripts/serve.sh --run-dir DIR), or pass the --config/--run-dir it runs with"


def default_config() -> str:
    """The config.properties a tool uses without --config: $TS_CONFIG (as scripts/serve.sh), else the repo's."""
    return os.environ.get("TS_CONFIG") or str(REPO / "config.properties")


def default_run_dir() -> str:
    """The run directory a tool uses without --run-dir: $RUN_DIR (as scripts/serve.sh), else the repo's run/."""
    return os.environ.get("RUN_DIR") or str(REPO / "run")


def add_server_arguments(parser) -> None:
    """--config and --run-dir: which running server a tool talks to, and where its keys and logs are."""
    parser.add_argument("--config", default=default_config(), help="the server's config.properties "
                        "(default: $TS_CONFIG, else the repo's)")
    parser.add_argument("--run-dir", default=default_run_dir(), help="the directory the server was started from, "
                        "with key_file.json and logs/ (default: $RUN_DIR, else run/)")


def server_from_arguments(args) -> "TorchServe":
    """The server that add_server_arguments' options name."""
    return TorchServe.from_config(args.config, args.run_dir)


def read_properties(path: str | Path) -> dict[str, str]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise OpsError(f"cannot read the TorchServe config {path}: {err.strerror or err}",
                       "pass --config with the config.properties the server was started with") from None
    return parse_properties(text)


def parse_properties(text: str) -> dict[str, str]:
    """config.properties text -> {key: value} (comments and blank lines skipped)."""
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def read_keys(key_file: str | Path) -> dict[str, str]:
    """{"inference": ..., "management": ..., "API": ...} from key_file.json."""
    data = json.loads(Path(key_file).read_text())
    return {name: entry["key"] for name, entry in data.items()}


def key_hint(kind: str, key_file: Path) -> str:
    """What a client must send: the header, and where the key of `kind` is."""
    return (f"send the header `Authorization: Bearer <key>` with the {kind} key: it is "
            f"[\"{kind}\"][\"key\"] in {key_file}, which TorchServe writes when it starts")


def _error_fields(body: str) -> tuple[str, str]:
    """(type, message) of a TorchServe error body, or ('', the body) when it is not TorchServe's JSON."""
    try:
        data = json.loads(body)
        return str(data.get("type", "")), str(data.get("message", body))
    except (ValueError, AttributeError):
        return "", body


class TorchServeError(OpsError):
    """TorchServe answered `status`; `body` is its answer."""

    def __init__(self, status: int, body: str, what: str, next_step: str | None = None, detail: str = ""):
        self.status, self.body, self.what = status, body, what
        kind, message = _error_fields(body)
        cause = f"{what} failed: HTTP {status}{' ' + kind if kind else ''}: {message.strip()}{detail}"
        super().__init__(cause, next_step)


class KeyRejected(TorchServeError):
    """TorchServe refused a key (400 InvalidKeyException) and it could not be renewed."""


class ServerUnreachable(OpsError):
    """Nothing answers at the server's address."""


class MissingKeyFile(OpsError):
    """No key_file.json where the server would have written it."""


class RegistrationError(TorchServeError):
    """Registration failed; `worker_error` is the worker's own last exception, when it logged one."""

    def __init__(self, status: int, body: str, what: str, worker_error: str | None, log: Path):
        self.worker_error, self.log = worker_error, log
        if worker_error:
            next_step = f"fix the archive (handler or model-config.yaml) and register again; full log: {log}"
        elif status == 409:
            next_step = "it is registered already: unregister it first (or use --replace)"
        else:
            next_step = f"see {log} and {log.parent / server_logs.FRONTEND_LOG}"
        # the worker's message is the cause; TorchServe's "Failed to start workers" says little
        super().__init__(status, body, what, next_step, f": the worker said: {worker_error}" if worker_error else "")


def _is_invalid_key(r: requests.Response) -> bool:
    return r.status_code == 400 and "InvalidKeyException" in r.text


def _reason(err: Exception) -> str:
    text = str(err)
    for words in ("Connection refused", "timed out", "Name or service not known", "No route to host"):
        if words.lower() in text.lower():
            return words.lower()
    return type(err).__name__


@dataclass
class TorchServe:
    """Addresses of one server and its key file."""

    inference_url: str
    management_url: str
    metrics_url: str
    key_file: Path
    timeout: float = 300.0
    token_auth: bool = True  # False with `disable_token_authorization=true` (the Kubernetes pod's TorchServe)

    @classmethod
    def from_config(cls, config: str | Path, run_dir: str | Path) -> "TorchServe":
        props = read_properties(config)
        return cls(props.get("inference_address", "http://127.0.0.1:8080"),
                   props.get("management_address", "http://127.0.0.1:8081"),
                   props.get("metrics_address", "http://127.0.0.1:8082"),
                   Path(run_dir) / "key_file.json",
                   token_auth=props.get("disable_token_authorization", "false").lower() != "true")

    @property
    def run_dir(self) -> Path:
        """The directory the server was started from: key_file.json and logs/."""
        return self.key_file.parent

    def listening(self, url: str | None = None, seconds: float = 1.0) -> bool:
        """True when something accepts TCP connections at `url` (default: the inference address)."""
        parts = urlsplit(url or self.inference_url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=seconds):
                return True
        except (OSError, ValueError):
            return False

    # ---- keys ----

    def key(self, kind: str) -> str:
        if not self.key_file.exists():
            if not self.listening():
                raise ServerUnreachable(f"no TorchServe answers at {self.inference_url} "
                                        f"(and there is no key file at {self.key_file})", START_HINT)
            raise MissingKeyFile(
                f"no key file at {self.key_file}, though something listens at {self.inference_url}",
                "TorchServe writes key_file.json into the directory it is started from when it starts: "
                "pass --run-dir with that directory (scripts/serve.sh --run-dir DIR; `make run` uses run/)")
        try:
            return read_keys(self.key_file)[kind]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OpsError(f"cannot read the {kind} key from {self.key_file} ({type(err).__name__}: {err})",
                           "the server rewrites that file at start: restart it (make stop && make run)") from None

    def refresh_key(self, kind: str) -> str:
        """Ask for a new `kind` key with the API key; TorchServe rewrites key_file.json."""
        url = f"{self.management_url}/token"
        r = self._request("GET", url, params={"type": kind}, headers=_auth(self.key("API")), timeout=30)
        if r.status_code != 200:
            what = f"the server refused the {kind} key, and renewing it with the API key of {self.key_file}"
            if _is_invalid_key(r):
                raise KeyRejected(r.status_code, r.text, what,
                                  f"{key_hint(kind, self.key_file)}; this file is not the running server's: pass "
                                  f"--run-dir with the directory the server was started from, or restart it "
                                  f"(make stop && make run)")
            raise self.error(r, what, "API")
        return self.key(kind)

    def _request(self, method: str, url: str, **kw) -> requests.Response:
        """requests.request, with "nothing listens there" as a ServerUnreachable naming the address."""
        try:
            return requests.request(method, url, **kw)
        except requests.ConnectionError as err:
            base = "{0.scheme}://{0.netloc}".format(urlsplit(url))
            raise ServerUnreachable(f"no TorchServe answers at {base} ({_reason(err)})", START_HINT) from None

    def _call(self, kind: str, method: str, url: str, **kw) -> requests.Response:
        """One call with the `kind` key; an expired key is refreshed once (KeyRejected when it cannot be)."""
        headers = kw.pop("headers", {})
        kw.setdefault("timeout", self.timeout)
        r = self._request(method, url, headers={**headers, **_auth(self.key(kind))}, **kw)
        if _is_invalid_key(r):
            self.refresh_key(kind)
            r = self._request(method, url, headers={**headers, **_auth(self.key(kind))}, **kw)
            if _is_invalid_key(r):
                raise KeyRejected(r.status_code, r.text, f"{method} {url} with the renewed {kind} key",
                                  key_hint(kind, self.key_file))
        return r

    def error(self, r: requests.Response, what: str, kind: str = "inference") -> TorchServeError:
        """The error for TorchServe's answer `r`; a refused key says which header and key file to use."""
        if _is_invalid_key(r):
            return KeyRejected(r.status_code, r.text, what, key_hint(kind, self.key_file))
        return TorchServeError(r.status_code, r.text, what)

    # ---- management ----

    def ping(self) -> bool:
        """True when /ping (which needs the inference key, unless token authorization is off) answers Healthy."""
        if self.token_auth and not self.key_file.exists():
            return False
        try:
            headers = _auth(self.key("inference")) if self.token_auth else {}
            r = requests.get(f"{self.inference_url}/ping", headers=headers, timeout=5)
        except (requests.RequestException, OpsError):
            return False
        return r.status_code == 200 and "Healthy" in r.text

    def wait_until_up(self, seconds: float = 90) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.ping():
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe did not answer {self.inference_url}/ping within {seconds:.0f} s")

    def register(self, archive: str, model_name: str, workers: int = 1) -> dict:
        """Register `archive` (a .mar in the model store) with `workers` workers, waiting for them.

        When it fails, the worker's own last exception (from <run-dir>/logs/model_log.log, written
        during this call) is part of the RegistrationError: TorchServe itself only says
        "Failed to start workers".
        """
        log = self.run_dir / "logs" / server_logs.MODEL_LOG
        offset = server_logs.size_of(log)
        r = self._call("management", "POST", f"{self.management_url}/models",
                       params={"url": archive, "model_name": model_name, "initial_workers": workers,
                               "synchronous": "true"})
        if r.status_code != 200:
            if _is_invalid_key(r):
                raise self.error(r, f"registering {archive}", "management")
            cause = server_logs.worker_error(server_logs.read_from(log, offset), model_name)
            raise RegistrationError(r.status_code, r.text, f"registering {archive} as {model_name}", cause, log)
        return r.json()

    def is_registered(self, model_name: str) -> bool:
        r = self._call("management", "GET", f"{self.management_url}/models/{model_name}")
        if r.status_code not in (200, 404):
            raise self.error(r, f"describing {model_name}", "management")
        return r.status_code == 200

    def unregister(self, model_name: str) -> None:
        r = self._call("management", "DELETE", f"{self.management_url}/models/{model_name}")
        if r.status_code != 200:
            raise self.error(r, f"unregistering {model_name}", "management")

    def describe(self, model_name: str, customized: bool = False) -> list[dict]:
        """GET /models/<model>: TorchServe's description (workers, batch size...). `customized=True` adds the
        worker's report; on a TorchServe 0.12.0 not started by scripts/serve.sh that call wedges the model
        (gpt2ops/frontend_patch.py), so it is never the default: `report()` reads the same through the
        inference API on any server."""
        r = self._call("management", "GET", f"{self.management_url}/models/{model_name}",
                       params={"customized": "true"} if customized else None)
        if r.status_code != 200:
            raise self.error(r, f"describing {model_name}", "management")
        return r.json()

    # ---- inference ----

    def predict_raw(self, model_name: str, payload: Any = None, *, data: bytes | str | None = None,
                    headers: dict | None = None, stream: bool = False) -> requests.Response:
        """POST /predictions/<model>: `payload` as JSON, or `data` as given."""
        kw: dict[str, Any] = {"headers": dict(headers or {}), "stream": stream}
        if payload is not None:
            kw["data"] = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            kw["headers"].setdefault("Content-Type", "application/json")
        elif data is not None:
            kw["data"] = data
        return self._call("inference", "POST", f"{self.inference_url}/predictions/{model_name}", **kw)

    def generate(self, model_name: str, prompt: str, **params) -> dict:
        r = self.predict_raw(model_name, {"prompt": prompt, **params})
        if r.status_code != 200:
            raise self.error(r, "generation")
        return r.json()

    def stream(self, model_name: str, prompt: str, **params) -> Iterator[dict]:
        """Yield the JSON lines of a streamed generation as they arrive."""
        r = self.predict_raw(model_name, {"prompt": prompt, "stream": True, **params}, stream=True)
        if r.status_code != 200:
            raise self.error(r, "generation")
        buffer = b""
        for chunk in r.iter_content(chunk_size=None):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)
        if buffer.strip():
            yield json.loads(buffer)

    def report(self, model_name: str, version: str = "1.0") -> dict:
        """The worker's report (memory breakdown, pool, load, limits) through the inference API.

        `describe(customized=True)` asks for the same through the management API, which under continuous
        batching wedges a TorchServe 0.12.0 that scripts/serve.sh did not start (gpt2ops/frontend_patch.py).
        """
        r = self._call("inference", "GET", f"{self.inference_url}/predictions/{model_name}/{version}/describe")
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, f"reading {model_name}'s report")
        return r.json()

    def metrics(self) -> str:
        return self._request("GET", f"{self.metrics_url}/metrics", timeout=30).text


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def parse_metric(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one Prometheus metric: [(labels, value)]."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}\{{(.*?)\}} ([0-9.eE+-]+)$", text, flags=re.M):
        labels = dict(re.findall(r'(\w+)="(.*?)"', m.group(1)))
        out.append((labels, float(m.group(2))))
    return out
