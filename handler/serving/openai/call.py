"""An OpenAI completions request in progress: its mapping to `GenerationParams`, its choices, its chunks.

The request's fields map onto the native request fields (`handler.serving.fields`, which checks ranges
and modes through `GenerationParams`: one home for each rule) in one function, `to_params`:

- `max_tokens` -> `max_new_tokens`; `stop`, `top_p` as they are;
- the decoding: `decoding` when the request names it, else `contrastive` when it
  gives `penalty_alpha`, else from `temperature` (0: `greedy`, > 0: `sample`), else
  `sample` for a `top_p` below 1, else the operator's default (`handler.defaults`:
  contrastive search as shipped). With contrastive decoding a temperature of 0 is
  contrastive search and one above 0 is contrastive sampling at that temperature;
- `seed` seeds the choices when the request samples (choice i of a prompt gets
  seed + i, so that n > 1 gives different texts, reproducibly); deterministic
  decodings need none and drop it.
- `logprobs` -> `logprobs`, and with `echo` also `prompt_logprobs` (as vLLM maps
  them); `max_tokens: 0` only with `echo` (the prompt scored, nothing generated);
  `logit_bias`, the penalties and `min_tokens` under the same names. The answer's
  `logprobs` objects: `handler.serving.logprobs`.

Several choices (a list of prompts, `n` > 1) are several engine generations of
one call (`CompletionCall`, a `handler.serving.call.Call`); it stays open until
all of them are done.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from handler.engine.params import SEED_LIMIT, GenerationParams, InvalidParameter
from handler.engine.core import Engine
from handler.engine.scheduler import Generation
from handler.engine.stopping import FinishReason
from handler.serving.preparation import EngineRequests
from handler.serving.errors import RequestError
from handler.serving.fields import params_from_request
from handler.serving.logprobs import Entry, TokenStrings, Trail, join_openai, openai_logprobs, trail_of
from handler.serving.openai.protocol import (DONE_EVENT, FINISH_REASONS, JSON_CONTENT_TYPE, NATIVE_EXTRAS,
                                             PASSED_ON, SSE_CONTENT_TYPE, CompletionRequest, OpenAIError, as_number,
                                             error_json)
from handler.serving.settings import HandlerSettings


# ---- the mapping: OpenAI fields -> GenerationParams ----


def to_params(request: CompletionRequest, settings: HandlerSettings, vocab_size: int) -> GenerationParams:
    """The request's GenerationParams, through the native field table (RequestError naming the field)."""
    params = params_from_request(native_fields(request.given), defaults=settings.defaults, limits=settings.limits,
                                 vocab_size=vocab_size)
    if params.samples and request.seed is not None:
        try:
            params = replace(params, seed=request.seed)
        except InvalidParameter as err:
            raise RequestError.invalid(err) from None
    return params


def native_fields(given: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI fields and this package's extras -> native request fields (all but the seed).

    The decoding: `decoding` when named; else contrastive when `penalty_alpha` is given; else greedy for
    temperature 0 and sampling above; else sampling for a top_p below 1; else (no field about decoding at
    all) the operator's default, left to the native table. The temperature then means what it means in
    that mode; where it contradicts the mode, 400 naming it.
    """
    native = {name: given[name] for name in NATIVE_EXTRAS + PASSED_ON if name in given}
    if "max_tokens" in given:
        native["max_new_tokens"] = given["max_tokens"]
    native.update(_scoring(given))
    if "stop" in given:
        native["stop"] = given["stop"]
    temperature = as_number("temperature", given["temperature"]) if "temperature" in given else None
    if temperature is not None and temperature < 0:
        raise OpenAIError("temperature", f"temperature must be >= 0, got {temperature:g}")
    top_p = as_number("top_p", given["top_p"]) if "top_p" in given else None
    if top_p is not None and top_p != 1:
        native["top_p"] = top_p  # 1 is no nucleus, in every mode; other values are sampling's (fields.py checks)

    if "decoding" not in native:
        if "penalty_alpha" in native:
            native["decoding"] = "contrastive"
        elif temperature is not None:
            native["decoding"] = "greedy" if temperature == 0 else "sample"
        elif "top_p" in native:
            native["decoding"] = "sample"
    mode = native.get("decoding")
    if temperature is None:
        return native
    if mode == "greedy" and temperature > 0:
        raise OpenAIError("temperature", f"temperature {temperature:g} samples, and decoding='greedy' does not; "
                          "leave temperature out or 0, or drop decoding")
    if mode == "sample":
        if temperature == 0:
            raise OpenAIError("temperature", "temperature 0 is greedy decoding; with decoding='sample' give "
                              "temperature > 0")
        native["temperature"] = temperature
    if mode == "contrastive":  # 0 is contrastive search, above 0 contrastive sampling at that temperature
        if native.get("do_sample") is (temperature == 0):
            raise OpenAIError("temperature", f"temperature {temperature:g} contradicts do_sample="
                              f"{str(native['do_sample']).lower()}: with contrastive decoding temperature 0 is "
                              "contrastive search and above 0 contrastive sampling")
        native["do_sample"] = temperature > 0
        if temperature > 0:
            native["temperature"] = temperature
    return native  # decoding is set whenever a temperature is: no other mode is left


def _scoring(given: Mapping[str, Any]) -> dict[str, Any]:
    """`logprobs` and `echo` -> the native `logprobs` and `prompt_logprobs` (as vLLM maps them): the generated
    tokens' logprobs with n alternatives, and with `echo` the prompt's too. `max_tokens: 0` scores the prompt
    and generates nothing: only with `echo` (the prompt is the whole answer)."""
    native: dict[str, Any] = {}
    echo = given.get("echo") is True
    if "logprobs" in given:
        native["logprobs"] = given["logprobs"]
        if echo:
            native["prompt_logprobs"] = given["logprobs"]
    if given.get("max_tokens") == 0 and not isinstance(given.get("max_tokens"), bool):
        if not echo:
            raise OpenAIError("max_tokens", "max_tokens 0 generates nothing: it is only allowed with echo: true "
                              "(the prompt, scored with logprobs when asked)")
        native.setdefault("prompt_logprobs", 0)  # the engine scores the prompt; shown only when logprobs asks
    return native


# ---- the call: its choices and how its answer looks ----


@dataclass
class Choice:
    index: int
    prompt: str
    generation: Generation
    started: bool = False  # an event of it went out (the echoed prompt goes with the first)
    finished: bool = False  # its event with the finish reason went out
    trail: Trail | None = None  # its generated tokens' logprobs, when asked for


@dataclass
class CompletionCall:
    """One completions request in progress: its choices' generations, and how its answer looks."""

    engine: Engine
    id: str
    model: str
    request: CompletionRequest
    choices: list[Choice]
    prompt_tokens: int
    strings: TokenStrings | None = None  # token strings for logprobs (None: not asked for)
    created: int = field(default_factory=lambda: int(time.time()))
    sent_chunks: bool = False  # an SSE event went out: errors from now on are events too
    failed_early: bool = False  # its error went out before any event: a plain JSON answer

    def __post_init__(self):
        if self.logprobs:
            for choice in self.choices:
                choice.trail = Trail(self.strings)

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def logprobs(self) -> bool:
        """The answer carries OpenAI's `logprobs` objects."""
        return self.request.logprobs is not None

    @property
    def generations(self) -> list[Generation]:
        return [c.generation for c in self.choices]

    @property
    def done(self) -> bool:
        if self.failure() is not None:  # one choice failed: the others stop now, the call answers the error
            for gen in self.generations:
                if not gen.done:
                    self.engine.cancel(gen.request_id)
            return True
        return all(gen.done for gen in self.generations)

    @property
    def content_type(self) -> str:
        return SSE_CONTENT_TYPE if self.stream and not self.failed_early else JSON_CONTENT_TYPE

    def failure(self) -> Generation | None:
        return next((g for g in self.generations if g.finish_reason is FinishReason.ERROR), None)

    # -- streaming --

    def chunk(self) -> str:
        """Events for the choices' new settled text and its tokens' logprobs (and for choices that finished
        while others go on)."""
        if not self.stream:
            return ""
        events = []
        for choice in self.choices:
            gen = choice.generation
            if choice.finished:
                continue
            if gen.done:
                events.append(self._last_event(choice))
                continue
            if not choice.started and self.request.echo and self.logprobs and not self._prompt_scored(choice):
                continue  # the echoed prompt goes out with its logprobs, once the prefill has scored it
            echo, echo_logprobs = self._echo(choice)
            text = gen.text.increment()
            entries = self._settled(choice, final=False)
            if echo or text or entries:
                logprobs = join_openai(echo_logprobs, self._rendered(choice, entries)) if self.logprobs else None
                events.append(self._event([self._choice(choice.index, echo + text, None, logprobs)]))
        if events:
            self.sent_chunks = True
        return "".join(events)

    def final(self) -> str:
        """Every choice done: the answer (JSON), or the stream's last events and `data: [DONE]`."""
        if not self.stream:
            return json.dumps(self.completion(), ensure_ascii=False)
        events = [self._last_event(c) for c in self.choices if not c.finished]
        if self.request.include_usage:
            events.append(self._event([], usage=self.usage()))
        return "".join(events) + DONE_EVENT

    def error(self, error: RequestError, opened: bool) -> str:
        """The body reporting `error`: an error event and the stream's end once events went out, else JSON."""
        if self.stream and (opened or self.sent_chunks):
            return f"data: {error_json(error)}\n\n" + DONE_EVENT
        self.failed_early = True
        return error_json(error)

    # -- shapes --

    def completion(self) -> dict:
        choices = []
        for c in self.choices:
            echo = self.request.echo
            logprobs = None
            if self.logprobs:
                prompt = self._prompt_logprobs(c) if echo else None
                logprobs = join_openai(prompt, self._rendered(c, self._settled(c, final=True)))
            choices.append(self._choice(c.index, (c.prompt if echo else "") + c.generation.text.text(),
                                        FINISH_REASONS.get(c.generation.finish_reason, "stop"), logprobs))
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    def usage(self) -> dict:
        completion_tokens = sum(len(c.generation.tokens) for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _prompt_scored(self, choice: Choice) -> bool:
        gen = choice.generation
        return len(gen.prompt_logprobs) >= len(gen.request.prompt_ids)

    def _prompt_logprobs(self, choice: Choice) -> dict:
        """The echoed prompt's logprobs object: its tokens from offset 0, the first one's logprob null."""
        gen = choice.generation
        return openai_logprobs(self.strings, trail_of(self.strings, gen.prompt_logprobs, gen.request.prompt_ids).entries)

    def _settled(self, choice: Choice, final: bool) -> list[Entry]:
        """The choice's generated tokens whose text has gone out (all of them when `final`), not yet sent."""
        if choice.trail is None:
            return []
        gen = choice.generation
        return choice.trail.take_settled(gen.logprobs, None if final else gen.text.sent)

    def _rendered(self, choice: Choice, entries: list[Entry]) -> dict:
        """Generated tokens' entries as OpenAI's object, offsets counted in the choice's whole text."""
        return openai_logprobs(self.strings, entries, base=len(choice.prompt) if self.request.echo else 0)

    def _echo(self, choice: Choice) -> tuple[str, dict | None]:
        """The echoed prompt and its logprobs, with the choice's first event only."""
        first = not choice.started
        choice.started = True
        if not (first and self.request.echo):
            return "", None
        return choice.prompt, (self._prompt_logprobs(choice) if self.logprobs else None)

    def _last_event(self, choice: Choice) -> str:
        echo, echo_logprobs = self._echo(choice)
        text = echo + choice.generation.text.increment(final=True)
        logprobs = join_openai(echo_logprobs, self._rendered(choice, self._settled(choice, final=True))) \
            if self.logprobs else None
        choice.finished = True
        reason = FINISH_REASONS.get(choice.generation.finish_reason, "stop")
        return self._event([self._choice(choice.index, text, reason, logprobs)])

    @staticmethod
    def _choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
        return {"text": text, "index": index, "finish_reason": finish_reason, "logprobs": logprobs}

    def _event(self, choices: list[dict], usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


def start_completion(request_id: str, request: CompletionRequest, params: GenerationParams, model_id: str,
                     engine_requests: EngineRequests, engine: Engine, headers: Mapping[str, Any]) -> CompletionCall:
    """Admit and submit every choice of a read request: its call (RequestError when one prompt cannot be served,
    and then none of its choices runs)."""
    submissions, prompt_tokens = [], 0
    base_seed = (request.seed if request.seed is not None else secrets.randbelow(SEED_LIMIT)) \
        if params.samples else None
    for p, prompt in enumerate(request.prompts):
        try:
            first = engine_requests.make(f"{request_id}#{p * request.n}", prompt, params, headers)
        except RequestError as err:
            if len(request.prompts) > 1:
                raise err.with_prefix(f"prompt[{p}]: ") from None
            raise
        prompt_tokens += len(first.prompt_ids)
        for j in range(request.n):
            index = p * request.n + j
            seed = (base_seed + j) % SEED_LIMIT if base_seed is not None else first.seed
            submissions.append((index, prompt, replace(first, request_id=f"{request_id}#{index}", seed=seed)))
    choices: list[Choice] = []
    try:
        for index, prompt, engine_request in submissions:
            choices.append(Choice(index, prompt, engine.submit(engine_request)))
    except Exception:
        for choice in choices:
            engine.cancel(choice.generation.request_id)
            engine.forget(choice.generation.request_id)
        raise
    strings = engine_requests.strings if request.logprobs is not None else None
    return CompletionCall(engine, f"cmpl-{request_id}", model_id, request, choices, prompt_tokens, strings)
