"""Routes under `/predictions/<model>/<version>/<suffix>`: TorchServe hands the suffix to the handler.

TorchServe 0.12 puts what follows the version in the request header `url_path`
(empty for `/predictions/<model>` and `/predictions/<model>/<version>`). The
empty suffix is generation through the native API (`handler.serving.native`),
handed over (`ApiStart`); every other suffix is answered here, at once, or by
the API mounted at its prefix:

- `describe`: the worker's report (memory breakdown, pool, load, limits), the
  same JSON as `describe_handle`, as an ordinary request. TorchServe's own
  `GET /models/<name>?customized=true` wedges a stock 0.12.0 under continuous
  batching (handler.serving.describe_jobs; gpt2ops/frontend_patch.py); this
  route works on any frontend.
- a mounted API's prefix (`v1/`: the OpenAI-compatible API of
  `handler.serving.openai.routes`): the rest of the suffix goes to that API, which
  answers it at once (`ReadyAnswer`, its errors in its own shape) or hands the
  request over for generation (`ApiStart`).
- anything else: 404 naming the known suffixes.

TorchServe does not pass the HTTP method to the handler (every method but
OPTIONS reaches it with the same headers), so a route answers whatever the
method; what a request asks for is told by its suffix and its body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from handler.serving.errors import RequestError

URL_PATH_HEADER = "url_path"
DESCRIBE = "describe"


@dataclass(frozen=True)
class ReadyAnswer:
    """An answer that needs no generation."""

    body: str
    content_type: str = "application/json"
    status: int = 200  # another API's errors come as immediate answers in that API's shape


@dataclass(frozen=True)
class ApiStart:
    """A request that an API prepares and answers itself, generating through the engine.

    `start(request_id, entry, headers)` reads the request and submits its generations: it returns what to
    answer at once when the request cannot be served (an `ReadyAnswer` in the API's error shape, or a
    `RequestError`), or the running call (`handler.serving.call.Call`).
    """

    start: Callable[[str, Any, Mapping[str, Any]], Any]


class Mount(Protocol):
    """An API under a prefix of the suffix (`v1`): it answers the rest of the suffix itself."""

    paths: tuple[str, ...]  # its routes, for the 404 message

    def answer(self, path: str) -> ReadyAnswer | ApiStart: ...


class Routes:
    def __init__(self, describe: Callable[[], str], generate: ApiStart, mounts: Mapping[str, Mount] | None = None):
        self._routes: dict[str, Callable[[], str]] = {DESCRIBE: describe}
        self._generate = generate  # the empty suffix: the native API
        self._mounts = dict(mounts or {})

    def answer(self, url_path: str) -> ReadyAnswer | ApiStart | RequestError:
        """The answer for this suffix, or the ApiStart of a generation to its API."""
        suffix = (url_path or "").strip("/")
        if not suffix:
            return self._generate
        prefix, _, rest = suffix.partition("/")
        if prefix in self._mounts:
            return self._mounts[prefix].answer(rest)
        route = self._routes.get(suffix)
        if route is None:
            known = ", ".join(repr(s) for s in sorted(self._routes) + [f"{prefix}/{path}" for prefix, mount in
                                                                     sorted(self._mounts.items())
                                                                     for path in mount.paths])
            return RequestError("url_path", f"no route {suffix!r} under /predictions/<model>/<version>/; known: "
                                f"'' (generation), {known}", status=404)
        return ReadyAnswer(route())
