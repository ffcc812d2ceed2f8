"""What a client receives: the JSON answer, the streamed lines, the error body.

Non-streamed: one JSON object,

    {"generated_text", "full_text", "prompt_tokens", "completion_tokens", "finish_reason",
     "seed" (when the request sampled), "token_ids" (when asked for)}

Streamed (`Content-Type: application/jsonl`): one `{"text": ...}` line per
chunk of settled text; the last line carries the rest of the text and every
field of the answer above. Errors: `RequestError.to_json()`, with the status it names.
"""

from __future__ import annotations

from handler.engine.scheduler import Generation
from handler.serving.errors import json_text

JSON_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/jsonl"


def answer(prompt: str, gen: Generation) -> dict:
    """The answer of a finished generation."""
    params = gen.request.params
    generated = gen.text.text()
    body = {
        "generated_text": generated,
        "full_text": prompt + generated,
        "prompt_tokens": len(gen.request.prompt_ids),
        "completion_tokens": len(gen.tokens),
        "finish_reason": str(gen.finish_reason),
    }
    if params.samples:
        body["seed"] = gen.request.seed
    if params.return_token_ids:
        body["token_ids"] = list(gen.tokens)
    return body


def stream_line(obj: dict) -> str:
    """One line of a streamed answer."""
    return json_text(obj) + "\n"


def final(prompt: str, gen: Generation, stream: bool) -> str:
    """The last thing a finished request receives: its answer, or the stream's last line."""
    body = answer(prompt, gen)
    if stream:
        return stream_line({"text": gen.text.increment(final=True), **body})
    return json_text(body)


def chunk(gen: Generation) -> str:
    """A streamed request's settled new text as one line, or "" when there is none yet."""
    delta = gen.text.increment()
    return stream_line({"text": delta}) if delta else ""
