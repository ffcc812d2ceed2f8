"""Log probabilities as clients read them: token ids -> strings, character offsets, and what a chunk may carry.

The engine returns, per token, its id, its logprob and its n most likely alternatives
(`handler.engine.logprobs.TokenLogprob`); it never decodes text. Here they become what both APIs show:

- **Token strings.** What the tokenizer decodes for that id alone. GPT-2's byte-level BPE has tokens that
  are not whole UTF-8 characters (a Chinese character is 3 bytes, often split across 2 tokens); such a
  token is shown as OpenAI shows it, `bytes:` followed by its bytes as `\\xNN` escapes (`"bytes:\\xe4\\xbd"`,
  the backslashes literal). A special token (`<|endoftext|>`) is shown by its name.
- **Offsets.** `text_offset[i]` is the index in the returned text of the first character token i's bytes
  go into: the number of characters that the bytes of the tokens before it decode to (UTF-8, an invalid
  sequence as U+FFFD, as the text itself is decoded). A token that ends inside a character and the one that
  completes it have the same offset; a special token adds nothing to the text (the text leaves it out).
  The token that completes a stop string is kept (its logprob was part of the generation), so the last
  offsets may point at or past the end of a text cut before the stop string.
- **Streaming.** A chunk carries the logprobs of the tokens whose text it completes: a token goes out once
  every character its bytes go into has gone out as text (`Trail.settled`), so the chunks' entries join to
  the whole answer's, in order, each with its offset in the whole text.
- **Numbers.** JSON has no infinity: a logprob of -inf (a token masked out of the processed distribution)
  is shown as -9999.0, as vLLM does.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

BYTES_PREFIX = "bytes:"
LOWEST = -9999.0  # what -inf is shown as (vLLM's)


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte -> that byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_LEVEL = _byte_level_table()


def shown(logprob: float) -> float:
    """A logprob as JSON can carry it: -inf as -9999.0."""
    return max(float(logprob), LOWEST) if not math.isnan(logprob) else LOWEST


class TokenStrings:
    """A tokenizer's token strings and bytes (cached per id): what logprobs show for each token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", ()) or ())
        self._bytes: dict[int, bytes] = {}
        self._strings: dict[int, str] = {}

    def bytes_of(self, token_id: int) -> bytes:
        """The bytes a token adds to the text (none for a special token: the text leaves it out)."""
        cached = self._bytes.get(token_id)
        if cached is None:
            cached = self._bytes[token_id] = self._read_bytes(token_id)
        return cached

    def _read_bytes(self, token_id: int) -> bytes:
        if token_id in self.special:
            return b""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if all(c in BYTE_LEVEL for c in piece):  # byte-level BPE: each character stands for one byte
            return bytes(BYTE_LEVEL[c] for c in piece)
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")

    def string(self, token_id: int) -> str:
        """The token as logprobs show it: its text, `bytes:\\xNN...` when that is not whole UTF-8 characters,
        a special token's name."""
        cached = self._strings.get(token_id)
        if cached is None:
            cached = self._strings[token_id] = self._read_string(token_id)
        return cached

    def _read_string(self, token_id: int) -> str:
        if token_id in self.special:
            return str(self.tokenizer.convert_ids_to_tokens(token_id))
        raw = self.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in raw)


@dataclass(frozen=True)
class Entry:
    """One token as a response shows it: id, string, logprob (None: the prompt's first token) and the
    alternatives (id, logprob), most likely first; its offset in the text it belongs to."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    offset: int


class Trail:
    """The tokens of one text (a prompt, or a generation) in order, with their offsets; which of them a
    stream may send (`settled`), given how many characters of the text went out."""

    def __init__(self, strings: TokenStrings):
        self.strings = strings
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.chars = 0  # characters the tokens so far decode to (bytes of an unfinished character held back)
        self.entries: list[Entry] = []
        self._ends: list[tuple[int, bool]] = []  # per token: characters decoded after it, bytes still held
        self.sent = 0  # entries handed out by `settled`

    def extend(self, scored: Sequence[Any], ids: Sequence[int] | None = None) -> None:
        """Add the scored tokens not seen yet: `scored[i]` a TokenLogprob, or None (a prompt's first token,
        whose id is `ids[i]`)."""
        for i in range(len(self.entries), len(scored)):
            item = scored[i]
            token_id = item.token_id if item is not None else ids[i]
            offset = self.chars
            self.chars += len(self._decoder.decode(self.strings.bytes_of(token_id)))
            held = bool(self._decoder.getstate()[0])
            if item is None:
                self.entries.append(Entry(token_id, None, None, offset))
            else:
                self.entries.append(Entry(token_id, item.logprob, tuple(item.top), offset))
            self._ends.append((self.chars, held))

    def settled(self, text_sent: int | None) -> list[Entry]:
        """The entries not handed out yet whose characters have all gone out (`text_sent` characters of the
        text; None: the text is complete, every entry goes)."""
        end = self.sent
        while end < len(self.entries):
            chars, held = self._ends[end]
            if text_sent is not None and (held or chars > text_sent):
                break
            end += 1
        out = self.entries[self.sent:end]
        self.sent = end
        return out

    def take_settled(self, scored: Sequence[Any], text_sent: int | None) -> list[Entry]:
        """`extend` with the scored tokens so far, then the entries `settled` hands out."""
        self.extend(scored)
        return self.settled(text_sent)


def trail_of(strings: TokenStrings, scored: Sequence[Any], ids: Sequence[int] | None = None) -> Trail:
    trail = Trail(strings)
    trail.extend(scored, ids)
    return trail


# ---- OpenAI's completions `logprobs` object ----


def openai_logprobs(strings: TokenStrings, entries: Iterable[Entry], base: int = 0) -> dict:
    """OpenAI's `logprobs` object of some entries: `tokens`, `token_logprobs`, `top_logprobs` (per token a
    {string: logprob} object of its n most likely alternatives and the chosen token, or null for the prompt's
    first token) and `text_offset` (`base` + the entry's offset)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(strings.string(e.token_id))
        out["token_logprobs"].append(None if e.logprob is None else shown(e.logprob))
        if e.top is None:
            out["top_logprobs"].append(None)
        else:
            top = {strings.string(t): shown(lp) for t, lp in e.top}
            top.setdefault(strings.string(e.token_id), shown(e.logprob))
            out["top_logprobs"].append(top)
        out["text_offset"].append(base + e.offset)
    return out


def join_openai(*parts: dict | None) -> dict | None:
    """OpenAI logprobs objects one after the other (the prompt's, then the generation's); None when none."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return {key: [x for p in parts for x in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                 "text_offset")}


# ---- the native API's ----


def native_logprobs(strings: TokenStrings, entries: Iterable[Entry]) -> list[dict | None]:
    """The native API's entries: `{"token", "token_id", "logprob", "offset", "top_logprobs": [{"token",
    "token_id", "logprob"}, ...]}` per token (the prompt's first token: `{"token", "token_id", "offset"}` with
    `logprob` and `top_logprobs` null)."""
    out = []
    for e in entries:
        out.append({
            "token": strings.string(e.token_id), "token_id": e.token_id,
            "logprob": None if e.logprob is None else shown(e.logprob), "offset": e.offset,
            "top_logprobs": None if e.top is None else [
                {"token": strings.string(t), "token_id": t, "logprob": shown(lp)} for t, lp in e.top],
        })
    return out
