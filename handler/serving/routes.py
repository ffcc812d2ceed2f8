"""Routes under `/predictions/<model>/<version>/<suffix>`: TorchServe hands the suffix to the handler.

TorchServe 0.12 puts what follows the version in the request header `url_path`
(empty for `/predictions/<model>` and `/predictions/<model>/<version>`). The
empty suffix is generation (the native API); every other suffix is answered
here, at once, without the engine:

- `describe`: the worker's report (memory breakdown, pool, load, limits), the
  same JSON as `describe_handle`, as an ordinary request. TorchServe's own
  `GET /models/<name>?customized=true` wedges a stock 0.12.0 under continuous
  batching (handler.serving.describe_jobs; gpt2ops/frontend_patch.py); this
  route works on any frontend.
- a mounted API's prefix (`v1/`: the OpenAI-compatible API of
  `handler.serving.openai`): the rest of the suffix goes to that API, which
  answers it at once (`Immediate`, its errors in its own shape) or hands the
  request over for generation (`Handoff`).
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
class Immediate:
    """An answer that needs no generation."""

    body: str
    content_type: str = "application/json"
    status: int = 200  # another API's errors come as immediate answers in that API's shape


@dataclass(frozen=True)
class Handoff:
    """A request that a mounted API prepares and answers itself, generating through the engine.

    `start(request_id, entry, headers)` reads the request and submits its generations: it returns the
    `Immediate` to answer when the request cannot be served (its error in the API's shape), or the running
    call (see `handler.serving.batching.Job.api` for what batching asks of it).
    """

    start: Callable[[str, Any, Mapping[str, Any]], Any]


class Mount(Protocol):
    """An API under a prefix of the suffix (`v1`): it answers the rest of the suffix itself."""

    paths: tuple[str, ...]  # its routes, for the 404 message

    def answer(self, path: str) -> Immediate | Handoff: ...


class Routes:
    def __init__(self, describe: Callable[[], str], mounts: Mapping[str, Mount] | None = None):
        self._routes: dict[str, Callable[[], str]] = {DESCRIBE: describe}
        self._mounts = dict(mounts or {})

    def answer(self, url_path: str) -> Immediate | Handoff | RequestError | None:
        """The answer for this suffix, or None when the request is a generation (the empty suffix)."""
        suffix = (url_path or "").strip("/")
        if not suffix:
            return None
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
        return Immediate(route())
