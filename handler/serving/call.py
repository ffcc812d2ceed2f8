"""What the serving loop asks of a request in progress, whatever API it came from.

Each API reads its requests, maps them to `GenerationParams`, submits their
generations and returns a `Call` (`handler.serving.native.NativeCall`,
`handler.serving.openai.call.CompletionCall`); the loop (`handler.serving.loop`)
then drives every call the same way: it asks whether it is done, for its new
chunk while it runs, for its answer once done, and for its error body when it fails.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from handler.engine.scheduler import Generation
from handler.serving.errors import RequestError


class Call(Protocol):
    """A request in progress: its generations, and how its chunks, answer and errors look."""

    stream: bool

    @property
    def generations(self) -> list[Generation]: ...

    @property
    def done(self) -> bool: ...  # every generation done (or one failed, and the call ends with its error)

    @property
    def content_type(self) -> str: ...  # of its answer so far: a failure before any chunk is plain JSON

    def chunk(self) -> str: ...  # the new settled text of a running call ("" when none or not streamed)

    def final(self) -> str: ...  # the answer once every generation is done (or the stream's end)

    def failure(self) -> Generation | None: ...  # a generation that failed in the engine, if any

    def error(self, error: RequestError, opened: bool) -> str: ...  # the body that reports `error`


class Api(Protocol):
    """An API's start of a call: read, map, admit and submit one request."""

    def start(self, request_id: str, entry: Any, headers: Mapping[str, Any]) -> Any: ...
    # -> a Call, or what to answer at once: an ReadyAnswer (the API's own error shape) or a RequestError
