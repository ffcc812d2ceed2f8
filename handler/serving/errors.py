"""The one error type a request can fail with, and how it becomes an HTTP answer.

A `RequestError` always names the request field at fault (or `"body"` for the
body as a whole), so that a client can fix its request without reading logs.
The name is data: a message refers to its own field through `PARAM`
(`handler.engine.params`), and each API renders it in the name it knows the
field by (`spelled`: the OpenAI API says `max_tokens` where the native one says
`max_new_tokens`); no message is rewritten after it was made.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Mapping

from handler.engine.params import InvalidParameter, spell


class RequestError(ValueError):
    """A request that cannot be served as sent.

    `status` is the HTTP status the client gets: 400 for bad input, 413 for a
    body over the limit, 507 where the request is valid but does not fit in the
    memory this worker has, 500 where generation failed for another reason.
    """

    def __init__(self, field: str, message: str | tuple, status: int = 400):
        """`message`: text, or parts where `PARAM` stands for the field's name (handler.engine.params.spell)."""
        self.parts = message if isinstance(message, tuple) else (message,)
        self.name = field
        self.field = field_label(field)
        self.status = status
        super().__init__(self.message)

    @classmethod
    def invalid(cls, err: InvalidParameter) -> "RequestError":
        """A parameter out of its range, as a 400 naming it."""
        return cls(err.field, err.parts)

    @property
    def message(self) -> str:
        return self.spelled(self.name)

    def spelled(self, name: str, names: Mapping[str, str] | None = None) -> str:
        """The message with the field called `name` and the other fields it mentions renamed by `names` (what
        another API calls them)."""
        return spell(self.parts, name, names)

    def with_prefix(self, prefix: str) -> "RequestError":
        """The same error, its message after `prefix` (e.g. which prompt of several it is about)."""
        return RequestError(self.name, (prefix, *self.parts), self.status)

    @property
    def reason(self) -> str:
        return HTTPStatus(self.status).phrase

    def to_json(self) -> str:
        return json_text({  # an error may echo any field name: json_text keeps it encodable
            "code": self.status,
            "type": "InvalidRequest" if self.status == 400 else self.reason.replace(" ", ""),
            "field": self.field,
            "message": self.message,
        })


def fault_while_reading(err: BaseException) -> RequestError:
    """The error a client gets when reading its request failed inside this worker (any API; see the log)."""
    return RequestError("body", f"internal error while reading this request ({type(err).__name__}); see the "
                        "worker log", status=500)


def field_label(name: str) -> str:
    """A field name as every error (native and OpenAI) shows it: the name itself when UTF-8 can carry it, else
    with each unpaired surrogate written as its escape (`"\\udfff"`), so that no answer naming a field the
    client sent can fail to encode. JSON lets a key hold a lone surrogate (`{"\\udfff": 1}`)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(name, str) else name


def json_text(obj: dict) -> str:
    """`obj` as JSON that UTF-8 can always carry: characters as they are, or, when a string holds an unpaired
    surrogate (a field name echoed in an error), every non-ASCII character escaped. TorchServe encodes an
    answer as UTF-8 after the handler has returned, where a failure would kill the worker."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return text


def is_out_of_memory(err: BaseException | None) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or PyTorch's CPU allocator failing."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
