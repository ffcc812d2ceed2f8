"""From one TorchServe request entry to an engine request, or to the error its client gets.

This is the boundary where a request is prepared: reading the body
(`handler.serving.request`), its parameters (`handler.serving.fields`),
the tokenizer, and admission (`handler.serving.admission`). Whatever the
request contains, it comes out as a `Prepared` or a `RequestError` of its own:
nothing raised here reaches TorchServe (which would fail the whole batch), so
a request never takes its neighbours down.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from handler.engine.params import GenerationParams
from handler.engine.scheduler import Request
from handler.serving.admission import Admission
from handler.serving.errors import RequestError
from handler.serving.fields import params_from_request
from handler.serving.request import header, read_request
from handler.serving.settings import HandlerSettings

logger = logging.getLogger(__name__)

FAULT_HEADER = "X-Fault-Injection"
EXIT_AFTER_S = 0.3


@dataclass
class Prepared:
    """A request ready for the engine, with what its answer needs."""

    prompt: str
    request: Request


class Preparation:
    """Prepares requests for one worker: its settings, tokenizer, model limits and admission."""

    def __init__(self, settings: HandlerSettings, tokenizer, vocab_size: int, eos_ids: tuple[int, ...],
                 admission: Admission):
        self.settings = settings
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.admission = admission

    def prepare(self, request_id: str, entry: Any, headers: Mapping[str, Any] | None) -> Prepared | RequestError:
        """One entry of TorchServe's batch (and its headers) -> a Prepared, or the RequestError to answer."""
        try:
            return self._prepare(request_id, entry, headers if isinstance(headers, Mapping) else {})
        except RequestError as err:
            return err
        except Exception as err:  # noqa: BLE001 - an internal fault fails this request alone, never the batch
            logger.exception("preparing request %s failed", request_id)
            return RequestError("body", f"internal error while reading this request ({type(err).__name__}); "
                                "see the worker log", status=500)

    def _prepare(self, request_id: str, entry: Any, headers: Mapping[str, Any]) -> Prepared:
        settings = self.settings
        raw = read_request(entry if isinstance(entry, Mapping) else {}, headers, settings.limits.max_body_bytes)
        params = params_from_request(raw.fields, defaults=settings.defaults, limits=settings.limits,
                                               vocab_size=self.vocab_size)
        return Prepared(raw.prompt, self.engine_request(request_id, raw.prompt, params, headers))

    def engine_request(self, request_id: str, prompt: str, params: GenerationParams,
                       headers: Mapping[str, Any]) -> Request:
        """A prompt and its checked parameters -> the engine's request, tokenized and admitted (RequestError
        when this worker cannot serve it). Also used by another API's requests (handler.serving.openai)."""
        prompt_ids = self.tokenizer.encode(prompt)
        if not prompt_ids:
            raise RequestError("prompt", "the prompt has no tokens")
        self.admission.check(len(prompt_ids), params)
        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        return Request(request_id, prompt_ids, params, params.end_ids(self.eos_ids), seed,
                       deadline=self.admission.deadline(),
                       on_admit=self._fault(headers), on_tokens=self._late_fault(headers))

    def _fault(self, headers: Mapping[str, Any]) -> Callable[[], None] | None:
        """Tests only (`handler.fault_injection`): "X-Fault-Injection: oom" fails the request's prefill;
        "exit-soon" ends the worker process EXIT_AFTER_S after the prefill (a worker dying while the
        frontend waits between two iterations, when its maxBatchDelay is long: tests/e2e/test_traps.py)."""
        if not self.settings.fault_injection:
            return None
        if header(headers, FAULT_HEADER) == "exit-soon":
            return lambda: threading.Timer(EXIT_AFTER_S, os._exit, (1,)).start()
        if header(headers, FAULT_HEADER) != "oom":
            return None

        def out_of_memory() -> None:
            raise torch.OutOfMemoryError(f"simulated out of memory ({FAULT_HEADER}: oom)")

        return out_of_memory

    def _late_fault(self, headers: Mapping[str, Any]) -> Callable[[int], None] | None:
        """Tests only: "X-Fault-Injection: fail-after-first-chunk" fails the request in the engine at its
        second look with new tokens: after the call that answered its first tokens (its first chunk) returned
        (tests/e2e/test_traps.py). One generation per request: the OpenAI API's choices share the hook."""
        if not self.settings.fault_injection or header(headers, FAULT_HEADER) != "fail-after-first-chunk":
            return None
        looks = []

        def fail_after_first_look(tokens: int) -> None:
            looks.append(tokens)
            if len(looks) > 1:
                raise RuntimeError(f"simulated failure after {looks[0]} tokens ({FAULT_HEADER}: "
                                   "fail-after-first-chunk)")

        return fail_after_first_look
