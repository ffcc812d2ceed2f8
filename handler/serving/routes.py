"""Routes under `/predictions/<model>/<version>/<suffix>`: TorchServe hands the suffix to the handler.

TorchServe 0.12 puts what follows the version in the request header `url_path`
(empty for `/predictions/<model>` and `/predictions/<model>/<version>`). The
empty suffix is generation (the native API); every other suffix is answered
here, at once, without the engine:

- `describe`: the worker's report (memory breakdown, pool, load, limits), the
  same JSON as `describe_handle`. Under continuous batching this is the way to
  read it: TorchServe 0.12.0's `GET /models/<name>?customized=true` puts its
  describe job back at the head of the model's queue after taking it
  (`Model.pollInferJob`), so the worker answers it again and again and never
  gets another request. Through the inference API the report is an ordinary
  request.
- anything else: 404 naming the known suffixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from handler.serving.errors import RequestError

URL_PATH_HEADER = "url_path"
DESCRIBE = "describe"


@dataclass(frozen=True)
class Immediate:
    """An answer that needs no generation."""

    body: str
    content_type: str = "application/json"


class Routes:
    def __init__(self, describe: Callable[[], str]):
        self._routes: dict[str, Callable[[], str]] = {DESCRIBE: describe}

    def answer(self, url_path: str) -> Immediate | RequestError | None:
        """The answer for this suffix, or None when the request is a generation (the empty suffix)."""
        suffix = (url_path or "").strip("/")
        if not suffix:
            return None
        route = self._routes.get(suffix)
        if route is None:
            known = ", ".join(repr(s) for s in sorted(self._routes))
            return RequestError("url_path", f"no route {suffix!r} under /predictions/<model>/<version>/; known: "
                                f"'' (generation), {known}", status=404)
        return Immediate(route())
