"""A small client of TorchServe's HTTP APIs with token authorization: keys, registration, predictions.

Used by `register.py`, `query.py`, the end-to-end tests and `benchmarks/load.py`.
TorchServe 0.12.0 writes `key_file.json` in the directory it was started from:
an `inference` and a `management` key (expire after `token_expiration_min`,
default 60) and an `API` key (never expires) whose only use is
`GET <management>/token?type=inference|management`, which replaces that key in
the file. A missing, wrong or expired key gets 400 `InvalidKeyException`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import requests


def read_properties(path: str | Path) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def read_keys(key_file: str | Path) -> dict[str, str]:
    """{"inference": ..., "management": ..., "API": ...} from key_file.json."""
    data = json.loads(Path(key_file).read_text())
    return {name: entry["key"] for name, entry in data.items()}


class TorchServeError(RuntimeError):
    def __init__(self, status: int, body: str, what: str):
        self.status, self.body = status, body
        super().__init__(f"{what} failed: HTTP {status}: {body.strip()}")


@dataclass
class TorchServe:
    """Addresses of one server and its key file."""

    inference_url: str
    management_url: str
    metrics_url: str
    key_file: Path
    timeout: float = 300.0

    @classmethod
    def from_config(cls, config: str | Path, run_dir: str | Path) -> "TorchServe":
        props = read_properties(config)
        return cls(props.get("inference_address", "http://127.0.0.1:8080"),
                   props.get("management_address", "http://127.0.0.1:8081"),
                   props.get("metrics_address", "http://127.0.0.1:8082"),
                   Path(run_dir) / "key_file.json")

    # ---- keys ----

    def key(self, kind: str) -> str:
        return read_keys(self.key_file)[kind]

    def refresh_key(self, kind: str) -> str:
        """Ask for a new `kind` key with the API key; TorchServe rewrites key_file.json."""
        r = requests.get(f"{self.management_url}/token", params={"type": kind},
                         headers=_auth(self.key("API")), timeout=30)
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, f"refreshing the {kind} key")
        return self.key(kind)

    def _call(self, kind: str, method: str, url: str, **kw) -> requests.Response:
        """One call with the `kind` key; an expired key is refreshed once."""
        headers = kw.pop("headers", {})
        kw.setdefault("timeout", self.timeout)
        r = requests.request(method, url, headers={**headers, **_auth(self.key(kind))}, **kw)
        if r.status_code == 400 and "InvalidKeyException" in r.text:
            self.refresh_key(kind)
            r = requests.request(method, url, headers={**headers, **_auth(self.key(kind))}, **kw)
        return r

    # ---- management ----

    def ping(self) -> bool:
        """True when /ping (which needs the inference key) answers Healthy."""
        if not self.key_file.exists():
            return False
        try:
            r = requests.get(f"{self.inference_url}/ping", headers=_auth(self.key("inference")), timeout=5)
        except requests.ConnectionError:
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
        """Register `archive` (a .mar in the model store) with `workers` workers, waiting for them."""
        r = self._call("management", "POST", f"{self.management_url}/models",
                       params={"url": archive, "model_name": model_name, "initial_workers": workers,
                               "synchronous": "true"})
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, f"registering {archive}")
        return r.json()

    def unregister(self, model_name: str) -> None:
        r = self._call("management", "DELETE", f"{self.management_url}/models/{model_name}")
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, f"unregistering {model_name}")

    def describe(self, model_name: str, customized: bool = True) -> list[dict]:
        r = self._call("management", "GET", f"{self.management_url}/models/{model_name}",
                       params={"customized": "true"} if customized else None)
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, f"describing {model_name}")
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
            raise TorchServeError(r.status_code, r.text, "generation")
        return r.json()

    def stream(self, model_name: str, prompt: str, **params) -> Iterator[dict]:
        """Yield the JSON lines of a streamed generation as they arrive."""
        r = self.predict_raw(model_name, {"prompt": prompt, "stream": True, **params}, stream=True)
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, "generation")
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
        batching wedges TorchServe 0.12.0's worker (see handler/serving/routes.py): use this instead.
        """
        r = self._call("inference", "GET", f"{self.inference_url}/predictions/{model_name}/{version}/describe")
        if r.status_code != 200:
            raise TorchServeError(r.status_code, r.text, f"reading {model_name}'s report")
        return r.json()

    def metrics(self) -> str:
        return requests.get(f"{self.metrics_url}/metrics", timeout=30).text


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def parse_metric(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one Prometheus metric: [(labels, value)]."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}\{{(.*?)\}} ([0-9.eE+-]+)$", text, flags=re.M):
        labels = dict(re.findall(r'(\w+)="(.*?)"', m.group(1)))
        out.append((labels, float(m.group(2))))
    return out
