"""From a prompt and its checked parameters to the engine's request: tokenized, admitted, seeded, timed.

Every API ends its reading here (`handler.serving.native`, `handler.serving.openai.call`):
the tokenizer, admission (`handler.serving.admission`: positions, pool, time), the
seed drawn when the request gave none, the deadline, and the test-only fault hook.
"""

from __future__ import annotations

import os
import secrets
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Mapping

import torch

from handler.engine.params import SEED_LIMIT, GenerationParams
from handler.engine.scheduler import Request
from handler.serving.admission import Admission
from handler.serving.body import header
from handler.serving.errors import RequestError
from handler.serving.logprobs import TokenStrings
from handler.serving.settings import HandlerSettings

FAULT_HEADER = "X-Fault-Injection"
EXIT_AFTER_S = 0.3


@dataclass
class EngineRequests:
    """Makes the engine's requests for one worker: its settings, tokenizer, model limits and admission."""

    settings: HandlerSettings
    tokenizer: Any
    vocab_size: int
    eos_ids: tuple[int, ...]
    admission: Admission

    @cached_property
    def strings(self) -> TokenStrings:
        """The tokenizer's token strings, as logprobs show them (handler.serving.logprobs)."""
        return TokenStrings(self.tokenizer)

    def make(self, request_id: str, prompt: str, params: GenerationParams, headers: Mapping[str, Any]) -> Request:
        """A prompt and its checked parameters -> the engine's request, tokenized and admitted (RequestError
        when this worker cannot serve it)."""
        prompt_ids = self.tokenizer.encode(prompt)
        if not prompt_ids:
            raise RequestError("prompt", "the prompt has no tokens")
        self.admission.admit(len(prompt_ids), params)
        seed = params.seed if params.seed is not None else secrets.randbelow(SEED_LIMIT)
        return Request(request_id, prompt_ids, params, params.end_ids(self.eos_ids), seed,
                       deadline=self.admission.deadline(),
                       on_admit=self._fault(headers), on_tokens=self._late_fault(headers))

    def _fault(self, headers: Mapping[str, Any]) -> Callable[[], None] | None:
        """Tests only (`handler.fault_injection`): "X-Fault-Injection: oom" fails the request's prefill;
        "exit-soon" ends the worker process EXIT_AFTER_S after the prefill (it dies during an iteration);
        "exit-after-answer" ends it right after it sent the answers of the call that prefilled the request (it
        dies between two iterations: `exit_after_next_answer`; tests/e2e/test_traps.py)."""
        if not self.settings.fault_injection:
            return None
        if header(headers, FAULT_HEADER) == "exit-soon":
            return lambda: threading.Timer(EXIT_AFTER_S, os._exit, (1,)).start()
        if header(headers, FAULT_HEADER) == "exit-after-answer":
            return exit_after_next_answer
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


def exit_after_next_answer() -> None:
    """Tests only: end this worker process as soon as it has sent its next message to the frontend (the answers
    of the call now running). The frontend reads the answers, then the closed connection: its worker thread is
    between two iterations when it learns of the death, so it keeps the jobs it had open (TorchServe 0.12.0's
    `WorkerThread.run` answers only the call in flight) and gives them to the restarted worker
    (handler.serving.orphans)."""
    import socket

    send = socket.socket.sendall

    def sendall_then_exit(sock, data, *args):
        send(sock, data, *args)
        sock.shutdown(socket.SHUT_RDWR)  # the frontend sees the end now, not after the process's memory is torn down
        os._exit(1)

    socket.socket.sendall = sendall_then_exit
