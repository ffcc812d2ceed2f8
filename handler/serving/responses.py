"""What a client receives: the JSON answer, the streamed lines, the error body.

Non-streamed: one JSON object,

    {"generated_text", "full_text", "prompt_tokens", "completion_tokens", "finish_reason",
     "seed" (when the request sampled), "token_ids", "logprobs", "prompt_logprobs" (when asked for)}

Streamed (`Content-Type: application/jsonl`): one `{"text": ...}` line per
chunk of settled text (with `logprobs`: the entries of the tokens whose text it
completes); the last line carries the rest of the text and every field of the
answer above (its `logprobs`: the entries no line carried yet). Logprob entries:
`handler.serving.logprobs`. Errors: `RequestError.to_json()`, with the status it names.
"""

from __future__ import annotations

from handler.engine.scheduler import Generation
from handler.serving.errors import json_text
from handler.serving.logprobs import Entry, TokenStrings, Trail, native_logprobs, trail_of

JSON_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/jsonl"


def answer(prompt: str, gen: Generation, strings: TokenStrings | None = None,
           entries: list[Entry] | None = None) -> dict:
    """The answer of a finished generation (`entries`: the generated tokens' logprobs it carries, when they
    are not all of them: a stream's last line)."""
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
    if params.logprobs is not None:
        if entries is None:
            entries = trail_of(strings, gen.logprobs).entries
        body["logprobs"] = native_logprobs(strings, entries)
    if params.prompt_logprobs is not None:
        body["prompt_logprobs"] = native_logprobs(strings, trail_of(strings, gen.prompt_logprobs,
                                                                    gen.request.prompt_ids).entries)
    return body


def stream_line(obj: dict) -> str:
    """One line of a streamed answer."""
    return json_text(obj) + "\n"


def final(prompt: str, gen: Generation, stream: bool, strings: TokenStrings | None = None,
          trail: Trail | None = None) -> str:
    """The last thing a finished request receives: its answer, or the stream's last line (with the logprobs
    of the tokens no line carried yet)."""
    if stream:
        text = gen.text.increment(final=True)
        entries = trail.take_settled(gen.logprobs, None) if trail is not None else None
        return stream_line({"text": text, **answer(prompt, gen, strings, entries)})
    return json_text(answer(prompt, gen, strings))


def chunk(gen: Generation, strings: TokenStrings | None = None, trail: Trail | None = None) -> str:
    """A streamed request's settled new text (and its tokens' logprobs) as one line, or "" when there is none."""
    delta = gen.text.increment()
    if trail is None:
        return stream_line({"text": delta}) if delta else ""
    entries = trail.take_settled(gen.logprobs, gen.text.sent)
    if not (delta or entries):
        return ""
    return stream_line({"text": delta, "logprobs": native_logprobs(strings, entries)})
