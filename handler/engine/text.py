"""From generated tokens to text: stop strings and the settled increments that streaming sends.

Byte-level BPE splits a Chinese character (3 bytes in UTF-8) across tokens, so
the text of a token prefix can end in an incomplete character (decoded as
U+FFFD). A stream sends only text that can no longer change: it holds back a
trailing U+FFFD and any tail that could still grow into a stop string. The
increments therefore join to exactly the final text.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"

Detokenize = Callable[[list[int]], str]


def detokenizer(tokenizer) -> Detokenize:
    """The one way token ids become text here (the stream and the final answer agree)."""

    def detokenize(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return detokenize


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class IncrementalText:
    """The tokens and text of one request as its tokens arrive."""

    def __init__(self, detokenize: Detokenize | None, stops: tuple[str, ...] = ()):
        if stops and detokenize is None:
            raise ValueError("stop strings need a detokenizer")
        self.detokenize = detokenize
        self.stops = stops
        self.tokens: list[int] = []
        self.sent = 0  # characters already handed out by `increment`
        self.stop_at = -1  # character index where a stop string begins, once found

    def add(self, new_tokens: list[int]) -> int | None:
        """Append tokens; when a stop string appears, return how many tokens to keep (else None)."""
        before = len(self.tokens)
        self.tokens.extend(new_tokens)
        if not self.stops or not new_tokens:
            return None
        if find_stop(self.detokenize(self.tokens), self.stops) < 0:
            return None
        for keep in range(before + 1, len(self.tokens) + 1):  # the first token that completes a stop string
            at = find_stop(self.detokenize(self.tokens[:keep]), self.stops)
            if at >= 0:
                del self.tokens[keep:]
                self.stop_at = at
                return keep
        raise AssertionError("a stop string found in the text is found in a prefix")  # unreachable

    def text(self) -> str:
        """The text so far: everything generated, cut before the stop string if one was found."""
        text = self.detokenize(self.tokens) if self.detokenize is not None else ""
        return text[: self.stop_at] if self.stop_at >= 0 else text

    def increment(self, final: bool = False) -> str:
        """Text not yet handed out that can no longer change (all of it when `final`)."""
        text = self.text()
        if not final and self.stop_at < 0:
            safe = len(text.rstrip(REPLACEMENT))
            safe -= _stop_prefix_len(text[:safe], self.stops)
            text = text[:safe]
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta
